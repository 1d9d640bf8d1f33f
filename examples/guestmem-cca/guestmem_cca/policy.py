"""The arch policy of the ``cca`` backend: an Arm CCA host (the KVM CCA series) with its RMM.

Each hook is the kernel function of ``arch/arm64/kvm`` (gwshan/linux) it is named after,
run against the RMM of :mod:`guestmem_cca.rmm` (backends.md 5):

* a realm is created, given its initial RIPAS, populated and activated through
  ``KVM_ENABLE_CAP(KVM_CAP_ARM_RME, ...)``; its vCPUs' RECs exist while it is NEW;
* a private fault delegates the gmem page and makes it the realm's (DATA_CREATE_UNKNOWN),
  a shared one maps the host page at the unprotected alias (RTT_MAP_UNPROTECTED);
* an unmap of private memory destroys the pages (DATA_DESTROY, then UNDELEGATE scrubs
  them): conversions are destructive, and a page a memslot change took away is DESTROYED
  for the realm until it accepts it again;
* the realm changes RIPAS with RSI_IPA_STATE_SET: the REC exits, KVM hands userspace a
  memory-fault exit (private iff RAM), and completes the change at the next REC entry;
* a delegated granule is never host-mappable, and a host access to one is a Granule
  Protection Fault.

Normal (non-realm) VMs of the host are left to the core, as arm64 KVM runs them.
"""

from __future__ import annotations

import errno
from typing import Any

from guestmem import cabi, uapi
from guestmem.backend import Fault, GfnRange, GmemView, HostFault, HostView, VcpuView, VmView, hookimpl, view
from guestmem.errors import KvmError, MemoryFault
from guestmem_cca.exits import RealmAbort
from guestmem_cca.realm import RULE, KvmRealm, RealmHost
from guestmem_cca.rmi import (
    GRANULE_SHIFT,
    GRANULE_SIZE,
    KVM_CAP_ARM_RME,
    KVM_CAP_ARM_RME_ACTIVATE_REALM,
    KVM_CAP_ARM_RME_CONFIG_REALM,
    KVM_CAP_ARM_RME_CREATE_REALM,
    KVM_CAP_ARM_RME_INIT_RIPAS_REALM,
    KVM_CAP_ARM_RME_POPULATE_REALM,
    KVM_VM_TYPE_ARM_REALM,
    PSCI_SYSTEM_OFF,
    RMI_MEASURE_CONTENT,
    RSI_ACCEPT,
    RSI_CHANGE_DESTROYED,
    RSI_ERROR_INPUT,
    RSI_REJECT,
    RSI_SUCCESS,
    SMC_RSI_IPA_STATE_SET,
    Ripas,
)

#: Capabilities x86 has and arm64 does not.
_X86_ONLY = (uapi.KVM_CAP_VM_TYPES, uapi.KVM_CAP_PRE_FAULT_MEMORY, uapi.KVM_CAP_MULTI_ADDRESS_SPACE)


def realm_host(host: HostView) -> RealmHost:
    """``host.arch`` of a ``cca`` host; TypeError for any other."""
    arch = host.arch
    if not isinstance(arch, RealmHost):
        raise TypeError(f"{host!r} is not a host of the cca backend")
    return arch


def kvm_realm(vm: Any) -> KvmRealm:
    """The realm state of *vm* (a ``Vm`` of the ``cca`` backend or its view); TypeError for
    a VM that is no realm."""
    arch = view(vm).arch
    if not isinstance(arch, KvmRealm):
        raise TypeError(f"{vm!r} is not a realm of the cca backend")
    return arch


def _realm(vm: VmView) -> KvmRealm | None:
    arch = vm.arch
    return arch if isinstance(arch, KvmRealm) else None


