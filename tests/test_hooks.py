"""The backend hooks: where the core calls each one, what it passes, what an answer does.

Each hook is exercised on a throwaway backend written against :mod:`guestmem.backend`
only (the way a third-party backend is), and, where the built-in ``sw`` backend has a
behaviour of its own for it, on ``sw``.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest
from gmem_helpers import GMEM, PAGE, PRIVATE, MiB, plugin, throwaway_backend, x86_type

import guestmem
from guestmem import FailEntryExit, HypercallExit, KvmError, uapi
from guestmem.backend import (
    Fault,
    GfnRange,
    GmemView,
    HostFault,
    HostView,
    Leaf,
    SlotView,
    VcpuView,
    VmView,
    hookimpl,
    view,
)
from guestmem.hooks import HOOK_NAMES, PLUGIN_HOOK_NAMES
from guestmem.invariants import InvariantViolation

PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
MIRRORED = x86_type(5, name="TEST_TDX_VM", has_mirrored_tdp=True)


def private_vm(kvm: Any, vm_type: int = 1, size: int = MiB) -> tuple[Any, Any, Any, Any]:
    """A private-memory VM with one gmem slot whose shared side is anonymous memory."""
    vm = kvm.create_vm(vm_type)
    gmem = vm.create_guest_memfd(size)
    shared = kvm.mmap_anonymous(size)
    vm.set_user_memory_region2(0, GMEM, 0, size, shared.address, gmem, 0)
    return vm, gmem, shared, vm.create_vcpu(0)


# --- the list of hooks ----------------------------------------------------------------------------
def test_hook_names_are_the_hookspecs() -> None:
    """The facade's one list of hook names is exactly hookspecs.py (the plugin hooks aside)."""
    from guestmem import hookspecs

    specs = [n.removeprefix("guestmem_") for n in vars(hookspecs) if n.startswith("guestmem_")]
    assert sorted(HOOK_NAMES) == sorted(n for n in specs if n not in PLUGIN_HOOK_NAMES)
    assert set(PLUGIN_HOOK_NAMES) <= set(specs)
    assert all(getattr(guestmem.hooks.Hooks, name).__doc__ for name in HOOK_NAMES)


# --- per-host state -------------------------------------------------------------------------------
class HostState:
    @hookimpl
    def guestmem_host_init(self, host: HostView) -> dict[str, int]:
        return {"opened": 1}

    @hookimpl
    def guestmem_vm_init(self, vm: VmView) -> dict[str, Any]:
        vm.host.arch["opened"] += 1
        return {"host": vm.host.arch}


def test_host_init_gives_every_host_its_own_state() -> None:
    with throwaway_backend("t-host", policy=HostState()) as kvm, guestmem.open("t-host") as other:
        vm = kvm.create_vm(1)
        assert view(kvm).arch == {"opened": 2} and view(other).arch == {"opened": 1}
        assert view(vm).arch["host"] is view(kvm).arch


# --- VM and vCPU lifetime -------------------------------------------------------------------------
class Lifetime:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.refuse_vcpu = False

    @hookimpl
    def guestmem_vm_pre_destroy(self, vm: VmView) -> None:
        self.calls.append(("pre_destroy", len(list(vm.leaves()))))

    @hookimpl
    def guestmem_remove_external_spte(self, vm: VmView, leaf: Leaf) -> None:
        self.calls.append(("remove_external_spte", (leaf.gfn, leaf.npages, leaf.level)))

    @hookimpl
    def guestmem_vcpu_init(self, vcpu: VcpuView) -> str:
        if self.refuse_vcpu:
            raise KvmError(errno.EIO, "", "TD not initialized")
        return f"vcpu{vcpu.vcpu_id}"

    @hookimpl
    def guestmem_vcpu_destroy(self, vcpu: VcpuView) -> None:
        self.calls.append(("vcpu_destroy", vcpu.arch))

    @hookimpl
    def guestmem_vm_destroy(self, vm: VmView) -> None:
        self.calls.append(("vm_destroy", len(list(vm.leaves()))))


def test_destroy_order_is_kvm_destroy_vm() -> None:
    """kvm_destroy_vm: pre-destroy sees the leaves, the MMU zap removes the mirrored ones,
    then each vCPU, then the arch VM (with no leaf left)."""
    policy = Lifetime()
    with throwaway_backend("t-life", MIRRORED, policy=policy) as kvm:
        vm = kvm.create_vm(5)
        gmem = vm.create_guest_memfd(MiB)
        vm.set_user_memory_region2(0, GMEM, 0, MiB, 0, gmem, 0)
        vm.set_memory_attributes(0, MiB, PRIVATE)
        vm.create_vcpu(0).access(0x3000, data=b"x")
        vm.create_vcpu(1)
        gmem.close()  # the file's release zaps the private leaf through the mirror root
        vm.set_user_memory_region(1, 0, MiB, MiB, kvm.mmap_anonymous(MiB).address)
        vm.vcpus[0].access(MiB, 1)  # a shared leaf, still there at destruction
        policy.calls.clear()
        vm.close()
    assert [name for name, _ in policy.calls] == ["pre_destroy", "vcpu_destroy", "vcpu_destroy", "vm_destroy"]
    assert policy.calls[0][1] == 1 and policy.calls[-1][1] == 0
    assert [arch for name, arch in policy.calls if name == "vcpu_destroy"] == ["vcpu0", "vcpu1"]


