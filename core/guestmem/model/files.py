"""File descriptors of the model: the guest_memfd fd (spec 2.C-2.E)."""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import TYPE_CHECKING

from guestmem import api, cabi, uapi
from guestmem.backend import GmemView
from guestmem.errors import KvmError
from guestmem.model.mapping import GmemVma, ModelHostMapping
from guestmem.model.operation import uapi_call

if TYPE_CHECKING:
    from guestmem.model.gmem import GmemFile
    from guestmem.model.kvm import ModelKvm

PAGE_SIZE = uapi.PAGE_SIZE
PAGE_SHIFT = uapi.PAGE_SHIFT
# fs/open.c vfs_fallocate: FALLOC_FL_MODE_MASK | FALLOC_FL_KEEP_SIZE (6.18).
_VFS_FALLOC_MODES = 0x01 | 0x02 | 0x08 | 0x10 | 0x20 | 0x40 | 0x80


def mmap_length(length: int, offset: int = 0) -> int:
    """The checks of ``mmap(2)`` before the file is involved (``ksys_mmap_pgoff``,
    ``do_mmap``, ``get_unmapped_area``); returns the page-aligned length.

    *length* is the ``size_t`` and *offset* the ``off_t`` of ``mmap(2)``, both reaching
    the x86-64 system call as ``unsigned long`` (:mod:`guestmem.cabi`).
    """
    offset = cabi.off_t(offset, "offset") & uapi.U64_MAX
    length = cabi.size_t(length, "length")
    if offset % PAGE_SIZE:
        raise KvmError(errno.EINVAL, "", f"mmap offset {offset:#x} is not page aligned")
    if length == 0:
        raise KvmError(errno.EINVAL, "", "mmap length is zero")
    length = (length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1) & uapi.U64_MAX
    if length == 0:
        raise KvmError(errno.ENOMEM, "", "mmap length overflows when rounded to pages")
    if (offset >> PAGE_SHIFT) + (length >> PAGE_SHIFT) > uapi.U64_MAX:
        raise KvmError(errno.EOVERFLOW, "", "mmap page offset + length overflows")
    if length > uapi.TASK_SIZE:
        raise KvmError(errno.ENOMEM, "", f"mmap length {length:#x} exceeds the user address space")
    return length


