"""Fixtures: the real /dev/kvm (skipped with a reason where it is missing), fd-leak checks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from guestmem_linux.kvm import LinuxKvm, LinuxVm
from guestmem_linux.testing import kvm_unavailable, open_fds


@pytest.fixture
def kvm() -> Iterator[LinuxKvm]:
    reason = kvm_unavailable()
    if reason:
        pytest.skip(reason)
    before = open_fds()
    with LinuxKvm() as handle:
        yield handle
    assert open_fds() == before, "file descriptors leaked"


@pytest.fixture
def vm(kvm: LinuxKvm) -> Iterator[LinuxVm]:
    with kvm.create_vm(0) as handle:
        yield handle
