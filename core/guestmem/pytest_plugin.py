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

``docs/vmm-testing.md`` has a complete example: a VMM's conversion handler tested on every
backend.  :func:`selected_backends` is the one place the selection is decided, for other
suites (the conformance kit) to reuse.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

__all__ = ["selected_backends"]

_FIXTURES = frozenset({"guestmem_backend", "guestmem_kvm", "guestmem_vm"})
_MARKER = "guestmem_requires"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("guestmem", "guestmem (guest_memfd model backends)")
    group.addoption(
        "--guestmem-backend",
        action="append",
        default=[],
        metavar="NAME[,NAME]",
        help="run guestmem fixtures on these backends (default: every installed model backend)",
    )


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

    named = [n.strip() for value in config.getoption("guestmem_backend") or [] for n in value.split(",")]
    named = [n for n in named if n]
    if named:
        return list(dict.fromkeys(named))
    return sorted(name for name, backend in guestmem.backends().items() if backend.opener is None)


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
