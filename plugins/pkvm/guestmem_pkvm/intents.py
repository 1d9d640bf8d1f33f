"""The portable intents on a pKVM host (``Backend(intents=PkvmIntents())``).

What a VMM (crosvm) and a protected guest do for each intent (backends.md section 3):

* a ``"private"`` VM is ``KVM_VM_TYPE_ARM_PROTECTED``; its RAM is guest_memfd created
  ``MMAP | INIT_SHARED`` in a gmem-only memslot (S-16), so the host reaches the same
  pages through its own mapping (``RamRegion.in_place``);
* ``launch.populate`` is the host writing the image through that mapping before the first
  run, then dropping its mapping (``MADV_DONTNEED``): a page the host still maps cannot be
  donated (``pKVM-3.5``).  Nothing measures it (the guest's pvmfw verifies its image), so
  ``measure = true`` is not applicable;
* a page becomes the guest's at its first stage-2 fault (donation, contents kept): there
  is no acceptance;
* ``guest.convert`` is ``MEM_SHARE`` / ``MEM_UNSHARE`` of the range, in place; the
  hypervisor's walk may stop early (256 pages, a discontiguous page) and the guest calls
  again for the rest, as Android guests do.  A refused call (``SMCCC_RET_INVALID_PARAMETER``)
  is the errno the hypervisor had (``EAGAIN`` [pKVM-3.3] while the host still maps a page);
* the ``KVM_EXIT_HYPERCALL`` that follows a conversion tells the VMM; nothing is discarded
  (:meth:`PkvmIntents.handle_exit`).  A guest fault on a page the host still maps is a
  memory-fault exit the VMM answers by unmapping the page (``MADV_DONTNEED``) and running
  the vCPU again.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from guestmem import uapi
from guestmem.backend import Backend, GuestVm, Intents, NotApplicable, RamRegion, VmTypeInfo
from guestmem.errors import HypercallExit, KvmError, MemoryFault
from guestmem_pkvm import abi
from guestmem_pkvm.policy import DEFAULT_VM, PROTECTED_VM, pkvm_state

PAGE_SHIFT = uapi.PAGE_SHIFT
PAGE_SIZE = uapi.PAGE_SIZE
_SHARE = abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_SHARE_FUNC_ID
_UNSHARE = abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_UNSHARE_FUNC_ID


class PkvmIntents(Intents):
    """pKVM's translation of the portable intents (see the module docstring)."""

    def vm_type(self, backend: Backend, kind: Any) -> tuple[VmTypeInfo, str]:
        """``"private"``: a protected VM; ``"default"``: a normal VM under pKVM."""
        return (PROTECTED_VM, "") if kind == "private" else (DEFAULT_VM, "")

    @staticmethod
    def _protected(guest: GuestVm) -> bool:
        return guest.vm_type.type == abi.KVM_VM_TYPE_ARM_PROTECTED

    def gmem_flags(self, guest: GuestVm) -> int:
        """Every arm64 guest_memfd slot is gmem-only (S-16); INIT_SHARED lets the host
        write the image before the guest owns the pages."""
        return uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED

    def add_region(self, guest: GuestVm, gpa: int, size: int, slot: int) -> RamRegion:
        """A gmem-only memslot with no ``userspace_addr`` (``gmem_abort`` resolves faults
        through guest_memfd), and the host's own mapping of the file for populating and
        sharing: the MMU notifier of that mapping never reaches the guest's stage-2."""
        gmem = guest.vm.create_guest_memfd(size, self.gmem_flags(guest))
        guest.vm.set_user_memory_region2(slot, uapi.KVM_MEM_GUEST_MEMFD, gpa, size, 0, gmem, 0)
        return RamRegion(gpa, size, gmem, 0, gmem.mmap(size), in_place=True, slot=slot)

    def launch_start(self, guest: GuestVm) -> str:
        """Nothing to start: the hypervisor hears of the VM at its first ``KVM_RUN``
        (``kvm_arch_vcpu_run_pid_change`` -> ``pkvm_create_hyp_vm`` -> ``__pkvm_init_vm``,
        the handle and VMID); until then ``kvm->arch.pkvm.handle`` is 0."""
        state = pkvm_state(guest.vm)
        kind = "protected VM" if state.protected else "normal VM"
        return f"pKVM {kind}: the hypervisor's VM (handle, VMID) is created at the first KVM_RUN"

    def populate(self, guest: GuestVm, gpa: int, data: bytes, measure: bool | None) -> str:
        """The host writes the image through its mapping, then drops the mapping."""
        if measure:
            raise NotApplicable(
                "pKVM does not measure host-written memory (the guest's pvmfw verifies its image)"
            )
        region = guest.region(gpa)
        if region.shared is None or gpa + len(data) > region.end:
            raise NotApplicable("the image does not fit one host-mapped RAM region")
        offset = gpa - region.gpa
        region.shared.write(offset, data)
        first = offset & ~(PAGE_SIZE - 1)
        end = (offset + len(data) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        region.shared.madvise(uapi.MADV_DONTNEED, first, end - first)
        return f"host wrote {(end - first) >> PAGE_SHIFT} page(s) and unmapped them (not measured)"

    def convert(
        self, guest: GuestVm, gpa: int, size: int, *, private: bool, page_size: int, coalesce: bool
    ) -> str:
        """``MEM_UNSHARE`` (private) or ``MEM_SHARE`` (shared) until the range is done."""
        if not self._protected(guest):
            raise NotApplicable("a normal pKVM VM cannot share or unshare (SMCCC_RET_NOT_SUPPORTED)")
        vcpu = guest.vcpu()
        state = pkvm_state(guest.vm)
        nr = _UNSHARE if private else _SHARE
        gfn, end = gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT
        calls = 0
        while gfn < end:
            want = 1 if not coalesce else end - gfn
            args = (gfn << PAGE_SHIFT, want if coalesce else 0, 0)
            ret = guest.run(partial(vcpu.hypercall, nr, *args), vcpu)
            calls += 1
            if ret != abi.SMCCC_RET_SUCCESS:
                err = state.last_error
                if err is not None:
                    raise KvmError(
                        err.errno or 0, err.rule, f"{'MEM_UNSHARE' if private else 'MEM_SHARE'}: {err.detail}"
                    )
                raise KvmError(0, "", f"hypercall returned {ret}")
            gfn += max(1, state.ret[1])
        name = "MEM_UNSHARE" if private else "MEM_SHARE"
        return f"{calls} {name} call(s), in place"

    def accept(
        self, guest: GuestVm, gpa: int, size: int, *, page_size: int, coalesce: bool, entries: int
    ) -> str:
        raise NotApplicable("pKVM has no acceptance: a page is donated to the guest at its first touch")

    def handle_exit(self, guest: GuestVm, exit: HypercallExit | MemoryFault) -> int | None:  # noqa: A002
        """Share/unshare exits only tell the VMM (nothing to discard: in place); a fault on
        a page the host still maps is answered by unmapping it (pKVM-3.5)."""
        if isinstance(exit, HypercallExit):
            if exit.nr in (_SHARE, _UNSHARE):
                return int(getattr(exit, "ret", 0))
            return None
        if exit.rule != "pKVM-3.5":
            return None
        region = guest.region(exit.gpa)
        if region.shared is not None:
            region.shared.madvise(uapi.MADV_DONTNEED, exit.gpa - region.gpa, exit.size)
        return 0

    def capabilities(self, guest: GuestVm) -> frozenset[str]:
        found = set(super().capabilities(guest)) | {"populate"}
        if self._protected(guest):
            found |= {"private_mem", "private_access", "conversion", "in_place_conversion"}
        return frozenset(found)

    def costs(self, counters: Mapping[str, int]) -> dict[str, int]:
        """The hypervisor's table changes (donations, reclaims, stage-2 maps), its exits,
        zeroing and TLB invalidations, next to the core's."""
        found = super().costs(counters)
        get = counters.get
        found["exits"] += get("pkvm.userspace_exits", 0)
        found["hw_table_updates"] += (
            sum(
                get(f"pkvm.{name}", 0)
                for name in (
                    "donations",
                    "reclaims",
                    "force_reclaims",
                    "relinquished_pages",
                    "stage2_map",
                    "stage2_unmap",
                )
            )
            + get("pkvm.host_stage2_map", 0)
            + get("pkvm.host_stage2_unmap", 0)
        )
        found["tlb_flushes"] += get("pkvm.tlbi", 0)
        found["zeroed_bytes"] += get("pkvm.zeroed_bytes", 0)
        found["copied_bytes"] += get("pkvm.copies", 0)
        return found

    def cost_details(self, counters: Mapping[str, int]) -> dict[str, int]:
        """The pKVM hypervisor's page transitions behind the categories."""
        names = {"pKVM donations": "donations", "pKVM reclaims": "reclaims", "pKVM shares": "converted_pages"}
        return {label: counters.get(f"pkvm.{name}", 0) for label, name in names.items()}
