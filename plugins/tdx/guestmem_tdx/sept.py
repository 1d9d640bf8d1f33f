"""The TDX module's ownership tables: Secure-EPT entry states and PAMT page types.

S-EPT states and the source states each SEAMCALL/TDCALL leaf accepts are those of
``intel/tdx-module`` (tdx_1.5) ``include/auto_gen/sept_state_lookup.{h,c}`` (encodings are
the entry's state bits; the lookup table is indexed by :attr:`SeptState.index`).  PAMT
page types are ``PT_*`` of the module's ``pamt_manager.h``.

Everything here is data: the operations that move entries between states are the
SEAMCALLs of :mod:`guestmem_tdx.module`.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs

from guestmem.backend import Owner


class SeptState(enum.Enum):
    """A Secure-EPT entry state: ``(index in the lookup table, encoding)``."""

    FREE = (0, 0x0E)
    REMOVED = (1, 0x0C)
    NL_MAPPED = (2, 0x00)
    NL_BLOCKED = (3, 0x08)
    MAPPED = (4, 0x60)
    BLOCKED = (5, 0x68)
    BLOCKEDW = (6, 0x64)
    EXPORTED_BLOCKEDW = (7, 0x66)
    EXPORTED_DIRTY = (8, 0x63)
    EXPORTED_DIRTY_BLOCKEDW = (9, 0x67)
    PENDING = (10, 0x70)
    PENDING_BLOCKED = (11, 0x78)
    PENDING_BLOCKEDW = (12, 0x74)
    PENDING_EXPORTED_BLOCKEDW = (13, 0x76)
    PENDING_EXPORTED_DIRTY = (14, 0x73)
    PENDING_EXPORTED_DIRTY_BLOCKEDW = (15, 0x77)

    @property
    def index(self) -> int:
        """Column of ``seamcall_sept_state_lookup``."""
        return self.value[0]

    @property
    def encoding(self) -> int:
        """``SEPT_STATE_*_ENCODING``."""
        return self.value[1]

    @property
    def is_leaf(self) -> bool:
        """A state of a leaf entry (a page is mapped; not FREE/REMOVED, not a table)."""
        return self not in _NOT_LEAF

    @property
    def any_blocked(self) -> bool:
        """``sept_state_is_any_blocked``: the TDB bit is set."""
        return self in (SeptState.NL_BLOCKED, SeptState.BLOCKED, SeptState.PENDING_BLOCKED)

    @property
    def any_pending(self) -> bool:
        """A page AUGed and not yet accepted."""
        return self.name.startswith("PENDING")

    @property
    def guest_accessible_leaf(self) -> bool:
        """``sept_state_is_guest_accessible_leaf``: the TD can access it (ACCEPT: already done)."""
        return self in _GUEST_ACCESSIBLE


_NOT_LEAF: Final = frozenset({SeptState.FREE, SeptState.REMOVED, SeptState.NL_MAPPED, SeptState.NL_BLOCKED})
_GUEST_ACCESSIBLE: Final = frozenset(
    {
        SeptState.MAPPED,
        SeptState.BLOCKEDW,
        SeptState.EXPORTED_BLOCKEDW,
        SeptState.EXPORTED_DIRTY,
        SeptState.EXPORTED_DIRTY_BLOCKEDW,
    }
)

_ROWS: Final[dict[str, str]] = {
    # leaf name: row of seamcall_sept_state_lookup / tdcall_sept_state_lookup, by index
    "TDH.MEM.PAGE.ADD": "1000000000000000",
    "TDH.MEM.SEPT.ADD": "1010000000000000",
    "TDH.MEM.PAGE.AUG": "1100000000000000",
    "TDH.MEM.RANGE.BLOCK": "0010101000101000",
    "TDH.MEM.PAGE.DEMOTE": "0000110000110000",
    "TDH.MR.EXTEND": "0000100000000000",
    "TDH.MEM.PAGE.PROMOTE": "0011000000000000",
    "TDH.MEM.PAGE.REMOVE": "0000111000111000",
    "TDH.MEM.SEPT.REMOVE": "0011000000000000",
    "TDH.MEM.RANGE.UNBLOCK": "0001010000010000",
    "TDG.MEM.PAGE.ACCEPT": "0000000000100010",
}

#: The S-EPT states each leaf accepts (``sept_state_is_seamcall_leaf_allowed``).
ALLOWED: Final[dict[str, frozenset[SeptState]]] = {
    leaf: frozenset(s for s in SeptState if row[s.index] == "1") for leaf, row in _ROWS.items()
}

#: ``block_sept_entry``: the state TDH.MEM.RANGE.BLOCK leaves.
BLOCKED_FROM: Final[dict[SeptState, SeptState]] = {
    SeptState.MAPPED: SeptState.BLOCKED,
    SeptState.PENDING: SeptState.PENDING_BLOCKED,
    SeptState.NL_MAPPED: SeptState.NL_BLOCKED,
    SeptState.BLOCKEDW: SeptState.BLOCKED,
    SeptState.PENDING_BLOCKEDW: SeptState.PENDING_BLOCKED,
}
#: What TDG.MEM.PAGE.ACCEPT leaves (``tdg_mem_page_accept``: MAPPED, or EXPORTED_DIRTY).
ACCEPTED_FROM: Final[dict[SeptState, SeptState]] = {
    SeptState.PENDING: SeptState.MAPPED,
    SeptState.PENDING_EXPORTED_DIRTY: SeptState.EXPORTED_DIRTY,
}
#: What TDH.MEM.RANGE.UNBLOCK restores.
UNBLOCKED_FROM: Final[dict[SeptState, SeptState]] = {
    SeptState.BLOCKED: SeptState.MAPPED,
    SeptState.PENDING_BLOCKED: SeptState.PENDING,
    SeptState.NL_BLOCKED: SeptState.NL_MAPPED,
}


def allowed(leaf: str, state: SeptState) -> bool:
    """``sept_state_is_seamcall_leaf_allowed`` / ``..._tdcall_leaf_allowed``."""
    return state in ALLOWED[leaf]


@attrs.frozen(slots=True)
class SeptLeaf:
    """A stored S-EPT leaf entry: its state and ``pfn - gfn`` (runs of it merge)."""

    state: SeptState
    delta: int


class PamtType(enum.Enum):
    """``PT_*``: what the TDX module uses a physical page for."""

    NDA = "PT_NDA"  # not assigned: the host owns it
    RSVD = "PT_RSVD"
    REG = "PT_REG"  # a TD private page
    TDR = "PT_TDR"
    TDCX = "PT_TDCX"  # a TDCS page, or a TDVPS page other than the TDVPR
    TDVPR = "PT_TDVPR"
    EPT = "PT_EPT"  # a Secure-EPT page-table page

    @property
    def owner(self) -> Owner:
        """Who holds a page of this type, in the terms every backend shares."""
        if self is PamtType.NDA:
            return Owner.HOST
        if self is PamtType.REG:
            return Owner.GUEST
        return Owner.HYPERVISOR


@attrs.frozen(slots=True)
class PamtEntry:
    """A PAMT entry: page type, owning TD (its TDR pfn), BEPOCH, and for a ``PT_REG`` page
    ``gfn - pfn`` (which gpa the S-EPT maps it at; not part of the PAMT, kept for checks)."""

    pt: PamtType
    owner: int
    bepoch: int = 0
    gfn_delta: int | None = None


def sept_owner(leaf: SeptLeaf | None) -> Owner:
    """Who an S-EPT leaf gives the page it maps to (absent: no page, the host's)."""
    return Owner.HOST if leaf is None else Owner.GUEST


def pamt_owner(entry: PamtEntry | None) -> Owner:
    """Who a PAMT entry gives its page to (absent: ``PT_NDA``)."""
    return Owner.HOST if entry is None else entry.pt.owner
