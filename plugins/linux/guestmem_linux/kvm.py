"""The uAPI face (:mod:`guestmem.api`) implemented with real ioctls on ``/dev/kvm``.

Every object owns its file descriptors and releases them in ``close()`` (also on leaving a
``with`` block).  A VM's ``close()`` also closes the vCPUs it created and unmaps their
``kvm_run`` areas and the guest runner's memory; a guest_memfd's host mappings outlive the
file, as in the kernel (L-6), and are released by their own ``close()``.

Host loads and stores never touch a mapping directly: they go through ``/proc/self/mem``
(``pread``/``pwrite`` at the mapping's address), where an access the kernel would answer
with SIGBUS fails with EIO instead.  That failure is raised as
:class:`guestmem.HostSigbus`; the process never receives the signal.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from typing import Any

from guestmem import api, cabi, uapi
from guestmem.errors import (
    GuestExit,
    HostSigbus,
    InternalErrorExit,
    KvmError,
    MemoryFault,
    MmioExit,
)
from guestmem_linux import _sys, guest

DEV_KVM = "/dev/kvm"


def _closed(what: str) -> KvmError:
    return KvmError(errno.EBADF, "", f"{what} is closed")


class _FdOwner:
    """Owns one descriptor: ``fileno()``, ``closed`` and an idempotent ``close()``."""

    _what = "file"
    _fd: int | None

    @property
    def closed(self) -> bool:
        return self._fd is None

    def fileno(self) -> int:
        """The descriptor number; ValueError once closed, as a closed Python file's."""
        if self._fd is None:
            raise ValueError(f"I/O operation on closed {self._what}")
        return self._fd

    def _fileno(self) -> int:
        """The descriptor for a system call: EBADF once closed, as ``fdget`` fails."""
        if self._fd is None:
            raise _closed(self._what)
        return self._fd

    def close(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self._release()
        finally:
            os.close(fd)

    def _release(self) -> None:
        """Release what the object owns besides its descriptor (before it is closed)."""


class LinuxHostMapping(api.HostMapping):
    """A real host mapping: anonymous memory or a guest_memfd range.

    ``length`` is the mapped length as the kernel mapped it: the ``size_t`` ``mmap(2)``
    read (the argument truncated to 64 bits), a whole number of pages; every host access is
    bounded by it.  *gmem* (size, flags, file offset) lets a SIGBUS be attributed to the
    spec rule that produced it (M-3 beyond EOF, M-4 file not INIT_SHARED).
    """

    def __init__(self, address: int, length: int, gmem: tuple[int, int, int] | None = None) -> None:
        self.address = address
        # ksys_mmap_pgoff reads a size_t; do_mmap maps PAGE_ALIGN(len) (0 never maps: EINVAL).
        self.length = (cabi.size_t(length, "length") + uapi.PAGE_SIZE - 1) & ~(uapi.PAGE_SIZE - 1)
        self._gmem = gmem
        self._mem: int | None = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)

    @property
    def closed(self) -> bool:
        return self._mem is None

    def close(self) -> None:
        if self._mem is None:
            return
        mem, self._mem = self._mem, None
        try:
            _sys.munmap(self.address, self.length)
        finally:
            os.close(mem)

    def _sigbus(self, offset: int) -> HostSigbus:
        address = self.address + offset
        if self._gmem is None:
            return HostSigbus(address, "", "host access failed")
        size, flags, file_offset = self._gmem
        page_offset = (file_offset + offset) & ~(uapi.PAGE_SIZE - 1)
        if page_offset >= size:
            return HostSigbus(address, "M-3", f"guest_memfd offset {page_offset:#x} is beyond EOF {size:#x}")
        if not flags & uapi.GUEST_MEMFD_FLAG_INIT_SHARED:
            return HostSigbus(address, "M-4", "guest_memfd lacks GUEST_MEMFD_FLAG_INIT_SHARED")
        return HostSigbus(address, "M-5", "guest_memfd fault failed")

    def read(self, offset: int, n: int) -> bytes:
        offset, n = api.host_access_arguments(offset, n, self.length, self._mem is None)
        mem = self._mem
        assert mem is not None
        out = bytearray()
        while len(out) < n:
            try:
                chunk = os.pread(mem, n - len(out), self.address + offset + len(out))
            except OSError:
                chunk = b""
            if not chunk:
                raise self._sigbus(offset + len(out))
            out += chunk
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        offset = cabi.index(offset, "offset")
        data = cabi.buffer(data, "data")
        offset, _ = api.host_access_arguments(offset, len(data), self.length, self._mem is None)
        mem = self._mem
        assert mem is not None
        done = 0
        while done < len(data):
            try:
                count = os.pwrite(mem, data[done:], self.address + offset + done)
            except OSError:
                count = 0
            if count <= 0:
                raise self._sigbus(offset + done)
            done += count

    def madvise(self, advice: int, offset: int = 0, length: int | None = None) -> None:
        """``madvise(2)`` of ``[offset, offset + length)`` of this mapping; the range is
        checked first (:func:`guestmem.api.madvise_range`), so no other mapping of the
        process is ever touched."""
        found = api.madvise_range(self, advice, offset, length)
        if found is not None:
            _sys.madvise(self.address + found[0], found[1], advice)