def test_vcpu_init_refusal_leaves_the_id_free() -> None:
    policy = Lifetime()
    with throwaway_backend("t-vcpu", policy=policy) as kvm, kvm.create_vm(1) as vm:
        policy.refuse_vcpu = True
        with pytest.raises(KvmError) as info:
            vm.create_vcpu(3)
        assert info.value.errno == errno.EIO
        policy.refuse_vcpu = False
        assert view(vm.create_vcpu(3)).arch == "vcpu3"


class PreRun:
    def __init__(self) -> None:
        self.ready = False

    @hookimpl
    def guestmem_vcpu_pre_run(self, vcpu: VcpuView) -> None:
        if not self.ready:
            raise KvmError(errno.EINVAL, "", "vCPU not initialized")


def test_vcpu_pre_run_gates_guest_entry_not_other_vcpu_ioctls() -> None:
    policy = PreRun()
    with throwaway_backend("t-prerun", x86_type(0), policy=policy) as kvm, kvm.create_vm(0) as vm:
        vm.set_user_memory_region(0, 0, 0, MiB, kvm.mmap_anonymous(MiB).address)
        vcpu = vm.create_vcpu(0)
        for run in (lambda: vcpu.access(0, 1), lambda: vcpu.hypercall(uapi.KVM_HC_KICK_CPU)):
            with pytest.raises(KvmError) as info:
                run()
            assert info.value.errno == errno.EINVAL
        assert vcpu.pre_fault_memory(0, PAGE) == 0  # KVM_PRE_FAULT_MEMORY is no KVM_RUN
        policy.ready = True
        assert vcpu.access(0, 1) == b"\0"


class RefuseEntry:
    @hookimpl
    def guestmem_vcpu_pre_run(self, vcpu: VcpuView) -> None:
        raise FailEntryExit(0xFFFF_FFFF_FFFF_FFFF, "VMRUN: VMEXIT_INVALID", cpu=vcpu.vcpu_id, rule="T-1")


def test_vcpu_pre_run_may_answer_with_a_fail_entry_exit() -> None:
    """A hardware refusal to enter the guest is ``KVM_RUN`` returning 0 with
    ``KVM_EXIT_FAIL_ENTRY``: the exit reaches the caller as it is, nothing was faulted in."""
    with throwaway_backend("t-failentry", x86_type(0), policy=RefuseEntry()) as kvm, kvm.create_vm(0) as vm:
        vm.set_user_memory_region(0, 0, 0, MiB, kvm.mmap_anonymous(MiB).address)
        vcpu = vm.create_vcpu(2)
        with pytest.raises(FailEntryExit) as info:
            vcpu.access(0, data=b"x")
        exit_ = info.value
        assert (exit_.exit_reason, exit_.hardware_entry_failure_reason) == (
            uapi.KVM_EXIT_FAIL_ENTRY,
            (1 << 64) - 1,
        )
        assert (exit_.cpu, exit_.rule) == (2, "T-1")
        assert "[T-1]" in str(exit_)
        assert not vm.is_mapped(0)


# --- the mirror root (TDX) ------------------------------------------------------------------------
class Mirror:
    def __init__(self) -> None:
        self.set: list[Leaf] = []
        self.removed: list[Leaf] = []
        self.refuse = False

    @hookimpl
    def guestmem_set_external_spte(self, vm: VmView, leaf: Leaf) -> None:
        if self.refuse:
            raise KvmError(errno.EIO, "", "TDH.MEM.PAGE.AUG failed")
        self.set.append(leaf)

    @hookimpl
    def guestmem_remove_external_spte(self, vm: VmView, leaf: Leaf) -> None:
        self.removed.append(leaf)


@pytest.fixture
def mirrored() -> Iterator[tuple[Any, Mirror]]:
    policy = Mirror()
    with throwaway_backend("t-mirror", MIRRORED, policy=policy) as kvm:
        yield kvm, policy


def test_set_external_spte_sees_the_chosen_leaf(mirrored: tuple[Any, Mirror]) -> None:
    kvm, policy = mirrored
    vm, _, _, vcpu = private_vm(kvm, 5)
    vm.set_memory_attributes(0, MiB, PRIVATE)
    vcpu.access(0x5000, data=b"td")
    pfn = vm.gmem_pfn(5)
    assert policy.set == [Leaf(5, 1, pfn, uapi.PG_LEVEL_4K, True, True)]
    vcpu.access(0x5000, 2)  # mapped: no second AUG
    assert len(policy.set) == 1


def test_set_external_spte_failure_installs_nothing(mirrored: tuple[Any, Mirror]) -> None:
    kvm, policy = mirrored
    vm, _, _, vcpu = private_vm(kvm, 5)
    vm.set_memory_attributes(0, MiB, PRIVATE)
    policy.refuse = True
    with pytest.raises(KvmError):
        vcpu.access(0, 1)
    assert view(vm).leaf(0) is None


