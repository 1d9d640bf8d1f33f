"""What ``kvm.snapshot()`` and ``vm.snapshot()`` show of a pKVM host (``guestmem_snapshot``).

The host: the hypervisor's host and hyp stage-2 annotations as runs (the pages the host
gave away, to whom, shared or not) and its VM table.  A VM: the host-side settings
(protected, firmware address, exits) and, once it ran, its hyp VM's guest stage-2
ownership runs (OWNED, SHARED_OWNED, SHARED_BORROWED, POISON) with their mappings.
"""

from __future__ import annotations

from typing import Any

import attrs

from guestmem.backend import HostView, VmView
from guestmem_pkvm.ownership import Hypervisor
from guestmem_pkvm.policy import PkvmVm


@attrs.frozen
class HostRun:
    """Host pfns ``[start, end)``: the host's state, the owner it gave them to (a guest's
    handle), ``pfn - gfn`` of that guest's mapping and the share count."""

    start: int
    end: int
    state: str
    owner: str
    handle: int
    delta: int
    share_count: int


@attrs.frozen
class StateRun:
    """``[start, end)`` (pfns of the hyp table, gfns of a guest's) in page state *state*,
    with ``pfn - gfn`` for a guest's mapping."""

    start: int
    end: int
    state: str
    delta: int = 0


@attrs.frozen
class PkvmHostState:
    """The hypervisor's host-wide tables."""

    host: tuple[HostRun, ...]
    hyp: tuple[StateRun, ...]
    #: Handles of the hyp VMs alive.
    vms: tuple[int, ...]


@attrs.frozen
class PkvmVmState:
    """One VM's pKVM state and, once it ran, its hyp VM."""

    protected: bool
    handle: int
    vmid: int
    dying: bool
    pvmfw_ipa: int | None
    exit_mask: int
    guest: tuple[StateRun, ...]


def host_state(host: HostView) -> PkvmHostState | None:
    """The hypervisor's tables, or None on a host the pKVM policy did not set up."""
    hyp = host.arch
    if not isinstance(hyp, Hypervisor):
        return None
    return PkvmHostState(
        tuple(
            HostRun(s, e, p.state.name, p.owner.name, p.handle, p.delta, p.share_count)
            for s, e, p in hyp.host.items()
        ),
        tuple(StateRun(s, e, state.name) for s, e, state in hyp.hyp.items()),
        tuple(vm.handle for vm in hyp.vm_table if vm is not None),
    )


def vm_state(vm: VmView) -> Any:
    """The VM's pKVM state, or None for a VM the policy does not know."""
    state = vm.arch
    if not isinstance(state, PkvmVm):
        return None
    hvm = state.hvm
    runs = () if hvm is None else hvm.guest.items()
    guest = tuple(StateRun(s, e, page.state.name, page.delta) for s, e, page in runs)
    return PkvmVmState(
        state.protected,
        state.handle,
        state.vmid,
        hvm is not None and hvm.dying,
        None if state.pvmfw is None else state.pvmfw.ipa,
        state.exit_mask,
        guest,
    )