class LinuxGuestMemfd(_FdOwner, api.GuestMemfd):
    """A guest_memfd file descriptor returned by ``KVM_CREATE_GUEST_MEMFD``."""

    _what = "guest_memfd"

    def __init__(self, fd: int, size: int, flags: int) -> None:
        self._fd = fd
        self.size = size
        self.flags = flags

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)``: ``int mode, loff_t offset, loff_t len``."""
        args = cabi.c_int(mode, "mode"), cabi.loff_t(offset, "offset"), cabi.loff_t(length, "length")
        _sys.fallocate(self._fileno(), *args)

    def read(self, n: int) -> bytes:
        """``read(2)`` of a ``size_t`` count."""
        return _sys.read(self._fileno(), cabi.size_t(n, "n"))

    def write(self, data: bytes) -> int:
        """``write(2)`` of bytes-like *data*."""
        data = cabi.buffer(data, "data")
        try:
            return os.write(self._fileno(), data)
        except OSError as exc:
            raise _sys.error(exc.errno or errno.EINVAL, "write(guest_memfd)", "F-1") from None

    def fstat(self) -> os.stat_result:
        return os.fstat(self._fileno())

    def dup(self) -> LinuxGuestMemfd:
        """``dup(2)``: a second descriptor of the same guest_memfd file (``os.dup``)."""
        return LinuxGuestMemfd(os.dup(self._fileno()), self.size, self.flags)

    def truncate(self, size: int) -> None:
        """``ftruncate(2)`` of a ``loff_t`` size."""
        size = cabi.loff_t(size, "size")
        _sys.ftruncate(self._fileno(), size)

    def mmap(self, length: int, offset: int = 0, shared: bool = True) -> LinuxHostMapping:
        """``mmap(2)``: a ``size_t`` length at an ``off_t`` offset."""
        length, offset = cabi.size_t(length, "length"), cabi.off_t(offset, "offset")
        flags = _sys.MAP_SHARED if shared else _sys.MAP_PRIVATE
        address = _sys.mmap(length, _sys.PROT_READ | _sys.PROT_WRITE, flags, self._fileno(), offset)
        return LinuxHostMapping(address, length, (self.size, self.flags, offset))


class LinuxVcpu(_FdOwner, api.Vcpu):
    """A vCPU; :meth:`access` runs the guest program of :mod:`guestmem_linux.guest`."""

    def __init__(self, vm: LinuxVm, fd: int, vcpu_id: int, run_size: int) -> None:
        self.vcpu_id = vcpu_id
        self._vm = vm
        self._what = f"vCPU {vcpu_id}"
        self._fd = fd
        self._run_size = run_size
        try:
            self._run = _sys.mmap(run_size, _sys.PROT_READ | _sys.PROT_WRITE, _sys.MAP_SHARED, fd, 0)
        except KvmError:
            os.close(fd)
            raise
        self._sregs: bytearray | None = None

    def _release(self) -> None:
        _sys.munmap(self._run, self._run_size)

    # --- kvm_run ------------------------------------------------------------------------
    def _run_bytes(self, offset: int, n: int) -> bytes:
        return ctypes.string_at(self._run + offset, n)

    def _kvm_run(self) -> int:
        """One ``KVM_RUN``; returns the exit reason, raises MemoryFault/KvmError on -1."""
        fd = self._fileno()
        while True:
            try:
                _sys.ioctl_int(fd, uapi.KVM_RUN, 0)
            except KvmError as exc:
                if exc.errno == errno.EINTR:
                    continue
                err = exc.errno or errno.EIO
                exit_reason = self._exit_reason()
                if err in (errno.EFAULT, _sys.EHWPOISON) and exit_reason == uapi.KVM_EXIT_MEMORY_FAULT:
                    flags, gpa, size = _sys.RUN_MEMORY_FAULT.unpack(self._run_bytes(_sys.RUN_UNION, 24))
                    raise MemoryFault(err, gpa, size, flags, "G-3", "KVM_RUN") from None
                raise
            return self._exit_reason()

    def _exit_reason(self) -> int:
        (reason,) = _sys.RUN_EXIT_REASON.unpack(self._run_bytes(8, 4))
        return int(reason)

    def _complete_pending_io(self) -> None:
        """Let KVM finish an MMIO exit (``immediate_exit``) so the next access starts clean."""
        ctypes.memset(self._run + _sys.RUN_IMMEDIATE_EXIT, 1, 1)
        try:
            _sys.ioctl_int(self._fileno(), uapi.KVM_RUN, 0)
        except KvmError as exc:
            if exc.errno != errno.EINTR:
                raise
        finally:
            ctypes.memset(self._run + _sys.RUN_IMMEDIATE_EXIT, 0, 1)

    # --- the uAPI face ------------------------------------------------------------------
    def access(
        self,
        gpa: int,
        length: int = 1,
        *,
        write: bool = False,
        data: bytes | None = None,
        private: bool | None = None,
    ) -> bytes | None:
        """A guest load or store performed by the guest program (see :mod:`.guest`).

        The real ``KVM_X86_DEFAULT_VM`` makes shared accesses only: ``private=True`` raises
        ``KvmError(EINVAL)``; ``private=False`` is the same as ``None``.
        """
        # the arguments as every backend takes them (api.access_arguments): data means a store
        gpa, length, data = api.access_arguments(gpa, length, write, data)
        write = data is not None
        if private:
            raise KvmError(errno.EINVAL, "", "a KVM_X86_DEFAULT_VM guest cannot make private accesses")
        if length > guest.BOUNCE_SIZE:
            raise KvmError(
                errno.EINVAL, "", f"guest access length {length:#x} outside [1, {guest.BOUNCE_SIZE:#x}]"
            )
        if gpa + length > guest.RUNNER_GPA:
            raise KvmError(
                errno.EINVAL,
                "",
                f"gpa range [{gpa:#x}, {gpa + length:#x}) not below the runner slot at {guest.RUNNER_GPA:#x}",
            )
        with self._vm.runner_lock:  # one bounce buffer per VM: its vCPUs' threads take turns
            return self._access(gpa, length, write, data)

    def _access(self, gpa: int, length: int, write: bool, data: bytes | None) -> bytes | None:
        bounce = self._vm.runner_buffer()
        fd = self._fileno()
        if self._sregs is None:
            sregs = bytearray(_sys.SREGS_SIZE)
            _sys.ioctl_buf(fd, _sys.KVM_GET_SREGS, sregs)
            self._sregs = guest.flat_protected_sregs(sregs)
        _sys.ioctl_buf(fd, _sys.KVM_SET_SREGS, bytearray(self._sregs))
        if write:
            assert data is not None
            ctypes.memmove(bounce, data, length)
            program = guest.regs(guest.BOUNCE_GPA, gpa, length)
        else:
            program = guest.regs(gpa, guest.BOUNCE_GPA, length)
        _sys.ioctl_buf(fd, _sys.KVM_SET_REGS, program)
        reason = self._kvm_run()
        if reason == uapi.KVM_EXIT_IO:
            _direction, _size, port, _count, _offset = _sys.RUN_IO.unpack(
                self._run_bytes(_sys.RUN_UNION, _sys.RUN_IO.size)
            )
            if port == guest.DONE_PORT:
                return None if write else ctypes.string_at(bounce, length)
            raise GuestExit(f"KVM_EXIT_IO on unexpected port {port:#x}")
        if reason == uapi.KVM_EXIT_MMIO:
            mmio = self._run_bytes(_sys.RUN_UNION, _sys.RUN_MMIO.size)
            phys, _data, size, is_write = _sys.RUN_MMIO.unpack(mmio)
            self._complete_pending_io()
            raise MmioExit(phys, size, bool(is_write))
        if reason == uapi.KVM_EXIT_INTERNAL_ERROR:
            internal = self._run_bytes(_sys.RUN_UNION, _sys.RUN_INTERNAL.size)
            suberror, _ndata = _sys.RUN_INTERNAL.unpack(internal)
            raise InternalErrorExit(suberror)
        raise GuestExit(f"unexpected exit reason {reason} during a guest access at gpa {gpa:#x}")

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> int:
        """``KVM_PRE_FAULT_MEMORY`` with :class:`guestmem.uapi.KvmPreFaultMemory`."""
        buf = bytearray(_sys.PRE_FAULT.pack(*uapi.KvmPreFaultMemory.of(gpa, size, flags)))
        _sys.ioctl_buf(self._fileno(), uapi.KVM_PRE_FAULT_MEMORY, buf)
        _gpa, left, _flags = _sys.PRE_FAULT.unpack(buf)
        return int(left)


class LinuxVm(_FdOwner, api.Vm):
    """A VM file descriptor (``KVM_CREATE_VM``)."""

    _what = "VM"

    def __init__(self, fd: int, vm_type: int, run_size: int) -> None:
        self._fd = fd
        self.vm_type = vm_type
        self._run_size = run_size
        self._vcpus: list[LinuxVcpu] = []
        self._runner_memory: int | None = None
        #: Held by a vCPU's guest access from installing the runner to reading its bounce
        #: buffer: the kernel runs vCPUs of several threads at once, the runner has one buffer.
        self.runner_lock = threading.Lock()

    def _release(self) -> None:
        for vcpu in self._vcpus:
            vcpu.close()
        self._vcpus.clear()
        if self._runner_memory is not None:
            memory, self._runner_memory = self._runner_memory, None
            _sys.munmap(memory, guest.RUNNER_SIZE)

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` of a ``long`` capability."""
        cap = cabi.long(cap, "cap")
        return _sys.ioctl_int(self._fileno(), uapi.KVM_CHECK_EXTENSION, cap)

    def create_guest_memfd(self, size: int, flags: int = 0) -> LinuxGuestMemfd:
        """``KVM_CREATE_GUEST_MEMFD`` with :class:`guestmem.uapi.KvmCreateGuestMemfd`."""
        args = uapi.KvmCreateGuestMemfd.of(size, flags)
        buf = bytearray(_sys.CREATE_GMEM.pack(*args))
        fd = _sys.ioctl_buf(self._fileno(), uapi.KVM_CREATE_GUEST_MEMFD, buf)
        return LinuxGuestMemfd(fd, *args)

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION``: the first five fields of
        :class:`guestmem.uapi.KvmUserspaceMemoryRegion2`."""
        mem = uapi.KvmUserspaceMemoryRegion2.of(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        buf = bytearray(_sys.REGION.pack(*mem[:5]))
        _sys.ioctl_buf(self._fileno(), uapi.KVM_SET_USER_MEMORY_REGION, buf)

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int = 0,
        guest_memfd: Any = None,
        guest_memfd_offset: int = 0,
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION2`` with :class:`guestmem.uapi.KvmUserspaceMemoryRegion2`."""
        mem = uapi.KvmUserspaceMemoryRegion2.of(
            slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd_offset, guest_memfd
        )
        buf = bytearray(_sys.REGION2.pack(*mem, 0))
        _sys.ioctl_buf(self._fileno(), uapi.KVM_SET_USER_MEMORY_REGION2, buf)

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES`` with :class:`guestmem.uapi.KvmMemoryAttributes`."""
        buf = bytearray(_sys.ATTRIBUTES.pack(*uapi.KvmMemoryAttributes.of(address, size, attributes, flags)))
        _sys.ioctl_buf(self._fileno(), uapi.KVM_SET_MEMORY_ATTRIBUTES, buf)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> int:
        """``KVM_ENABLE_CAP`` with :class:`guestmem.uapi.KvmEnableCap`."""
        request = uapi.KvmEnableCap.of(cap, flags, args)
        values = (*request.args, 0, 0, 0, 0)[:4]
        buf = bytearray(_sys.ENABLE_CAP.pack(request.cap, request.flags, *values))
        return _sys.ioctl_buf(self._fileno(), uapi.KVM_ENABLE_CAP, buf)

    def memory_encrypt_op(self, cmd: Any) -> int:
        """``KVM_MEMORY_ENCRYPT_OP`` with *cmd* as the bytes of the vendor's command struct
        (a ``bytearray`` is updated in place); a VM without such commands answers ENOTTY."""
        buf = cmd if isinstance(cmd, bytearray) else bytearray(64 if cmd is None else cabi.buffer(cmd, "cmd"))
        return _sys.ioctl_buf(self._fileno(), uapi.KVM_MEMORY_ENCRYPT_OP, buf)

    def create_vcpu(self, vcpu_id: int) -> LinuxVcpu:
        """``KVM_CREATE_VCPU`` of an ``unsigned long`` id."""
        vcpu_id = cabi.ulong(vcpu_id, "vcpu_id")
        fd = _sys.ioctl_int(self._fileno(), uapi.KVM_CREATE_VCPU, vcpu_id)
        vcpu = LinuxVcpu(self, fd, vcpu_id, self._run_size)
        self._vcpus.append(vcpu)
        return vcpu

    def runner_buffer(self) -> int:
        """Install the runner slot on first use; returns the host address of the bounce buffer."""
        if self._runner_memory is None:
            memory = _sys.mmap(
                guest.RUNNER_SIZE,
                _sys.PROT_READ | _sys.PROT_WRITE,
                _sys.MAP_PRIVATE | _sys.MAP_ANONYMOUS | _sys.MAP_NORESERVE,
                -1,
                0,
            )
            ctypes.memmove(memory, guest.CODE, len(guest.CODE))
            try:
                self.set_user_memory_region(guest.RUNNER_SLOT, 0, guest.RUNNER_GPA, guest.RUNNER_SIZE, memory)
            except KvmError as exc:
                _sys.munmap(memory, guest.RUNNER_SIZE)
                raise KvmError(
                    exc.errno or errno.EINVAL,
                    "",
                    f"cannot install the guest runner (slot {guest.RUNNER_SLOT}, gpa {guest.RUNNER_GPA:#x}"
                    f"+{guest.RUNNER_SIZE:#x}; keep both free for Vcpu.access): {exc.strerror}",
                ) from None
            self._runner_memory = memory
        return self._runner_memory + (guest.BOUNCE_GPA - guest.RUNNER_GPA)


class LinuxKvm(_FdOwner, api.Kvm):
    """``/dev/kvm`` of the running kernel."""

    backend = "linux"
    _what = "/dev/kvm"

    def __init__(self, path: str = DEV_KVM) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            err = exc.errno or errno.ENOENT
            raise KvmError(
                err, "", f"cannot open {path} ({os.strerror(err)}): the linux backend needs a kernel with KVM"
            ) from None
        self._fd = fd
        self.path = path
        try:
            self._run_size = _sys.ioctl_int(fd, uapi.KVM_GET_VCPU_MMAP_SIZE, 0)
        except KvmError:
            os.close(fd)
            raise

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` of a ``long`` capability."""
        cap = cabi.long(cap, "cap")
        return _sys.ioctl_int(self._fileno(), uapi.KVM_CHECK_EXTENSION, cap)

    def create_vm(self, vm_type: int = 0) -> LinuxVm:
        """``KVM_CREATE_VM`` of an ``unsigned long`` type."""
        vm_type = cabi.ulong(vm_type, "vm_type")
        fd = _sys.ioctl_int(self._fileno(), uapi.KVM_CREATE_VM, vm_type)
        return LinuxVm(fd, vm_type, self._run_size)

    def mmap_anonymous(self, length: int) -> LinuxHostMapping:
        """``mmap(2)`` of a ``size_t`` length of anonymous shared memory."""
        length = cabi.size_t(length, "length")
        address = _sys.mmap(
            length, _sys.PROT_READ | _sys.PROT_WRITE, _sys.MAP_SHARED | _sys.MAP_ANONYMOUS, -1, 0
        )
        return LinuxHostMapping(address, length)