def test_shared_side_zap_keeps_private_leaves_of_a_mirrored_vm(mirrored: tuple[Any, Mirror]) -> None:
    """kvm_gfn_range_filter_to_root_types: a KVM_FILTER_SHARED zap (the host unmapping the
    shared side) reaches the direct root only; the private leaves go only with a private
    filter (punch hole), each through remove_external_spte."""
    kvm, policy = mirrored
    vm, gmem, shared, vcpu = private_vm(kvm, 5)
    vm.set_memory_attributes(0, PAGE, PRIVATE)
    vcpu.access(0, data=b"private")
    vcpu.access(PAGE, data=b"shared")
    shared.madvise(uapi.MADV_DONTNEED, 0, MiB)  # mmu notifier: KVM_FILTER_SHARED
    leaves = [(leaf.gfn, leaf.private) for leaf in view(vm).leaves()]
    assert leaves == [(0, True)] and policy.removed == []
    gmem.fallocate(PUNCH, 0, MiB)  # guest_memfd invalidation: KVM_FILTER_PRIVATE
    assert list(view(vm).leaves()) == []
    assert [(leaf.gfn, leaf.npages, leaf.private) for leaf in policy.removed] == [(0, 1, True)]


def test_shared_side_zap_removes_private_leaves_of_a_direct_root_vm(kvm: Any) -> None:
    """Without a mirror root (sw, SNP) private and shared leaves share the direct root and
    any zap removes what lies in its range, as kvm_unmap_gfn_range does there."""
    vm, _, shared, vcpu = private_vm(kvm)
    vm.set_memory_attributes(0, PAGE, PRIVATE)
    vcpu.access(0, data=b"private")
    shared.madvise(uapi.MADV_DONTNEED, 0, MiB)
    assert list(view(vm).leaves()) == []


def test_memslot_delete_and_destroy_reach_the_mirror_root(mirrored: tuple[Any, Mirror]) -> None:
    kvm, policy = mirrored
    vm, _, _, vcpu = private_vm(kvm, 5)
    vm.set_memory_attributes(0, MiB, PRIVATE)
    vcpu.access(0, 1)
    vcpu.access(0x10000, 1)
    vm.set_user_memory_region2(0, GMEM, 0, 0, 0)
    assert sorted(leaf.gfn for leaf in policy.removed) == [0, 0x10]


# --- memslots and bindings ------------------------------------------------------------------------
class Bindings:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.refuse_bind = False
        self.refuse_change: str | None = None

    @hookimpl
    def guestmem_gmem_bind(self, vm: VmView, slot: SlotView, gmem: GmemView, pgoff: int, npages: int) -> None:
        if self.refuse_bind:
            raise KvmError(errno.EEXIST, "", "page bound to another VM")
        self.calls.append(("bind", slot.id, gmem.ino, pgoff, npages))

    @hookimpl
    def guestmem_gmem_unbind(self, vm: VmView, slot: SlotView, gmem: GmemView) -> None:
        self.calls.append(("unbind", slot.id, gmem.ino))

    @hookimpl
    def guestmem_prepare_memory_region(
        self, vm: VmView, old: SlotView | None, new: SlotView | None, change: str
    ) -> None:
        self.calls.append(
            ("prepare", change, None if old is None else old.id, None if new is None else new.id)
        )
        if change == self.refuse_change:
            raise KvmError(errno.EPERM, "", f"protected VMs refuse memslot {change}")


def test_gmem_bind_and_unbind() -> None:
    policy = Bindings()
    with throwaway_backend("t-bind", policy=policy) as kvm, kvm.create_vm(1) as vm:
        gmem = vm.create_guest_memfd(4 * MiB)
        ino = view(gmem).ino
        vm.set_user_memory_region2(3, GMEM, 0, MiB, 0, gmem, 2 * MiB)
        vm.set_user_memory_region2(3, GMEM, 0, 0, 0)
        assert policy.calls == [
            ("bind", 3, ino, 512, 256),
            ("prepare", "create", None, 3),
            ("prepare", "delete", 3, None),
            ("unbind", 3, ino),
        ]


def test_a_refused_bind_creates_no_memslot() -> None:
    policy = Bindings()
    policy.refuse_bind = True
    with throwaway_backend("t-bind-no", policy=policy) as kvm, kvm.create_vm(1) as vm:
        gmem = vm.create_guest_memfd(MiB)
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region2(0, GMEM, 0, MiB, 0, gmem, 0)
        assert info.value.errno == errno.EEXIST
        assert not vm.memslots
        policy.refuse_bind = False
        vm.set_user_memory_region2(0, GMEM, 0, MiB, 0, gmem, 0)  # the pages were not left bound


