"""Helpers for test suites that run against the real kernel."""

from __future__ import annotations

import os

from guestmem_linux.kvm import DEV_KVM


def kvm_unavailable(path: str = DEV_KVM) -> str | None:
    """Why the real-kernel tests cannot run here (a skip reason), or None."""
    if not os.path.exists(path):
        return f"{path} is absent: the linux backend needs a kernel with KVM"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not readable and writable by this user"
    return None


def is_kvm_pvm() -> bool:
    """The host's KVM module is kvm_pvm (shadow paging: guest faults walk userspace_addr)."""
    return os.path.isdir("/sys/module/kvm_pvm")


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))
