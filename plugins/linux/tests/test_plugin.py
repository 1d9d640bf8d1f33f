"""Registration and opening of the ``linux`` backend."""

from __future__ import annotations

import errno
import importlib.metadata

import pytest

import guestmem
from guestmem import Backend, uapi
from guestmem_linux import plugin
from guestmem_linux.kvm import LinuxKvm
from guestmem_linux.testing import kvm_unavailable


def registered() -> Backend:
    backends: list[Backend] = []
    plugin.guestmem_register_backends(register=backends.append)
    assert [b.name for b in backends] == ["linux"]
    return backends[0]


def test_entry_point_names_the_plugin_module() -> None:
    (ep,) = [ep for ep in importlib.metadata.entry_points(group="guestmem") if ep.name == "linux"]
    assert ep.value == "guestmem_linux.plugin"
    assert ep.dist is not None and ep.dist.name == "guestmem-linux"
    assert ep.load() is plugin


def test_backend_registers_an_opener_and_no_policy() -> None:
    backend = registered()
    assert backend.opener is plugin.open_linux
    assert backend.policy is None


def test_missing_dev_kvm_registers_unavailable_and_open_fails_with_enoent() -> None:
    infos, summary = plugin.probe("/nonexistent/kvm")
    assert infos == ()
    assert "unavailable" in summary
    backend = registered()
    with pytest.raises(guestmem.KvmError) as info:
        plugin.open_linux(backend, path="/nonexistent/kvm")
    assert info.value.errno == errno.ENOENT
    assert isinstance(info.value, OSError)


def test_unknown_open_option_is_refused() -> None:
    with pytest.raises(TypeError, match="profile"):
        plugin.open_linux(registered(), profile="upstream-6.18")


def test_vm_types_follow_kvm_cap_vm_types(kvm: LinuxKvm) -> None:
    """CAP-6: the backend offers exactly the VM types of the running kernel."""
    bitmap = kvm.check_extension(uapi.KVM_CAP_VM_TYPES)
    types = {info.type for info in registered().vm_types}
    assert types == {t for t in range(bitmap.bit_length()) if bitmap >> t & 1}
    for vm_type in types:
        with kvm.create_vm(vm_type) as vm:
            assert vm.vm_type == vm_type


def test_open_returns_the_real_kvm() -> None:
    reason = kvm_unavailable()
    if reason:
        pytest.skip(reason)
    with plugin.open_linux(registered()) as kvm:
        assert isinstance(kvm, LinuxKvm)
        assert kvm.check_extension(uapi.KVM_CAP_USER_MEMORY2) == 1  # CAP-7
    assert kvm.closed


def test_unsupported_vm_type_is_einval(kvm: LinuxKvm) -> None:
    """CAP-6: KVM_CREATE_VM with a type outside KVM_CAP_VM_TYPES fails with EINVAL."""
    bitmap = kvm.check_extension(uapi.KVM_CAP_VM_TYPES)
    missing = next(t for t in range(64) if not bitmap >> t & 1)
    with pytest.raises(guestmem.KvmError) as info:
        kvm.create_vm(missing)
    assert info.value.errno == errno.EINVAL
    assert "KVM_CREATE_VM" in str(info.value)


def test_registry_lists_linux_and_opens_it() -> None:
    """Installed through its entry point, the backend is in guestmem.backends()."""
    backend = guestmem.backends()["linux"]
    assert backend.distribution == "guestmem-linux"
    reason = kvm_unavailable()
    if reason:
        with pytest.raises(guestmem.KvmError) as info:
            guestmem.open("linux")
        assert info.value.errno == errno.ENOENT
        return
    with guestmem.open("linux") as kvm:
        assert isinstance(kvm, LinuxKvm)
        assert {t.type for t in backend.vm_types} == {
            t for t in range(64) if kvm.check_extension(uapi.KVM_CAP_VM_TYPES) >> t & 1
        }