class ModelGuestMemfd(api.GuestMemfd):
    """A guest_memfd fd of the model; holds one reference to its file."""

    def __init__(self, kvm: ModelKvm, file: GmemFile) -> None:
        self.kvm = kvm
        self.file = file
        self.size = file.inode.size
        self.flags = file.inode.flags
        file.get()
        self._fd: int | None = kvm.fd_install(self)

    def __repr__(self) -> str:
        return f"<ModelGuestMemfd fd={self._fd} ino={self.file.inode.ino:#x} size={self.size:#x}>"

    @property
    def closed(self) -> bool:
        return self._fd is None

    @property
    def inode(self) -> object:
        """The :class:`~guestmem.model.gmem.GmemInode` behind this fd."""
        return self.file.inode

    @property
    def backend_view(self) -> GmemView:
        """:func:`guestmem.backend.view` of this file: its inode."""
        return self.file.inode.view

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("I/O operation on closed guest_memfd")
        return self._fd

    def _check(self) -> None:
        if self._fd is None:
            raise KvmError(errno.EBADF, "", "guest_memfd is closed")
        self.kvm.host.check_alive()

    @uapi_call
    def close(self) -> None:
        if self._fd is None:
            return
        self.kvm.fd_remove(self._fd)
        self._fd = None
        self.file.put()

    @uapi_call
    def dup(self) -> ModelGuestMemfd:
        """``dup(2)``: another descriptor (the lowest free number) of the same file (F-4)."""
        self._check()
        return ModelGuestMemfd(self.kvm, self.file)

    @uapi_call
    def read(self, n: int) -> bytes:
        """F-1: guest_memfd has no read op (*n* is the ``size_t`` count of ``read(2)``)."""
        cabi.size_t(n, "n")
        self._check()
        raise KvmError(errno.EINVAL, "F-1", "guest_memfd does not support read()")

    @uapi_call
    def write(self, data: bytes) -> int:
        """F-1: guest_memfd has no write op (*data* is bytes-like, as :func:`os.write`'s)."""
        cabi.buffer(data, "data")
        self._check()
        raise KvmError(errno.EINVAL, "F-1", "guest_memfd does not support write()")

    @uapi_call
    def truncate(self, size: int) -> None:
        """F-3: ``kvm_gmem_setattr`` refuses every change (*size* is the ``loff_t`` of
        ``ftruncate(2)``)."""
        cabi.loff_t(size, "size")
        self._check()
        raise KvmError(errno.EINVAL, "F-3", "guest_memfd size can never change")

    @uapi_call
    def fstat(self) -> os.stat_result:
        """F-2: ``st_size`` = create size, ``st_blksize`` = PAGE_SIZE, distinct ``st_ino``."""
        self._check()
        inode = self.file.inode
        mtime = inode.mtime_ns
        # (mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime); the rest by name.
        return os.stat_result(
            (stat.S_IFREG | 0o600, inode.ino, 0, 1, 0, 0, inode.size, 0, mtime // 10**9, mtime // 10**9),
            {
                "st_blksize": PAGE_SIZE,
                "st_blocks": 0,  # the page cache of guest_memfd does not account i_blocks
                "st_mtime": mtime / 1e9,
                "st_ctime": mtime / 1e9,
                "st_mtime_ns": mtime,
                "st_ctime_ns": mtime,
            },
        )

    @uapi_call
    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)`` (FA-1..FA-11): ``int mode, loff_t offset, loff_t len``."""
        mode = cabi.c_int(mode, "mode")
        offset = cabi.loff_t(offset, "offset")
        length = cabi.loff_t(length, "length")
        self._check()
        if offset < 0 or length <= 0:
            raise KvmError(errno.EINVAL, "FA-1", "offset < 0 or len <= 0")
        if mode & ~_VFS_FALLOC_MODES:
            raise KvmError(errno.EOPNOTSUPP, "FA-1", f"unknown fallocate mode bits {mode:#x}")
        # vfs_fallocate: the modes are exclusive; PUNCH_HOLE needs KEEP_SIZE, COLLAPSE/INSERT/
        # WRITE_ZEROES refuse it.  All before the EFBIG check.
        keep = bool(mode & uapi.FALLOC_FL_KEEP_SIZE)
        match mode & ~uapi.FALLOC_FL_KEEP_SIZE:
            case 0x00 | 0x10 | 0x40:  # ALLOCATE_RANGE, ZERO_RANGE, UNSHARE_RANGE
                pass
            case uapi.FALLOC_FL_PUNCH_HOLE if not keep:
                raise KvmError(errno.EOPNOTSUPP, "FA-1", "PUNCH_HOLE requires KEEP_SIZE")
            case 0x08 | 0x20 | 0x80 if keep:  # COLLAPSE_RANGE, INSERT_RANGE, WRITE_ZEROES
                raise KvmError(errno.EOPNOTSUPP, "FA-1", f"mode {mode:#x} does not take KEEP_SIZE")
            case uapi.FALLOC_FL_PUNCH_HOLE | 0x08 | 0x20 | 0x80:
                pass
            case _:
                raise KvmError(errno.EOPNOTSUPP, "FA-1", f"fallocate modes are exclusive: {mode:#x}")
        if offset + length > uapi.LOFF_MAX:
            raise KvmError(errno.EFBIG, "FA-1", "offset + len beyond the maximum file size")
        if not mode & uapi.FALLOC_FL_KEEP_SIZE:
            raise KvmError(errno.EOPNOTSUPP, "FA-2", "guest_memfd size can't change: KEEP_SIZE is required")
        if mode & ~(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE):
            raise KvmError(
                errno.EOPNOTSUPP, "FA-3", f"mode {mode:#x} has bits other than KEEP_SIZE|PUNCH_HOLE"
            )
        if offset % PAGE_SIZE or length % PAGE_SIZE:
            raise KvmError(errno.EINVAL, "FA-4", "offset and len must be page aligned")
        inode = self.file.inode
        vm = inode.owner
        if mode & uapi.FALLOC_FL_PUNCH_HOLE:
            inode.fallocate_punch_hole(offset, length)
            return
        if offset + length > inode.size:
            raise KvmError(
                errno.EINVAL, "FA-5", f"[{offset:#x}, {offset + length:#x}) beyond size {inode.size:#x}"
            )
        inode.allocate(offset // PAGE_SIZE, (offset + length) // PAGE_SIZE)
        inode.mtime_ns = time.time_ns()  # FA-10 file_modified
        vm.trace("fallocate", ino=inode.ino, offset=offset, length=length)

    @uapi_call
    def mmap(self, length: int, offset: int = 0, shared: bool = True) -> ModelHostMapping:
        """``mmap(2)`` of the file (M-1, M-2): *length* a ``size_t``, *offset* an ``off_t``."""
        length = cabi.size_t(length, "length")
        offset = cabi.off_t(offset, "offset")
        self._check()
        length = mmap_length(length, offset)
        # do_mmap -> file_mmap_ok: the file range must stay within MAX_LFS_FILESIZE
        pgoff = (offset & uapi.U64_MAX) >> PAGE_SHIFT
        if length > uapi.LOFF_MAX or pgoff > (uapi.LOFF_MAX - length) >> PAGE_SHIFT:
            raise KvmError(
                errno.EOVERFLOW, "", f"mmap of [{offset:#x}, +{length:#x}) is beyond the maximum file size"
            )
        if not self.file.inode.mmap_allowed:
            raise KvmError(errno.ENODEV, "M-1", "guest_memfd was created without GUEST_MEMFD_FLAG_MMAP")
        if not shared:
            raise KvmError(errno.EINVAL, "M-2", "guest_memfd can only be mapped MAP_SHARED")
        vma = GmemVma(self.kvm, self.file, length, pgoff)
        self.kvm.mm.insert(vma)
        return ModelHostMapping(vma)

    @uapi_call
    def inject_memory_failure(self, offset: int) -> None:
        """Poison the page at *offset* (a ``loff_t`` in the file) as a hardware memory error
        would (E-1, E-2)."""
        offset = cabi.loff_t(offset, "offset")
        self._check()
        inode = self.file.inode
        if offset < 0 or offset >= inode.size:
            raise KvmError(errno.EINVAL, "E-1", f"offset {offset:#x} is outside the file")
        inode.memory_failure(offset // PAGE_SIZE)
        inode.owner.trace("memory_failure", ino=inode.ino, offset=offset)
