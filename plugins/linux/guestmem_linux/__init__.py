"""guestmem-linux: the running kernel's KVM as a guestmem backend.

``guestmem.open("linux")`` returns a :class:`guestmem_linux.kvm.LinuxKvm` whose objects
issue the real ioctls on ``/dev/kvm``; see README.md for what the guest runner reserves.
"""

from __future__ import annotations

from guestmem_linux.kvm import LinuxGuestMemfd, LinuxHostMapping, LinuxKvm, LinuxVcpu, LinuxVm

__all__ = ["LinuxGuestMemfd", "LinuxHostMapping", "LinuxKvm", "LinuxVcpu", "LinuxVm"]
