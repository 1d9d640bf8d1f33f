"""How the conformance kit drives TDs: the ``guestmem_conformance_options`` of guestmem-tdx
and the kit's VMM driver for ``KVM_X86_TDX_VM``.

A TD exists only once ``KVM_TDX_INIT_VM`` made it (``KVM_CREATE_VCPU`` before it is EIO,
TDX-1.1), its vCPUs run only once ``KVM_TDX_INIT_VCPU`` set them up and
``KVM_TDX_FINALIZE_VM`` froze the launch measurement, and its private memory is usable
only once the TD accepted it (TDG.MEM.PAGE.ACCEPT).  The TD converts with
TDG.VP.VMCALL<MapGPA>, which leaves ``KVM_RUN`` as ``KVM_HC_MAP_GPA_RANGE``; the VMM
converts destructively as QEMU's ``kvm_convert_memory`` does (attributes, then a punch
of the old side), and the TD accepts what became private (Linux's
``tdx_enc_status_changed``; backends.md 1.3, 1.4).  :class:`TdxKitVmm` is that VMM and
TD; it has the methods of ``guestmem.conformance.KitVmm`` it changes, and the kit
supplies the rest (this package imports only the public API).
"""

from __future__ import annotations

from typing import Any

from guestmem import uapi
from guestmem.backend import Backend, VmTypeInfo, hookimpl
from guestmem.errors import HypercallExit, KvmError
from guestmem_tdx.guest import TdxGuest
from guestmem_tdx.invariants import TdxChecker
from guestmem_tdx.kvm import PendingAccessVe
from guestmem_tdx.vmm import Tdx

PAGE = uapi.PAGE_SIZE
PAGE_SHIFT = uapi.PAGE_SHIFT
#: TD attributes of the kit's TDs: no ``SEPT_VE_DISABLE``, so that the TD takes #VE
#: (rather than dying, TDX-1.2) when it touches a page the host took away.
KIT_TD_ATTRIBUTES = 0


