"""The uAPI face: abstract classes every backend's objects implement.

The model (``sw`` and the hardware-model plugins) and the real kernel (``guestmem-linux``)
both hand out objects of these types, so one program runs unchanged against either.  Each
method is the ioctl or file operation of the same name; failures raise
:class:`guestmem.KvmError` (an ``OSError``) with the kernel's errno.
"""

from __future__ import annotations

import abc
import errno
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from guestmem.snapshot import HostSnapshot, VmSnapshot


class _Closable(abc.ABC):
    """Deterministic release: ``close()`` and the context-manager protocol."""

    @abc.abstractmethod
    def close(self) -> None:
        """Drop this reference (the kernel's ``close(fd)``); idempotent."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """True once :meth:`close` ran."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class HostMapping(_Closable):
    """A host userspace mapping (``mmap``): anonymous memory or a guest_memfd range.

    Accesses are host loads/stores.  One the kernel would answer with SIGBUS raises
    :class:`guestmem.HostSigbus`, one it would answer with SIGSEGV (a page the hardware
    took from the host: arm64 pKVM) :class:`guestmem.HostSigsegv`; the process never dies.
    """

    address: int
    length: int

    @abc.abstractmethod
    def read(self, offset: int, n: int) -> bytes:
        """Load *n* bytes at ``address + offset``."""

    @abc.abstractmethod
    def write(self, offset: int, data: bytes) -> None:
        """Store *data* at ``address + offset``."""

    @abc.abstractmethod
    def madvise(self, advice: int, offset: int = 0, length: int | None = None) -> None:
        """``madvise(address + offset, length, advice)`` (``mm/madvise.c``).

        ``uapi.MADV_DONTNEED`` drops the pages' host PTEs (the MMU notifier zaps guest
        mappings of them); shared memory keeps its contents.  ``uapi.MADV_REMOVE`` frees
        the backing (``madvise_remove`` punches a hole in the file behind the mapping): an
        anonymous shared mapping reads zeroes afterwards and a guest_memfd mapping loses
        its folios, as ``fallocate(PUNCH_HOLE)`` would.  This is how a VMM discards the
        side of guest memory a conversion left unused (QEMU ``ram_block_discard_range``).

        Checks in the kernel's order: an advice other than these two is EINVAL, an
        unaligned start EINVAL, a length that overflows when rounded to pages EINVAL, and
        a zero length does nothing.  *length* None means up to the end of the mapping.  A
        range reaching outside this mapping is ENOMEM and nothing is applied: the face never
        touches another mapping of the process (the kernel would apply the advice to the
        mapped parts it covers, then fail with ENOMEM).
        """


def madvise_range(
    mapping: HostMapping, advice: int, offset: int, length: int | None
) -> tuple[int, int] | None:
    """The checks of ``madvise(2)`` for :meth:`HostMapping.madvise`, in the kernel's order.

    Returns ``(offset, length)`` within *mapping*, page aligned, or None when there is
    nothing to do (a zero length); raises :class:`guestmem.KvmError` otherwise.  Shared by
    every backend so that the model and the real kernel refuse the same calls.
    """
    from guestmem import uapi
    from guestmem.errors import KvmError

    if advice not in (uapi.MADV_DONTNEED, uapi.MADV_REMOVE):  # madvise_behavior_valid
        raise KvmError(errno.EINVAL, "", f"madvise: advice {advice} is not MADV_DONTNEED or MADV_REMOVE")
    if length is None:
        length = mapping.length - offset
    if offset % uapi.PAGE_SIZE:
        raise KvmError(errno.EINVAL, "", f"madvise: start {mapping.address + offset:#x} is not page aligned")
    length &= uapi.U64_MAX  # a size_t
    aligned = (length + uapi.PAGE_SIZE - 1) & ~(uapi.PAGE_SIZE - 1) & uapi.U64_MAX
    if length and not aligned:
        raise KvmError(errno.EINVAL, "", f"madvise: length {length:#x} overflows when rounded to pages")
    if aligned == 0:
        return None
    if mapping.closed or offset < 0 or offset + aligned > mapping.length:
        where = f"[{offset:#x}, {offset + aligned:#x})"
        raise KvmError(
            errno.ENOMEM, "", f"madvise: {where} is not inside the {mapping.length:#x}-byte mapping"
        )
    return offset, aligned


