"""The uAPI face: abstract classes every backend's objects implement.

The model (``sw`` and the hardware-model plugins) and the real kernel (``guestmem-linux``)
both hand out objects of these types, so one program runs unchanged against either.  Each
method is the ioctl or file operation of the same name; failures raise
:class:`guestmem.KvmError` (an ``OSError``) with the kernel's errno.

Arguments go through :mod:`guestmem.cabi` on every backend before anything happens: an
integer argument becomes the C type the real uAPI carries for it (each method says which;
the structs are those of :mod:`guestmem.uapi`), a non-integer is a TypeError naming the
parameter, data must be bytes-like and a file argument a file object, an fd number or None.
"""

from __future__ import annotations

import abc
import errno
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

from guestmem import cabi

if TYPE_CHECKING:
    from guestmem.snapshot import HostSnapshot, VmSnapshot

#: The most bytes one host access (:meth:`HostMapping.read`, :meth:`HostMapping.write`) or
#: guest access (:meth:`Vcpu.access`) moves: a limit of this project, not the kernel's
#: (``docs/model.md``), so that every call's cost is bounded; more is EINVAL on every
#: backend.  Larger transfers are a loop of accesses.
MAX_ACCESS: Final = 64 << 20


def access_arguments(gpa: object, length: object, write: bool, data: object) -> tuple[int, int, bytes | None]:
    """The arguments of :meth:`Vcpu.access` as every backend takes them: ``(gpa, length,
    data)`` with *data* as ``bytes`` (a store) or None (a load).

    Integers (TypeError naming *gpa* or *length*), bytes-like *data* (TypeError), then
    ValueError for a store without data (a call that cannot be meant), and EINVAL for a
    length that is not positive, a negative gpa or a length beyond :data:`MAX_ACCESS`
    (no instruction accesses that).
    """
    from guestmem.errors import KvmError

    gpa = cabi.index(gpa, "gpa")
    if data is not None:
        data = cabi.buffer(data, "data")
        length = len(data)
    else:
        length = cabi.index(length, "length")
        if write:
            raise ValueError("a guest store needs data")
    if length <= 0 or gpa < 0:
        raise KvmError(errno.EINVAL, "", f"a guest access of {length} bytes at gpa {gpa:#x}: no such access")
    if length > MAX_ACCESS:
        raise KvmError(
            errno.EINVAL, "", f"a guest access of {length:#x} bytes is more than MAX_ACCESS ({MAX_ACCESS:#x})"
        )
    return gpa, length, data


