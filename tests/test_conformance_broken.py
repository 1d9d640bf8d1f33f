"""Every test of the deep kit can fail: run against deliberately broken throwaway backends
(leaking pages or ownership, host-mapping private memory, wrong conversion semantics,
destroying what a memslot change unmaps), each fails with the check that names the fault;
against a sound backend of the same shape every one of them passes.

The kit's test methods are called directly with the objects their fixtures would give, so
a failure here is the kit's assertion, not pytest machinery.
"""

from __future__ import annotations

import builtins
import errno
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from gmem_helpers import DEEP, BackendPlugin, plugin

import guestmem
from guestmem.backend import HostFault, Owner, VmTypeInfo, hookimpl
from guestmem.conformance import GmemConformance, OwnershipLedger
from guestmem.errors import KvmError
from guestmem.guestvm import GuestVm
from guestmem.intents import Intents, NotApplicable
from guestmem.invariants import InvariantChecker

TYPE = 7
PAGE = 4096
DESTRUCTIVE = VmTypeInfo(type=TYPE, name="BROKEN_VM", has_private_mem=True, nr_memslot_as_ids=1)
IN_PLACE = VmTypeInfo(
    type=TYPE, name="BROKEN_VM", has_private_mem=True, nr_memslot_as_ids=1, conversion="in_place"
)


class Sound:
    """A sound policy with an ownership table: a gmem folio is the guest's from its first
    fault (prepare) until it is freed (invalidate); a page mapped from userspace memory is
    shared while mapped."""

    @hookimpl
    def guestmem_gmem_prepare(self, vm: Any, gfn: int, pfn: int, order: int, npages: int) -> None:
        vm.ownership_update("t", pfn, npages, None, "g", old_owner=Owner.HOST, new_owner=Owner.GUEST)

    @hookimpl
    def guestmem_gmem_invalidate(self, vm: Any, start_pfn: int, end_pfn: int) -> None:
        vm.ownership_update(
            "t", start_pfn, end_pfn - start_pfn, "g", None, old_owner=Owner.GUEST, new_owner=Owner.HOST
        )


class Leaky(Sound):
    """Takes every page the guest maps and never gives one back."""

    @hookimpl
    def guestmem_gmem_invalidate(self, vm: Any, start_pfn: int, end_pfn: int) -> None:
        """Forgets to reclaim."""

    @hookimpl
    def guestmem_fault(self, vm: Any, fault: Any) -> None:
        owner = Owner.GUEST if fault.is_private else Owner.SHARED
        vm.ownership_update("t", fault.pfn, fault.npages, None, "m", old_owner=Owner.HOST, new_owner=owner)


class LeakyPages(Sound):
    """Allocates a control page per VM and never frees it."""

    @hookimpl
    def guestmem_vm_init(self, vm: Any) -> int:
        return int(vm.host.alloc(1))


class HostMapsPrivate:
    """Lets the host map any guest_memfd page, private ones included (and keeps no
    ownership table the ledger could cross-check: the kit's own accesses must see it)."""

    @hookimpl
    def guestmem_gmem_fault_user_mapping(self, vm: Any, gmem: Any, index: int) -> HostFault:
        return HostFault.ALLOW


class StaleContents(Sound):
    """Keeps the bytes of private pages it unmaps and puts them back when the gfn gets a
    new folio: a conversion that should be destructive hands the guest its old secret."""

    def __init__(self) -> None:
        self.saved: dict[int, bytes] = {}

    @hookimpl
    def guestmem_unmap_gfn_range(self, vm: Any, range: Any) -> None:  # noqa: A002
        for gfn in builtins.range(range.start, range.end):
            pfn = vm.gmem_pfn(gfn)
            if pfn is not None:
                self.saved[gfn] = vm.host.read(pfn, 0, 4096)

    @hookimpl
    def guestmem_gmem_prepare(self, vm: Any, gfn: int, pfn: int, order: int, npages: int) -> None:
        super().guestmem_gmem_prepare(vm, gfn, pfn, order, npages)
        if gfn in self.saved:
            vm.host.write(pfn, 0, self.saved.pop(gfn))


class ZeroOnUnmap(Sound):
    """Scrubs private pages whenever their mapping goes, though it declares (by the kit's
    default ``private_unmap = "keep"``) that a memslot change keeps them."""

    @hookimpl
    def guestmem_unmap_gfn_range(self, vm: Any, range: Any) -> None:  # noqa: A002
        for gfn in builtins.range(range.start, range.end):
            pfn = vm.gmem_pfn(gfn)
            if pfn is not None and vm.is_private(gfn):
                vm.host.zero(pfn, 1)


class LocksMemslots(Sound):
    """Refuses to delete or move a memslot once the VM has a vCPU, as pKVM's protected VMs
    once they ran (``kvm_arch_prepare_memory_region``, pKVM-3.6), with *err*."""

    err = errno.EPERM

    @hookimpl
    def guestmem_prepare_memory_region(self, vm: Any, old: Any, new: Any, change: str) -> None:
        if change in ("delete", "move") and vm.vcpus():
            raise KvmError(self.err, "t-lock", f"no {change} once the VM ran")


