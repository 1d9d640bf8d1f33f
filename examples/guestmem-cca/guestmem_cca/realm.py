"""KVM's side of a realm: ``arch/arm64/kvm/rme.c`` of the CCA host series (gwshan/linux).

:class:`RealmHost` is the machine (``host.arch``): its RMM and the realm VMID bitmap.
:class:`KvmRealm` is one realm VM (``vm.arch``): its state as KVM keeps it
(``REALM_STATE_NONE`` .. ``DEAD``), its RD and root RTT, its RECs.  The methods are the
functions of rme.c they are named after, calling the RMM in the same order and turning
its answers into the same errnos; where rme.c WARNs and leaks a granule the RMM would not
give back, the model counts it in ``cca.leaked_granules`` and keeps it off the allocator.
"""

from __future__ import annotations

import errno
from typing import Any

import attrs

from guestmem.backend import HostView, Owner, VmView
from guestmem.errors import KvmError
from guestmem_cca.rmi import (
    GRANULE_SHIFT,
    GRANULE_SIZE,
    RMI_ERROR_RTT,
    RMI_MEASURE_CONTENT,
    RTT_PAGE_LEVEL,
    RTT_START_LEVEL,
    GranuleState,
    Ripas,
    map_size,
)
from guestmem_cca.rmm import RealmParams, RmiResult, Rmm, SetRipas

#: Rule tag of this backend's own decisions.
RULE = "CCA"
#: The realm's IPA width (``VTCR_EL2_IPA``): 40 bits, the unprotected alias at bit 39.
IPA_BITS = 40
#: ``1 << kvm_get_vmid_bits()``.
VMID_COUNT = 1 << 8


def owner_of(state: GranuleState) -> Owner:
    """Who a granule state gives the page to: the host (NS), a realm (DATA) or the RMM."""
    if state is GranuleState.NS:
        return Owner.HOST
    return Owner.GUEST if state is GranuleState.DATA else Owner.HYPERVISOR


class RealmHost:
    """``host.arch`` of a ``cca`` host: the RMM and the VMIDs (``rme_vmid_bitmap``)."""

    def __init__(self, host: HostView) -> None:
        self.host = host

        def listener(addr: int, count: int, old: GranuleState, new: GranuleState) -> None:
            host.ownership_update(
                "granule",
                addr >> GRANULE_SHIFT,
                count,
                old.value,
                new.value,
                old_owner=owner_of(old),
                new_owner=owner_of(new),
            )

        self.rmm = Rmm(zero=host.zero, write=host.write, read=host.read, listener=listener)
        self.vmids: set[int] = set()

    def vmid_reserve(self) -> int:
        """``rme_vmid_reserve``: the lowest free VMID; ENOMEM when none is."""
        for vmid in range(VMID_COUNT):
            if vmid not in self.vmids:
                self.vmids.add(vmid)
                return vmid
        raise KvmError(errno.ENOMEM, RULE, "no free realm VMID")

    def vmid_release(self, vmid: int) -> None:
        """``rme_vmid_release``."""
        self.vmids.discard(vmid)


@attrs.define(eq=False)
class Rec:
    """``vcpu->arch.rec``: the REC granule, its auxiliary granules, and what the guest's
    last RSI call left in x0..x2 (``rec->run->enter.gprs``)."""

    addr: int
    aux: tuple[int, ...]
    ret: tuple[int, int, int] = (0, 0, 0)
    #: The RIPAS change KVM completed at the last entry, ``(base, top, ripas)``: the guest's
    #: RSI_IPA_STATE_SET returns with it.
    completed: tuple[int, int, int] | None = None