def test_a_refused_delete_keeps_the_slot_with_its_mappings_zapped() -> None:
    """kvm_set_memslot: the slot is invalidated and zapped before the arch prepare; a
    refusal reactivates it."""
    policy = Bindings()
    with throwaway_backend("t-prepare", policy=policy) as kvm, kvm.create_vm(1) as vm:
        gmem = vm.create_guest_memfd(MiB)
        vm.set_user_memory_region2(0, GMEM, 0, MiB, 0, gmem, 0)
        vm.set_memory_attributes(0, MiB, PRIVATE)
        vcpu = vm.create_vcpu(0)
        vcpu.access(0, data=b"kept")
        policy.refuse_change = "delete"
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region2(0, GMEM, 0, 0, 0)
        assert info.value.errno == errno.EPERM
        assert (0, 0) in vm.memslots and not vm.memslots[(0, 0)].flags & uapi.KVM_MEMSLOT_INVALID
        assert list(view(vm).leaves()) == []
        assert vcpu.access(0, 4) == b"kept"


# --- arch ioctls ----------------------------------------------------------------------------------
def test_sw_enable_cap_exit_hypercall_makes_map_gpa_range_exit(kvm: Any) -> None:
    """x86 KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL) and __kvm_emulate_hypercall's MAP_GPA_RANGE."""
    vm, _, _, vcpu = private_vm(kvm)
    assert vcpu.hypercall(uapi.KVM_HC_MAP_GPA_RANGE, 0, 1, 0) == -uapi.KVM_ENOSYS
    for args, flags in (((1 << 13,), 0), ((1 << 12,), 1)):
        with pytest.raises(KvmError) as info:
            vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, *args, flags=flags)
        assert info.value.errno == errno.EINVAL
    assert vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << uapi.KVM_HC_MAP_GPA_RANGE) == 0
    encrypted = uapi.KVM_MAP_GPA_RANGE_ENCRYPTED
    with pytest.raises(HypercallExit) as exit_:
        vcpu.hypercall(uapi.KVM_HC_MAP_GPA_RANGE, 0x2000, 3, encrypted)
    assert (exit_.value.nr, exit_.value.args) == (uapi.KVM_HC_MAP_GPA_RANGE, (0x2000, 3, encrypted))
    assert exit_.value.flags == uapi.KVM_EXIT_HYPERCALL_LONG_MODE
    assert vcpu.hypercall(uapi.KVM_HC_MAP_GPA_RANGE, 0x2001, 1, 0) == -uapi.KVM_EINVAL
    assert vcpu.hypercall(uapi.KVM_HC_MAP_GPA_RANGE, 0x2000, 0, 0) == -uapi.KVM_EINVAL
    with pytest.raises(KvmError) as info:
        vm.enable_cap(9999)
    assert info.value.errno == errno.EINVAL


@pytest.mark.sw_host
def test_sw_has_no_memory_encrypt_op(kvm: Any) -> None:
    vm, _, _, vcpu = private_vm(kvm)
    for target in (vm, vcpu):
        with pytest.raises(KvmError) as info:
            target.memory_encrypt_op(b"\0" * 16)
        assert info.value.errno == errno.ENOTTY


class Ioctls:
    def __init__(self) -> None:
        self.caps: list[tuple[int, tuple[int, ...]]] = []

    @hookimpl
    def guestmem_vm_ioctl(self, vm: VmView, request: int, arg: Any) -> int | None:
        if request == uapi.KVM_ENABLE_CAP and arg.cap == 0x1234:
            self.caps.append((arg.cap, arg.args))
            return 0
        if request == uapi.KVM_MEMORY_ENCRYPT_OP and isinstance(arg, dict):
            arg["error"] = 7  # copied back
            return 0
        return None

    @hookimpl
    def guestmem_vcpu_ioctl(self, vcpu: VcpuView, request: int, arg: Any) -> int | None:
        if request == uapi.KVM_MEMORY_ENCRYPT_OP:
            arg["vcpu"] = vcpu.vcpu_id
            return 0
        return None


def test_arch_ioctls_reach_the_backend() -> None:
    policy = Ioctls()
    with throwaway_backend("t-ioctl", policy=policy) as kvm, kvm.create_vm(1) as vm:
        assert vm.enable_cap(0x1234, 5, 6) == 0 and policy.caps == [(0x1234, (5, 6))]
        cmd: dict[str, int] = {}
        assert vm.memory_encrypt_op(cmd) == 0 and cmd == {"error": 7}
        assert vm.create_vcpu(2).memory_encrypt_op(cmd) == 0 and cmd["vcpu"] == 2
        assert vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << 12) == 0  # x86's own, not the backend's
        with pytest.raises(KvmError) as info:
            vm.memory_encrypt_op(b"unknown")
        assert info.value.errno == errno.ENOTTY


# --- the guest's accesses -------------------------------------------------------------------------
class GuestAccess:
    def __init__(self) -> None:
        self.seen: list[tuple[int, bool, bool]] = []
        self.pending: set[int] = set()

    @hookimpl
    def guestmem_guest_access(self, vcpu: VcpuView, gfn: int, pfn: int, write: bool, private: bool) -> None:
        self.seen.append((gfn, write, private))
        if gfn in self.pending:
            vcpu.vm.kill("guest access before accepting")
            raise KvmError(errno.EIO, "", "EPT violation on a PENDING page")