def host_access_arguments(offset: object, n: object, mapped: int, unmapped: bool) -> tuple[int, int]:
    """*offset* and *n* of a host access to a mapping *mapped* bytes long, as every backend
    takes them: integers (TypeError naming them); EFAULT once the mapping is *unmapped* or
    for bytes outside it (what the SIGSEGV of such an access stops); EINVAL beyond
    :data:`MAX_ACCESS`."""
    from guestmem.errors import KvmError

    offset, n = cabi.index(offset, "offset"), cabi.index(n, "n")
    if unmapped:
        raise KvmError(errno.EFAULT, "", "access to an unmapped host mapping (SIGSEGV)")
    if offset < 0 or n < 0 or offset + n > mapped:
        raise KvmError(
            errno.EFAULT,
            "",
            f"host access [{offset:#x}, {offset + n:#x}) outside the {mapped:#x}-byte mapping",
        )
    if n > MAX_ACCESS:
        raise KvmError(
            errno.EINVAL, "", f"a host access of {n:#x} bytes is more than MAX_ACCESS ({MAX_ACCESS:#x})"
        )
    return offset, n


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
        """Load *n* bytes at ``address + offset`` (:func:`host_access_arguments`)."""

    @abc.abstractmethod
    def write(self, offset: int, data: bytes) -> None:
        """Store bytes-like *data* at ``address + offset`` (:func:`host_access_arguments`)."""

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
    from guestmem import cabi, uapi
    from guestmem.errors import KvmError

    advice = cabi.c_int(advice, "advice")
    offset = cabi.index(offset, "offset")
    if length is not None:
        length = cabi.size_t(length, "length")
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
        """``fallocate(2)``: allocate (KEEP_SIZE) or punch a hole (KEEP_SIZE|PUNCH_HOLE);
        ``int mode, loff_t offset, loff_t len``."""

    @abc.abstractmethod
    def read(self, n: int) -> bytes:
        """``read(2)`` of a ``size_t`` count: always fails with EINVAL (F-1)."""

    @abc.abstractmethod
    def write(self, data: bytes) -> int:
        """``write(2)`` of bytes-like data: always fails with EINVAL (F-1)."""

    @abc.abstractmethod
    def fstat(self) -> Any:
        """``fstat(2)``: an object with ``st_size``, ``st_blksize``, ``st_ino`` (F-2)."""

    @abc.abstractmethod
    def truncate(self, size: int) -> None:
        """``ftruncate(2)`` to a ``loff_t`` size: always fails with EINVAL (F-3)."""

    @abc.abstractmethod
    def dup(self) -> GuestMemfd:
        """``dup(2)``: a second descriptor of the same open file (F-4); EBADF once closed."""

    @abc.abstractmethod
    def mmap(self, length: int, offset: int = 0, shared: bool = True) -> HostMapping:
        """``mmap(2)`` of the file (M-1, M-2) with a ``size_t`` length and an ``off_t``
        offset; faults follow M-3..M-5."""

    def inject_memory_failure(self, offset: int) -> None:
        """Poison the page at *offset* (a ``loff_t``) as a hardware memory error would
        (E-1, E-2).

        The model backends implement it; on a real host this would need ``MADV_HWPOISON``
        on live memory, so the default refuses with EOPNOTSUPP.
        """
        from guestmem.errors import KvmError

        cabi.loff_t(offset, "offset")
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
        implied); ``write=True`` without data is an error (:func:`access_arguments`: integer
        *gpa* and *length*, bytes-like *data*, at most :data:`MAX_ACCESS` bytes).

        ``private=None`` lets the VM's attributes decide (SW_PROTECTED semantics, G-1).  An
        unresolvable fault raises :class:`guestmem.MemoryFault`; an access that exits for
        MMIO raises :class:`guestmem.MmioExit`.
        """

    @abc.abstractmethod
    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> int:
        """``KVM_PRE_FAULT_MEMORY`` (:class:`guestmem.uapi.KvmPreFaultMemory`): map
        ``[gpa, gpa+size)``; returns the size left (PF-4)."""

    def hypercall(self, nr: int, *args: int) -> int:
        """The guest executes hypercall *nr* (``vmcall``/``vmmcall``/``hvc``) with *args*,
        each a register (``unsigned long``).

        Returns the guest's return register.  A request the backend hands to userspace
        raises :class:`guestmem.HypercallExit`.  Backends without guest hypercalls
        refuse with ENOSYS.
        """
        from guestmem.errors import KvmError

        nr = cabi.ulong(nr, "nr")
        for i, arg in enumerate(args):
            cabi.ulong(arg, f"args[{i}]")
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
        """``KVM_CHECK_EXTENSION`` on the VM fd (*cap* a ``long``)."""

    @abc.abstractmethod
    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        """``KVM_CREATE_GUEST_MEMFD`` (:class:`guestmem.uapi.KvmCreateGuestMemfd`; rules
        C-1..C-11)."""

    @abc.abstractmethod
    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` (v1; S-2 rejects GUEST_MEMFD): the first five
        fields of :class:`guestmem.uapi.KvmUserspaceMemoryRegion2`."""

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
        """``KVM_SET_USER_MEMORY_REGION2`` (:class:`guestmem.uapi.KvmUserspaceMemoryRegion2`;
        S-1..S-16, B-1..B-11).

        *guest_memfd* is a :class:`GuestMemfd`, any other object with ``fileno()``, a raw fd
        number, or None (fd 0 as the kernel would read it); anything else is a TypeError.
        """

    @abc.abstractmethod
    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES`` (:class:`guestmem.uapi.KvmMemoryAttributes`;
        A-1..A-12)."""

    @abc.abstractmethod
    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """``KVM_CREATE_VCPU`` (*vcpu_id* an ``unsigned long``)."""

    @abc.abstractmethod
    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> int:
        """``KVM_ENABLE_CAP`` on the VM fd (:class:`guestmem.uapi.KvmEnableCap`: *cap*,
        *flags*, ``args[0..3]``); e.g. ``enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)``."""

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
        """``KVM_CHECK_EXTENSION`` on the system fd (*cap* a ``long``)."""

    @abc.abstractmethod
    def create_vm(self, vm_type: int = 0) -> Vm:
        """``KVM_CREATE_VM`` (*vm_type* an ``unsigned long``)."""

    @abc.abstractmethod
    def mmap_anonymous(self, length: int) -> HostMapping:
        """Plain host memory (``MAP_ANONYMOUS|MAP_SHARED``) of a ``size_t`` length, for
        ``userspace_addr``."""

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
