"""The TDX arch policy: the hooks a host and VM of the ``tdx`` backend reach.

Each hook is the kernel function named in its docstring (``vt_*`` dispatch in
``arch/x86/kvm/vmx/main.c`` to ``tdx_*`` in ``tdx.c``); the work is done by the host's
:class:`~guestmem_tdx.host.TdxHost` (``host.arch``) and the TD's
:class:`~guestmem_tdx.kvm.KvmTdx` (``vm.arch``).  The host's ``KVM_X86_DEFAULT_VM`` and
``KVM_X86_SW_PROTECTED_VM`` get no arch state (``vm.arch`` is None) and every hook
leaves them to the core, so they behave as on the built-in ``sw`` backend.
"""

from __future__ import annotations

import errno
from typing import Any

from guestmem import uapi
from guestmem.backend import Fault, GmemView, HostFault, HostView, Leaf, VcpuView, VmView, hookimpl
from guestmem.errors import KvmError
from guestmem_tdx.abi import EXIT_REASON_TDCALL, TdxCmd
from guestmem_tdx.host import TdxHost
from guestmem_tdx.kvm import KvmTdx, TdxVcpu


def _tdx(vm: VmView) -> KvmTdx | None:
    arch = vm.arch
    return arch if isinstance(arch, KvmTdx) else None