def test_guest_access_sees_mapped_pages_too() -> None:
    policy = GuestAccess()
    with throwaway_backend("t-access", policy=policy) as kvm:
        vm, _, _, vcpu = private_vm(kvm)
        vm.set_memory_attributes(0, MiB, PRIVATE)
        vcpu.access(0x1FFE, data=b"abcd")  # two pages, faulted in
        vcpu.access(0x1000, 1)  # mapped already
        assert policy.seen == [(1, True, True), (2, True, True), (1, False, True)]
        policy.pending.add(1)
        with pytest.raises(KvmError) as info:
            vcpu.access(0x1000, 1)
        assert info.value.errno == errno.EIO and view(vm).dead


class ByteRanges:
    """Takes the byte-range arguments of the two access hooks (and leaves the rest out)."""

    def __init__(self) -> None:
        self.host: list[tuple[bool, int, int]] = []
        self.guest: list[tuple[int, bool, int, int]] = []

    @hookimpl
    def guestmem_host_access(self, write: bool, offset: int, length: int) -> None:
        self.host.append((write, offset, length))

    @hookimpl
    def guestmem_guest_access(self, gfn: int, write: bool, offset: int, length: int) -> None:
        self.guest.append((gfn, write, offset, length))


def test_accesses_say_which_bytes_they_touch() -> None:
    """A guest access names the bytes of each page it reaches (0 bytes for a page walk:
    ``VcpuView.translate``); a host kernel store and a host mapping's load name theirs
    too (a backend that poisons lines, as TDX does, needs them)."""
    policy = ByteRanges()
    with throwaway_backend("t-bytes", x86_type(0), x86_type(1), policy=policy) as kvm:
        vm, _, _, vcpu = private_vm(kvm)
        vm.set_memory_attributes(0, MiB, PRIVATE)
        vcpu.access(0x1FFE, data=b"abcd")
        view(vcpu).translate(0x3010)
        assert policy.guest == [(1, True, 0xFFE, 2), (2, True, 0, 2), (3, False, 0x10, 0)]
        host = view(kvm)
        pfn = host.alloc(1)
        host.kernel_write(pfn, 0x40, b"xy")
        assert policy.host == [(True, 0x40, 2)]
        with kvm.create_vm(0) as plain:
            shared = plain.create_guest_memfd(
                MiB, uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
            )
            with shared.mmap(MiB) as mapping:
                mapping.read(PAGE + 8, 3)
        assert policy.host[-1] == (False, 8, 3)


@pytest.mark.parametrize("gpa", [-1, -PAGE, -(1 << 63)])
def test_a_page_walk_at_a_negative_gpa_is_einval_as_an_access_there(gpa: int) -> None:
    """``VcpuView.translate`` (PVALIDATE, ACCEPT, a backend's guest load) answers a negative
    gpa as ``Vcpu.access`` does (``api.access_arguments``): EINVAL, before the guest runs."""
    policy = ByteRanges()
    with throwaway_backend("t-walk", x86_type(0), x86_type(1), policy=policy) as kvm:
        _, _, _, vcpu = private_vm(kvm)
        for walk in (lambda: view(vcpu).translate(gpa), lambda: vcpu.access(gpa, 8)):
            with pytest.raises(KvmError) as info:
                walk()
            assert info.value.errno == errno.EINVAL
        assert policy.guest == []


# --- host faults ----------------------------------------------------------------------------------
class HostFaults:
    def __init__(self, answer: HostFault | None) -> None:
        self.answer = answer
        self.lent = {0}
        self.reclaimed: list[tuple[int, int]] = []

    @hookimpl
    def guestmem_gmem_fault_user_mapping(self, vm: VmView, gmem: GmemView, index: int) -> HostFault | None:
        if index in self.lent:
            return self.answer
        return HostFault.ALLOW

    @hookimpl
    def guestmem_unmap_gfn_range(self, vm: VmView, range: GfnRange) -> bool:  # noqa: A002
        self.reclaimed.append((range.start, range.end))
        self.lent.clear()  # the guest gave the page back
        return True


@pytest.mark.parametrize("answer", [HostFault.SIGBUS, HostFault.RECLAIM, None])
def test_host_fault_outcomes(answer: HostFault | None) -> None:
    """ALLOW maps, SIGBUS refuses, RECLAIM takes the page back from the guest (the folio's
    guest mappings are invalidated, reaching guestmem_unmap_gfn_range) and asks again."""
    policy = HostFaults(answer)
    with throwaway_backend("t-hostfault", x86_type(0), policy=policy) as kvm, kvm.create_vm(0) as vm:
        gmem = vm.create_guest_memfd(MiB, uapi.GUEST_MEMFD_FLAG_MMAP)
        vm.set_user_memory_region2(0, GMEM, 0, MiB, 0, gmem, 0)
        vm.create_vcpu(0).access(0, data=b"guest")
        mapping = gmem.mmap(MiB)
        assert mapping.read(PAGE, 1) == b"\0"  # not lent: allowed
        if answer is HostFault.RECLAIM:
            assert mapping.read(0, 5) == b"guest" and policy.reclaimed == [(0, 1)]
            assert view(vm).leaf(0) is None and vm.counters["host_fault_reclaims"] == 1
        else:  # SIGBUS, and None: the core rule M-4 (no INIT_SHARED)
            with pytest.raises(guestmem.HostSigbus):
                mapping.read(0, 1)