class CcaPolicy:
    """The hook implementations of the ``cca`` backend."""

    @hookimpl
    def guestmem_snapshot(self, host: HostView, vm: VmView | None) -> Any:
        """The RMM's granules, or a realm's RTTs, RIPAS and mappings
        (:mod:`guestmem_cca.snapshot`)."""
        from guestmem_cca import snapshot

        return snapshot.host_state(host) if vm is None else snapshot.vm_state(vm)

    # --- host and VM lifetime ----------------------------------------------------------------
    @hookimpl
    def guestmem_host_init(self, host: HostView) -> RealmHost:
        """``kvm_init_rme``: the machine's RMM (``rmi_check_version``, the VMID bitmap)."""
        return RealmHost(host)

    @hookimpl
    def guestmem_vm_init(self, vm: VmView) -> KvmRealm | None:
        """``kvm_init_realm_vm``: a realm starts without its RD (``REALM_STATE_NONE``)."""
        if vm.vm_type != KVM_VM_TYPE_ARM_REALM:
            return None
        return KvmRealm(vm, realm_host(vm.host))

    @hookimpl
    def guestmem_vm_destroy(self, vm: VmView) -> None:
        """``kvm_destroy_realm``."""
        realm = _realm(vm)
        if realm is not None:
            realm.destroy()

    @hookimpl
    def guestmem_vcpu_init(self, vcpu: VcpuView) -> None:
        """``kvm_create_rec`` (``KVM_ARM_VCPU_FINALIZE`` of ``KVM_ARM_VCPU_REC``): ENOENT once
        the realm is no longer NEW; a vCPU made before the realm gets its REC with it."""
        realm = _realm(vcpu.vm)
        if realm is not None:
            realm.create_rec(vcpu)

    @hookimpl
    def guestmem_vcpu_destroy(self, vcpu: VcpuView) -> None:
        """``kvm_destroy_rec``."""
        realm = _realm(vcpu.vm)
        if realm is not None:
            realm.destroy_rec(vcpu.vcpu_id)

    @hookimpl
    def guestmem_check_extension(self, vm: VmView | None, cap: int) -> int | None:
        """arm64 answers, and ``KVM_CAP_ARM_RME`` (realms are supported)."""
        if cap in _X86_ONLY:
            return 0
        if cap == KVM_CAP_ARM_RME:
            return 1
        return None

    @hookimpl
    def guestmem_vcpu_pre_run(self, vcpu: VcpuView) -> None:
        """``kvm_rec_pre_enter``: a REC runs only in an ACTIVE realm (EINVAL), and a RIPAS
        change it exited for is completed before it enters again."""
        realm = _realm(vcpu.vm)
        if realm is None:
            return
        if realm.state != "ACTIVE":
            raise KvmError(errno.EINVAL, RULE, f"KVM_RUN of a REC while the realm is {realm.state}")
        rec = realm.recs.get(vcpu.vcpu_id)
        if rec is None:
            raise KvmError(errno.EINVAL, RULE, f"vCPU {vcpu.vcpu_id} has no REC")
        entered = realm.rmm.rec_enter(rec.addr)
        if not entered.ok:
            raise KvmError(errno.EINVAL, RULE, f"RMI_REC_ENTER: {entered}")
        realm.complete_ripas_change(vcpu.vcpu_id)

    # --- realm commands ----------------------------------------------------------------------------
    @hookimpl
    def guestmem_vm_ioctl(self, vm: VmView, request: int, arg: Any) -> int | None:
        """``kvm_realm_enable_cap``: ``KVM_ENABLE_CAP(KVM_CAP_ARM_RME, command, ...)``.

        ``args`` is ``(command, base, size)`` for INIT_RIPAS (the series passes a pointer to
        ``struct arm_rme_init_ripas``; the model takes its fields), ``(command, cfg, value)``
        for CONFIG.  POPULATE needs the source pages: :func:`guestmem_cca.populate`.
        """
        if request != uapi.KVM_ENABLE_CAP or not isinstance(arg, uapi.KvmEnableCap):
            return None
        if arg.cap != KVM_CAP_ARM_RME:
            return None
        realm = _realm(vm)
        if realm is None:
            raise KvmError(errno.EINVAL, RULE, "KVM_CAP_ARM_RME on a VM that is no realm")
        command, *rest = (*arg.args, 0, 0, 0)[:4]
        if command == KVM_CAP_ARM_RME_CONFIG_REALM:
            if realm.state != "NONE":
                raise KvmError(errno.EBUSY, RULE, "KVM_CAP_ARM_RME_CONFIG_REALM after the realm was created")
            cfg, value = rest[0], rest[1]
            if cfg != 1 or value not in (0, 1):  # ARM_RME_CONFIG_HASH_ALGO: SHA256, SHA512
                raise KvmError(errno.EINVAL, RULE, f"KVM_CAP_ARM_RME_CONFIG_REALM: cfg {cfg} value {value}")
            realm.hash_algo = value
        elif command == KVM_CAP_ARM_RME_CREATE_REALM:
            realm.create_realm()
        elif command == KVM_CAP_ARM_RME_INIT_RIPAS_REALM:
            realm.init_ripas(rest[0], rest[1])
        elif command == KVM_CAP_ARM_RME_ACTIVATE_REALM:
            realm.activate()
        elif command == KVM_CAP_ARM_RME_POPULATE_REALM:
            raise KvmError(errno.EINVAL, RULE, "POPULATE takes its source pages: guestmem_cca.populate()")
        else:
            raise KvmError(errno.EINVAL, RULE, f"KVM_CAP_ARM_RME command {command}")
        return 0

    @hookimpl
    def guestmem_post_populate(
        self, vm: VmView, gfn: int, pfn: int, src: bytes | None, order: int, opaque: Any
    ) -> int | None:
        """``realm_create_protected_data_page``: DELEGATE and DATA_CREATE each granule with
        its source page, measured as *opaque* (the flags) says."""
        realm = _realm(vm)
        if realm is None:
            return None
        for i in range(1 << order):
            page = bytes(GRANULE_SIZE) if src is None else src[i * GRANULE_SIZE : (i + 1) * GRANULE_SIZE]
            realm.create_data(
                (gfn + i) << GRANULE_SHIFT, pfn + i, page.ljust(GRANULE_SIZE, b"\0"), int(opaque)
            )
        return 0

    # --- faults and unmaps ---------------------------------------------------------------------------
    @hookimpl
    def guestmem_fault(self, vm: VmView, fault: Fault) -> None:
        """A REC's stage-2 fault the RMM handed to the host: ``kvm_realm_map_protected``
        (private, RIPAS RAM) or ``realm_map_non_secure`` (shared, the unprotected alias).
        A private access to an IPA whose RIPAS is not RAM never reaches the host: the RMM
        injects an abort into the realm."""
        realm = _realm(vm)
        if realm is None or realm.state not in ("NEW", "ACTIVE"):
            return
        assert fault.pfn is not None
        fault.max_level = uapi.PG_LEVEL_4K  # 4 KiB granules: no RTT fold here
        if fault.is_private:
            ripas = realm.ripas(fault.gfn)
            if ripas is not Ripas.RAM:
                vm.count("cca.realm_aborts")
                raise RealmAbort(fault.gpa, ripas.name)
            if realm.rmm.realms[realm.rd].entry(fault.gpa)[1] is None:  # not yet the realm's
                realm.create_data(fault.gpa, fault.pfn, None, 0)
            return
        realm.map_unprotected(fault.gpa, fault.pfn)

    @hookimpl
    def guestmem_max_mapping_level(self, vm: VmView, pfn: int, is_private: bool) -> int | None:
        """4 KiB: the model folds no RTT into blocks."""
        return uapi.PG_LEVEL_4K if _realm(vm) is not None else None

    @hookimpl
    def guestmem_unmap_gfn_range(self, vm: VmView, range: GfnRange) -> bool:  # noqa: A002
        """``kvm_realm_unmap_range``: unprotected mappings always, private pages when the
        unmap's filter covers them (punch hole, release, memslot changes, attribute changes
        to shared)."""
        realm = _realm(vm)
        if realm is None:
            return False
        private = bool(range.attr_filter & uapi.KVM_FILTER_PRIVATE)
        return realm.unmap_range(range.start << GRANULE_SHIFT, range.end << GRANULE_SHIFT, private)

    @hookimpl
    def guestmem_gmem_invalidate(self, vm: VmView, start_pfn: int, end_pfn: int) -> None:
        """A freed guest_memfd page must be the host's again (its unmap destroyed it); one
        the RMM still holds is counted, never a silent reuse."""
        rmm = realm_host(vm.host).rmm
        for pfn in range(start_pfn, end_pfn):
            if rmm.in_realm_pas(pfn << GRANULE_SHIFT):
                vm.count("cca.freed_in_realm_pas")
                vm.trace("cca_freed_in_realm_pas", pfn=pfn, state=rmm.state(pfn << GRANULE_SHIFT).value)

    # --- the host's accesses -------------------------------------------------------------------------
    @hookimpl
    def guestmem_gmem_fault_user_mapping(self, vm: VmView, gmem: GmemView, index: int) -> HostFault | None:
        """A delegated granule is never mapped by the host."""
        pfn = gmem.pfn(index)
        if pfn is not None and realm_host(vm.host).rmm.in_realm_pas(pfn << GRANULE_SHIFT):
            return HostFault.SIGBUS
        return None

    @hookimpl
    def guestmem_host_access(self, host: HostView, pfn: int, write: bool) -> str | None:
        """A host access to a granule of the Realm PAS is a Granule Protection Fault."""
        rmm = realm_host(host).rmm
        if not rmm.in_realm_pas(pfn << GRANULE_SHIFT):
            return None
        return (
            f"Granule Protection Fault: host access to pfn {pfn:#x} ({rmm.state(pfn << GRANULE_SHIFT).value})"
        )

    # --- the realm's calls ---------------------------------------------------------------------------
    @hookimpl
    def guestmem_hypercall(self, vcpu: VcpuView, nr: int, args: tuple[int, ...]) -> int | None:
        """RSI_IPA_STATE_SET and PSCI SYSTEM_OFF.

        RSI_IPA_STATE_SET checks its arguments (``handle_rsi_ipa_state_set``:
        RSI_ERROR_INPUT), then the REC exits (RMI_EXIT_RIPAS_CHANGE) and KVM leaves to
        userspace with a memory-fault exit over the range, private iff RAM
        (``rec_exit_ripas_change``; KVM_RUN returns 0 there, the model raises it as it
        raises every memory-fault exit).  KVM completes the change at the next entry; the
        call then returns RSI_SUCCESS with x1 the top it reached, x2 RSI_ACCEPT.
        """
        vm = vcpu.vm
        realm = _realm(vm)
        if realm is None:
            return None
        rec = realm.recs[vcpu.vcpu_id]
        if nr == PSCI_SYSTEM_OFF:
            realm.rmm.system_off(realm.rd)
            realm.state = "SYSTEM_OFF"
            vm.trace("cca_system_off")
            return 0
        if nr != SMC_RSI_IPA_STATE_SET:
            return None
        base, top, ripas, flags = (*args, 0, 0, 0, 0)[:4]
        if rec.completed is not None and rec.completed[0] == base and rec.completed[2] == ripas:
            # complete_set_ripas: x1 how far the host got; no progress at all is a rejection.
            done_top = rec.completed[1]
            rec.completed = None
            realm.rmm.realms[realm.rd].recs[rec.addr].set_ripas = None  # the RSI call returns
            rec.ret = (RSI_SUCCESS, done_top, RSI_ACCEPT if done_top > base else RSI_REJECT)
            return RSI_SUCCESS
        par_end = 1 << 39
        valid = (
            base % GRANULE_SIZE == 0
            and top % GRANULE_SIZE == 0
            and base < top <= par_end
            and ripas in (Ripas.EMPTY, Ripas.RAM)
            and flags in (0, RSI_CHANGE_DESTROYED)
        )
        if not valid:
            rec.ret = (RSI_ERROR_INPUT, base, 0)
            return RSI_ERROR_INPUT
        realm.request_ripas(vcpu.vcpu_id, base, top, Ripas(ripas), bool(flags & RSI_CHANGE_DESTROYED))
        vm.count("cca.ripas_change_exits")
        flag = uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE if ripas == Ripas.RAM else 0
        raise MemoryFault(errno.EFAULT, base, top - base, flag, RULE, "the realm asks for a RIPAS change")


