"""The core's conformance kit against the real kernel, and against the model of this host."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import guestmem
from guestmem import uapi
from guestmem.conformance import GmemConformance, kit_for
from guestmem.diff import host_profile
from guestmem.model.profile import get_profile
from guestmem_linux.testing import kvm_unavailable

_PROFILE = get_profile(host_profile())


class TestLinuxDefaultVm(GmemConformance):
    """/dev/kvm itself: the same rules the model is held to."""

    backend = "linux"
    vm_type = uapi.KVM_X86_DEFAULT_VM
    gmem_only_from_gmem = _PROFILE.gmem_only_faults_from_gmem

    @pytest.fixture
    def kvm(self) -> Iterator[Any]:
        reason = kvm_unavailable()
        if reason:
            pytest.skip(reason)
        with guestmem.open("linux") as k:
            yield k


class TestSwHostProfile(GmemConformance):
    """The sw model with the profile of this host: it must pass exactly where the kernel does."""

    backend = "sw"
    open_options = {"profile": _PROFILE}
    vm_type = uapi.KVM_X86_DEFAULT_VM
    gmem_only_from_gmem = _PROFILE.gmem_only_faults_from_gmem


def test_the_kit_built_by_name_knows_this_host() -> None:
    """``kit_for("linux")`` (and ``pytest --guestmem-backend linux --guestmem-kit``) takes
    the flag the classes above set by hand from the plugin's options."""
    if kvm_unavailable():
        pytest.skip(kvm_unavailable())
    kit = kit_for("linux", uapi.KVM_X86_DEFAULT_VM)
    assert kit.gmem_only_from_gmem == _PROFILE.gmem_only_faults_from_gmem
