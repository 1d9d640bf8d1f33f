"""Shared fixtures of the core tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import guestmem
from guestmem import uapi


@pytest.fixture
def kvm() -> Iterator[Any]:
    """``/dev/kvm`` of the built-in ``sw`` backend (default profile)."""
    with guestmem.open("sw") as k:
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