class TdxKitVmm:
    """The kit's VMM and TD: ``KVM_TDX_INIT_VM`` before any vCPU, the launch before the
    first run, ACCEPT before a private page is used, MapGPA for conversions."""

    vm: Any

    def setup(self) -> None:
        """``KVM_CAP_EXIT_HYPERCALL`` (MapGPA reaches the VMM), then ``KVM_TDX_INIT_VM``:
        the TD's HKID and control pages, before ``KVM_CREATE_VCPU``."""
        self.tdx = Tdx(self.vm)
        self.tdx.enable_cap_exit_hypercall()
        self.tdx.init_vm(attributes=KIT_TD_ATTRIBUTES)

    def add_vcpu(self, vcpu: Any) -> None:
        """``KVM_TDX_INIT_VCPU`` of every vCPU before ``KVM_TDX_FINALIZE_VM`` (a vCPU cannot
        be added to a finalized TD, ``tdx_vcpu_create``)."""
        self.tdx.init_vcpu(vcpu)

    def start(self, vcpu: Any, ram: Any) -> None:
        """The launch: ``KVM_TDX_INIT_VCPU``, the RAM made private (``KitVmm.start``), a
        zeroed boot page added and measured at the start of the RAM
        (``KVM_TDX_INIT_MEM_REGION``: TDH.MEM.PAGE.ADD and TDH.MR.EXTEND), then
        ``KVM_TDX_FINALIZE_VM``; the TD accepts the rest of its RAM as Linux's
        ``tdx_accept_memory`` does at boot."""
        self.tdx.init_vcpu(vcpu)
        super().start(vcpu, ram)  # type: ignore[misc]
        self.tdx.init_mem_region(vcpu, ram.gpa, bytes(PAGE))
        self.tdx.finalize()
        self._accept(vcpu, ram.gpa + PAGE, ram.gpa + ram.size)

    def _accept(self, vcpu: Any, start: int, end: int) -> None:
        if start < end and not TdxGuest(vcpu).accept_memory(start, end):
            raise KvmError(0, "", f"the TD could not accept [{start:#x}, {end:#x})")

    # --- the TD's accesses ------------------------------------------------------------------
    def _access(self, vcpu: Any, run: Any) -> Any:
        """Run a TD access; a private one of a page the host took away since the TD
        accepted it (a punch, a memslot change: KVM's next fault AUGs a new, PENDING
        page) takes #VE, which the TD answers with ACCEPT, then runs again.  (A Linux TD
        accepts its memory once and sets ``SEPT_VE_DISABLE``: it would die there; the
        kit's TD accepts the page again, so that the kit can go on, and finds it zeroed.)"""
        try:
            return run()
        except PendingAccessVe as exc:
            page = exc.gpa & ~(PAGE - 1)
            status = TdxGuest(vcpu).accept(page)
            if status:
                raise KvmError(0, "", f"TDG.MEM.PAGE.ACCEPT of {page:#x} after #VE: {status:#x}") from exc
        return run()

    def _gpa(self, vcpu: Any, gpa: int, private: bool) -> int:
        """The alias the TD uses: the shared bit set for a shared access."""
        return gpa if private else gpa | TdxGuest(vcpu).shared_bit

    def guest_write(self, vcpu: Any, gpa: int, data: bytes, *, private: bool) -> None:
        """A TD store through the private or the shared alias."""
        guest = TdxGuest(vcpu)
        self._access(vcpu, lambda: guest.write(self._gpa(vcpu, gpa, private), data))

    def guest_read(self, vcpu: Any, gpa: int, n: int, *, private: bool) -> bytes:
        """A TD load through the private or the shared alias."""
        guest = TdxGuest(vcpu)
        data: bytes = self._access(vcpu, lambda: guest.read(self._gpa(vcpu, gpa, private), n))
        return data

    # --- conversions --------------------------------------------------------------------------
    def convert(self, vcpu: Any, ram: Any, page: int, npages: int, *, private: bool) -> None:
        """Linux's ``tdx_enc_status_changed``: MapGPA of the range (``tdx_map_gpa``), each
        ``KVM_EXIT_HYPERCALL`` answered by the VMM's destructive conversion
        (``KitVmm.convert``: attributes, then the punch of the old side); pages made
        private are then accepted (``tdx_accept_memory``)."""
        vmm_convert = super().convert  # type: ignore[misc]
        start = ram.gpa_of(page)
        end = start + npages * PAGE

        def handle(exit_: HypercallExit) -> int:
            gpa, count, attrs = exit_.args[:3]
            assert exit_.nr == uapi.KVM_HC_MAP_GPA_RANGE and start <= gpa and gpa + count * PAGE <= end
            assert bool(attrs & uapi.KVM_MAP_GPA_RANGE_ENCRYPTED) == private
            vmm_convert(vcpu, ram, (gpa - ram.gpa) >> PAGE_SHIFT, count, private=private)
            return 0

        if not TdxGuest(vcpu).map_gpa_range(start, end, private=private, handle=handle):
            raise KvmError(
                0, "", f"MapGPA of [{start:#x}, {end:#x}) to {'private' if private else 'shared'} failed"
            )
        if private:
            self._accept(vcpu, start, end)


@hookimpl
def guestmem_conformance_options(backend: Backend, vm_type: VmTypeInfo) -> dict[str, Any] | None:
    """The kit's settings for the ``tdx`` backend: the TDX checker watches every VM; a TD is
    driven by :class:`TdxKitVmm`, and a private page whose S-EPT leaf a memslot change
    removed (TDH.MEM.PAGE.REMOVE, then the page cleared) comes back as a new page the TD
    accepts: zeroed (``private_unmap="destroy"``)."""
    if backend.name != "tdx":
        return None
    options: dict[str, Any] = {"observers": (TdxChecker,)}
    if vm_type.type == uapi.KVM_X86_TDX_VM:
        options.update(vmm=TdxKitVmm, private_unmap="destroy")
    return options
