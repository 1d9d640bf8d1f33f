"""GuestVm, the portable intents on sw, and the QEMU-style VMM loop (``guestmem.vmm``)."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest

import guestmem
from guestmem import HypercallExit, KvmError, MemoryFault, uapi
from guestmem.backend import X86_DEFAULT_VM, X86_SW_PROTECTED_VM, Backend, X86Intents, view
from guestmem.guestvm import GuestVm
from guestmem.intents import CAPABILITIES, COST_CATEGORIES, Intents, NotApplicable, RamRegion
from guestmem.vmm import convert_memory

MiB = 1 << 20
PAGE = uapi.PAGE_SIZE


def launch(kvm: Any, **options: Any) -> GuestVm:
    """A ``KVM_X86_SW_PROTECTED_VM`` launched on *kvm*: sw's private VM type, and with
    ``--guestmem-host`` the same ordinary type on that host, whose intents must treat it as
    sw's do (the host's confidential type has its own tests in its plugin)."""
    return GuestVm.launch(kvm, vm_type=uapi.KVM_X86_SW_PROTECTED_VM, **options)


@pytest.fixture
def guest(kvm: Any) -> Iterator[GuestVm]:
    with launch(kvm, size=16 * MiB) as g:
        yield g


def test_capabilities_are_probed_at_launch(guest: GuestVm) -> None:
    """A VM its guest killed answers every ioctl with EIO (CAP-9), KVM_CHECK_EXTENSION too;
    what it can do was probed at launch, so later steps still learn whether they apply."""
    view(guest.vm).kill("the guest touched what it must not")
    with pytest.raises(KvmError) as info:
        guest.vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES)
    assert info.value.errno == errno.EIO
    assert {"conversion", "memory_attributes", "private_mem"} <= guest.capabilities


def test_launch_lays_out_memory_as_qemu_does(guest: GuestVm) -> None:
    """A private-memory VM: gmem + shared anonymous memory in one GUEST_MEMFD slot, all
    private (kvm_set_memory_attributes_private), MAP_GPA_RANGE exits enabled."""
    assert guest.vm_type.type == uapi.KVM_X86_SW_PROTECTED_VM
    (region,) = guest.regions
    assert (region.gpa, region.size, region.slot, region.in_place) == (0, 16 * MiB, 0, False)
    vm = view(guest.vm)
    assert all(attr == uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE for _, _, attr in vm.attribute_runs(0, 4096))
    assert vm.hypercall_exit_enabled == 1 << uapi.KVM_HC_MAP_GPA_RANGE
    assert [slot.userspace_addr for slot in vm.memslots()] == [region.shared.address]  # type: ignore[union-attr]
    assert len(guest.vcpus) == 1
    assert guest.capabilities >= {"private_mem", "conversion", "memory_attributes", "guest_access"}
    assert guest.capabilities <= set(CAPABILITIES)


def test_conversion_is_destructive_with_the_qemu_loop(guest: GuestVm) -> None:
    """to-shared punches the gmem copy; to-private MADV_REMOVEs the shared copy."""
    guest.write(0x1000, b"secret")
    assert guest.read(0x1000, 6) == b"secret"
    assert "1 KVM_HC_MAP_GPA_RANGE" in guest.convert(0x1000, PAGE, private=False)
    assert guest.read(0x1000, 6) == bytes(6)  # the shared side, fresh
    guest.write(0x1000, b"bounce")
    shared = guest.regions[0].shared
    assert shared is not None and shared.read(0x1000, 6) == b"bounce"
    guest.convert(0x1000, PAGE, private=True)
    assert shared.read(0x1000, 6) == bytes(6)  # MADV_REMOVE freed the shmem page
    assert guest.read(0x1000, 6) == bytes(6)  # and the private page is a new folio
    assert guest.vmm is not None and guest.vmm.handled["hypercall"] == 2
    counters = guest.counters()
    assert counters["punch_hole"] == 1 and counters["userspace_exits"] == 2


def test_implicit_conversion_through_a_memory_fault_exit(guest: GuestVm) -> None:
    """A shared access to private memory exits (G-2); the loop converts and re-runs it."""
    assert guest.read(0x3000, 4, private=False) == bytes(4)
    assert not view(guest.vm).is_private(3)
    assert guest.vmm is not None and guest.vmm.handled["memory_fault"] == 1


def test_without_a_vmm_loop_exits_reach_the_caller(kvm: Any) -> None:
    with launch(kvm, size=MiB, handle_exits="none") as guest:
        with pytest.raises(HypercallExit) as hc:
            guest.convert(0, PAGE, private=False)
        assert hc.value.args == (0, 1, uapi.KVM_MAP_GPA_RANGE_DECRYPTED)
        with pytest.raises(MemoryFault) as mf:
            guest.read(0x2000, 1, private=False)
        assert (mf.value.gpa, mf.value.is_private) == (0x2000, False)


def test_coalesce_false_is_one_request_per_page(guest: GuestVm) -> None:
    assert guest.convert(0, 4 * PAGE, private=False, coalesce=False).startswith("4 ")
    assert guest.counters()["hypercalls"] == 4
    assert guest.convert(0, 2 * MiB, private=True, page_size=2 * MiB).startswith("1 ")


def test_unaligned_intents_are_einval(guest: GuestVm) -> None:
    with pytest.raises(KvmError) as exc:
        guest.convert(0x1000, 2 * MiB, private=False, page_size=2 * MiB)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(KvmError):
        guest.accept(0, 0)


def test_what_sw_cannot_express_is_not_applicable(kvm: Any, guest: GuestVm) -> None:
    with pytest.raises(NotApplicable, match="no launch"):
        guest.populate(0, b"image")
    with pytest.raises(NotApplicable, match="no memory acceptance"):
        guest.accept(0, MiB)
    with GuestVm.launch(kvm, kind="default", size=MiB) as plain:
        assert plain.vm_type.type == uapi.KVM_X86_DEFAULT_VM
        assert plain.regions[0].in_place  # gmem-only: MMAP | INIT_SHARED, its own mapping
        with pytest.raises(NotApplicable, match="no private memory"):
            plain.convert(0, PAGE, private=True)
        plain.write(0x5000, b"plain")
        shared = plain.regions[0].shared
        assert shared is not None and shared.read(0x5000, 5) == b"plain"


def test_populate_after_the_launch_is_not_applicable(guest: GuestVm) -> None:
    guest.finish_launch()
    with pytest.raises(NotApplicable, match="pre-boot"):
        guest.populate(0, b"late")


def test_touch_faults_runs_and_counts_pages(guest: GuestVm) -> None:
    assert guest.touch(2 * MiB, 4 * MiB) == 1024
    leaves = list(view(guest.vm).leaves(512, 1536))
    assert sum(leaf.npages for leaf in leaves) == 1024 and all(leaf.private for leaf in leaves)


def test_prefault_after_conversion(kvm: Any) -> None:
    """QEMU 4cdc489eb9c2: KVM_PRE_FAULT_MEMORY over the converted range."""
    with launch(kvm, size=4 * MiB, prefault=True) as guest:
        guest.convert(MiB, MiB, private=False)
        leaves = list(view(guest.vm).leaves(256, 512))
        assert sum(leaf.npages for leaf in leaves) == 256 and not any(leaf.private for leaf in leaves)
        assert guest.counters()["pre_faulted_bytes"] == MiB


def test_convert_memory_follows_kvm_convert_memory(kvm: Any) -> None:
    with launch(kvm, memory=[(0, MiB), (MiB, MiB)]) as guest:
        convert_memory(guest.vm, guest.regions, 8 * MiB, PAGE, to_private=False)  # no RAM: ignored
        with pytest.raises(KvmError) as exc:
            convert_memory(guest.vm, guest.regions, 8 * MiB, PAGE, to_private=True)
        assert exc.value.errno == errno.EFAULT
        # one conversion across both regions converts each (the AMDESE fix)
        convert_memory(guest.vm, guest.regions, MiB - PAGE, 2 * PAGE, to_private=False)
        vm = view(guest.vm)
        assert not vm.is_private(255) and not vm.is_private(256) and vm.is_private(257)
        anon = RamRegion(4 * MiB, MiB, slot=9)
        with pytest.raises(KvmError, match="no guest_memfd"):
            convert_memory(guest.vm, [anon], 4 * MiB, PAGE, to_private=True)


def test_costs_use_the_common_categories(guest: GuestVm) -> None:
    guest.write(0, b"x")
    guest.convert(0, PAGE, private=False)
    costs = guest.costs()
    assert set(costs) == set(COST_CATEGORIES)
    assert costs["exits"] == 1 and costs["hypercalls"] == 1 and costs["faults"] >= 1


class _Storm(Intents):
    """An architecture whose guest never stops exiting."""

    def convert(self, guest: GuestVm, gpa: int, size: int, **_: Any) -> str:
        vcpu = guest.vcpu()
        guest.run(lambda: vcpu.hypercall(uapi.KVM_HC_MAP_GPA_RANGE, gpa, 1, 0), vcpu)
        return ""

    def resume(self, guest: GuestVm, vcpu: Any, exit: HypercallExit, ret: int) -> Any:  # noqa: A002
        raise HypercallExit(exit.nr, exit.args)


def test_the_loop_gives_up_on_an_exit_storm(kvm: Any) -> None:
    guest = launch(kvm, size=MiB)
    guest.intents = _Storm()
    with pytest.raises(RuntimeError, match="still exiting"):
        guest.convert(0, PAGE, private=False)
    guest.close()


class _Chunks(Intents):
    """An architecture whose conversion leaves in one exit per page, as TDX's MapGPA leaves
    in one exit per 2 MiB chunk: every exit makes progress."""

    def convert(self, guest: GuestVm, gpa: int, size: int, **_: Any) -> str:
        vcpu = guest.vcpu()
        return str(guest.run(lambda: vcpu.hypercall(uapi.KVM_HC_MAP_GPA_RANGE, gpa, 1, 0), vcpu))

    def resume(self, guest: GuestVm, vcpu: Any, exit: HypercallExit, ret: int) -> Any:  # noqa: A002
        gpa = exit.args[0] + PAGE
        if gpa >= 256 * PAGE:
            return gpa
        return vcpu.hypercall(uapi.KVM_HC_MAP_GPA_RANGE, gpa, 1, 0)


def test_exits_that_make_progress_are_not_a_storm(kvm: Any) -> None:
    guest = launch(kvm, size=MiB)
    guest.intents = _Chunks()
    assert guest.convert(0, PAGE, private=False) == str(256 * PAGE)  # 256 exits, each a new page
    assert guest.vmm is not None and guest.vmm.handled["hypercall"] == 256
    guest.close()


def test_a_backend_without_intents_gets_the_generic_base() -> None:
    registry = guestmem.get_registry()
    sw = registry.backend("sw")
    assert isinstance(sw.intents, X86Intents)  # what a whole x86 host's intents extend
    assert Intents().vm_type(sw, "private")[0].type == uapi.KVM_X86_SW_PROTECTED_VM


def test_a_backend_names_its_private_vm_type() -> None:
    """A host whose /dev/kvm offers SW_PROTECTED next to its own confidential type (SNP,
    TDX) names the latter; a backend without it keeps the first type with private memory."""

    class Named(Intents):
        private_vm_type = uapi.KVM_X86_SW_PROTECTED_VM

    class Missing(Intents):
        private_vm_type = uapi.KVM_X86_TDX_VM

    sw = guestmem.get_registry().backend("sw")
    plain = Backend(name="plain", summary="an x86 host", vm_types=[X86_DEFAULT_VM, X86_SW_PROTECTED_VM])
    assert plain.vm_types[0].type == uapi.KVM_X86_DEFAULT_VM
    assert Named().vm_type(plain, "private")[0] is X86_SW_PROTECTED_VM
    assert Missing().vm_type(plain, "private")[0] is X86_SW_PROTECTED_VM  # the first private one
    assert Named().vm_type(sw, "default")[0].type == uapi.KVM_X86_DEFAULT_VM


def test_the_base_converts_implicitly_through_memory_fault_exits(kvm: Any) -> None:
    """Without a conversion call of its own, a VM type whose attributes decide privateness
    converts as KVM lets any guest: its access on the other side exits with
    KVM_EXIT_MEMORY_FAULT (G-2) and QEMU's loop converts the page; a VM type without
    attributes has no conversion (n/a)."""
    with launch(kvm, size=MiB) as guest:
        guest.intents = Intents()
        assert "conversion" in Intents().capabilities(guest)
        guest.write(0x3000, b"private")
        assert guest.convert(0x2000, 2 * PAGE, private=False).startswith("2 page(s) converted implicitly")
        assert guest.vmm is not None and guest.vmm.handled["memory_fault"] == 2
        assert guest.read(0x3000, 7, private=False) == bytes(7)  # QEMU punched the private copy
        guest.convert(0x3000, PAGE, private=True)
        assert guest.vmm.handled["memory_fault"] == 3
    with GuestVm.launch(kvm, kind="default", size=MiB) as plain:
        plain.intents = Intents()
        assert "conversion" not in Intents().capabilities(plain)
        with pytest.raises(NotApplicable, match="no guest-initiated conversion"):
            plain.convert(0, PAGE, private=True)


class _Pending(Exception):
    def __init__(self, gpa: int) -> None:
        super().__init__(f"not accepted: {gpa:#x}")
        self.gpa = gpa


class _LazyGuest(X86Intents):
    """A guest whose pages in ``pending`` fault until accepted; ``stuck`` ones stay so."""

    def __init__(self, pending: set[int], stuck: frozenset[int] = frozenset()) -> None:
        self.pending = pending
        self.stuck = stuck
        self.accepted: list[tuple[int, int]] = []

    def read(self, guest: GuestVm, gpa: int, length: int, *, private: bool | None) -> bytes:
        page = gpa & ~(PAGE - 1)
        if page in self.pending:
            raise _Pending(gpa)
        return super().read(guest, gpa, length, private=private)

    def accept(
        self, guest: GuestVm, gpa: int, size: int, *, page_size: int, coalesce: bool, entries: int
    ) -> str:
        self.accepted.append((gpa, size))
        if gpa not in self.stuck:
            self.pending.discard(gpa)
        return ""

    def unaccepted(self, guest: GuestVm, exc: BaseException) -> int | None:
        return exc.gpa if isinstance(exc, _Pending) else None


def test_accept_on_fault_accepts_the_page_and_runs_the_access_again(kvm: Any) -> None:
    """A guest launched with ``accept_on_fault`` accepts the one page its load stopped at
    and loads again; without it (a Linux guest) the fault reaches the caller, and a page
    accepting does not help is not retried for ever."""
    with launch(kvm, size=MiB, accept_on_fault=True) as guest:
        guest.intents = lazy = _LazyGuest({0x5000})
        assert guest.read(0x5010, 4) == bytes(4)
        assert lazy.accepted == [(0x5000, PAGE)]
        guest.intents = _LazyGuest({0x6000}, stuck=frozenset({0x6000}))
        with pytest.raises(_Pending):
            guest.read(0x6000, 4)
    with launch(kvm, size=MiB) as guest:
        guest.intents = lazy = _LazyGuest({0x5000})
        with pytest.raises(_Pending):
            guest.read(0x5000, 4)
        assert lazy.accepted == []
