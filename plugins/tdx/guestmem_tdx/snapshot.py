"""What ``kvm.snapshot()`` and ``vm.snapshot()`` show of a TDX host (``guestmem_snapshot``).

The host: the PAMT as runs (page type, owning TD, BEPOCH), the KeyIDs in use and leaked,
the pages poisoned or leaked.  A VM: its TD state (HKID, lifecycle, operation state,
MRTD) and, once the module holds its TD, the Secure-EPT leaves as runs with their
states and the S-EPT page tables per level.
"""

from __future__ import annotations

from typing import Any

import attrs

from guestmem.backend import HostView, VmView
from guestmem_tdx.host import TdxHost
from guestmem_tdx.kvm import KvmTdx


@attrs.frozen
class PamtRun:
    """Pages ``[start, end)`` with the same PAMT entry (``gfn_delta`` is ``gfn - pfn`` of a
    ``PT_REG`` page)."""

    start: int
    end: int
    pt: str
    owner: int
    bepoch: int
    gfn_delta: int | None


@attrs.frozen
class SeptRun:
    """gfns ``[start, end)`` whose S-EPT leaves are in *state*, mapping pfn ``gfn + delta``."""

    start: int
    end: int
    state: str
    delta: int


@attrs.frozen
class TableRun:
    """S-EPT page tables at *level* over table indices ``[start, end)``: the table page's
    pfn (of *start*) and whether it is blocked."""

    level: int
    start: int
    end: int
    pfn: int
    blocked: bool


@attrs.frozen
class TdxHostState:
    """The TDX module's and the host's tables."""

    pamt: tuple[PamtRun, ...]
    keyids_in_use: tuple[int, ...]
    keyids_leaked: tuple[int, ...]
    poisoned: tuple[tuple[int, int], ...]
    leaked: tuple[tuple[int, int], ...]


@attrs.frozen
class TdSnapshot:
    """One TD as KVM and the module hold it."""

    state: str
    hkid: int
    tdr: int | None
    attributes: int
    nr_premapped: int
    lifecycle: str | None
    op_state: str | None
    mrtd: str | None
    sept: tuple[SeptRun, ...]
    tables: tuple[TableRun, ...]


def host_state(host: HostView) -> TdxHostState | None:
    """The host's tables, or None on a host the TDX policy did not set up."""
    state = host.arch
    if not isinstance(state, TdxHost):
        return None
    return TdxHostState(
        tuple(
            PamtRun(s, e, entry.pt.name, entry.owner, entry.bepoch, entry.gfn_delta)
            for s, e, entry in state.module.pamt.items()
        ),
        tuple(sorted(state.keyids.in_use)),
        tuple(sorted(state.keyids.leaked)),
        tuple((s, e) for s, e, _ in state.poisoned.items()),
        tuple((s, e) for s, e, _ in state.leaked.items()),
    )


def vm_state(vm: VmView) -> Any:
    """The TD's state, or None for a VM that is no TD."""
    kvm_tdx = vm.arch
    if not isinstance(kvm_tdx, KvmTdx):
        return None
    td = kvm_tdx.td
    sept: tuple[SeptRun, ...] = ()
    tables: tuple[TableRun, ...] = ()
    if td is not None:
        sept = tuple(SeptRun(s, e, leaf.state.name, leaf.delta) for s, e, leaf in td.leaves.items())
        tables = tuple(
            TableRun(level, s, e, s + delta, blocked)
            for level in sorted(td.tables)
            for s, e, (delta, blocked) in td.tables[level].items()
        )
    return TdSnapshot(
        kvm_tdx.state.name,
        kvm_tdx.hkid,
        kvm_tdx.tdr,
        kvm_tdx.attributes,
        kvm_tdx.nr_premapped,
        None if td is None else td.lifecycle.name,
        None if td is None else td.op_state.name,
        None if td is None or td.mrtd is None else td.mrtd.hex(),
        sept,
        tables,
    )
