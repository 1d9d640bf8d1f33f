"""The portable intents on the running kernel (``Backend(intents=LinuxIntents())``).

What the real ``/dev/kvm`` can express without confidential-computing hardware is a
``KVM_X86_DEFAULT_VM`` whose RAM is guest_memfd created ``MMAP | INIT_SHARED`` (a
gmem-only memslot, the Firecracker "secret hiding" layout), driven by this plugin's guest
runner, which makes shared loads and stores only.  So:

* every VM kind is that DEFAULT VM (a note says so for ``"private"``);
* ``launch.populate`` is the host writing the image through its guest_memfd mapping
  before the first run (nothing measures it);
* conversions, acceptance and private accesses are not applicable, with the reason.
"""

from __future__ import annotations

from typing import Any

from guestmem import uapi
from guestmem.backend import Backend, GuestVm, Intents, NotApplicable, RamRegion, VmTypeInfo
from guestmem_linux.guest import RUNNER_GPA, RUNNER_SIZE

_RUNNER = "the guest runner of guestmem-linux makes shared loads and stores only"


class LinuxIntents(Intents):
    """The running kernel's translation of the portable intents (see the module docstring)."""

    def vm_type(self, backend: Backend, kind: Any) -> tuple[VmTypeInfo, str]:
        """``KVM_X86_DEFAULT_VM`` for every kind."""
        found = backend.vm_type(uapi.KVM_X86_DEFAULT_VM)
        if found is None:
            raise NotApplicable(f"{backend.summary}: no KVM_X86_DEFAULT_VM")
        if kind == "private":
            return found, f"KVM_X86_DEFAULT_VM in place of a private-memory VM: {_RUNNER}"
        return found, ""

    def add_region(self, guest: GuestVm, gpa: int, size: int, slot: int) -> RamRegion:
        """The base layout, below the guest runner's memslot (the top 4 MiB under 4 GiB)."""
        if gpa < RUNNER_GPA + RUNNER_SIZE and gpa + size > RUNNER_GPA:
            raise NotApplicable(
                f"RAM [{gpa:#x}, {gpa + size:#x}) covers the guest runner's memslot at {RUNNER_GPA:#x}"
            )
        return super().add_region(guest, gpa, size, slot)

    def populate(self, guest: GuestVm, gpa: int, data: bytes, measure: bool | None) -> str:
        """The host writes *data* through the guest_memfd mapping before the first run."""
        if measure:
            raise NotApplicable("KVM_X86_DEFAULT_VM has no launch measurement")
        region = guest.region(gpa)
        if region.shared is None or gpa + len(data) > region.end:
            raise NotApplicable("the image does not fit one host-mapped RAM region")
        region.shared.write(gpa - region.gpa, data)
        return f"host wrote {len(data)} byte(s) through the guest_memfd mapping (not measured)"

    def convert(
        self, guest: GuestVm, gpa: int, size: int, *, private: bool, page_size: int, coalesce: bool
    ) -> str:
        raise NotApplicable(f"KVM_X86_DEFAULT_VM has no private memory to convert ({_RUNNER})")

    def side(self, guest: GuestVm, gpa: int, private: bool | None) -> bool | None:
        if private:
            raise NotApplicable(f"a private access: {_RUNNER}")
        if gpa >= RUNNER_GPA:
            raise NotApplicable(
                f"gpa {gpa:#x}: the guest runner of guestmem-linux reaches gpas below {RUNNER_GPA:#x}"
            )
        return None

    def capabilities(self, guest: GuestVm) -> frozenset[str]:
        return (super().capabilities(guest) - {"private_mem", "private_access"}) | {"populate"}
