"""The pytest plugin for VMM developers (registered through ``pytest11`` when guestmem is
installed).

* ``--guestmem-backend NAME[,NAME]`` (repeatable): the backends tests run on; by default
  every installed model backend (the real kernel, ``linux``, only when named).
* ``guestmem_backend``: the backend name, parametrised over the selected backends; every
  test using one of the fixtures below runs once per backend.
* ``guestmem_kvm``: ``/dev/kvm`` of that backend (closed after the test).
* ``guestmem_vm(vm_type="private", ...)``: a factory launching a
  :class:`guestmem.guestvm.GuestVm`, the backend's VM type for that kind with its launch
  boilerplate done through the backend's intents (SEV ``INIT2`` and ``LAUNCH_START`` on
  SNP, a protected VM on gmem-only memory on pKVM...); a kind the backend does not offer
  skips the test with the reason.
* ``@pytest.mark.guestmem_requires("conversion", "host_mmap")``: skip (with the reason)
  where the backend's VM lacks a capability (:data:`guestmem.intents.CAPABILITIES`);
  ``vm_type="default"`` as a keyword asks about the plain VM type instead.
* ``--guestmem-kit`` (or the ini option ``guestmem_kit = true``): also collect the
  conformance kit, every VM type of each selected backend, without a test file or a
  subclass (:mod:`guestmem.conformance.pytest_plugin`'s :func:`collect_kit`).  Off by
  default: a VMM's own suite run with ``--guestmem-backend sw`` runs its own tests, not
  the kit's hundreds.  A selected backend that is not installed gets one skipped item.

``docs/vmm-testing.md`` has a complete example: a VMM's conversion handler tested on every
backend.  :func:`selected_backends` is the one place the selection is decided, for the VMM's
tests and the kit alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["kit_requested", "selected_backends"]

_FIXTURES = frozenset({"guestmem_backend", "guestmem_kvm", "guestmem_vm"})
_MARKER = "guestmem_requires"
_KIT_INI = "guestmem_kit"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("guestmem", "guestmem (guest_memfd model backends)")
    group.addoption(
        "--guestmem-backend",
        action="append",
        default=[],
        metavar="NAME[,NAME]",
        help="run guestmem fixtures on these backends (default: every installed model backend)",
    )
    group.addoption(
        "--guestmem-kit",
        action="store_true",
        default=None,
        help="also run the guestmem conformance kit against the selected backends",
    )
    parser.addini(_KIT_INI, "run the guestmem conformance kit too, as --guestmem-kit does", type="bool")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_MARKER}(*capabilities, vm_type='private'): "
        "skip where the guestmem backend's VM lacks a capability",
    )


def selected_backends(config: pytest.Config) -> list[str]:
    """The backends ``--guestmem-backend`` names, or every installed model backend.

    A name that is not installed is kept: its tests skip with "backend not installed",
    so a CI matrix naming ``tdx`` shows where it would run.
    """
    import guestmem
    from guestmem.conformance.pytest_plugin import backend_names

    named = backend_names(",".join(config.getoption("guestmem_backend") or []))
    if named:
        return named
    return sorted(name for name, backend in guestmem.backends().items() if backend.opener is None)


def kit_requested(config: pytest.Config) -> bool:
    """``--guestmem-kit``, else the ini option ``guestmem_kit``."""
    option = config.getoption("guestmem_kit")
    return bool(option if option is not None else config.getini(_KIT_INI))


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """With ``--guestmem-kit``: the conformance kit of the selected backends, after the
    tests collected from files."""
    if not kit_requested(config):
        return
    import guestmem
    from guestmem.conformance import pytest_plugin as kit

    if config.pluginmanager.has_plugin(kit.__name__):
        raise pytest.UsageError(
            f"--guestmem-kit collects the conformance kit itself: do not also load -p {kit.__name__}"
        )
    names = selected_backends(config)
    installed = guestmem.backends()
    present = [name for name in names if name in installed]
    try:
        if present:
            items.extend(kit.collect_kit(session, present))
    except (LookupError, guestmem.PluginError) as exc:
        raise pytest.UsageError(f"guestmem conformance kit: {exc}") from exc
    missing = [name for name in names if name not in installed]
    if missing:
        items.extend(_not_installed(session, missing))


def _not_installed(session: pytest.Session, names: list[str]) -> list[pytest.Item]:
    """One skipped item per backend named but not installed (as the fixtures skip)."""
    import types

    from guestmem.conformance import pytest_plugin as kit

    module = types.ModuleType("guestmem_kit_not_installed")
    for name in names:

        def test_kit(backend: str = name) -> None:
            pytest.skip(f"{backend}: backend not installed")

        safe = "".join(c if c.isalnum() else "_" for c in name)
        test_kit.__name__ = f"test_kit_{safe}"
        setattr(module, test_kit.__name__, test_kit)
    node = kit.KitModule.from_parent(
        session, path=Path(kit.__file__), nodeid=f"guestmem-kit[{','.join(names)}: not installed]"
    )
    node.kit = module
    return list(session.genitems(node))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if _FIXTURES & set(metafunc.fixturenames):
        names = selected_backends(metafunc.config)
        metafunc.parametrize("guestmem_backend", names, ids=names, scope="function")


@pytest.fixture
def guestmem_kvm(guestmem_backend: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """``/dev/kvm`` of the backend under test; the test is skipped where it cannot run."""
    import guestmem

    if guestmem_backend not in guestmem.backends():
        pytest.skip(f"{guestmem_backend}: backend not installed")
    try:
        kvm = guestmem.open(guestmem_backend)
    except OSError as exc:
        pytest.skip(f"{guestmem_backend}: cannot open the backend: {exc.strerror or exc}")
    try:
        _check_requirements(request, kvm)
        yield kvm
    finally:
        kvm.close()


def _check_requirements(request: pytest.FixtureRequest, kvm: Any) -> None:
    from guestmem.guestvm import GuestVm
    from guestmem.intents import CAPABILITIES, NotApplicable

    for marker in request.node.iter_markers(_MARKER):
        unknown = [c for c in marker.args if c not in CAPABILITIES]
        if unknown:
            known = ", ".join(CAPABILITIES)
            raise pytest.UsageError(f"{_MARKER}: unknown capabilities {unknown} (known: {known})")
        kind = marker.kwargs.get("vm_type", "private")
        try:
            with GuestVm.launch(kvm, kind=kind, size=2 << 20) as probe:
                missing = [c for c in marker.args if c not in probe.capabilities]
        except NotApplicable as exc:
            pytest.skip(f"{kvm.backend}: {exc.reason}")
        if missing:
            why = "; ".join(f"{c} ({CAPABILITIES[c]})" for c in missing)
            pytest.skip(f"{kvm.backend}: needs {why}")


@pytest.fixture
def guestmem_vm(guestmem_kvm: Any) -> Iterator[Callable[..., Any]]:
    """A factory: ``guestmem_vm(vm_type="private", size=16 << 20, vcpus=1,
    handle_exits="qemu", memory=None, prefault=False)`` returns a launched
    :class:`guestmem.guestvm.GuestVm` on the backend under test; it is closed after the
    test.  ``handle_exits`` may be your own handler class (called with the guest once):
    the guest's conversion exits then reach it."""
    from guestmem.guestvm import GuestVm
    from guestmem.intents import NotApplicable

    made: list[GuestVm] = []

    def launch(vm_type: str = "private", **options: Any) -> GuestVm:
        try:
            guest = GuestVm.launch(guestmem_kvm, kind=vm_type, **options)  # type: ignore[arg-type]
        except NotApplicable as exc:
            pytest.skip(f"{guestmem_kvm.backend}: {exc.reason}")
        made.append(guest)
        return guest

    yield launch
    for guest in reversed(made):
        guest.close()
