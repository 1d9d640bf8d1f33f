"""Helpers of the guestmem-tdx tests: a ready TD, and a TDX module on its own."""

from __future__ import annotations

from typing import Any

import attrs

import guestmem
import guestmem_tdx
from guestmem import uapi
from guestmem.backend import view
from guestmem_tdx import status as st
from guestmem_tdx.module import MIN_NUM_TDCS_PAGES, MIN_TDVPS_PAGES, Td, TdxModule, Vp

MIB = 1 << 20
PAGE = uapi.PAGE_SIZE
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
PUNCH = uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE


@attrs.define
class TdVm:
    """A TD with one guest_memfd RAM slot ``[0, size)``, a shared mapping and vCPUs."""

    kvm: Any
    vm: Any
    gmem: Any
    shared: Any
    vcpus: list[Any]
    size: int

    @property
    def tdx(self) -> guestmem_tdx.Tdx:
        return guestmem_tdx.tdx(self.vm)

    @property
    def state(self) -> guestmem_tdx.KvmTdx:
        return self.tdx.state

    @property
    def vcpu(self) -> Any:
        return self.vcpus[0]

    @property
    def guest(self) -> guestmem_tdx.TdxGuest:
        return guestmem_tdx.guest(self.vcpus[0])

    @property
    def host(self) -> guestmem_tdx.TdxHost:
        return guestmem_tdx.tdx_host(self.kvm)

    @property
    def module(self) -> TdxModule:
        return self.host.module

    def vmm(self) -> guestmem_tdx.TdxVmm:
        return guestmem_tdx.TdxVmm(self.vm, [guestmem_tdx.Ram(0, self.size, self.gmem, 0, self.shared)])

    def pfn(self, gpa: int) -> int:
        pfn = self.vm.gmem_pfn(gpa >> uapi.PAGE_SHIFT)
        assert pfn is not None
        return int(pfn)

    def close(self) -> None:
        self.gmem.close()
        for vcpu in self.vcpus:
            vcpu.close()
        self.vm.close()


def make_td(
    size: int = 8 * MIB,
    *,
    nvcpus: int = 1,
    init: bool = True,
    finalize: bool = False,
    payload: bytes | None = None,
    exits: bool = True,
    attributes: int = guestmem_tdx.TDX_TD_ATTR_SEPT_VE_DISABLE,
    gpaw: int = 48,
    kvm: Any = None,
    private: bool = True,
) -> TdVm:
    """A TD: INIT_VM, memslot, vCPUs with INIT_VCPU, RAM private, an optional measured
    *payload* at gpa 0, and FINALIZE if asked."""
    kvm = kvm if kvm is not None else guestmem.open("tdx")
    vm = kvm.create_vm(uapi.KVM_X86_TDX_VM)
    tdx = guestmem_tdx.tdx(vm)
    if exits:
        tdx.enable_cap_exit_hypercall()
    vcpus = []
    gmem = vm.create_guest_memfd(size)
    shared = kvm.mmap_anonymous(size)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, size, shared.address, gmem, 0)
    if init:
        tdx.init_vm(attributes, gpaw=gpaw)
        for i in range(nvcpus):
            vcpus.append(vm.create_vcpu(i))
            tdx.init_vcpu(vcpus[-1])
        if private:
            vm.set_memory_attributes(0, size, PRIVATE)
        if payload is not None:
            tdx.init_mem_region(vcpus[0], 0, payload)
        if finalize:
            tdx.finalize()
    return TdVm(kvm, vm, gmem, shared, vcpus, size)


class Seam:
    """A TDX module over a real host's memory, with one TD and one vCPU (initialised)."""

    def __init__(self, *, packages: int = 2, gpaw52: bool = False) -> None:
        self.kvm = guestmem.open("sw")
        self.host = view(self.kvm)
        self.events: list[tuple[str, int, int, Any, Any]] = []
        self.module = TdxModule(self.host, packages, on_change=self._record)
        self.td, self.vp = self.new_td(hkid=32, gpaw52=gpaw52)

    def _record(self, table: str, first: int, npages: int, old: Any, new: Any, td: Td | None) -> None:
        self.events.append((table, first, npages, old, new))

    def alloc(self, npages: int = 1) -> int:
        return self.host.alloc(npages)

    def new_td(self, hkid: int, gpaw52: bool = False) -> tuple[Td, Vp]:
        m = self.module
        err, td = m.mng_create(self.alloc(), hkid)
        assert err == st.TDX_SUCCESS and td is not None
        for package in range(m.packages):
            assert m.mng_key_config(td, package) == st.TDX_SUCCESS
        for _ in range(MIN_NUM_TDCS_PAGES):
            assert m.mng_addcx(td, self.alloc()) == st.TDX_SUCCESS
        assert m.mng_init(td, 0, 3, gpaw52) == st.TDX_SUCCESS
        err, vp = m.vp_create(td, self.alloc())
        assert err == st.TDX_SUCCESS and vp is not None
        for _ in range(MIN_TDVPS_PAGES - 1):
            assert m.vp_addcx(vp, self.alloc()) == st.TDX_SUCCESS
        assert m.vp_init(vp) == st.TDX_SUCCESS
        return td, vp

    def link(self, gfn: int, npages: int = 1, td: Td | None = None) -> None:
        """TDH.MEM.SEPT.ADD of every table ``[gfn, gfn + npages)`` needs."""
        td = td or self.td
        for level in range(td.top_level, 0, -1):
            shift = 9 * level
            for s, e in list(td.table(level).gaps(gfn >> shift, ((gfn + npages - 1) >> shift) + 1)):
                assert self.module.sept_add(td, level, s, self.alloc(e - s), e - s)

    def finalize(self, td: Td | None = None) -> None:
        assert self.module.mr_finalize(td or self.td) == st.TDX_SUCCESS
