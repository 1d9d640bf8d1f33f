"""A built-in VMM loop that handles conversion exits the way QEMU does.

:class:`QemuVmm` is QEMU's ``kvm_convert_memory()`` (``accel/kvm/kvm-all.c``) behind its
two callers: a ``KVM_EXIT_MEMORY_FAULT`` (the guest touched memory whose attribute does
not match its access: an implicit conversion) and a ``KVM_EXIT_HYPERCALL`` for
``KVM_HC_MAP_GPA_RANGE`` (an explicit one, ``kvm_handle_hc_map_gpa_range`` in
``target/i386/kvm/kvm.c``, which sets ``run->hypercall.ret``).  A conversion sets the
attribute with ``KVM_SET_MEMORY_ATTRIBUTES``, then discards the side the guest no longer
uses:

* to private: ``ram_block_discard_range`` on the shared side.  Guest RAM's shared side is
  shared anonymous memory, which QEMU discards with ``MADV_REMOVE`` ("shared anonymous
  memory requires madvise REMOVE"): its pages are freed and read back as zeroes.
  ``MADV_DONTNEED`` would only drop the PTEs and keep the shmem pages and their contents.
* to shared: ``ram_block_discard_guest_memfd_range``, a ``PUNCH_HOLE`` of the guest_memfd
  range, which frees the private folios (``kvm_arch_gmem_invalidate``: SNP reclaims the
  RMP entries).

A region whose shared side *is* its guest_memfd (``RamRegion.in_place``) is not discarded:
the page changes state and keeps its contents.  A conversion spanning several RAM regions
converts each (QEMU before "Fix kvm_convert_memory calls crossing memory regions" handled
the first section only).  With ``prefault`` the VMM then pre-faults the range with
``KVM_PRE_FAULT_MEMORY``, ignoring failures, as QEMU does since commit 4cdc489eb9c2.

Exits an architecture defines beyond these (pKVM's share notifications, its "the host
still maps this page" fault) reach the backend's :meth:`~guestmem.intents.Intents.handle_exit`
first.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from guestmem import api, uapi
from guestmem.errors import HypercallExit, KvmError, MemoryFault

if TYPE_CHECKING:
    from guestmem.guestvm import GuestVm
    from guestmem.intents import RamRegion

__all__ = ["ExitHandler", "QemuVmm", "convert_memory"]


class ExitHandler(Protocol):
    """What handles a VM's exits for :meth:`guestmem.guestvm.GuestVm.run`: the built-in
    :class:`QemuVmm`, or a VMM developer's own conversion handler under test
    (``GuestVm.launch(kvm, handle_exits=MyHandler)``, ``MyHandler(guest)`` made once)."""

    def handle_hypercall(self, exit: HypercallExit, vcpu: api.Vcpu) -> int:  # noqa: A002
        """A ``KVM_EXIT_HYPERCALL``: return ``run->hypercall.ret``, or raise to stop the vCPU."""
        ...

    def handle_memory_fault(self, exit: MemoryFault, vcpu: api.Vcpu) -> None:  # noqa: A002
        """A ``KVM_EXIT_MEMORY_FAULT``: make the access succeed when re-run, or raise."""
        ...


def convert_memory(
    vm: api.Vm,
    regions: Sequence[RamRegion],
    gpa: int,
    size: int,
    *,
    to_private: bool,
    discard: bool = True,
) -> None:
    """QEMU ``kvm_convert_memory(start, size, to_private)`` over *regions*.

    Raises :class:`guestmem.KvmError` where QEMU returns an error (and stops the vCPU):
    converting memory that is not guest RAM to private, RAM without guest_memfd, a failed
    ``KVM_SET_MEMORY_ATTRIBUTES``.  Converting a range with no RAM to shared is ignored.
    """
    parts = [(region, clip) for region in regions if (clip := region.clip(gpa, size)) is not None]
    if not parts:
        if not to_private:
            return  # "Ignore converting non-assigned region to shared"
        raise KvmError(errno.EFAULT, "", f"kvm_convert_memory: no guest RAM at [{gpa:#x}, +{size:#x})")
    for region, (start, length) in parts:
        if region.gmem is None:
            raise KvmError(errno.EINVAL, "", "kvm_convert_memory: memory region has no guest_memfd")
        attributes = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if to_private else 0
        vm.set_memory_attributes(start, length, attributes)
        if not discard or region.in_place:
            continue
        offset = start - region.gpa
        if to_private:
            if region.shared is not None:  # ram_block_discard_range: shared anonymous memory
                region.shared.madvise(uapi.MADV_REMOVE, offset, length)
        else:  # ram_block_discard_guest_memfd_range
            mode = uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE
            region.gmem.fallocate(mode, region.gmem_offset + offset, length)


class QemuVmm:
    """The exit handling of one VM's vCPU threads, as QEMU does it (``vmm.handle_exits =
    "qemu"``)."""

    def __init__(self, guest: GuestVm, *, discard: bool = True, prefault: bool = False) -> None:
        self.guest = guest
        #: Discard the side a conversion leaves unused (QEMU always does).
        self.discard = discard
        #: Pre-fault converted ranges (QEMU with ``KVM_PRE_FAULT_MEMORY``, commit 4cdc489eb9c2).
        self.prefault = prefault
        #: Exits handled: ``{"hypercall": n, "memory_fault": n}``.
        self.handled: dict[str, int] = {"hypercall": 0, "memory_fault": 0}
        #: Called with ``(gpa, size, to_private)`` after each ``kvm_convert_memory``.
        self.on_convert: list[Callable[[int, int, bool], None]] = []

    def convert(self, gpa: int, size: int, *, to_private: bool, vcpu: api.Vcpu | None = None) -> None:
        """``kvm_convert_memory``, then the opportunistic pre-fault."""
        guest = self.guest
        convert_memory(guest.vm, guest.regions, gpa, size, to_private=to_private, discard=self.discard)
        for listener in self.on_convert:
            listener(gpa, size, to_private)
        if self.prefault and vcpu is not None:
            left = size
            while left:
                try:
                    left = vcpu.pre_fault_memory(gpa + size - left, left)
                except KvmError:
                    break  # "Failures are ignored": the guest's fault will tell

    def handle_hypercall(self, exit: HypercallExit, vcpu: api.Vcpu | None = None) -> int:  # noqa: A002
        """``KVM_EXIT_HYPERCALL``: the ``run->hypercall.ret`` to re-enter with.

        ``KVM_HC_MAP_GPA_RANGE`` converts ``args = (gpa, npages, attributes)``; an exit the
        backend handles (:meth:`~guestmem.intents.Intents.handle_exit`) is its business;
        anything else stops the vCPU as QEMU's ``kvm_handle_hypercall`` does (the exit is
        raised again).
        """
        own = self.guest.intents.handle_exit(self.guest, exit)
        if own is not None:
            self.handled["hypercall"] += 1
            return own
        if exit.nr != uapi.KVM_HC_MAP_GPA_RANGE:
            raise exit
        gpa, npages, attributes = (*exit.args, 0, 0, 0)[:3]
        private = bool(attributes & uapi.KVM_MAP_GPA_RANGE_ENCRYPTED)
        self.convert(gpa, npages << uapi.PAGE_SHIFT, to_private=private, vcpu=vcpu)
        self.handled["hypercall"] += 1
        return 0

    def handle_memory_fault(self, exit: MemoryFault, vcpu: api.Vcpu | None = None) -> None:  # noqa: A002
        """``KVM_EXIT_MEMORY_FAULT``: convert ``[gpa, gpa + size)`` to the access's side so
        that the guest's access succeeds when re-run.  ``EHWPOISON`` is not a conversion
        (the page is poisoned): it is raised again, as QEMU fails ``KVM_RUN``."""
        if exit.errno != errno.EFAULT:
            raise exit
        own = self.guest.intents.handle_exit(self.guest, exit)
        if own is None:
            self.convert(exit.gpa, exit.size, to_private=exit.is_private, vcpu=vcpu)
        self.handled["memory_fault"] += 1