class LocksWithWrongErrno(LocksMemslots):
    """Refuses the changes with another errno than the kit was told."""

    err = errno.EINVAL


class ScrubsThenLocks(LocksMemslots, ZeroOnUnmap):
    """Scrubs the private pages the refused change zapped: the guest's bytes are gone."""


class ReleasesThenLocks(LocksMemslots):
    """Gives the zapped pages back to the host in its table, though the change is refused
    and the guest keeps them."""

    @hookimpl
    def guestmem_unmap_gfn_range(self, vm: Any, range: Any) -> None:  # noqa: A002
        for gfn in builtins.range(range.start, range.end):
            pfn = vm.gmem_pfn(gfn)
            if pfn is not None:
                vm.ownership_update("t", pfn, 1, "g", None, old_owner=Owner.GUEST, new_owner=Owner.HOST)


@contextmanager
def backend(
    name: str, policy: object, info: VmTypeInfo = DESTRUCTIVE, *, intents: Intents | None = None
) -> Iterator[None]:
    with plugin(BackendPlugin(name, (info,), policy, intents=intents), distribution=f"guestmem-{name}"):
        yield


def run_kit_test(name: str, backend_name: str, **flags: Any) -> None:
    """Call the kit's test *name* against *backend_name* as pytest would, observers on,
    with the kit's *flags*."""
    kit = type(
        "Kit",
        (GmemConformance,),
        {"backend": backend_name, "vm_type": TYPE, "machine_examples": 30, "machine_shrink": False, **flags},
    )()
    registry = guestmem.get_registry()
    ledger, checker = OwnershipLedger(), InvariantChecker()
    registry.add_plugin(ledger, name="t-ledger")
    registry.add_plugin(checker, name="t-checker")
    try:
        with guestmem.open(backend_name) as kvm:
            info = registry.backend(backend_name).vm_type(TYPE)
            method: Callable[..., None] = getattr(kit, name)
            given = {"kvm": kvm, "info": info, "ledger": ledger}
            method(**{arg: given[arg] for arg in inspect.signature(method).parameters})
    finally:
        registry.remove_plugin(checker)
        registry.remove_plugin(ledger)


LEAK = "ownership-released: after closing everything the tables still hold t "
BROKEN: list[tuple[str, Callable[[], object], VmTypeInfo, str]] = [
    *[(test, Leaky, DESTRUCTIVE, LEAK) for test in DEEP],
    ("test_leak_check_after_a_lifecycle", LeakyPages, DESTRUCTIVE, "pages-freed: 2 host page"),
    ("test_stateful_machine", LeakyPages, DESTRUCTIVE, "pages-freed: 1 host page"),
    (
        "test_host_access_after_conversion",
        HostMapsPrivate,
        DESTRUCTIVE,
        "the host mapped a private probe page",
    ),
    ("test_stateful_machine", HostMapsPrivate, DESTRUCTIVE, "the host mapped private guest_memfd page"),
    (
        "test_conversion_private_to_shared_to_private",
        StaleContents,
        DESTRUCTIVE,
        "the old private bytes came back",
    ),
    (
        "test_stateful_machine",
        StaleContents,
        DESTRUCTIVE,
        "guest read of page|holds other bytes than the reference|never wrote, is not zero",
    ),
    (
        "test_conversion_private_to_shared_to_private",
        Sound,
        IN_PLACE,
        "declared in_place: guest view after to-shared",
    ),
    (
        "test_conversion_shared_to_private_to_shared",
        Sound,
        IN_PLACE,
        "declared in_place: guest view after to-private",
    ),
    (
        "test_memslot_delete_with_mapped_pages",
        ZeroOnUnmap,
        DESTRUCTIVE,
        "private_unmap='keep': after the memslot",
    ),
]


@pytest.mark.parametrize(
    ("test", "policy", "info", "message"),
    BROKEN,
    ids=[
        f"{test.removeprefix('test_')}-{policy.__name__}-{info.conversion}"
        for test, policy, info, _ in BROKEN
    ],
)
def test_deep_kit_test_fails_on_a_broken_backend(
    test: str, policy: Callable[[], object], info: VmTypeInfo, message: str
) -> None:
    with backend("t-broken", policy(), info), pytest.raises(AssertionError, match=message):
        run_kit_test(test, "t-broken")


def test_every_deep_test_fails_on_some_broken_backend() -> None:
    assert {test for test, *_ in BROKEN} == set(DEEP)
    assert set(DEEP) <= {name for name in dir(GmemConformance) if name.startswith("test_")}


@pytest.mark.parametrize("test", DEEP)
def test_deep_kit_test_passes_on_the_sound_backend(test: str) -> None:
    """The control: the same shape without the breakage passes, so the failures above are
    the breakages'."""
    with backend("t-sound", Sound()):
        run_kit_test(test, "t-sound")


