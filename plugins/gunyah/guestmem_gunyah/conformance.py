"""How the conformance kit drives Gunyah VMs: the ``guestmem_conformance_options`` of
guestmem-gunyah and the kit's VMM driver.

A Gunyah VM's memory is guest_memfd bound with a lend or a share policy
(``GUNYAH_VM_MAP_MEM``, backends.md 4.3): a page of a lent binding becomes the guest's
alone when the guest first touches it (demand paging lends the folio), a page of a shared
binding is mapped for both.  The kit's RAM is one lent binding (the memslot's default
policy); the VM starts with its devicetree lent as a parcel (``GUNYAH_VM_SET_DTB_CONFIG``,
``GUNYAH_VM_START``) and the guest touches all its RAM, which makes every page private.
A conversion is the VMM changing the binding of the pages as the guest asked
(``GUNYAH_VM_MAP_MEM`` with ``GUNYAH_MEM_UNMAP``, then again with the other policy): the
removal reclaims the folios with their bytes (no sanitize), so the same page changes
hands with its contents (``VmTypeInfo.conversion = "in_place"``).  :class:`GunyahKitVmm`
has the methods of ``guestmem.conformance.KitVmm`` it changes; the kit supplies the rest
(this package imports only the public API).
"""

from __future__ import annotations

from typing import Any

from guestmem import uapi
from guestmem.backend import Backend, VmTypeInfo, hookimpl
from guestmem_gunyah import abi
from guestmem_gunyah.driver import Driver
from guestmem_gunyah.face import gunyah, set_driver
from guestmem_gunyah.invariants import GunyahChecker

PAGE = uapi.PAGE_SIZE
PAGE_SHIFT = uapi.PAGE_SHIFT


class GunyahKitVmm:
    """The kit's VMM and guest of a Gunyah VM: RAM is a lent binding the guest touches at
    boot; conversions rebind pages lent or shared."""

    kvm: Any
    vm: Any

    def setup(self) -> None:
        """The host runs the guest_memfd-library generation of the driver
        (:attr:`~guestmem_gunyah.driver.Driver.LIBRARY`), whose host faults on lent memory
        are SIGBUS: the host never maps a private page (M-4).  (Gunyah's own guest_memfd
        launders instead, reclaiming the page from the guest; the plugin's tests cover it.)"""
        set_driver(self.kvm, Driver.LIBRARY)

    def gmem_flags(self) -> int:
        """What ``GUNYAH_CREATE_GUEST_MEM`` gives: an mmap-able file the host may access
        wherever nothing is lent (``MMAP | INIT_SHARED``)."""
        return uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED

    def start(self, vcpu: Any, ram: Any) -> None:
        """``GUNYAH_VM_SET_DTB_CONFIG`` of the RAM's first page (the kit's devicetree is a
        zeroed page, so that the RAM starts zeroed), ``GUNYAH_VM_START`` (the devicetree
        parcel lent, demand paging set up for the lent binding), then the guest touches all
        its RAM: every page is lent, guest-private."""
        face = gunyah(self.vm)
        face.set_dtb_config(ram.gpa, PAGE)
        face.start()
        self._touch_lent(ram)

    def _touch_lent(self, ram: Any) -> None:
        """The guest touches every page of the RAM's lent bindings (demand paging lends the
        folios it does not hold; the pages it holds need nothing)."""
        face = gunyah(self.vm)
        first, last = ram.gpa >> PAGE_SHIFT, (ram.gpa + ram.size) >> PAGE_SHIFT
        for b in face.bindings:
            if b.lend and b.gfn < last and first < b.end:
                face.touch(b.gfn << PAGE_SHIFT, b.nr << PAGE_SHIFT)

    def convert(self, vcpu: Any, ram: Any, page: int, npages: int, *, private: bool) -> None:
        """The guest's request carried out by the VMM (Gunyah has no conversion call of its
        own): every binding holding one of the pages is removed (``GUNYAH_MEM_UNMAP``:
        ``gunyah_gmem_remove_binding`` reclaims its folios, contents kept) and bound again
        in pieces, the pages with ``GUNYAH_MEM_FORCE_LEND`` (private) or
        ``GUNYAH_MEM_FORCE_SHARE`` (shared), the rest as it was (a binding cannot be split
        in place, ``gunyah_gmem_trim_binding``); then the guest touches its lent memory
        again.  The lent IPAs stay registered for demand paging (``VM_SET_DEMAND_PAGING``
        of the start)."""
        face = gunyah(self.vm)
        start = ram.gpa_of(page) >> PAGE_SHIFT
        end = start + npages
        access = abi.GUNYAH_MEM_FORCE_LEND if private else abi.GUNYAH_MEM_FORCE_SHARE
        for b in face.bindings:
            if b.end <= start or end <= b.gfn:
                continue
            face.map_mem(
                ram.gmem,
                b.gfn << PAGE_SHIFT,
                b.i_off << PAGE_SHIFT,
                b.nr << PAGE_SHIFT,
                b.flags | abi.GUNYAH_MEM_UNMAP,
            )
            lo, hi = max(b.gfn, start), min(b.end, end)
            pieces = (
                (b.gfn, lo, b.flags),
                (lo, hi, (b.flags & abi.GUNYAH_MEM_ALLOW_RWX) | access),
                (hi, b.end, b.flags),
            )
            for s, e, flags in pieces:
                if s < e:
                    offset = (b.i_off + s - b.gfn) << PAGE_SHIFT
                    face.map_mem(ram.gmem, s << PAGE_SHIFT, offset, (e - s) << PAGE_SHIFT, flags)
        self._touch_lent(ram)


@hookimpl
def guestmem_conformance_options(backend: Backend, vm_type: VmTypeInfo) -> dict[str, Any] | None:
    """The kit's settings for the ``gunyah`` backend: the Gunyah checker watches every VM,
    which :class:`GunyahKitVmm` drives."""
    if backend.name != "gunyah":
        return None
    return {"observers": (GunyahChecker,), "vmm": GunyahKitVmm}
