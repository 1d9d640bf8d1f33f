"""The portable intents on a Gunyah host (``Backend(intents=GunyahIntents())``).

What a Gunyah VMM and its guest do for each intent (backends.md section 4):

* a ``"private"`` VM is a Gunyah VM whose RAM is lent to it: each RAM region is a guest
  memory file (``GUNYAH_CREATE_GUEST_MEM``, a guest_memfd the host may map wherever
  nothing is lent) bound with ``GUNYAH_VM_MAP_MEM`` and ``GUNYAH_MEM_FORCE_LEND``, so a
  page the guest faults in is donated to it (``DONATE_TO_PROTECTED``) and leaves the
  host's reach.  A ``"default"`` VM binds its RAM with ``GUNYAH_MEM_FORCE_SHARE``: the
  host keeps access.  The host reaches each region through its own mapping of the file
  (``RamRegion.in_place``);
* ``launch.populate`` is the VMM writing the image through that mapping before the VM
  starts, then dropping its mapping (``MADV_DONTNEED``): Gunyah's guest_memfd lends no
  folio the host maps.  Nothing measures it (the RM may authenticate images; not in the
  sources modelled), so ``measure = true`` is not applicable;
* the launch ends as a VMM starts the VM: the devicetree written into the last page of the
  first region, ``GUNYAH_VM_SET_DTB_CONFIG``, then ``GUNYAH_VM_START``
  (``gunyah_vm_start``: VMID, the DTB parcel lent, ``VM_CONFIG_IMAGE``,
  ``VM_SET_DEMAND_PAGING`` of the lent bindings, ``VM_SET_ADDRESS_LAYOUT``, ``VM_INIT``,
  ``VM_GET_HYP_RESOURCES``, ``VM_START``);
* there is no acceptance: the hypervisor demand-pages a lent binding at the guest's first
  touch (``gunyah_gmem_demand_page``: ``memextent_donate`` + ``addrspace_map``);
* the guest converts nothing itself: whether a page is lent or shared is its binding's
  policy, fixed at ``GUNYAH_VM_MAP_MEM`` (a VM's shared I/O memory is a binding of its
  own), and the driver offers the VMM nothing to carry out a guest's request with either
  (``GUNYAH_MEM_UNMAP`` only trims a binding at one of its ends,
  ``gunyah_gmem_trim_binding``, whose split of one is "TODO": EINVAL), so
  ``guest.convert`` is not applicable.  The conversion Gunyah has is the host's,
  and it keeps the contents: a host fault on a lent page takes it back from the guest
  (``gunyah_gmem_host_fault`` -> ``gunyah_gmem_launder_folio``: reclaimed, then mapped for
  the host) and the guest's next touch lends it again (demand paging); scenarios show it
  with host accesses and guest steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from guestmem import uapi
from guestmem.backend import (
    Backend,
    GuestVm,
    Intents,
    NotApplicable,
    RamRegion,
    VmTypeInfo,
)
from guestmem_gunyah import abi
from guestmem_gunyah.face import GunyahFace, create_guest_mem, gunyah
from guestmem_gunyah.policy import GUNYAH_VM

PAGE_SHIFT = abi.PAGE_SHIFT
PAGE_SIZE = abi.PAGE_SIZE
#: The devicetree blob's magic (``FDT_MAGIC``), what the VMM writes where the DTB goes.
FDT_MAGIC = b"\xd0\x0d\xfe\xed"
_LEND = abi.GUNYAH_MEM_ALLOW_RWX | abi.GUNYAH_MEM_FORCE_LEND
_SHARE = abi.GUNYAH_MEM_ALLOW_RWX | abi.GUNYAH_MEM_FORCE_SHARE


class GunyahIntents(Intents):
    """Gunyah's translation of the portable intents (see the module docstring)."""

    def vm_type(self, backend: Backend, kind: Any) -> tuple[VmTypeInfo, str]:
        """One VM type; its RAM is lent (``"private"``) or shared (``"default"``)."""
        if kind == "private":
            return GUNYAH_VM, "RAM lent (GUNYAH_MEM_FORCE_LEND): the host loses each page the guest takes"
        return GUNYAH_VM, "RAM shared (GUNYAH_MEM_FORCE_SHARE): the host keeps access"

    @staticmethod
    def _lent(guest: GuestVm) -> bool:
        return guest.kind == "private"

    @staticmethod
    def face(guest: GuestVm) -> GunyahFace:
        """Gunyah's own calls on the VM."""
        return gunyah(guest.vm)

    # --- memory and launch ---------------------------------------------------------------------------
    def gmem_flags(self, guest: GuestVm) -> int:
        """``GUNYAH_CREATE_GUEST_MEM``: mappable, host-accessible until lent."""
        return uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED

    def add_region(self, guest: GuestVm, gpa: int, size: int, slot: int) -> RamRegion:
        """A guest memory file bound with ``GUNYAH_VM_MAP_MEM`` (lend or share), and the
        host's mapping of it."""
        gmem = create_guest_mem(guest.vm, size)
        face = self.face(guest)
        face.map_mem(gmem, gpa, 0, size, _LEND if self._lent(guest) else _SHARE)
        binding = next(b for b in face.bindings if b.gfn == gpa >> PAGE_SHIFT)
        return RamRegion(gpa, size, gmem, 0, gmem.mmap(size), in_place=True, slot=binding.slot)

    def launch_start(self, guest: GuestVm) -> str:
        """Nothing yet: the VM starts at ``GUNYAH_VM_START`` (or its first vCPU run)."""
        return "the VM starts at GUNYAH_VM_START (launch.finish) or its first vCPU run"

    def _write_unmapped(self, region: RamRegion, offset: int, data: bytes) -> int:
        """The VMM writes through its mapping, then drops the pages from it; returns them."""
        assert region.shared is not None
        region.shared.write(offset, data)
        first = offset & ~(PAGE_SIZE - 1)
        end = (offset + len(data) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        region.shared.madvise(uapi.MADV_DONTNEED, first, end - first)
        return (end - first) >> PAGE_SHIFT

    def populate(self, guest: GuestVm, gpa: int, data: bytes, measure: bool | None) -> str:
        """The VMM writes the image before the VM starts and unmaps it."""
        if measure:
            raise NotApplicable("Gunyah measures nothing the VMM writes (image authentication is the RM's)")
        if self.face(guest).status != abi.VmStatus.NO_STATE:
            raise NotApplicable("the VM has started: the host no longer writes its image")
        region = guest.region(gpa)
        if gpa + len(data) > region.end:
            raise NotApplicable("the image does not fit one RAM region")
        pages = self._write_unmapped(region, gpa - region.gpa, data)
        return f"host wrote {pages} page(s) and unmapped them (not measured)"

    def launch_finish(self, guest: GuestVm) -> str:
        """The devicetree in the first region's last page, ``SET_DTB_CONFIG``, ``VM_START``."""
        face = self.face(guest)
        if face.status != abi.VmStatus.NO_STATE:
            return ""
        region = guest.regions[0]
        dtb = region.end - PAGE_SIZE
        self._write_unmapped(region, dtb - region.gpa, FDT_MAGIC)
        face.set_dtb_config(dtb, PAGE_SIZE)
        face.start()
        return f"VM started: VMID {face.vmid:#x}, devicetree at {dtb:#x} lent as its image"

    # --- the guest ---------------------------------------------------------------------------------------
    def accept(
        self, guest: GuestVm, gpa: int, size: int, *, page_size: int, coalesce: bool, entries: int
    ) -> str:
        """Not applicable: nothing to accept before use."""
        raise NotApplicable(
            "Gunyah has no acceptance: a lent page is demand-paged at the guest's first touch"
        )

    def convert(
        self, guest: GuestVm, gpa: int, size: int, *, private: bool, page_size: int, coalesce: bool
    ) -> str:
        """Not applicable: the guest has no conversion of its own (module docstring)."""
        raise NotApplicable(
            "a Gunyah guest converts nothing: a binding is lent or shared at GUNYAH_VM_MAP_MEM; a lent page"
            " goes back to the host, contents kept, when the host faults on it (launder) and to the guest"
            " at its next touch"
        )

    # --- capabilities and costs ----------------------------------------------------------------------
    def capabilities(self, guest: GuestVm) -> frozenset[str]:
        """The host populates before the start; lent RAM is private memory."""
        found = set(super().capabilities(guest)) | {"populate"}
        if self._lent(guest):
            found |= {"private_mem", "private_access"}
        return frozenset(found)

    def costs(self, counters: Mapping[str, int]) -> dict[str, int]:
        """Donations and stage-2 maps are table updates, RM RPCs firmware commands,
        page-fault and status exits exits, syncs flushes, sanitizing zeroes."""
        found = super().costs(counters)
        get = counters.get
        found["exits"] += get("gunyah.exits.page_fault", 0) + get("gunyah.exits.status", 0)
        found["hw_table_updates"] += sum(
            get(f"gunyah.hvc.{name}", 0) for name in ("memextent_donate", "addrspace_map", "addrspace_unmap")
        )
        found["firmware_commands"] += _rpcs(counters)
        found["tlb_flushes"] += get("gunyah.sync", 0)
        found["zeroed_bytes"] += get("gunyah.sanitized_bytes", 0)
        return found

    def cost_details(self, counters: Mapping[str, int]) -> dict[str, int]:
        """The Gunyah operations behind the categories."""
        return {
            "RM RPCs": _rpcs(counters),
            "memextent donations": counters.get("gunyah.hvc.memextent_donate", 0),
            "demand-paged pages": counters.get("gunyah.demand_paged_pages", 0),
            "reclaimed pages": counters.get("gunyah.reclaimed_pages", 0),
        }


def _rpcs(counters: Mapping[str, int]) -> int:
    """The RM RPCs charged to the VM (``gunyah.rm.<RPC>``)."""
    return sum(v for k, v in counters.items() if k.startswith("gunyah.rm."))
