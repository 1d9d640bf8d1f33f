"""What a VMM does with a TD: the ``KVM_TDX_*`` commands (:class:`Tdx`) and the handling
of the exits that convert memory (:class:`TdxVmm`), as QEMU does them.

Every command is ``KVM_MEMORY_ENCRYPT_OP`` on the uAPI ``Vm`` or ``Vcpu`` (or
``KVM_ENABLE_CAP``): the same calls a VMM makes on real hardware, so errors carry the
kernel's errno.  :class:`Tdx` also reads back what the commands left (HKID, state,
MRTD) for tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from guestmem import cabi, uapi
from guestmem.api import Vcpu, Vm
from guestmem.backend import view
from guestmem.errors import HypercallExit, MemoryFault
from guestmem_tdx import abi
from guestmem_tdx.host import TdxHost
from guestmem_tdx.kvm import KvmTdx, TdState, TdxVcpu, as_tdx
from guestmem_tdx.module import Td

PAGE_SIZE = uapi.PAGE_SIZE
PUNCH = uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE


class Tdx:
    """A VMM's TDX commands on one VM (``KVM_MEMORY_ENCRYPT_OP`` with a ``TdxCmd``)."""

    def __init__(self, vm: Any) -> None:
        self.vm = vm
        self.state: KvmTdx = as_tdx(vm)

    def __repr__(self) -> str:
        return f"<Tdx {self.state!r}>"

    def _op(self, target: Vm | Vcpu, cmd_id: int, data: Any = None, flags: int = 0) -> abi.TdxCmd:
        cmd = abi.TdxCmd(cmd_id, flags, data)
        target.memory_encrypt_op(cmd)
        return cmd

    @staticmethod
    def _vcpu_fd(vcpu: object) -> Vm | Vcpu:
        """The file a vCPU command is an ioctl on: a ``Vcpu`` (or a ``Vm``: the ioctl then
        reaches ``tdx_vm_ioctl``, which refuses a vCPU command with EINVAL, as on a VM fd).
        These calls take the uAPI objects, not descriptor numbers: anything else is a
        TypeError naming ``vcpu``, before any command is issued."""
        if isinstance(vcpu, Vcpu | Vm):
            return vcpu
        raise cabi.ArgumentTypeError(
            f"vcpu must be a Vcpu of the uAPI face (Vm.create_vcpu), not {type(vcpu).__name__}"
        )

    # --- commands ----------------------------------------------------------------------------
    def enable_cap_exit_hypercall(self, mask: int = 1 << uapi.KVM_HC_MAP_GPA_RANGE) -> None:
        """``KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)``: MapGPA reaches userspace."""
        self.vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, mask)

    def capabilities(self) -> abi.KvmTdxCapabilities:
        """``KVM_TDX_CAPABILITIES``."""
        caps = abi.KvmTdxCapabilities()
        self._op(self.vm, abi.KVM_TDX_CAPABILITIES, caps)
        return caps

    def init_vm(
        self,
        attributes: int = abi.TDX_TD_ATTR_SEPT_VE_DISABLE,
        xfam: int = abi.XFEATURE_MASK_FPSSE,
        *,
        gpaw: int = 48,
        cpuid: Sequence[abi.KvmCpuidEntry2] | None = None,
    ) -> None:
        """``KVM_TDX_INIT_VM``: the HKID, TDR/TDCS and TD_PARAMS (GPAW from CPUID)."""
        entries = list(cpuid) if cpuid is not None else [abi.cpuid_gpaw(gpaw)]
        init = abi.KvmTdxInitVm(attributes, xfam, cpuid=abi.KvmCpuid2(entries))
        self._op(self.vm, abi.KVM_TDX_INIT_VM, init)

    def init_vcpu(self, vcpu: Vcpu, rcx: int = 0) -> None:
        """``KVM_TDX_INIT_VCPU`` on *vcpu*'s fd: TDVPR/TDCX pages, VP.CREATE/ADDCX/INIT.
        *vcpu* is a ``Vcpu`` (TypeError for anything else)."""
        self._op(self._vcpu_fd(vcpu), abi.KVM_TDX_INIT_VCPU, rcx)

    def init_mem_region(
        self, vcpu: Vcpu, gpa: int, data: bytes, *, measure: bool = True, source_addr: int = 0x7F0000000000
    ) -> abi.KvmTdxInitMemRegion:
        """``KVM_TDX_INIT_MEM_REGION`` of *data* (padded to pages) at *gpa* on *vcpu*'s fd;
        the region struct as the kernel left it.  *vcpu* is a ``Vcpu`` and *data*
        bytes-like (a TypeError otherwise)."""
        target = self._vcpu_fd(vcpu)
        data = cabi.buffer(data, "data")
        npages = max(1, -(-len(data) // PAGE_SIZE))
        region = abi.KvmTdxInitMemRegion(source_addr, gpa, npages, data.ljust(npages * PAGE_SIZE, b"\0"))
        flags = abi.KVM_TDX_MEASURE_MEMORY_REGION if measure else 0
        self._op(target, abi.KVM_TDX_INIT_MEM_REGION, region, flags)
        return region

    def finalize(self) -> bytes:
        """``KVM_TDX_FINALIZE_VM``; returns MRTD."""
        self._op(self.vm, abi.KVM_TDX_FINALIZE_VM)
        return self.mrtd

    def inject_interrupt(self, vcpu: Any) -> None:
        """An interrupt becomes pending for *vcpu* (``kvm_vcpu_has_events``): a MapGPA in
        progress returns ``TDVMCALL_STATUS_RETRY`` at its next chunk."""
        self.vcpu_state(vcpu).interrupt_pending = True

    # --- what the commands left ------------------------------------------------------------
    @property
    def host(self) -> TdxHost:
        """The host's TDX state."""
        return self.state.host

    @property
    def td(self) -> Td:
        """The TD in the TDX module (after ``KVM_TDX_INIT_VM``)."""
        td = self.state.td
        if td is None:
            raise LookupError("no TD before KVM_TDX_INIT_VM")
        return td

    @property
    def hkid(self) -> int:
        """The HKID (-1 when none is assigned)."""
        return self.state.hkid

    @property
    def td_state(self) -> TdState:
        """``kvm_tdx->state``."""
        return self.state.state

    @property
    def mrtd(self) -> bytes:
        """MRTD, frozen at FINALIZE (empty before)."""
        return self.state.mrtd

    @property
    def nr_premapped(self) -> int:
        """``kvm_tdx->nr_premapped``."""
        return self.state.nr_premapped

    def vcpu_state(self, vcpu: Any) -> TdxVcpu:
        """``to_tdx(vcpu)`` of a vCPU of this TD."""
        return self.state.vcpu_state(view(vcpu))


@attrs.define
class Ram:
    """A TD RAM region: ``[gpa, gpa + size)`` backed by *gmem* (private, from
    *gmem_offset*) and by *shared* (a host mapping at ``userspace_addr``)."""

    gpa: int
    size: int
    gmem: Any
    gmem_offset: int = 0
    shared: Any = None


@attrs.define
class TdxVmm:
    """Converts TD memory as QEMU's ``kvm_convert_memory()``: set the attribute, then
    discard the old side (destructive conversion): a range made shared is punched out of
    guest_memfd (the private pages go back to the host), a range made private is
    discarded from the shared mapping.

    It answers the two ways a TD asks: explicitly, ``KVM_EXIT_HYPERCALL``
    (``KVM_HC_MAP_GPA_RANGE``, from MapGPA: :meth:`handle`), and implicitly, a
    ``KVM_EXIT_MEMORY_FAULT`` for an access through the other alias
    (:meth:`handle_memory_fault`).
    """

    vm: Any
    regions: list[Ram]
    discard: bool = True
    exits: int = 0
    conversions: list[tuple[int, int, bool]] = attrs.Factory(list)

    def convert(self, gpa: int, size: int, *, private: bool) -> None:
        """``kvm_convert_memory``: ``KVM_SET_MEMORY_ATTRIBUTES``, then the discard."""
        value = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
        self.vm.set_memory_attributes(gpa, size, value)
        self.conversions.append((gpa, size, private))
        if not self.discard:
            return
        for region in self.regions:
            lo, hi = max(gpa, region.gpa), min(gpa + size, region.gpa + region.size)
            if lo >= hi:
                continue
            if not private:
                region.gmem.fallocate(PUNCH, region.gmem_offset + lo - region.gpa, hi - lo)
            elif region.shared is not None:
                region.shared.madvise(uapi.MADV_REMOVE, lo - region.gpa, hi - lo)

    def handle(self, exit_: HypercallExit) -> int:
        """A ``KVM_EXIT_HYPERCALL``; returns ``run->hypercall.ret`` (0: done)."""
        if exit_.nr != uapi.KVM_HC_MAP_GPA_RANGE:
            return -uapi.KVM_ENOSYS
        gpa, npages, attrs_ = exit_.args[:3]
        self.exits += 1
        self.convert(gpa, npages * PAGE_SIZE, private=bool(attrs_ & uapi.KVM_MAP_GPA_RANGE_ENCRYPTED))
        return 0

    def handle_memory_fault(self, fault: MemoryFault) -> None:
        """A ``KVM_EXIT_MEMORY_FAULT``: convert the page to what the TD accessed it as."""
        self.exits += 1
        self.convert(fault.gpa, fault.size, private=fault.is_private)
