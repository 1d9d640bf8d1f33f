"""Guest faults and KVM_EXIT_MEMORY_FAULT on x86: spec 2.J (G-1..G-12, as modelled)."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from gmem_helpers import INIT_SHARED, MMAP, PAGE, PRIVATE, READONLY, MiB, anon_slot, gmem_slot, plugin

import guestmem
from guestmem import KvmError, MemoryFault, MmioExit, uapi
from guestmem.errors import EHWPOISON

EXIT_PRIVATE = uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE


class PrepareCounter:
    """Observer counting ``guestmem_gmem_prepare`` calls per VM."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int, int]] = []

    @guestmem.hookimpl
    def guestmem_gmem_prepare(self, vm: Any, gfn: int, pfn: int, order: int) -> None:
        self.calls.append((vm.vm_id, gfn, pfn, order))


@pytest.fixture
def pgmem(protected_vm: Any) -> Any:
    """The guest_memfd of ``pvm``."""
    gmem = gmem_slot(protected_vm, MiB)
    protected_vm.set_memory_attributes(0, MiB // 2, PRIVATE)
    return gmem


@pytest.fixture
def pvm(protected_vm: Any, pgmem: Any) -> Any:
    """A SW_PROTECTED VM with a 1 MiB gmem slot at gpa 0 (gfns 0..255), first half private."""
    return protected_vm


def exit_of(vcpu: Any, gpa: int, **kwargs: Any) -> MemoryFault:
    with pytest.raises(MemoryFault) as info:
        vcpu.access(gpa, **kwargs)
    exc = info.value
    assert exc.exit_reason == uapi.KVM_EXIT_MEMORY_FAULT
    return exc


# --- G-1 ------------------------------------------------------------------------------------
def test_G1_attributes_decide_privateness(pvm: Any) -> None:
    """G-1: on SW_PROTECTED an access is private iff the gfn's attribute is PRIVATE."""
    vcpu = pvm.create_vcpu(0)
    vcpu.access(0, data=b"private")
    leaf = pvm.mmu.lookup(0)
    assert leaf is not None and leaf[1].private
    assert leaf[0] == pvm.gmem_pfn(0)


# --- G-2 / G-3 ------------------------------------------------------------------------------
@pytest.mark.parametrize("write", [False, True])
def test_G2_shared_access_to_private_gfn_exits(pvm: Any, write: bool) -> None:
    """G-2/G-3: shared access to a PRIVATE gfn: exit 39, EFAULT, page-aligned gpa, 4 KiB, flags 0."""
    vcpu = pvm.create_vcpu(0)
    kwargs: dict[str, Any] = {"data": b"xy"} if write else {"length": 2}
    exc = exit_of(vcpu, 0x1234, private=False, **kwargs)
    assert (exc.errno, exc.rule) == (errno.EFAULT, "G-2")
    assert (exc.gpa, exc.size, exc.flags) == (0x1000, PAGE, 0)
    assert not pvm.is_mapped(1)


@pytest.mark.parametrize("write", [False, True])
def test_G2_private_access_to_shared_gfn_exits_with_private_flag(pvm: Any, write: bool) -> None:
    """G-2/G-3: a private access to a shared gfn reports flags == PRIVATE (never RWX bits)."""
    vcpu = pvm.create_vcpu(0)
    gpa = MiB // 2 + 3 * PAGE + 0x10
    kwargs: dict[str, Any] = {"data": b"z"} if write else {}
    exc = exit_of(vcpu, gpa, private=True, **kwargs)
    assert (exc.errno, exc.rule) == (errno.EFAULT, "G-2")
    assert (exc.gpa, exc.size, exc.flags) == (gpa & ~(PAGE - 1), PAGE, EXIT_PRIVATE)
    assert exc.is_private
    assert not pvm.is_mapped(gpa >> 12)


def test_G2_default_vm_private_access_exits(default_vm: Any) -> None:
    """G-2: on a VM without private memory every gfn is shared, so a private access exits."""
    gmem_slot(default_vm, MiB)
    exc = exit_of(default_vm.create_vcpu(0), 0, private=True)
    assert (exc.rule, exc.flags) == ("G-2", EXIT_PRIVATE)


def test_G3_exit_for_a_multi_page_access_reports_the_faulting_page(pvm: Any) -> None:
    """G-3: the exit gpa is the page of the access that faulted (the second page here)."""
    vcpu = pvm.create_vcpu(0)
    start = MiB // 2 - 8  # last 8 bytes private, next page shared
    exc = exit_of(vcpu, start, length=16, private=True)
    assert exc.gpa == MiB // 2 and exc.flags == EXIT_PRIVATE


# --- G-4 no memslot ----------------------------------------------------------------------------
def test_G4_private_access_without_memslot_exits(protected_vm: Any) -> None:
    """G-4: a private access where no memslot exists is a memory-fault exit (EFAULT, PRIVATE)."""
    protected_vm.set_memory_attributes(8 * MiB, PAGE, PRIVATE)
    exc = exit_of(protected_vm.create_vcpu(0), 8 * MiB + 4)
    assert (exc.errno, exc.rule, exc.gpa, exc.size, exc.flags) == (
        errno.EFAULT,
        "G-4",
        8 * MiB,
        PAGE,
        EXIT_PRIVATE,
    )


@pytest.mark.parametrize("write", [False, True])
def test_G4_shared_access_without_memslot_is_mmio(protected_vm: Any, write: bool) -> None:
    """G-4: a shared access with no memslot takes the MMIO path: KVM_EXIT_MMIO, not an error."""
    vcpu = protected_vm.create_vcpu(0)
    kwargs: dict[str, Any] = {"data": b"abcd"} if write else {"length": 4}
    with pytest.raises(MmioExit) as info:
        vcpu.access(8 * MiB + 0x10, **kwargs)
    assert (info.value.gpa, info.value.length, info.value.is_write) == (8 * MiB + 0x10, 4, write)
    assert info.value.exit_reason == uapi.KVM_EXIT_MMIO
    assert not isinstance(info.value, KvmError)


# --- G-5 / G-6 gmem path -------------------------------------------------------------------------
def test_G5_private_fault_in_slot_without_gmem_exits(protected_vm: Any) -> None:
    """G-5: a private fault in a slot lacking KVM_MEM_GUEST_MEMFD: exit, EFAULT, PRIVATE."""
    anon_slot(protected_vm, MiB)
    protected_vm.set_memory_attributes(0, PAGE, PRIVATE)
    exc = exit_of(protected_vm.create_vcpu(0), 0)
    assert (exc.errno, exc.rule, exc.flags) == (errno.EFAULT, "G-5", EXIT_PRIVATE)


def test_G5_gmem_closed_exits_EFAULT(pvm: Any, pgmem: Any) -> None:
    """G-5 / L-4: the slot's gmem file was released: kvm_gmem_get_pfn fails, exit with EFAULT."""
    pgmem.close()
    exc = exit_of(pvm.create_vcpu(0), 0)
    assert (exc.errno, exc.flags) == (errno.EFAULT, EXIT_PRIVATE)


def test_G5_poisoned_gmem_page_exits_EHWPOISON(protected_vm: Any) -> None:
    """G-5 / E-2: a poisoned gmem folio makes the fault exit with errno EHWPOISON."""
    gmem = gmem_slot(protected_vm, MiB)
    protected_vm.set_memory_attributes(0, MiB, PRIVATE)
    gmem.inject_memory_failure(PAGE)
    exc = exit_of(protected_vm.create_vcpu(0), PAGE)
    assert (exc.errno, exc.gpa, exc.flags) == (EHWPOISON, PAGE, EXIT_PRIVATE)


def test_G5_gmem_only_slot_serves_shared_faults_from_gmem(default_vm: Any) -> None:
    """G-5/M-7: in a gmem-only slot (FLAG_MMAP) shared faults use gmem, not userspace_addr."""
    vm = default_vm
    gmem = gmem_slot(vm, MiB, flags=MMAP | INIT_SHARED)  # userspace_addr 0: no hva at all
    vcpu = vm.create_vcpu(0)
    vcpu.access(PAGE, data=b"guest")
    assert vm.mmu.lookup(1)[0] == vm.gmem_pfn(1)
    assert not vm.mmu.lookup(1)[1].private
    host = gmem.mmap(MiB)
    assert host.read(PAGE, 5) == b"guest"
    host.write(2 * PAGE, b"host")
    assert vcpu.access(2 * PAGE, 4) == b"host"


def test_G6_gmem_mapping_is_writable_and_backed_by_gmem(pvm: Any) -> None:
    """G-6: the gmem path maps the gmem pfn, writable (GMEM slots cannot be READONLY)."""
    vcpu = pvm.create_vcpu(0)
    assert vcpu.access(3 * PAGE, 4) == bytes(4)
    pfn, spte = pvm.mmu.lookup(3)
    assert pfn == pvm.gmem_pfn(3) and spte.writable and spte.private
    vcpu.access(3 * PAGE, data=b"w")  # no second fault needed for the write
    assert pvm.counters["faults"] == 1


def test_G12_binding_mismatch_is_EIO(pvm: Any, pgmem: Any) -> None:
    """G-12: the bindings entry at the index is not the slot (forced here): exit with EIO."""
    pgmem.file.bindings.erase(5, 6)
    exc = exit_of(pvm.create_vcpu(0), 5 * PAGE)
    assert (exc.errno, exc.rule, exc.gpa) == (errno.EIO, "G-12", 5 * PAGE)


# --- G-7 hva path ---------------------------------------------------------------------------------
def test_G7_shared_fault_with_bad_hva_is_plain_EFAULT(pvm: Any) -> None:
    """G-7: a shared fault in a non-gmem-only slot uses userspace_addr; no VMA -> EFAULT, no exit."""
    vcpu = pvm.create_vcpu(0)
    exits = pvm.counters.get("memory_fault_exits", 0)
    with pytest.raises(KvmError) as info:
        vcpu.access(MiB // 2)
    assert not isinstance(info.value, MemoryFault)
    assert (info.value.errno, info.value.rule) == (errno.EFAULT, "G-7")
    assert pvm.counters.get("memory_fault_exits", 0) == exits
    assert not pvm.is_mapped((MiB // 2) >> 12)


def test_G7_shared_fault_uses_userspace_addr_not_gmem(protected_vm: Any) -> None:
    """G-7: with a mapped userspace_addr the shared fault maps host memory; gmem stays untouched."""
    vm = protected_vm
    gmem = vm.create_guest_memfd(MiB)
    host = vm.kvm.mmap_anonymous(MiB)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, MiB, host.address, gmem, 0)
    vcpu = vm.create_vcpu(0)
    vcpu.access(PAGE, data=b"shared")
    assert host.read(PAGE, 6) == b"shared"
    assert gmem.file.inode.allocated_pages() == 0
    vm.set_memory_attributes(PAGE, PAGE, PRIVATE)
    assert vcpu.access(PAGE, 6) == bytes(6)  # private view: a fresh gmem page
    assert host.read(PAGE, 6) == b"shared"


def test_G7_readonly_slot_write_is_mmio(default_vm: Any) -> None:
    """G-7: a write to a READONLY slot goes to emulation (KVM_EXIT_MMIO); reads are mapped."""
    vm = default_vm
    anon_slot(vm, MiB, flags=READONLY)
    vcpu = vm.create_vcpu(0)
    assert vcpu.access(0x10, 2) == bytes(2)
    with pytest.raises(MmioExit) as info:
        vcpu.access(0x10, data=b"no")
    assert (info.value.gpa, info.value.length, info.value.is_write) == (0x10, 2, True)
    assert not vm.mmu.lookup(0)[1].writable


# --- G-11 zeroing and prepare ------------------------------------------------------------------
def test_G11_first_guest_use_zeroes_the_folio(pvm: Any, pgmem: Any) -> None:
    """G-11: a folio allocated by fallocate (not zeroed there, FA-6) is cleared on first guest use."""
    pgmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE, 0, 2 * PAGE)
    pfn = pgmem.file.inode.pfn(1)
    pvm.host.write(pfn, 0, b"stale host data")
    assert not pgmem.file.inode.is_prepared(1)
    assert pvm.create_vcpu(0).access(PAGE, 15) == bytes(15)
    assert pgmem.file.inode.is_prepared(1)


def test_G11_prepare_called_once_per_folio(pvm: Any) -> None:
    """G-11 [6.18]: arch prepare runs once per folio (when not uptodate), with its gfn/pfn/order."""
    counter = PrepareCounter()
    with plugin(counter):
        vcpu = pvm.create_vcpu(0)
        vcpu.access(0, data=b"a")
        vcpu.access(0, 1)
        pvm.set_memory_attributes(0, PAGE, 0)  # zap and convert back: the folio stays prepared
        pvm.set_memory_attributes(0, PAGE, PRIVATE)
        vcpu.access(0, 1)
        vcpu.access(7 * PAGE, 1)
    ours = [c for c in counter.calls if c[0] == pvm.vm_id]
    assert ours == [(pvm.vm_id, 0, pvm.gmem_pfn(0), 0), (pvm.vm_id, 7, pvm.gmem_pfn(7), 0)]


def test_G11_prepare_again_after_punch_hole(pvm: Any, pgmem: Any) -> None:
    """G-11 with FA-8: a punched page comes back as a fresh folio, zeroed and prepared again."""
    counter = PrepareCounter()
    with plugin(counter):
        vcpu = pvm.create_vcpu(0)
        vcpu.access(0, data=b"before")
        pgmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, 0, PAGE)
        assert vcpu.access(0, 6) == bytes(6)
    assert len([c for c in counter.calls if c[0] == pvm.vm_id]) == 2


# --- order of the fault checks (kvm_mmu_faultin_pfn) ----------------------------------------------
def test_G2_before_G4_mismatch_wins_over_missing_slot(protected_vm: Any) -> None:
    """G-2 is checked right after the seq snapshot, before the memslot lookup (G-4)."""
    exc = exit_of(protected_vm.create_vcpu(0), 8 * MiB, private=True)  # shared gfn, no slot
    assert (exc.rule, exc.flags) == ("G-2", EXIT_PRIVATE)


def test_G2_before_G5_mismatch_wins_over_slot_without_gmem(protected_vm: Any) -> None:
    """G-2 wins over G-5: a private access to a shared gfn of a plain slot is a mismatch."""
    anon_slot(protected_vm, MiB)
    exc = exit_of(protected_vm.create_vcpu(0), 0, private=True)
    assert exc.rule == "G-2"


def test_G4_shared_gfn_beyond_slots_after_delete_is_mmio(pvm: Any) -> None:
    """G-4 (selftest private_access_memslot_deleted): once the slot is deleted, a private gfn
    exits with the memory fault, a shared one goes to MMIO."""
    vcpu = pvm.create_vcpu(0)
    vcpu.access(0, 1)
    pvm.set_user_memory_region2(0, 0, 0, 0, 0)
    exc = exit_of(vcpu, 0)
    assert (exc.rule, exc.flags) == ("G-4", EXIT_PRIVATE)
    with pytest.raises(MmioExit):
        vcpu.access(MiB // 2)


# --- the vCPU's translation cache never outlives what it caches ------------------------------
def test_cached_translation_dropped_by_punch(pvm: Any, pgmem: Any) -> None:
    """L-5 + G-11: after a punch, the next access faults a fresh, zeroed folio."""
    vcpu = pvm.create_vcpu(0)
    vcpu.access(0, data=b"secret")
    assert vcpu.access(0, 6) == b"secret"  # a cached translation now
    pgmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, 0, PAGE)
    assert vcpu.access(0, 6) == bytes(6)


def test_cached_translation_dropped_by_attribute_change(pvm: Any) -> None:
    """G-2: a cached private translation must not serve an access once the gfn is shared."""
    vcpu = pvm.create_vcpu(0)
    vcpu.access(0, 1)
    assert vcpu.access(0, 1) == b"\0"
    pvm.set_memory_attributes(0, PAGE, 0)
    with pytest.raises(MemoryFault) as exc:
        vcpu.access(0, 1, private=True)
    assert exc.value.errno == errno.EFAULT and exc.value.rule == "G-2"


def test_cached_translation_dropped_by_memslot_delete(pvm: Any) -> None:
    """G-4: deleting the memslot zaps its leaves: the next private access has no memslot."""
    vcpu = pvm.create_vcpu(0)
    vcpu.access(PAGE * 10, data=b"x")
    assert vcpu.access(PAGE * 10, 1) == b"x"
    pvm.set_user_memory_region2(0, 0, 0, 0, 0)
    with pytest.raises(MemoryFault) as exc:
        vcpu.access(PAGE * 10, 1)
    assert exc.value.rule == "G-4"