class GuestMemfd(_Closable):
    """A guest_memfd file descriptor (``KVM_CREATE_GUEST_MEMFD``)."""

    size: int
    flags: int

    @abc.abstractmethod
    def fileno(self) -> int:
        """The descriptor number (model: a simulated fd of the model's own table).

        ValueError once closed, as a closed Python file object's ``fileno()``; a system call
        on a closed file is EBADF.  ``Vm`` and ``Kvm`` answer the same.
        """

    @abc.abstractmethod
    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)``: allocate (KEEP_SIZE) or punch a hole (KEEP_SIZE|PUNCH_HOLE)."""

    @abc.abstractmethod
    def read(self, n: int) -> bytes:
        """``read(2)``: always fails with EINVAL (F-1)."""

    @abc.abstractmethod
    def write(self, data: bytes) -> int:
        """``write(2)``: always fails with EINVAL (F-1)."""

    @abc.abstractmethod
    def fstat(self) -> Any:
        """``fstat(2)``: an object with ``st_size``, ``st_blksize``, ``st_ino`` (F-2)."""

    @abc.abstractmethod
    def truncate(self, size: int) -> None:
        """``ftruncate(2)``: always fails with EINVAL (F-3)."""

    @abc.abstractmethod
    def dup(self) -> GuestMemfd:
        """``dup(2)``: a second descriptor of the same open file (F-4); EBADF once closed."""

    @abc.abstractmethod
    def mmap(self, length: int, offset: int = 0, shared: bool = True) -> HostMapping:
        """``mmap(2)`` of the file (M-1, M-2); faults follow M-3..M-5."""

    def inject_memory_failure(self, offset: int) -> None:
        """Poison the page at *offset* as a hardware memory error would (E-1, E-2).

        The model backends implement it; on a real host this would need ``MADV_HWPOISON``
        on live memory, so the default refuses with EOPNOTSUPP.
        """
        from guestmem.errors import KvmError

        raise KvmError(errno.EOPNOTSUPP, "E-1", "this backend cannot inject memory failures")


class Vcpu(_Closable):
    """A vCPU; its accesses really run the guest (model or kernel)."""

    vcpu_id: int

    @abc.abstractmethod
    def access(
        self,
        gpa: int,
        length: int = 1,
        *,
        write: bool = False,
        data: bytes | None = None,
        private: bool | None = None,
    ) -> bytes | None:
        """A guest load (returns the bytes) or store (*data* given; returns None).

        Passing *data* makes the access a store of ``len(data)`` bytes (``write=True`` is
        implied); ``write=True`` without data is an error.

        ``private=None`` lets the VM's attributes decide (SW_PROTECTED semantics, G-1).  An
        unresolvable fault raises :class:`guestmem.MemoryFault`; an access that exits for
        MMIO raises :class:`guestmem.MmioExit`.
        """

    @abc.abstractmethod
    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> int:
        """``KVM_PRE_FAULT_MEMORY``: map ``[gpa, gpa+size)``; returns the size left (PF-4)."""

    def hypercall(self, nr: int, *args: int) -> int:
        """The guest executes hypercall *nr* (``vmcall``/``vmmcall``/``hvc``) with *args*.

        Returns the guest's return register.  A request the backend hands to userspace
        raises :class:`guestmem.HypercallExit`.  Backends without guest hypercalls
        refuse with ENOSYS.
        """
        from guestmem.errors import KvmError

        raise KvmError(errno.ENOSYS, "", f"backend has no guest hypercall entry (nr {nr})")

    def memory_encrypt_op(self, cmd: Any) -> int:
        """``KVM_MEMORY_ENCRYPT_OP`` on the vCPU fd (TDX ``KVM_TDX_INIT_VCPU``...).

        *cmd* is the backend's command value, updated in place where the kernel copies
        back.  ENOTTY where the VM type has no such commands.
        """
        from guestmem.errors import KvmError

        raise KvmError(errno.ENOTTY, "", "KVM_MEMORY_ENCRYPT_OP is not supported here")


class Vm(_Closable):
    """A VM file descriptor (``KVM_CREATE_VM``)."""

    vm_type: int

    @abc.abstractmethod
    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd."""

    @abc.abstractmethod
    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        """``KVM_CREATE_GUEST_MEMFD`` (rules C-1..C-11)."""

    @abc.abstractmethod
    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` (v1; S-2 rejects GUEST_MEMFD)."""

    @abc.abstractmethod
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
        """``KVM_SET_USER_MEMORY_REGION2`` (S-1..S-16, B-1..B-11).

        *guest_memfd* is a :class:`GuestMemfd`, any other object with ``fileno()``, a raw fd
        number, or None (fd 0 as the kernel would read it).
        """

    @abc.abstractmethod
    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES`` (A-1..A-12)."""

    @abc.abstractmethod
    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """``KVM_CREATE_VCPU``."""

    @abc.abstractmethod
    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> int:
        """``KVM_ENABLE_CAP`` on the VM fd (``struct kvm_enable_cap``: *cap*, *flags*,
        ``args[0..3]``); e.g. ``enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)``."""

    def memory_encrypt_op(self, cmd: Any) -> int:
        """``KVM_MEMORY_ENCRYPT_OP`` on the VM fd: a confidential-computing command (SEV
        ``KVM_SEV_*``, TDX ``KVM_TDX_*``) as a backend's command value, updated in place
        where the kernel copies back.  ENOTTY where the VM type has no such commands."""
        from guestmem.errors import KvmError

        raise KvmError(errno.ENOTTY, "", "KVM_MEMORY_ENCRYPT_OP is not supported here")

    def snapshot(self) -> VmSnapshot:
        """The VM's state as frozen values (:class:`guestmem.snapshot.VmSnapshot`):
        memslots, attributes, stage-2 leaves, vCPUs, its guest_memfd files and pages and the
        backend's tables for it; equal snapshots, nothing changed.  The model backends
        implement it; the default (``guestmem-linux``, the real kernel, whose state
        userspace cannot read) raises :class:`NotImplementedError`."""
        raise NotImplementedError(
            "this backend cannot snapshot a VM: the kernel's state is not readable from userspace"
        )


class Kvm(_Closable):
    """``/dev/kvm`` of one backend (:func:`guestmem.open`)."""

    backend: str

    @abc.abstractmethod
    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the system fd."""

    @abc.abstractmethod
    def create_vm(self, vm_type: int = 0) -> Vm:
        """``KVM_CREATE_VM``."""

    @abc.abstractmethod
    def mmap_anonymous(self, length: int) -> HostMapping:
        """Plain host memory (``MAP_ANONYMOUS|MAP_SHARED``), for ``userspace_addr``."""

    def snapshot(self) -> HostSnapshot:
        """The host's state as frozen values (:class:`guestmem.snapshot.HostSnapshot`): its
        VMs, guest_memfd files and pages, mappings, descriptors, allocated memory and the
        backend's hardware tables; equal snapshots, nothing changed.

        The model backends implement it.  Userspace cannot read the real kernel's memslots,
        attributes, stage-2 or hardware tables, so the default (``guestmem-linux``) raises
        :class:`NotImplementedError` saying so.
        """
        raise NotImplementedError(
            f"backend {self.backend!r} cannot snapshot: the kernel's state is not readable from userspace"
        )
