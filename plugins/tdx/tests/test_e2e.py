"""End to end: a measured TD is built, finalized and run; it accepts memory lazily and
eagerly, shares a bounce buffer and takes it back (MapGPA, the userspace exit,
KVM_SET_MEMORY_ATTRIBUTES and a punch, as a VMM does), the VMM punches holes, and the TD
is torn down.  The core's invariant checker and the TDX checker run after every event;
afterwards every page is back with the host (PT_NDA), the HKID is back in the pool and
no private page was ever host-mapped (backends.md 1.1-1.7, 6.1)."""

from __future__ import annotations

from tdx_helpers import MIB, PAGE, PRIVATE, PUNCH

import guestmem
import guestmem_tdx
from guestmem import uapi
from guestmem.invariants import InvariantChecker
from guestmem_tdx import MeasuredRegion, SeptState, TdxChecker

SIZE = 16 * MIB
FIRMWARE = bytes(range(256)) * 32  # 2 pages
KERNEL = b"\x90" * (3 * PAGE)
BOUNCE = 5 * MIB


def test_td_lifecycle(checkers: tuple[InvariantChecker, TdxChecker]) -> None:
    kvm = guestmem.open("tdx", record=True)
    host = guestmem_tdx.tdx_host(kvm)
    vm = kvm.create_vm(uapi.KVM_X86_TDX_VM)
    tdx = guestmem_tdx.tdx(vm)
    tdx.enable_cap_exit_hypercall()
    tdx.init_vm()
    hkid = tdx.hkid
    gmem = vm.create_guest_memfd(SIZE)
    shared = kvm.mmap_anonymous(SIZE)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, SIZE, shared.address, gmem, 0)
    vcpus = [vm.create_vcpu(i) for i in range(2)]
    for vcpu in vcpus:
        tdx.init_vcpu(vcpu)
    vm.set_memory_attributes(0, SIZE, PRIVATE)

    # --- the measured payload, FINALIZE ------------------------------------------------------
    tdx.init_mem_region(vcpus[0], 0, FIRMWARE)
    tdx.init_mem_region(vcpus[0], MIB, KERNEL)
    mrtd = tdx.finalize()
    assert mrtd == guestmem_tdx.expected_mrtd([MeasuredRegion(0, FIRMWARE), MeasuredRegion(MIB, KERNEL)])
    boot, other = guestmem_tdx.guest(vcpus[0]), guestmem_tdx.guest(vcpus[1])
    assert boot.read(0, len(FIRMWARE)) == FIRMWARE and boot.read(MIB, 16) == KERNEL[:16]

    # --- lazy: a 2 MiB unit accepted when first used; eager: the rest at boot -----------------
    assert other.accept_memory(2 * MIB, 4 * MIB)
    other.write(2 * MIB + 0x40, b"lazy")
    assert boot.accept_memory(4 * MIB, SIZE)
    boot.write(15 * MIB, b"eager")
    td = tdx.td
    assert td.leaf_state((15 * MIB) >> 12) is SeptState.MAPPED
    assert not any(leaf.state is SeptState.PENDING for _, _, leaf in td.leaves.items())

    # --- a bounce buffer: MapGPA to shared and back, as QEMU's kvm_convert_memory ------------
    vmm = guestmem_tdx.TdxVmm(vm, [guestmem_tdx.Ram(0, SIZE, gmem, 0, shared)])
    boot.write(BOUNCE, b"private")
    assert boot.map_gpa_range(BOUNCE, BOUNCE + 3 * PAGE, private=False, handle=vmm.handle)
    assert vm.gmem_pfn(BOUNCE >> 12) is None  # punched: the private pages went back
    boot.write(BOUNCE | boot.shared_bit, b"to the host")
    assert shared.read(BOUNCE, 11) == b"to the host"
    shared.write(BOUNCE + 16, b"from the host")
    assert boot.read((BOUNCE + 16) | boot.shared_bit, 13) == b"from the host"
    assert boot.map_gpa_range(BOUNCE, BOUNCE + 3 * PAGE, private=True, handle=vmm.handle)
    assert boot.accept_memory(BOUNCE, BOUNCE + 3 * PAGE)
    assert boot.read(BOUNCE, 11) == bytes(11)  # destructive: a new, zeroed page
    assert vmm.exits == 2

    # --- the VMM punches a hole (e.g. balloon); the TD accepts the memory again --------------
    freed = [vm.gmem_pfn(g) for g in (12 * 256, 13 * 256 + 7)]
    gmem.fallocate(PUNCH, 12 * MIB, 2 * MIB)
    assert all(host.module.pamt_entry(pfn) is None for pfn in freed if pfn is not None)
    assert boot.accept_memory(12 * MIB, 14 * MIB)
    assert boot.read(13 * MIB, 4) == bytes(4)
    guestmem_tdx.check_tdx(kvm)

    counters = vm.counters
    assert counters["seamcall.TDH.MEM.PAGE.ADD"] == 5 and counters["seamcall.TDH.MR.EXTEND"] == 5 * 16
    assert counters["tdx.track_epochs"] == counters["seamcall.TDH.MEM.PAGE.REMOVE"] > 0
    assert counters["tdx.vcpu_kicks"] == 2 * counters["tdx.track_epochs"]
    assert counters["userspace_exits"] == 2 and counters["ept_violation_exits"] > 0

    # --- teardown: everything back with the host -------------------------------------------------
    gmem.close()
    for vcpu in vcpus:
        vcpu.close()
    vm.close()
    assert not host.module.pamt and not host.module.tds and not host.module.kot
    assert hkid not in host.keyids.in_use and not host.keyids.leaked and not host.leaked
    assert kvm.backend_view.crashed is None
    assert not [e for e in kvm.events if e.kind in ("host_map", "tdx_memory_poisoned")]
    core, tdx_checker = checkers
    assert core.checked > 50 and tdx_checker.checked > 50
