"""What ``kvm.snapshot()`` and ``vm.snapshot()`` show of an SEV-SNP host (``guestmem_snapshot``).

The host: the RMP as its assigned runs (what ``RMPREAD`` of every page would say, one
value per run), the ASIDs in use and waiting for reclaim, the pages leaked
(``snp_leak_pages``) or freed while still assigned.  A VM: its SEV state (ASID, launch,
digest, VMSA pages, firmware pages) and the RMP runs assigned to its ASID.
"""

from __future__ import annotations

import attrs

from guestmem.backend import HostView, VmView
from guestmem_snp.host import SnpHost
from guestmem_snp.rmp import RmpTable
from guestmem_snp.sev import SevVm


@attrs.frozen
class RmpRun:
    """Pages ``[start, end)`` assigned with the same fields; ``gpa`` is that of *start*."""

    start: int
    end: int
    level: int
    validated: bool
    immutable: bool
    asid: int
    gpa: int
    vmsa: bool


@attrs.frozen
class SnpHostState:
    """The host-wide SNP tables."""

    rmp: tuple[RmpRun, ...]
    asids_used: tuple[int, ...]
    asids_to_reclaim: tuple[int, ...]
    leaked: tuple[tuple[int, int], ...]
    freed_while_assigned: tuple[tuple[int, int], ...]


@attrs.frozen
class SevVmState:
    """One VM's ``struct kvm_sev_info`` and its part of the RMP."""

    asid: int
    active: bool
    snp: bool
    need_init: bool
    policy: int
    snp_finished: bool
    launch_digest: str
    gctx_pfn: int | None
    guest_req_pfn: int | None
    guest_resp_pfn: int | None
    vmsa_pfns: tuple[tuple[int, int], ...]
    rmp: tuple[RmpRun, ...]


def _rmp_runs(rmp: RmpTable, asid: int | None = None) -> tuple[RmpRun, ...]:
    return tuple(
        RmpRun(s, e, entry.level, entry.validated, entry.immutable, entry.asid, entry.gpa, entry.vmsa)
        for s, e, entry in rmp.runs()
        if asid is None or entry.asid == asid
    )


def host_state(host: HostView) -> SnpHostState | None:
    """The host's tables, or None on a host the SNP policy did not set up."""
    state = host.arch
    if not isinstance(state, SnpHost):
        return None
    used, reclaim = state.asids.bitmaps()
    return SnpHostState(
        _rmp_runs(state.rmp),
        used,
        reclaim,
        tuple((s, e) for s, e, _ in state.leaked.items()),
        tuple((s, e) for s, e, _ in state.freed_while_assigned.items()),
    )


def vm_state(vm: VmView) -> SevVmState | None:
    """The VM's SEV state, or None for a VM that is no SEV type."""
    sev = vm.arch
    if not isinstance(sev, SevVm):
        return None
    return SevVmState(
        sev.asid,
        sev.active,
        sev.snp,
        sev.need_init,
        sev.policy,
        sev.snp_finished,
        sev.launch_digest.hex(),
        sev.gctx_pfn,
        sev.guest_req_pfn,
        sev.guest_resp_pfn,
        tuple(sorted(sev.vmsa_pfns.items())),
        _rmp_runs(sev.host.rmp, sev.asid) if sev.asid else (),
    )