class HostAccess:
    @hookimpl
    def guestmem_host_access(self, host: HostView, pfn: int, write: bool) -> str | None:
        return "RMP #PF" if write and pfn in host.arch else None

    @hookimpl
    def guestmem_host_init(self, host: HostView) -> set[int]:
        return set()


class StageTwoAbort:
    """A machine whose "hypervisor" takes pages from the host: userspace gets SIGSEGV, the
    host kernel goes down (pKVM's ``host_inject_abort`` and arm64 ``do_page_fault``)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bool, int | None]] = []

    @hookimpl
    def guestmem_host_init(self, host: HostView) -> set[int]:
        return set()

    @hookimpl
    def guestmem_host_access(self, host: HostView, pfn: int, write: bool, address: int | None) -> str | None:
        self.seen.append((pfn, write, address))
        if pfn not in host.arch:
            return None
        if address is not None:
            raise guestmem.HostSigsegv(address, "", "stage-2 fault")
        return "access to hypervisor-protected memory"


def test_every_host_userspace_access_meets_the_backend_with_its_address() -> None:
    """``guestmem_host_access`` sees each page of every userspace load and store, anonymous
    memory included, with the host address; a backend's HostSigsegv stops that access only
    (nothing stored, the host goes on), while the kernel's own store (address None) may take
    the host down.  KVM's hva fault path (get_user_pages) touches no data: no call."""
    policy = StageTwoAbort()
    with throwaway_backend("t-sigsegv", x86_type(0), policy=policy) as kvm, kvm.create_vm(0) as vm:
        shared = kvm.mmap_anonymous(2 * PAGE)
        vm.set_user_memory_region2(0, 0, 0, 2 * PAGE, shared.address)
        vcpu = vm.create_vcpu(0)
        vcpu.access(PAGE - 2, data=b"abcd")  # the hva path: no host access
        assert policy.seen == []
        shared.write(PAGE - 1, b"XY")  # one store over two pages: two host accesses
        leaf = view(vm).leaf(0)
        assert leaf is not None and leaf.npages >= 2
        pfn0, pfn1 = leaf.pfn, leaf.pfn + 1
        assert policy.seen == [(pfn0, True, shared.address + PAGE - 1), (pfn1, True, shared.address + PAGE)]
        host = view(kvm)
        host.arch.add(pfn1)
        with pytest.raises(guestmem.HostSigsegv) as info:
            shared.read(PAGE, 2)
        exc = info.value
        assert (exc.errno, exc.address, exc.si_code) == (
            errno.EFAULT,
            shared.address + PAGE,
            uapi.SEGV_ACCERR,
        )
        assert isinstance(exc, KvmError) and "SIGSEGV" in str(exc)
        with pytest.raises(guestmem.HostSigsegv):
            shared.write(PAGE, b"z")
        assert host.crashed is None and shared.read(0, PAGE) == bytes(PAGE - 2) + b"aX"
        vm.mmu_notifier_invalidate_range(shared.address, shared.address + 2 * PAGE)
        assert vcpu.access(PAGE, 1) == b"Y"  # the guest refaults through the hva path
        policy.seen.clear()
        with pytest.raises(guestmem.HostCrash, match="hypervisor-protected"):
            host.kernel_write(pfn1, 0, b"k")
        assert policy.seen == [(pfn1, True, None)] and host.crashed


@pytest.mark.parametrize("method", ["kernel_write", "write", "read"])
def test_host_memory_accesses_take_integers_within_one_page(method: str) -> None:
    """``HostView.read``/``write``/``kernel_write``: *pfn* and *offset* go through
    ``operator.index`` (a string, a float is a TypeError naming the argument), *data* must
    be bytes-like, and the span must lie within the page (ValueError), all before the host
    memory or the backend is touched."""
    policy = StageTwoAbort()
    with throwaway_backend("t-kwrite-types", policy=policy) as kvm:
        host = view(kvm)
        pfn = host.alloc(1)
        access = getattr(host, method)
        last = b"x" if method != "read" else 1
        for args, error, name in [
            ((str(pfn), 0, last), TypeError, "pfn"),
            ((float(pfn), 0, last), TypeError, "pfn"),
            ((pfn, "8", last), TypeError, "offset"),
            ((pfn, None, last), TypeError, "offset"),
            ((pfn, PAGE - 1, b"xy" if method != "read" else 2), ValueError, "page"),
            ((pfn, -1, last), ValueError, "page"),
        ]:
            with pytest.raises(error, match=name):
                access(*args)
        if method != "read":
            with pytest.raises(TypeError, match="data"):
                access(pfn, 0, "text")
            access(pfn, 0, bytearray(b"ok"))
        assert host.read(pfn, 0, 2) == (b"ok" if method != "read" else bytes(2))
        assert policy.seen == ([(pfn, True, None)] if method == "kernel_write" else [])
        assert host.crashed is None


