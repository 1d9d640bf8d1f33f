"""What a backend declares about its VM types: conversion semantics, default and private types."""

from __future__ import annotations

import pytest

import guestmem
from guestmem import uapi
from guestmem.backend import X86_DEFAULT_VM, X86_SW_PROTECTED_VM, Backend, VmTypeInfo


def test_sw_declares_destructive_conversion_for_sw_protected_only() -> None:
    """backends.md 0.2: x86 conversions are destructive; a DEFAULT VM has nothing to convert."""
    sw = guestmem.backends()["sw"]
    assert sw.vm_type(uapi.KVM_X86_SW_PROTECTED_VM) == X86_SW_PROTECTED_VM
    assert X86_SW_PROTECTED_VM.conversion == "destructive" and X86_SW_PROTECTED_VM.private
    assert X86_DEFAULT_VM.conversion is None and not X86_DEFAULT_VM.private
    assert sw.default_vm_type == X86_DEFAULT_VM
    assert sw.private_vm_types == (X86_SW_PROTECTED_VM,)


def test_default_vm_type_is_the_first_without_private_memory() -> None:
    private = VmTypeInfo(type=9, name="P", conversion="in_place", arch="arm64")
    plain = VmTypeInfo(type=8, name="N", arch="arm64")
    both = Backend(name="b", summary="", vm_types=(private, plain), policy=object())
    assert both.default_vm_type == plain
    assert both.private_vm_types == (private,)
    only_private = Backend(name="p", summary="", vm_types=(private,), policy=object())
    assert only_private.default_vm_type == private
    with pytest.raises(LookupError, match="offers no VM type"):
        _ = Backend(name="e", summary="", vm_types=(), policy=object()).default_vm_type


def test_conversion_takes_only_the_two_semantics() -> None:
    with pytest.raises(ValueError, match="conversion"):
        VmTypeInfo(type=1, name="X", conversion="sometimes")  # type: ignore[arg-type]