class TdxPolicy:
    """Hook implementations for the VMs of a TDX host."""

    @hookimpl
    def guestmem_snapshot(self, host: HostView, vm: VmView | None) -> Any:
        """The PAMT and KeyIDs of the host, or a TD's state and Secure-EPT
        (:mod:`guestmem_tdx.snapshot`)."""
        from guestmem_tdx import snapshot

        return snapshot.host_state(host) if vm is None else snapshot.vm_state(vm)

    # --- host and VM lifetime ------------------------------------------------------------------
    @hookimpl
    def guestmem_host_init(self, host: HostView) -> TdxHost:
        """``tdx_bringup``: the TDX module, its KeyIDs and the packages."""
        return TdxHost(host)

    @hookimpl
    def guestmem_vm_init(self, vm: VmView) -> KvmTdx | None:
        """``tdx_vm_init`` for ``KVM_X86_TDX_VM`` (``TD_STATE_UNINITIALIZED``)."""
        if vm.vm_type != uapi.KVM_X86_TDX_VM:
            return None
        return KvmTdx(vm)

    @hookimpl
    def guestmem_vm_pre_destroy(self, vm: VmView) -> None:
        """``vt_vm_pre_destroy`` -> ``tdx_mmu_release_hkid``, before the MMU is zapped."""
        tdx = _tdx(vm)
        if tdx is not None:
            tdx.mmu_release_hkid()

    @hookimpl
    def guestmem_vcpu_destroy(self, vcpu: VcpuView) -> None:
        """``tdx_vcpu_free``."""
        tdx = _tdx(vcpu.vm)
        if tdx is not None and isinstance(vcpu.arch, TdxVcpu):
            tdx.vcpu_free(vcpu)

    @hookimpl
    def guestmem_vm_destroy(self, vm: VmView) -> None:
        """``tdx_sept_free_private_spt`` (S-EPT pages) and ``tdx_vm_destroy``."""
        tdx = _tdx(vm)
        if tdx is not None:
            tdx.vm_destroy()

    @hookimpl
    def guestmem_vcpu_init(self, vcpu: VcpuView) -> TdxVcpu | None:
        """``tdx_vcpu_create``: EIO until ``KVM_TDX_INIT_VM``."""
        tdx = _tdx(vcpu.vm)
        return None if tdx is None else tdx.vcpu_create(vcpu)

    @hookimpl
    def guestmem_vcpu_pre_run(self, vcpu: VcpuView) -> None:
        """``kvm_arch_vcpu_ioctl_run``: the pending exit's ``complete_userspace_io`` first
        (with ``run->hypercall.ret`` as userspace left it), then ``tdx_vcpu_pre_run``:
        EINVAL until ``KVM_TDX_INIT_VCPU`` and FINALIZE."""
        tdx = _tdx(vcpu.vm)
        if tdx is not None:
            tdx.complete_userspace_io(vcpu)
            tdx.vcpu_pre_run(vcpu)

    # --- arch ioctls -----------------------------------------------------------------------------
    @hookimpl
    def guestmem_vm_ioctl(self, vm: VmView, request: int, arg: Any) -> int | None:
        """``vt_mem_enc_ioctl`` -> ``tdx_vm_ioctl``: ``KVM_MEMORY_ENCRYPT_OP`` with a
        :class:`~guestmem_tdx.abi.TdxCmd`; ENOTTY on the host's other VM types."""
        if request != uapi.KVM_MEMORY_ENCRYPT_OP:
            return None
        tdx = _tdx(vm)
        if tdx is None or not isinstance(arg, TdxCmd):
            raise KvmError(errno.ENOTTY, "", "KVM_MEMORY_ENCRYPT_OP needs a TdxCmd on a TDX VM")
        return tdx.vm_ioctl(arg)

    @hookimpl
    def guestmem_vcpu_ioctl(self, vcpu: VcpuView, request: int, arg: Any) -> int | None:
        """``vt_vcpu_mem_enc_ioctl`` -> ``tdx_vcpu_ioctl``."""
        if request != uapi.KVM_MEMORY_ENCRYPT_OP:
            return None
        tdx = _tdx(vcpu.vm)
        if tdx is None or not isinstance(arg, TdxCmd):
            raise KvmError(errno.ENOTTY, "", "KVM_MEMORY_ENCRYPT_OP needs a TdxCmd on a TD vCPU")
        return tdx.vcpu_ioctl(vcpu, arg)

    # --- the MMU ---------------------------------------------------------------------------------
    @hookimpl
    def guestmem_max_mapping_level(self, vm: VmView, pfn: int, is_private: bool) -> int | None:
        """``tdx_gmem_private_max_mapping_level``: private memory is mapped at 4 KiB."""
        if _tdx(vm) is None or not is_private:
            return None
        return uapi.PG_LEVEL_4K

    @hookimpl
    def guestmem_fault(self, vm: VmView, fault: Fault) -> None:
        """A run of private faults ends where one TDH.MEM.PAGE.AUG batch would not stand
        for as many single AUGs (an entry that is not FREE, a page the module owns)."""
        tdx = _tdx(vm)
        if tdx is None or not fault.is_private or fault.pfn is None or fault.npages == 1:
            return
        fault.npages = tdx.uniform_prefix(fault.gfn, fault.pfn, fault.npages)

    @hookimpl
    def guestmem_set_external_spte(self, vm: VmView, leaf: Leaf) -> None:
        """``tdx_sept_link_private_spt`` + ``tdx_sept_set_private_spte``."""
        tdx = _tdx(vm)
        if tdx is not None:
            tdx.set_private_spte(leaf)

    @hookimpl
    def guestmem_remove_external_spte(self, vm: VmView, leaf: Leaf) -> None:
        """``tdx_sept_remove_private_spte``."""
        tdx = _tdx(vm)
        if tdx is not None:
            tdx.remove_private_spte(leaf)

    # --- host side -------------------------------------------------------------------------------
    @hookimpl
    def guestmem_gmem_fault_user_mapping(self, vm: VmView, gmem: GmemView, index: int) -> HostFault | None:
        """A page the TDX module gave a TD is never mapped into host userspace."""
        state = vm.host.arch
        pfn = gmem.pfn(index)
        if isinstance(state, TdxHost) and pfn is not None and state.td_owned(pfn) is not None:
            return HostFault.SIGBUS
        return None

    @hookimpl
    def guestmem_host_access(
        self, host: HostView, pfn: int, write: bool, offset: int, length: int
    ) -> str | None:
        """A host store to TD memory does not fault: it poisons the lines it wrote
        (``X86_BUG_TDX_PW_MCE``); the TD's next access to them is a machine check."""
        state = host.arch
        if write and isinstance(state, TdxHost):
            state.host_write(pfn, offset, length)
        return None

    # --- the guest -------------------------------------------------------------------------------
    @hookimpl
    def guestmem_guest_access(
        self, vcpu: VcpuView, gfn: int, pfn: int, private: bool, offset: int, length: int
    ) -> None:
        """What the CPU finds on a private page: PENDING (EPT violation or #VE), a poisoned
        line among the bytes accessed (#MC)."""
        tdx = _tdx(vcpu.vm)
        if tdx is not None and private:
            tdx.guest_access(vcpu, gfn, pfn, offset, length)

    @hookimpl
    def guestmem_hypercall(self, vcpu: VcpuView, nr: int, args: tuple[int, ...]) -> int | None:
        """``handle_tdvmcall`` for TDG.VP.VMCALL with R10 = 0 (``nr == EXIT_REASON_TDCALL``);
        any other *nr* is a KVM hypercall (``tdx_emulate_vmcall``), the core's x86 code."""
        tdx = _tdx(vcpu.vm)
        if tdx is None or nr != EXIT_REASON_TDCALL:
            return None
        return tdx.handle_tdvmcall(vcpu, args)

    @hookimpl
    def guestmem_post_populate(
        self, vm: VmView, gfn: int, pfn: int, src: bytes | None, order: int, opaque: Any
    ) -> int | None:
        """``tdx_gmem_post_populate`` (KVM_TDX_INIT_MEM_REGION)."""
        tdx = _tdx(vm)
        return None if tdx is None else tdx.post_populate(gfn, pfn, src, order, opaque)
