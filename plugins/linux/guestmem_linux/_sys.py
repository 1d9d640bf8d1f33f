"""System-call plumbing: ioctl numbers beyond guestmem.uapi, struct layouts, libc calls.

Everything goes through the standard library (``fcntl``, ``mmap``, ``os``, ``ctypes`` on
the C library already loaded in the process); there is no compiled extension.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from typing import Final

from guestmem import cabi, uapi
from guestmem.errors import EHWPOISON, KvmError

__all__ = ["EHWPOISON"]

# --- ioctls the guest runner needs (x86 uAPI; _IOR/_IOW(KVMIO, nr, struct)) -------------
KVM_GET_REGS: Final = 0x8090AE81  # _IOR(KVMIO, 0x81, struct kvm_regs)      144 bytes
KVM_SET_REGS: Final = 0x4090AE82  # _IOW(KVMIO, 0x82, struct kvm_regs)
KVM_GET_SREGS: Final = 0x8138AE83  # _IOR(KVMIO, 0x83, struct kvm_sregs)    312 bytes
KVM_SET_SREGS: Final = 0x4138AE84  # _IOW(KVMIO, 0x84, struct kvm_sregs)

REGS_SIZE: Final = 144
SREGS_SIZE: Final = 312

# struct layouts (spec section 1.3)
REGION: Final = struct.Struct("<IIQQQ")  # kvm_userspace_memory_region, 32 bytes
REGION2: Final = struct.Struct("<IIQQQQII112x")  # kvm_userspace_memory_region2, 160 bytes
ATTRIBUTES: Final = struct.Struct("<QQQQ")  # kvm_memory_attributes, 32 bytes
CREATE_GMEM: Final = struct.Struct("<QQ48x")  # kvm_create_guest_memfd, 64 bytes
PRE_FAULT: Final = struct.Struct("<QQQ40x")  # kvm_pre_fault_memory, 64 bytes
ENABLE_CAP: Final = struct.Struct("<II4Q64x")  # kvm_enable_cap, 104 bytes

# kvm_run
RUN_EXIT_REASON: Final = struct.Struct("<I")  # at offset 8
RUN_UNION: Final = 32
RUN_MEMORY_FAULT: Final = struct.Struct("<QQQ")  # flags, gpa, size
RUN_MMIO: Final = struct.Struct("<Q8sIB")  # phys_addr, data[8], len, is_write
RUN_IO: Final = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
RUN_INTERNAL: Final = struct.Struct("<II")  # suberror, ndata
RUN_IMMEDIATE_EXIT: Final = 1

PROT_READ: Final = 0x1
PROT_WRITE: Final = 0x2
MAP_SHARED: Final = 0x01
MAP_PRIVATE: Final = 0x02
MAP_ANONYMOUS: Final = 0x20
MAP_NORESERVE: Final = 0x4000
MAP_FAILED: Final = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int
_libc.ftruncate.argtypes = [ctypes.c_int, ctypes.c_int64]
_libc.ftruncate.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_libc.read.restype = ctypes.c_ssize_t


def ioctl_name(request: int) -> str:
    """The uAPI name of *request* for messages (``0x...`` if unknown)."""
    for name in dir(uapi):
        if name.startswith("KVM_") and getattr(uapi, name) == request and not name.startswith("KVM_CAP"):
            return name
    for name, value in globals().items():
        if name.startswith("KVM_") and value == request:
            return name
    return f"ioctl {request:#x}"


def error(err: int, what: str, rule: str = "") -> KvmError:
    """The :class:`KvmError` for *what* failing with *err*."""
    return KvmError(err, rule, f"{what}: {os.strerror(err)}")


def ioctl_int(fd: int, request: int, arg: int = 0) -> int:
    """An ioctl whose argument is an integer, passed as the ``unsigned long`` the kernel
    reads (:func:`guestmem.cabi.ulong`); returns the kernel's return value."""
    ret = _libc.ioctl(fd, request, cabi.ulong(arg, "arg"))
    if ret < 0:
        raise error(ctypes.get_errno() or errno.EIO, ioctl_name(request))
    return int(ret)


def ioctl_buf(fd: int, request: int, buf: bytearray) -> int:
    """An ioctl on a struct (read and written in place); returns the kernel's return value."""
    try:
        return int(fcntl.ioctl(fd, request, buf, True))
    except OSError as exc:
        raise error(exc.errno or errno.EIO, ioctl_name(request)) from None


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` through the C library (``os.posix_fallocate`` has no *mode*)."""
    offset, length = cabi.loff_t(offset, "offset"), cabi.loff_t(length, "length")
    if _libc.fallocate(fd, cabi.c_int(mode, "mode"), offset, length) != 0:
        raise error(ctypes.get_errno(), f"fallocate(mode={mode:#x}, offset={offset:#x}, len={length:#x})")


def ftruncate(fd: int, length: int) -> None:
    """``ftruncate(2)`` with *length* as the ``loff_t`` the kernel reads."""
    if _libc.ftruncate(fd, cabi.loff_t(length, "length")) != 0:
        raise error(ctypes.get_errno(), f"ftruncate(length={length:#x})", "F-3")


def read(fd: int, count: int) -> bytes:
    """``read(2)`` of *count* bytes, *count* as the ``size_t`` the kernel reads.

    A count beyond what the process would buffer is passed with a NULL buffer: the kernel
    checks the file's mode first and would fail a real transfer with EFAULT, never
    touching memory.
    """
    count = cabi.size_t(count, "count")
    buf = ctypes.create_string_buffer(count) if count <= 1 << 20 else None
    n = _libc.read(fd, buf, count)
    if n < 0:
        raise error(ctypes.get_errno(), "read", "F-1")
    return b"" if buf is None else buf.raw[:n]


def mmap(length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    """``mmap(2)`` through the C library; returns the address."""
    addr = _libc.mmap(None, cabi.size_t(length, "length"), prot, flags, fd, cabi.off_t(offset, "offset"))
    if addr is None or addr == MAP_FAILED:
        raise error(ctypes.get_errno(), f"mmap(length={length:#x}, offset={offset:#x}, flags={flags:#x})")
    return int(addr)


def madvise(address: int, length: int, advice: int) -> None:
    """``madvise(2)``."""
    if _libc.madvise(address, length, advice) != 0:
        raise error(ctypes.get_errno(), f"madvise({address:#x}, {length:#x}, {advice})")


def munmap(address: int, length: int) -> None:
    """``munmap(2)``."""
    if _libc.munmap(address, length) != 0:
        raise error(ctypes.get_errno(), f"munmap({address:#x}, {length:#x})")