def populate(vm: Any, base: int, data: bytes, *, measure: bool = True) -> int:
    """``KVM_CAP_ARM_RME_POPULATE_REALM`` (``kvm_populate_realm``): load *data* into the
    realm's private pages from *base* on, each one DELEGATEd and DATA_CREATEd with its
    contents, measured into the RIM unless *measure* is False.  NEW realms only (EPERM);
    the range must be private (``kvm_gmem_populate``, P-3).  The series reads the source
    from the memslot's ``userspace_addr``; the model takes the bytes.  Returns the pages
    populated.  *base* is the ``__u64`` of ``struct arm_rme_populate_realm``, *data*
    bytes-like (a TypeError naming either); a VM ioctl: EBADF once the VM fd is closed."""
    with view(vm).host.operation():  # one ioctl: a vCPU of another thread cannot start the realm meanwhile
        return _populate(vm, base, data, measure=measure)


def _populate(vm: Any, base: int, data: bytes, *, measure: bool) -> int:
    base, data = cabi.u64(base, "base"), cabi.buffer(data, "data")
    realm = kvm_realm(vm)
    view(vm).check_ioctl()
    if realm.state != "NEW":
        raise KvmError(errno.EPERM, RULE, f"populate in state {realm.state}")
    if base % GRANULE_SIZE:
        raise KvmError(errno.EINVAL, RULE, "populate: base must be page aligned")
    npages = -(-len(data) // GRANULE_SIZE)
    padded = data.ljust(npages * GRANULE_SIZE, b"\0")
    flags = RMI_MEASURE_CONTENT if measure else 0
    return int(view(vm).gmem_populate(base >> GRANULE_SHIFT, padded, npages, flags))
