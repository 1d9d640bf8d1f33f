"""The backend registry: listing, throwaway plugins, per-backend hook isolation, validation."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from gmem_helpers import PAGE, PRIVATE, BackendPlugin, MiB, gmem_slot, plugin, throwaway_backend, x86_type

import guestmem
from guestmem import uapi
from guestmem.cli import main


class RecordingPolicy:
    """A backend policy recording which VMs reach its arch hooks."""

    def __init__(self) -> None:
        self.vms: list[tuple[str, str]] = []

    def _note(self, hook: str, vm: Any) -> None:
        self.vms.append((hook, vm.backend.name))

    @guestmem.hookimpl
    def guestmem_vm_init(self, vm: Any) -> None:
        self._note("vm_init", vm)

    @guestmem.hookimpl
    def guestmem_gmem_prepare(self, vm: Any, gfn: int, pfn: int, order: int) -> None:
        self._note("gmem_prepare", vm)

    @guestmem.hookimpl
    def guestmem_unmap_gfn_range(self, vm: Any, range: Any) -> None:  # noqa: A002
        self._note("unmap_gfn_range", vm)

    @guestmem.hookimpl
    def guestmem_pre_set_memory_attributes(self, vm: Any, range: Any) -> None:  # noqa: A002
        self._note("pre_set_memory_attributes", vm)

    @guestmem.hookimpl
    def guestmem_fault(self, vm: Any, fault: Any) -> None:
        self._note("fault", vm)


class RecordingObserver(RecordingPolicy):
    """The same hooks, registered as an observer (not a backend's policy)."""


def exercise(kvm: Any) -> None:
    """Create a private-mem VM, bind gmem, convert, fault, punch."""
    with kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM) as vm:
        gmem = gmem_slot(vm, MiB)
        vm.set_memory_attributes(0, MiB, PRIVATE)
        vm.create_vcpu(0).access(0, data=b"x")
        gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, 0, PAGE)


