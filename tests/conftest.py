"""Shared fixtures of the core tests.

``kvm``, ``default_vm`` and ``protected_vm`` are ``/dev/kvm`` of the built-in ``sw`` backend
and its two VM types.  ``pytest tests --guestmem-host NAME`` opens backend NAME instead: a
hardware backend's ordinary x86 VM types (``KVM_X86_DEFAULT_VM``, ``KVM_X86_SW_PROTECTED_VM``)
must pass every test written against these fixtures, as on ``sw``.  Tests marked
``sw_host`` are about the ``sw`` host itself (its VM type list, its capabilities) and are
skipped on another host.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

import guestmem
from guestmem import uapi


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--guestmem-host",
        default="sw",
        metavar="BACKEND",
        help="the backend whose host the kvm/default_vm/protected_vm fixtures open (default: sw)",
    )
    parser.addoption(
        "--guestmem-stress-seconds",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long the thread stress test runs per backend (default: $GUESTMEM_STRESS_SECONDS, else 1)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sw_host: about the sw host itself; skipped with --guestmem-host")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    host = config.getoption("--guestmem-host")
    if host == "sw":
        return
    skip = pytest.mark.skip(reason=f"about the sw host itself, not {host!r}'s ordinary VM types")
    for item in items:
        if item.get_closest_marker("sw_host"):
            item.add_marker(skip)


@pytest.fixture
def host_backend(request: pytest.FixtureRequest) -> str:
    """The backend ``kvm`` opens (``--guestmem-host``, default ``sw``)."""
    name: str = request.config.getoption("--guestmem-host")
    return name


@pytest.fixture
def kvm(host_backend: str) -> Iterator[Any]:
    """``/dev/kvm`` of the host under test (default profile)."""
    with guestmem.open(host_backend) as k:
        yield k


@pytest.fixture
def default_vm(kvm: Any) -> Iterator[Any]:
    """A KVM_X86_DEFAULT_VM."""
    vm = kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    yield vm
    vm.close()


@pytest.fixture
def protected_vm(kvm: Any) -> Iterator[Any]:
    """A KVM_X86_SW_PROTECTED_VM."""
    vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    yield vm
    vm.close()


@pytest.fixture
def stress_seconds(request: pytest.FixtureRequest) -> float:
    """How long the thread stress test runs per backend (``--guestmem-stress-seconds``)."""
    seconds: float | None = request.config.getoption("--guestmem-stress-seconds")
    if seconds is None:
        seconds = float(os.environ.get("GUESTMEM_STRESS_SECONDS", "1"))
    return seconds