def test_host_kernel_writes_meet_the_direct_map_and_the_backend() -> None:
    with throwaway_backend("t-kwrite", policy=HostAccess()) as kvm:
        host = view(kvm)
        a, b = host.alloc(1), host.alloc(1)
        host.kernel_write(a, 0, b"ok")
        assert host.read(a, 0, 2) == b"ok"
        host.arch.add(b)
        with pytest.raises(guestmem.HostCrash, match="RMP #PF"):
            host.kernel_write(b, 0, b"x")
    with guestmem.open("sw") as kvm:
        host = view(kvm)
        pfn = host.alloc(1)
        host.set_direct_map_invalid(pfn, 1)
        assert not host.direct_map_valid(pfn)
        with pytest.raises(guestmem.HostCrash, match="direct map"):
            host.kernel_write(pfn, 0, b"x")
        assert host.crashed


# --- faults and prepare ---------------------------------------------------------------------------
class RaisesLevel:
    @hookimpl
    def guestmem_fault(self, vm: VmView, fault: Fault) -> None:
        fault.max_level = uapi.PG_LEVEL_1G  # above what the folio allows: ignored
        fault.npages = 1 << 20


def test_a_fault_hook_can_only_restrict() -> None:
    huge = x86_type(1, gmem_folio_order=0)
    with throwaway_backend("t-raise", huge, policy=RaisesLevel()) as kvm:
        vm, _, _, vcpu = private_vm(kvm)
        vm.set_memory_attributes(0, MiB, PRIVATE)
        vcpu.access(0, 1)
        assert view(vm).leaf(0) == Leaf(0, 1, vm.gmem_pfn(0), uapi.PG_LEVEL_4K, True, True)


# --- observers and failures -----------------------------------------------------------------------
class AnswersHypercalls:
    @hookimpl
    def guestmem_hypercall(self, vcpu: VcpuView, nr: int, args: tuple[int, ...]) -> int:
        return 42


class BrokenObserver:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.fired = 0

    @hookimpl
    def guestmem_fault(self, vm: VmView, fault: Fault) -> None:
        self.fired += 1
        raise self.exc


def test_an_observer_never_answers(kvm: Any) -> None:
    with plugin(AnswersHypercalls()):
        _, _, _, vcpu = private_vm(kvm)
        assert vcpu.hypercall(uapi.KVM_HC_KICK_CPU) == 0  # the backend's answer stands
        assert vcpu.hypercall(999) == -uapi.KVM_ENOSYS


def test_an_observer_failure_is_reported_after_the_operation_naming_the_plugin(kvm: Any) -> None:
    broken = BrokenObserver(ZeroDivisionError("oops"))
    vm, _, _, vcpu = private_vm(kvm)
    with (
        plugin(broken, distribution="guestmem-broken-observer"),
        pytest.raises(guestmem.ObserverError, match="guestmem-broken-observer") as info,
    ):
        vcpu.access(0, data=b"x")
    assert isinstance(info.value.error, ZeroDivisionError) and info.value.hook == "guestmem_fault"
    assert broken.fired == 1
    assert vcpu.access(0, 1) == b"x"  # the store happened, the model is consistent
    assert view(vm).mmu_invalidate_in_progress == 0


def test_an_invariant_violation_is_reported_as_itself_after_the_event(kvm: Any) -> None:
    _, _, _, vcpu = private_vm(kvm)
    with (
        plugin(BrokenObserver(InvariantViolation("leaf-backed: made up"))),
        pytest.raises(InvariantViolation, match="made up") as info,
    ):
        vcpu.access(0, 1)
    assert any("reported by observer" in note for note in info.value.__notes__)


class BuggyBackend:
    armed = False

    @hookimpl
    def guestmem_unmap_gfn_range(self, vm: VmView, range: GfnRange) -> None:  # noqa: A002
        if self.armed:
            raise KeyError("bug in the backend")


def test_a_backend_exception_names_the_backend_and_leaves_no_invalidation_open() -> None:
    policy = BuggyBackend()
    with throwaway_backend("t-buggy", policy=policy) as kvm:
        vm, gmem, _, vcpu = private_vm(kvm)
        vm.set_memory_attributes(0, MiB, PRIVATE)
        vcpu.access(0, 1)
        policy.armed = True
        with pytest.raises(guestmem.BackendError, match=r"t-buggy.*guestmem-tests.*guestmem_unmap_gfn_range"):
            gmem.fallocate(PUNCH, 0, MiB)
        assert view(vm).mmu_invalidate_in_progress == 0
        vcpu.access(0x1000, 1)  # no EAGAIN [3.3]: the invalidation was ended


class CountsOperations:
    def __init__(self) -> None:
        self.done: list[str] = []

    @hookimpl
    def guestmem_operation_done(self, host: HostView, operation: str) -> None:
        self.done.append(operation)


def test_operation_done_once_per_call_of_the_uapi_face(kvm: Any) -> None:
    counter = CountsOperations()
    with plugin(counter):
        vm = kvm.create_vm(1)
        vm.create_guest_memfd(MiB).close()
        with pytest.raises(KvmError):
            vm.set_memory_attributes(1, 1, 0)
    assert counter.done == [
        "ModelKvm.create_vm",
        "ModelVm.create_guest_memfd",
        "ModelGuestMemfd.close",
        "ModelVm.set_memory_attributes",
    ]