def backends_json(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["backends", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    return {row["name"]: row for row in rows}


# --- listing ------------------------------------------------------------------------------------
def test_backends_json_lists_sw(capsys: pytest.CaptureFixture[str]) -> None:
    """``guestmem backends --json`` lists the built-in sw backend with its VM types and caps."""
    rows = backends_json(capsys)
    sw = rows["sw"]
    assert sw["distribution"] == "guestmem"
    assert sw["available"] is True
    assert sw["vm_types"] == {"0": "KVM_X86_DEFAULT_VM", "1": "KVM_X86_SW_PROTECTED_VM"}
    assert sw["capabilities"]["KVM_CAP_GUEST_MEMFD"] == 1
    assert sw["capabilities"]["KVM_CAP_VM_TYPES"] == 0b11


def test_throwaway_backend_is_listed_then_gone(capsys: pytest.CaptureFixture[str]) -> None:
    """A backend plugin registered at run time appears (with its distribution) and is removed."""
    obj = BackendPlugin("t-listed", (x86_type(1),), RecordingPolicy())
    with plugin(obj, distribution="guestmem-listed-test"):
        row = backends_json(capsys)["t-listed"]
        assert row["distribution"] == "guestmem-listed-test"
        assert row["vm_types"] == {"1": "TEST_VM_1"}
        assert row["available"] is True
    assert "t-listed" not in backends_json(capsys)
    assert "t-listed" not in guestmem.backends()


def test_unknown_backend_is_lookup_error_listing_known() -> None:
    """Opening an unknown backend names the installed ones."""
    with pytest.raises(LookupError, match="sw"):
        guestmem.open("no-such-backend")


# --- hook isolation --------------------------------------------------------------------------------
def test_policy_hooks_reach_only_own_vms() -> None:
    """A backend's policy is called for its own VMs, never for a sw VM; an observer sees both."""
    policy = RecordingPolicy()
    observer = RecordingObserver()
    with plugin(observer), throwaway_backend("t-iso", x86_type(1), policy=policy) as kvm:
        exercise(kvm)
        with guestmem.open("sw") as sw:
            exercise(sw)
    assert policy.vms and {b for _, b in policy.vms} == {"t-iso"}
    assert {h for h, _ in policy.vms} >= {"vm_init", "gmem_prepare", "unmap_gfn_range", "fault"}
    assert {b for _, b in observer.vms} == {"t-iso", "sw"}
    assert [h for h, b in observer.vms if b == "sw"] == [h for h, b in observer.vms if b == "t-iso"]


def test_backend_registered_after_sw_was_opened_stays_isolated() -> None:
    """A sw /dev/kvm opened *before* another backend appears must not reach the newcomer's policy."""
    policy = RecordingPolicy()
    with guestmem.open("sw") as sw, throwaway_backend("t-late", x86_type(1), policy=policy):
        exercise(sw)
    assert policy.vms == []


def test_two_throwaway_backends_are_isolated_from_each_other() -> None:
    """Each backend's policy sees only its own VMs, even with the same distribution name."""
    a, b = RecordingPolicy(), RecordingPolicy()
    with (
        throwaway_backend("t-a", x86_type(1), policy=a) as ka,
        throwaway_backend("t-b", x86_type(1), policy=b) as kb,
    ):
        exercise(ka)
        exercise(kb)
    assert {n for _, n in a.vms} == {"t-a"}
    assert {n for _, n in b.vms} == {"t-b"}


def test_removing_one_plugin_keeps_another_of_the_same_distribution() -> None:
    """remove_plugin undoes only what that plugin registered."""
    a, b = RecordingPolicy(), RecordingPolicy()
    pa = BackendPlugin("t-keep-a", (x86_type(1),), a)
    pb = BackendPlugin("t-keep-b", (x86_type(1),), b)
    with plugin(pa, distribution="guestmem-same"):
        with plugin(pb, distribution="guestmem-same"):
            pass
        with guestmem.open("t-keep-a") as kvm:
            exercise(kvm)
    assert {n for _, n in a.vms} == {"t-keep-a"}


# --- validation ---------------------------------------------------------------------------------------
class Misspelt:
    """An observer with a typo in a hook name."""

    @guestmem.hookimpl
    def guestmem_gmem_prepaer(self, vm: Any) -> None:
        raise AssertionError("never called")


class BadSignature:
    """An observer whose hook takes an argument the spec does not have."""

    @guestmem.hookimpl
    def guestmem_gmem_prepare(self, vm: Any, gpa: int) -> None:
        raise AssertionError("never called")


def add_fails(obj: object, distribution: str) -> guestmem.PluginError:
    """add_plugin(*obj*) raises a PluginError naming *distribution*; *obj* is not left behind."""
    registry = guestmem.get_registry()
    try:
        with pytest.raises(guestmem.PluginError, match=distribution) as info:
            registry.add_plugin(obj, distribution=distribution)
    finally:
        if registry.pm.is_registered(obj):
            registry.remove_plugin(obj)
    assert not registry.pm.is_registered(obj)
    return info.value


@pytest.mark.parametrize("bad", [Misspelt, BadSignature], ids=["misspelt", "bad-argument"])
def test_invalid_plugin_fails_naming_its_distribution(bad: Callable[[], object]) -> None:
    """check_pending/validation: a wrong guestmem_ hook is a PluginError naming the distribution,
    and the registry stays usable."""
    add_fails(bad(), "guestmem-typo-dist")
    with guestmem.open("sw") as kvm:
        exercise(kvm)


def test_invalid_backend_policy_fails_naming_its_distribution() -> None:
    """A backend whose policy has a misspelt hook is a PluginError naming the distribution, at
    registration; nothing of it stays registered and the registry keeps working."""
    policy = Misspelt()
    add_fails(BackendPlugin("t-badpolicy", (x86_type(1),), policy), "guestmem-badpolicy-dist")
    assert not guestmem.get_registry().pm.is_registered(policy)
    assert "t-badpolicy" not in guestmem.backends()
    with guestmem.open("sw") as kvm:
        exercise(kvm)


def test_duplicate_backend_name_names_both_distributions() -> None:
    """Two backends of the same name: PluginError naming both distributions; sw survives."""
    err = add_fails(BackendPlugin("sw", (x86_type(1),), RecordingPolicy()), "guestmem-dup-dist")
    assert "'guestmem'" in str(err)
    assert guestmem.backends()["sw"].distribution == "guestmem"


class FreshPolicyPlugin:
    """A backend plugin that builds a new policy object each time it is asked (as docs show)."""

    def __init__(self) -> None:
        self.policies: list[RecordingPolicy] = []

    @guestmem.hookimpl
    def guestmem_register_backends(self, register: Callable[[guestmem.Backend], None]) -> None:
        policy = RecordingPolicy()
        self.policies.append(policy)
        register(guestmem.Backend(name="t-fresh", summary="fresh", vm_types=(x86_type(1),), policy=policy))


def test_recollection_does_not_leave_old_policies_behind() -> None:
    """A plugin handing out a new policy per collection: after other plugins come and go, no
    old policy object lingers (it would act as an observer of sw VMs)."""
    fresh = FreshPolicyPlugin()
    with plugin(fresh):
        with plugin(RecordingObserver()):
            pass
        with guestmem.open("sw") as kvm:
            exercise(kvm)
        with guestmem.open("t-fresh") as kvm:
            exercise(kvm)
    assert len(fresh.policies) >= 2
    assert all(n == "t-fresh" for p in fresh.policies for _, n in p.vms)
    assert any(p.vms for p in fresh.policies)
    registry = guestmem.get_registry()
    assert not any(registry.pm.is_registered(p) for p in fresh.policies)


# --- containment: a broken installed plugin never takes the others down ------------------------------
class FakeDist:
    def __init__(self, name: str) -> None:
        self.name = name
        self.version = "9.9"


class FakeEntryPoint:
    """An installed plugin's entry point: *load* is what importing it gives (or raises)."""

    def __init__(self, name: str, dist: str, load: Callable[[], object]) -> None:
        self.name = name
        self.dist = FakeDist(dist)
        self._load = load

    def load(self) -> object:
        return self._load()


def _sw_entry_point() -> FakeEntryPoint:
    from guestmem import sw

    return FakeEntryPoint("sw", "guestmem", lambda: sw)


def _raise_import_error() -> object:
    raise ImportError("No module named 'guestmem_missing'")


class UnmarkedHook:
    def guestmem_fault(self, vm: Any, fault: Any) -> None:
        raise AssertionError("never called")


class NearMiss:
    @guestmem.hookimpl
    def guestmem_faults(self, vm: Any, fault: Any) -> None:
        raise AssertionError("never called")


class Wrapper:
    @guestmem.hookimpl(wrapper=True)
    def guestmem_trace(self, event: Any) -> Any:
        return (yield)


class PolicyHooksAtModuleLevel(BackendPlugin):
    """A backend plugin that also implements a VM hook itself (it would observe every VM)."""

    @guestmem.hookimpl
    def guestmem_gmem_prepare(self, vm: Any, gfn: int) -> None:
        raise AssertionError("never called")


BROKEN = [
    ("missing", _raise_import_error, "failed to import: ImportError"),
    ("unmarked", UnmarkedHook, "not marked with @hookimpl"),
    ("nearmiss", NearMiss, "did you mean guestmem_fault"),
    ("wrapper", Wrapper, "hook wrapper"),
    (
        "modlevel",
        lambda: PolicyHooksAtModuleLevel("t-mod", (x86_type(1),), RecordingPolicy()),
        "module level",
    ),
    (
        "dup",
        lambda: BackendPlugin("sw", (x86_type(1),), RecordingPolicy()),
        "already registered by distribution",
    ),
]


@pytest.mark.parametrize(("name", "load", "why"), BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_installed_plugin_is_left_out_with_a_warning(
    name: str, load: Callable[[], object], why: str
) -> None:
    good = FakeEntryPoint(
        "t-good", "guestmem-good", lambda: BackendPlugin("t-good", (x86_type(1),), RecordingPolicy())
    )
    bad = FakeEntryPoint(name, f"guestmem-{name}", load)
    registry = guestmem.registry.Registry(entry_points=lambda: [_sw_entry_point(), bad, good])
    with pytest.warns(
        guestmem.errors.PluginWarning, match=f"guestmem-{name}.*{why}.*GUESTMEM_DISABLE_PLUGINS={name}"
    ):
        backends = registry.backends()
    assert {"sw", "t-good"} <= set(backends) and backends["sw"].distribution == "guestmem"
    assert set(registry.broken) == {name} and why in registry.broken[name].error


def test_backends_command_lists_the_broken_plugin_and_exits_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = FakeEntryPoint("broken", "guestmem-broken", _raise_import_error)
    registry = guestmem.registry.Registry(entry_points=lambda: [_sw_entry_point(), bad])
    monkeypatch.setattr(guestmem.registry, "_default", registry)
    assert main(["backends", "--json"]) == 0
    out, err = capsys.readouterr()
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["sw"]["available"] is True
    assert rows["broken"]["distribution"] == "guestmem-broken" and "ImportError" in rows["broken"]["broken"]
    assert err.count("\n") == 1 and err.startswith("guestmem: warning: ") and "Traceback" not in err
    with guestmem.open("sw") as kvm:
        exercise(kvm)


def test_disabled_plugins_are_not_loaded() -> None:
    bad = FakeEntryPoint("broken", "guestmem-broken", _raise_import_error)
    registry = guestmem.registry.Registry(entry_points=lambda: [_sw_entry_point(), bad])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GUESTMEM_DISABLE_PLUGINS", "guestmem-broken")
        assert set(registry.backends()) == {"sw"} and not registry.broken


@pytest.mark.parametrize("bad", [UnmarkedHook, NearMiss, Wrapper], ids=["unmarked", "near-miss", "wrapper"])
def test_add_plugin_refuses_what_loading_leaves_out(bad: Callable[[], object]) -> None:
    add_fails(bad(), "guestmem-refused-dist")


# --- the conformance kit's options ------------------------------------------------------------------
class OptionsPlugin(BackendPlugin):
    """A backend plugin that also tells the conformance kit how to drive its VMs."""

    def __init__(self, name: str, answer: Any) -> None:
        super().__init__(name, (x86_type(1),), RecordingPolicy())
        self.answer = answer
        self.asked: list[tuple[str, int]] = []

    @guestmem.hookimpl
    def guestmem_conformance_options(self, backend: guestmem.Backend, vm_type: guestmem.VmTypeInfo) -> Any:
        self.asked.append((backend.name, vm_type.type))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_conformance_options_come_from_the_registering_plugin_only() -> None:
    """guestmem_conformance_options is asked of the plugin that registered the backend alone."""
    mine = OptionsPlugin("t-opt-mine", {"private_access": True})
    other = OptionsPlugin("t-opt-other", {"x": 1})
    registry = guestmem.get_registry()
    with plugin(mine), plugin(other):
        backend = registry.backend("t-opt-mine")
        assert registry.conformance_options(backend, backend.vm_types[0]) == {"private_access": True}
        assert mine.asked == [("t-opt-mine", 1)] and other.asked == []
        assert registry.conformance_options(registry.backend("sw"), registry.backend("sw").vm_types[0]) == {}


@pytest.mark.parametrize(
    ("answer", "message"), [(RuntimeError("boom"), "raised RuntimeError: boom"), (["x"], "not a dict")]
)
def test_conformance_options_failures_name_the_distribution(answer: Any, message: str) -> None:
    obj = OptionsPlugin("t-opt-bad", answer)
    registry = guestmem.get_registry()
    with plugin(obj, distribution="guestmem-bad-options"):
        backend = registry.backend("t-opt-bad")
        with pytest.raises(guestmem.PluginError, match=rf"'guestmem-bad-options' .*{message}"):
            registry.conformance_options(backend, backend.vm_types[0])


def test_conformance_options_on_a_policy_is_refused() -> None:
    class Policy:
        @guestmem.hookimpl
        def guestmem_conformance_options(self, backend: Any, vm_type: Any) -> None:
            return None

    with pytest.raises(guestmem.PluginError, match="belongs on the plugin that registers the backend"):
        guestmem.get_registry().add_plugin(BackendPlugin("t-opt-policy", (x86_type(1),), Policy()))
    assert "t-opt-policy" not in guestmem.backends()