@attrs.define(eq=False)
class KvmRealm:
    """``kvm->arch.realm`` of one realm VM."""

    vm: VmView
    realm_host: RealmHost
    #: ``kvm_realm_state``: NONE, NEW, ACTIVE, SYSTEM_OFF (the RMM's, seen at REC entry),
    #: DYING, DEAD.
    state: str = "NONE"
    vmid: int = -1
    rd: int = 0
    root: int = 0
    hash_algo: int = 0
    #: RECs by vCPU id.
    recs: dict[int, Rec] = attrs.Factory(dict)
    #: vCPUs created before the realm (their RECs come with KVM_CAP_ARM_RME_CREATE_REALM).
    waiting: list[Any] = attrs.Factory(list)

    @property
    def rmm(self) -> Rmm:
        """The machine's RMM."""
        return self.realm_host.rmm

    @property
    def shared_bit(self) -> int:
        """``BIT(realm->ia_bits - 1)``: the unprotected IPA alias."""
        return 1 << (IPA_BITS - 1)

    def _count(self, name: str, n: int = 1) -> None:
        self.vm.count(f"cca.{name}", n)

    def _call(self, what: str, result: RmiResult) -> RmiResult:
        self._count(f"rmi.{what}")
        if not result.ok:
            self.vm.trace("cca_rmi_error", call=what, status=str(result))
        return result

    # --- granules the host hands to the RMM ---------------------------------------------------
    def alloc_delegated_granule(self) -> int:
        """``alloc_delegated_granule``: a zeroed host page, delegated; ENXIO if refused."""
        pfn = self.vm.host.alloc(1)
        if not self._call("granule_delegate", self.rmm.granule_delegate(pfn << GRANULE_SHIFT)).ok:
            self.vm.host.free(pfn, 1)
            raise KvmError(errno.ENXIO, RULE, f"RMI_GRANULE_DELEGATE of pfn {pfn:#x} refused")
        return pfn << GRANULE_SHIFT

    def free_delegated_granule(self, addr: int) -> None:
        """``free_delegated_granule``: undelegate, then free; a granule the RMM keeps is
        leaked (WARN_ON)."""
        if not self._call("granule_undelegate", self.rmm.granule_undelegate(addr)).ok:
            self._count("leaked_granules")
            return
        self._count("zeroed_bytes", GRANULE_SIZE)
        self.vm.host.free(addr >> GRANULE_SHIFT, 1)

    # --- creating and activating the realm -------------------------------------------------------
    def create_realm(self) -> None:
        """``kvm_create_realm``: a VMID, then ``realm_create_rd`` (RD and root RTT delegated,
        RMI_REALM_CREATE, RMI_REC_AUX_COUNT); the realm is NEW."""
        if self.state != "NONE":
            raise KvmError(errno.EEXIST, RULE, "KVM_CAP_ARM_RME_CREATE_REALM: the realm exists")
        self.vmid = self.realm_host.vmid_reserve()
        try:
            self.rd = self.alloc_delegated_granule()
            self.root = self.alloc_delegated_granule()
        except KvmError:
            if self.rd:
                self.free_delegated_granule(self.rd)
            self.realm_host.vmid_release(self.vmid)
            raise
        params = RealmParams(ipa_bits=IPA_BITS, rtt_base=self.root, vmid=self.vmid)
        if not self._call("realm_create", self.rmm.realm_create(self.rd, params)).ok:
            self.free_delegated_granule(self.root)
            self.free_delegated_granule(self.rd)
            self.realm_host.vmid_release(self.vmid)
            raise KvmError(errno.ENXIO, RULE, "RMI_REALM_CREATE failed")
        self._call("rec_aux_count", self.rmm.rec_aux_count(self.rd))
        self.state = "NEW"
        self.vm.trace("cca_realm_create", vmid=self.vmid, rd=self.rd >> GRANULE_SHIFT)
        for vcpu in self.waiting:
            self.create_rec(vcpu)
        self.waiting.clear()

    def activate(self) -> None:
        """``kvm_activate_realm``: NEW -> ACTIVE through RMI_REALM_ACTIVATE."""
        if self.state != "NEW":
            raise KvmError(errno.EINVAL, RULE, f"KVM_CAP_ARM_RME_ACTIVATE_REALM in state {self.state}")
        if not self._call("realm_activate", self.rmm.realm_activate(self.rd)).ok:
            raise KvmError(errno.ENXIO, RULE, "RMI_REALM_ACTIVATE failed")
        self.state = "ACTIVE"
        self.vm.trace("cca_realm_activate", rim=self.rmm.realms[self.rd].rim.hex())

    def create_rec(self, vcpu: Any) -> None:
        """``kvm_create_rec``: only while the realm is NEW (ENOENT otherwise); the REC and its
        auxiliary granules delegated, RMI_REC_CREATE."""
        if self.state == "NONE":
            self.waiting.append(vcpu)
            return
        if self.state != "NEW":
            raise KvmError(errno.ENOENT, RULE, f"a REC is created while the realm is NEW, not {self.state}")
        rec = self.alloc_delegated_granule()
        aux = (self.alloc_delegated_granule(),)
        if not self._call("rec_create", self.rmm.rec_create(self.rd, rec, aux)).ok:
            for addr in (*aux, rec):
                self.free_delegated_granule(addr)
            raise KvmError(errno.ENXIO, RULE, "RMI_REC_CREATE failed")
        self.recs[vcpu.vcpu_id] = Rec(rec, aux)

    def destroy_rec(self, vcpu_id: int) -> None:
        """``kvm_destroy_rec``: RMI_REC_DESTROY, then its granules back; a REC the RMM will
        not destroy leaks them."""
        rec = self.recs.pop(vcpu_id, None)
        if rec is None:
            return
        if not self._call("rec_destroy", self.rmm.rec_destroy(rec.addr)).ok:
            self._count("leaked_granules", 1 + len(rec.aux))
            return
        for addr in (*rec.aux, rec.addr):
            self.free_delegated_granule(addr)

    # --- RTTs --------------------------------------------------------------------------------------
    def create_rtt_levels(self, ipa: int, level: int, max_level: int) -> None:
        """``realm_create_rtt_levels``: tables from *level* + 1 down to *max_level*; one that
        exists already (RMI_ERROR_RTT at the level above) is passed over."""
        while level < max_level:
            level += 1
            rtt = self.alloc_delegated_granule()
            addr = ipa // map_size(level - 1) * map_size(level - 1)
            result = self._call("rtt_create", self.rmm.rtt_create(self.rd, rtt, addr, level))
            if result.status == RMI_ERROR_RTT and result.index == level - 1:
                self.free_delegated_granule(rtt)
                continue
            if not result.ok:
                self.free_delegated_granule(rtt)
                raise KvmError(errno.ENXIO, RULE, f"RMI_RTT_CREATE at level {level}: {result}")

    def find_map_level(self, start: int, end: int) -> int:
        """``find_map_level``: the largest entry level ``[start, end)`` allows."""
        level = RTT_PAGE_LEVEL
        while level > RTT_START_LEVEL + 1:
            size = map_size(level - 1)
            if start % size or start + size > end:
                break
            level -= 1
        return level

    def tear_down_rtts(self) -> None:
        """``kvm_realm_destroy_rtts``: every table below the root destroyed, deepest first."""
        realm = self.rmm.realms[self.rd]
        for level in (RTT_PAGE_LEVEL, RTT_START_LEVEL + 1):
            for lv, idx in sorted(k for k in realm.tables if k[0] == level):
                ipa = idx * map_size(lv - 1)
                result = self._call("rtt_destroy", self.rmm.rtt_destroy(self.rd, ipa, lv))
                if result.ok:
                    self.free_delegated_granule(result.x1)
                else:
                    self._count("leaked_granules")

    # --- IPA states ----------------------------------------------------------------------------------
    def ripas_change(self, base: int, end: int, rec: Rec | None = None) -> int:
        """``ripas_change``: RMI_RTT_INIT_RIPAS (no REC) or RMI_RTT_SET_RIPAS (for *rec*) over
        ``[base, end)``, creating the tables an RMI_ERROR_RTT asks for; returns the top."""
        ipa = base
        while ipa < end:
            if rec is None:
                result = self._call("rtt_init_ripas", self.rmm.rtt_init_ripas(self.rd, ipa, end))
            else:
                result = self._call("rtt_set_ripas", self.rmm.rtt_set_ripas(self.rd, rec.addr, ipa, end))
            if result.ok:
                ipa = result.x1
                continue
            if result.status != RMI_ERROR_RTT:
                raise KvmError(errno.ENXIO, RULE, f"RIPAS change of [{ipa:#x}, {end:#x}): {result}")
            level = self.find_map_level(ipa, end)
            if result.index >= level:
                raise KvmError(errno.EINVAL, RULE, f"RIPAS change of [{ipa:#x}, {end:#x}): {result}")
            self.create_rtt_levels(ipa, result.index, level)
        return ipa

    def init_ripas(self, base: int, size: int) -> None:
        """``kvm_init_ipa_range_realm`` (KVM_CAP_ARM_RME_INIT_RIPAS_REALM): NEW realms only."""
        end = base + size
        if end < base:
            raise KvmError(errno.EINVAL, RULE, "KVM_CAP_ARM_RME_INIT_RIPAS_REALM: the range wraps")
        if self.state != "NEW":
            raise KvmError(errno.EPERM, RULE, f"KVM_CAP_ARM_RME_INIT_RIPAS_REALM in state {self.state}")
        self.ripas_change(base, end)
        self.vm.trace("cca_init_ripas", base=base, end=end)

    def complete_ripas_change(self, vcpu_id: int) -> None:
        """``kvm_complete_ripas_change`` (from ``kvm_rec_pre_enter``): RMI_RTT_SET_RIPAS over
        the REC's outstanding request; a change to EMPTY then unmaps the private range
        (``realm_set_ipa_state``: DATA_DESTROY, UNDELEGATE)."""
        rec = self.recs[vcpu_id]
        request = self.rmm.realms[self.rd].recs[rec.addr].set_ripas
        if request is None or rec.completed is not None:
            return
        base = request.addr
        try:
            top = self.ripas_change(base, request.top, rec)
        except KvmError as exc:  # WARN_RATELIMIT("Unable to satisfy RIPAS_CHANGE"): the realm
            top = request.addr  # learns how far it got
            self._count("ripas_change_failures")
            self.vm.trace("cca_ripas_change_failed", base=base, top=request.top, error=str(exc))
        if request.ripas is Ripas.EMPTY and top != base:
            self.unmap_private(base, top)
            self.zap_private_leaves(base, top)
        rec.completed = (request.base, top, int(request.ripas))
        self._count("ripas_changes")
        self.vm.trace("cca_ripas_change", base=request.base, top=top, ripas=request.ripas.name)

    def zap_private_leaves(self, start: int, end: int) -> None:
        """The RTT is the realm's stage-2: what DATA_DESTROY took from ``[start, end)`` is no
        longer mapped, so the core's private leaves there, which mirror it, go too (a
        change to EMPTY the VMM never carried out leaves the attributes private; the
        realm's next access there aborts, RIPAS EMPTY)."""
        first, last = start >> GRANULE_SHIFT, end >> GRANULE_SHIFT
        for leaf in [leaf for leaf in self.vm.leaves(first, last) if leaf.private]:
            self.vm.zap_gfn_range(leaf.gfn, leaf.end_gfn)

    def request_ripas(self, vcpu_id: int, base: int, top: int, ripas: Ripas, change_destroyed: bool) -> None:
        """The REC exits with RMI_EXIT_RIPAS_CHANGE: the RMM keeps the request on the REC."""
        rec = self.recs[vcpu_id]
        self.rmm.realms[self.rd].recs[rec.addr].set_ripas = SetRipas(base, top, ripas, change_destroyed, base)
        rec.completed = None

    # --- data --------------------------------------------------------------------------------------------
    def create_data(self, ipa: int, pfn: int, src: bytes | None, flags: int) -> None:
        """``realm_create_protected_data_granule`` (populate, src given) or one granule of
        ``realm_map_protected`` (fault, no src): DELEGATE, DATA_CREATE[_UNKNOWN], the
        missing tables on RMI_ERROR_RTT, undelegated again if it fails."""
        data = pfn << GRANULE_SHIFT
        if not self._call("granule_delegate", self.rmm.granule_delegate(data)).ok:
            raise KvmError(errno.ENXIO, RULE, f"RMI_GRANULE_DELEGATE of pfn {pfn:#x} refused")
        for attempt in (0, 1):
            if src is None:
                result = self._call("data_create_unknown", self.rmm.data_create_unknown(self.rd, data, ipa))
            else:
                result = self._call("data_create", self.rmm.data_create(self.rd, data, ipa, src, flags))
            if result.status == RMI_ERROR_RTT and attempt == 0:
                self.create_rtt_levels(ipa, result.index, RTT_PAGE_LEVEL)
                continue
            break
        if not result.ok:
            if self._call("granule_undelegate", self.rmm.granule_undelegate(data)).ok:
                self._count("zeroed_bytes", GRANULE_SIZE)
            else:
                self._count("leaked_granules")
            raise KvmError(errno.EIO, RULE, f"DATA_CREATE at ipa {ipa:#x}: {result}")
        self._count("measured_pages" if src is not None and flags == RMI_MEASURE_CONTENT else "data_pages")

    def map_unprotected(self, ipa: int, pfn: int) -> None:
        """``realm_map_non_secure``: RMI_RTT_MAP_UNPROTECTED of the NS page at the
        unprotected alias; an entry already there (another vCPU's fault) is fine."""
        result = self._call(
            "rtt_map_unprotected",
            self.rmm.rtt_map_unprotected(self.rd, ipa | self.shared_bit, pfn << GRANULE_SHIFT),
        )
        if not result.ok and result.status != RMI_ERROR_RTT:
            raise KvmError(errno.ENXIO, RULE, f"RTT_MAP_UNPROTECTED at ipa {ipa:#x}: {result}")

    def unmap_private(self, start: int, end: int) -> int:
        """``realm_unmap_private_range``: DATA_DESTROY then UNDELEGATE of every assigned page
        of ``[start, end)``; returns the pages destroyed."""
        realm = self.rmm.realms[self.rd]
        first, last = start >> GRANULE_SHIFT, end >> GRANULE_SHIFT
        done = 0
        for s, e, _ in list(realm.assigned.items(first, last)):
            for page in range(s, e):
                result = self._call("data_destroy", self.rmm.data_destroy(self.rd, page << GRANULE_SHIFT))
                if not result.ok:
                    continue
                self._count("zeroed_bytes", GRANULE_SIZE)
                if self._call("granule_undelegate", self.rmm.granule_undelegate(result.x1)).ok:
                    self._count("zeroed_bytes", GRANULE_SIZE)
                else:
                    self._count("leaked_granules")
                done += 1
        return done

    def unmap_range(self, start: int, end: int, unmap_private: bool) -> bool:
        """``kvm_realm_unmap_range``: the unprotected mappings of ``[start, end)``, and the
        private pages when the unmap covers them; True if anything went (a TLBI)."""
        if self.state in ("NONE", "DEAD"):
            return False
        realm = self.rmm.realms[self.rd]
        bit = self.shared_bit
        first, last = (start | bit) >> GRANULE_SHIFT, (end | bit) >> GRANULE_SHIFT
        gone = 0
        for s, e, _ in list(realm.unprotected.items(first, last)):
            for page in range(s, e):
                gone += self._call(
                    "rtt_unmap_unprotected", self.rmm.rtt_unmap_unprotected(self.rd, page << GRANULE_SHIFT)
                ).ok
        if unmap_private:
            gone += self.unmap_private(start, end)
        return gone > 0

    # --- teardown ----------------------------------------------------------------------------------------
    def destroy(self) -> None:
        """``kvm_destroy_realm`` after the stage-2 teardown: the private pages and unprotected
        mappings left, the RTTs, RMI_REALM_DESTROY, the RD and root RTT back, the VMID."""
        if self.state in ("NONE", "DEAD"):
            return
        self.state = "DYING"
        self.unmap_range(0, 1 << (IPA_BITS - 1), unmap_private=True)
        self.tear_down_rtts()
        for vcpu_id in list(self.recs):
            self.destroy_rec(vcpu_id)
        if not self._call("realm_destroy", self.rmm.realm_destroy(self.rd)).ok:
            self._count("leaked_granules", 2)
            return
        self.free_delegated_granule(self.rd)
        self.free_delegated_granule(self.root)
        self.realm_host.vmid_release(self.vmid)
        self.state = "DEAD"
        self.vm.trace("cca_realm_destroy", vmid=self.vmid)

    # --- what the RMM says of a page --------------------------------------------------------------------
    def ripas(self, gfn: int) -> Ripas:
        """The RIPAS of *gfn*'s protected IPA."""
        return self.rmm.realms[self.rd].entry(gfn << GRANULE_SHIFT)[2]