def test_views_of_uapi_objects(kvm: Any) -> None:
    vm, gmem, _, vcpu = private_vm(kvm)
    assert isinstance(view(vm), VmView) and view(view(vm)) is view(vm)
    assert isinstance(view(vcpu), VcpuView) and view(vcpu).vm.vm_id == view(vm).vm_id
    assert isinstance(view(gmem), GmemView) and view(gmem).owner.vm_id == view(vm).vm_id
    assert isinstance(view(kvm), HostView) and view(vm).host is view(kvm)
    with pytest.raises(TypeError):
        view(object())


def test_hostview_counts_allocated_pages() -> None:
    """HostView.allocated_pages follows allocation and freeing (a scenario's leak count)."""
    with guestmem.open("sw") as kvm:
        host = guestmem.backend.view(kvm)
        before = host.allocated_pages
        pfn = host.alloc(3)
        assert host.allocated_pages == before + 3
        host.free(pfn, 3)
        assert host.allocated_pages == before


def test_a_backend_operation_reports_observer_failures_when_it_ends(kvm: Any) -> None:
    """``HostView.operation``: a backend's own call is one operation, like an ioctl."""
    counter = CountsOperations()
    vm, _, _, _ = private_vm(kvm)
    host = view(kvm)
    with plugin(counter), plugin(BrokenObserver(InvariantViolation("made up"))):
        with pytest.raises(InvariantViolation, match="made up"), host.operation():
            with host.operation():  # nests
                view(vm).fault_range(0, 1, private=False)
            steps = ["inside"]  # the failure is held until the outermost operation ends
        assert steps == ["inside"]
    assert counter.done == ["operation"]


def test_unmap_mapping_range_drops_host_ptes_keeps_pages(kvm: Any) -> None:
    vm = kvm.create_vm(0)
    gmem = vm.create_guest_memfd(MiB, uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED)
    mapping = gmem.mmap(MiB)
    mapping.write(PAGE, b"kept")
    inode = view(gmem)
    pfn = inode.pfn(1)
    assert inode.host_mapped(1)
    inode.unmap_mapping_range(0, 4)
    assert not inode.host_mapped(1) and inode.pfn(1) == pfn
    assert mapping.read(PAGE, 4) == b"kept" and inode.host_mapped(1)  # faulted in again


def test_host_mapped_ranges_of_a_span(kvm: Any) -> None:
    """``GmemView.host_mapped_ranges(start, end)``: the faulted runs of every host mapping
    clipped to the span, so a backend checks a run of pages without one query per page."""
    vm = kvm.create_vm(0)
    gmem = vm.create_guest_memfd(MiB, uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED)
    first, second = gmem.mmap(MiB), gmem.mmap(MiB)
    for page in (2, 3, 4, 9):
        first.write(page * PAGE, b"x")
    second.write(3 * PAGE, b"y")
    inode = view(gmem)
    assert sorted(inode.host_mapped_ranges()) == [(2, 5), (3, 4), (9, 10)]
    assert sorted(inode.host_mapped_ranges(4, 9)) == [(4, 5)]
    assert sorted(inode.host_mapped_ranges(3, 4)) == [(3, 4), (3, 4)]
    assert list(inode.host_mapped_ranges(5, 9)) == [] and sorted(inode.host_mapped_ranges(9)) == [(9, 10)]
    folios = sorted((f.start, f.end, f.pfn) for f in inode.host_mapped_folios())
    assert [(s, e) for s, e, _ in folios] == [(2, 5), (3, 4), (9, 10)]
    assert all(pfn == inode.pfn(s) for s, _, pfn in folios)


def test_bound_gmem_is_each_file_once(kvm: Any) -> None:
    """``VmView.bound_gmem()``: the guest_memfd files the memslots bind, each once, in
    memslot order (two slots on one file give it once)."""
    vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    one, two = vm.create_guest_memfd(MiB), vm.create_guest_memfd(MiB)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, PAGE, 0, two, 0)
    vm.set_user_memory_region2(1, uapi.KVM_MEM_GUEST_MEMFD, PAGE, PAGE, 0, one, 0)
    vm.set_user_memory_region2(2, uapi.KVM_MEM_GUEST_MEMFD, 2 * PAGE, PAGE, 0, two, PAGE)
    vm.set_user_memory_region(3, 0, 3 * PAGE, PAGE, 0)
    assert [g.ino for g in view(vm).bound_gmem()] == [view(two).ino, view(one).ino]


def test_gmem_allocate_instantiates_folios_like_fallocate(kvm: Any) -> None:
    vm = kvm.create_vm(0)
    gmem = vm.create_guest_memfd(MiB)
    inode = view(gmem)
    inode.allocate(2, 4)
    assert inode.pfn(1) is None and inode.pfn(2) is not None and inode.pfn(3) == inode.pfn(2) + 1
    assert not inode.is_prepared(2)
    pfn = inode.pfn(2)
    inode.allocate(0, 4)  # existing folios are untouched
    assert inode.pfn(2) == pfn and inode.pfn(0) is not None