MEMSLOT_TESTS = [
    "test_memslot_move_with_mapped_pages",
    "test_memslot_delete_with_mapped_pages",
    "test_gmem_release_while_bound",
]
#: A kit told ``memslot_change_errno = EPERM``, against backends that do not refuse, refuse
#: otherwise, or refuse but change something.
LOCKED: list[tuple[str, Callable[[], object], str]] = [
    *[(test, Sound, "DID NOT RAISE") for test in MEMSLOT_TESTS],
    *[(test, LocksWithWrongErrno, "expected EPERM, got") for test in MEMSLOT_TESTS],
    ("test_memslot_delete_with_mapped_pages", ScrubsThenLocks, "a refused memslot change changed the page"),
    ("test_memslot_delete_with_mapped_pages", ReleasesThenLocks, "a refused memslot change moved pages"),
]


@pytest.mark.parametrize(
    ("test", "policy", "message"),
    LOCKED,
    ids=[f"{test.removeprefix('test_')}-{policy.__name__}" for test, policy, _ in LOCKED],
)
def test_memslot_tests_of_a_locking_architecture_fail_on_a_broken_backend(
    test: str, policy: Callable[[], object], message: str
) -> None:
    with backend("t-broken", policy()), pytest.raises((AssertionError, pytest.fail.Exception), match=message):
        run_kit_test(test, "t-broken", memslot_change_errno=errno.EPERM)


@pytest.mark.parametrize("test", DEEP)
def test_the_deep_kit_passes_on_a_sound_locking_backend(test: str) -> None:
    """The control: a backend that refuses memslot changes of a VM that ran and keeps
    everything as it was passes the whole deep kit told so."""
    with backend("t-locks", LocksMemslots()):
        run_kit_test(test, "t-locks", memslot_change_errno=errno.EPERM)


class DirtyFolios(Sound):
    """Hands the guest new guest_memfd folios holding another's bytes (no clearing)."""

    @hookimpl
    def guestmem_gmem_prepare(self, vm: Any, gfn: int, pfn: int, order: int, npages: int) -> None:
        super().guestmem_gmem_prepare(vm, gfn, pfn, order, npages)
        for i in builtins.range(npages):
            vm.host.write(pfn + i, 0, b"\xaa" * 64)


class AcceptingIntents(Intents):
    """A guest that accepts all its private memory at boot (touching every page, as a TD
    does with ACCEPT): guest_memfd holds folios the guest never wrote."""

    def accept(
        self, guest: GuestVm, gpa: int, size: int, *, page_size: int, coalesce: bool, entries: int
    ) -> str:
        vcpu = guest.vcpu()
        for page in builtins.range(gpa, gpa + size, PAGE):
            vcpu.access(page, 1, private=True)
        return "touched"

    def capabilities(self, guest: GuestVm) -> frozenset[str]:
        return super().capabilities(guest) | {"acceptance"}


def test_the_machine_takes_folios_a_guest_accepted_but_never_wrote() -> None:
    """Folios of private pages the guest touched without writing are zero-filled pages the
    reference does not count (they pass); holding other bytes, they fail."""
    with backend("t-sound", Sound(), intents=AcceptingIntents()):
        run_kit_test("test_stateful_machine", "t-sound")
    with (
        backend("t-broken", DirtyFolios(), intents=AcceptingIntents()),
        pytest.raises(AssertionError, match="never wrote, is not zero"),
    ):
        run_kit_test("test_stateful_machine", "t-broken")


class NoConversion(Intents):
    """A guest that converts nothing, and says why."""

    def convert(
        self, guest: GuestVm, gpa: int, size: int, *, private: bool, page_size: int, coalesce: bool
    ) -> str:
        raise NotApplicable("this guest's memory is private or shared for good")

    def capabilities(self, guest: GuestVm) -> frozenset[str]:
        return super().capabilities(guest) - {"conversion"}


class SilentConversion(Intents):
    """A guest that converts, though its backend reports no ``conversion`` capability."""

    def capabilities(self, guest: GuestVm) -> frozenset[str]:
        return super().capabilities(guest) - {"conversion"}


CONVERSION_TESTS = [
    "test_conversion_private_to_shared_to_private",
    "test_conversion_shared_to_private_to_shared",
    "test_host_access_after_conversion",
]


@pytest.mark.parametrize("test", CONVERSION_TESTS)
def test_a_guest_without_conversion_skips_the_conversion_tests_with_its_reason(test: str) -> None:
    with (
        backend("t-noconv", Sound(), intents=NoConversion()),
        pytest.raises(pytest.skip.Exception, match="n/a: this guest's memory is private or shared for good"),
    ):
        run_kit_test(test, "t-noconv")


@pytest.mark.parametrize("test", CONVERSION_TESTS)
def test_a_conversion_the_backend_does_not_report_fails(test: str) -> None:
    with (
        backend("t-silent", Sound(), intents=SilentConversion()),
        pytest.raises(AssertionError, match="reports no 'conversion' capability"),
    ):
        run_kit_test(test, "t-silent")
