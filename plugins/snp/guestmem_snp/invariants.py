"""SNP invariants a VMM's tests can assert (``check_rmp``) or check after every event (``RmpChecker``).

- ``rmp-freed``: no RMP-assigned entry lies on a page guest_memfd (or KVM) gave back to
  the host, including pages freed although their reclaim failed;
- ``rmp-host-mapped``: no RMP-assigned gmem page is faulted into a host mapping.

Both walk stored ranges (freed runs, host PTE runs), never pages.
"""

from __future__ import annotations

from typing import Any

from guestmem.hookspecs import hookimpl
from guestmem.invariants import InvariantViolation
from guestmem_snp.sev import SevVm


def check_rmp(vm: Any, after: str = "") -> None:
    """Raise :class:`guestmem.invariants.InvariantViolation` if an SNP invariant of *vm* fails."""
    sev = getattr(vm, "arch", None)
    if not isinstance(sev, SevVm):
        return
    where = f" after {after}" if after else ""
    host = sev.host
    rmp = host.rmp
    for start, end, _ in host.freed_while_assigned.items():
        raise InvariantViolation(f"rmp-freed{where}: pfns [{start:#x}, {end:#x}) were freed while assigned")
    for start, end, _ in host.freed.items():
        if rmp.any_assigned(start, end - start):
            raise InvariantViolation(
                f"rmp-freed{where}: an assigned RMP entry lies in freed [{start:#x}, {end:#x})"
            )
    inodes = {
        id(s.gmem_file.inode): s.gmem_file.inode for s in vm.memslots.values() if s.gmem_file is not None
    }
    for inode in inodes.values():
        for vma in inode.vmas:
            for s, e, _ in vma.faulted.items():
                for fs, fe, folio in inode.pages.items(s, e):
                    if rmp.any_assigned(fs + folio.delta, fe - fs):
                        raise InvariantViolation(
                            f"rmp-host-mapped{where}: private gmem pages [{fs:#x}, {fe:#x}) are host-mapped"
                        )


class RmpChecker:
    """An observer: :func:`check_rmp` after every event of every SNP VM."""

    def __init__(self) -> None:
        self.checked = 0

    @hookimpl(trylast=True)
    def guestmem_trace(self, vm: Any, event: Any) -> None:
        if vm is None or getattr(vm, "destroyed", False):
            return
        check_rmp(vm, event.kind)
        self.checked += 1
