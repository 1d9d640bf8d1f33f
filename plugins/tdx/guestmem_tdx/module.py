"""The TDX module (SEAM): TDs, their Secure-EPT, the PAMT and the key ownership table.

Each method is one SEAMCALL (``TDH.*``, called by the host kernel) or TDCALL (``TDG.*``,
called by the TD) of ``intel/tdx-module`` tdx_1.5, with its order of checks and its
completion status (:mod:`guestmem_tdx.status`) instead of an exception: the caller
(the modelled KVM) decides what a status means, as ``arch/x86/kvm/vmx/tdx.c`` does.
Only what Linux 6.18 uses is modelled: 4 KiB S-EPT leaves (KVM maps private memory at
4 KiB only), no migration, no L2 VMs, no TD partitioning.

Storage is range based (:class:`~guestmem.backend.RangeMap`).  The PAMT is keyed by
host pfn; a TD's S-EPT leaves are keyed by gfn with ``pfn - gfn`` as value, and its
non-leaf pages per level by the index of the entry that holds them (``gfn >> 9 * level``),
so a 64 GiB TD mapped contiguously is a handful of entries.  S-EPT levels are the
module's: level 0 entries map 4 KiB pages, a level-``l`` entry (``l >= 1``) holds the
page-table page of the level below (TDH.MEM.SEPT.ADD puts it there); the root is part
of the TDCS.

Batched forms (``npages``, ``count``, ``times``) stand for the same SEAMCALL issued once
per page (or entry) in order: they stop at the first call that would fail, having done
the ones before it, and report both (:class:`Outcome`).  The tests check them against the
one-at-a-time forms.

Page contents go through a *memory* object with ``read``/``write``/``zero`` by pfn (a
:class:`guestmem.backend.HostView`).  This module does not depend on the core model.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Final, Protocol

import attrs

from guestmem import uapi
from guestmem.backend import RangeMap
from guestmem_tdx import status as st
from guestmem_tdx.measure import TDX_EXTENDMR_CHUNKSIZE, MrtdChain
from guestmem_tdx.sept import (
    ACCEPTED_FROM,
    ALLOWED,
    BLOCKED_FROM,
    UNBLOCKED_FROM,
    PamtEntry,
    PamtType,
    SeptLeaf,
    SeptState,
)

PAGE_SIZE: Final = uapi.PAGE_SIZE
#: The TDCALL ended in a TD exit (an EPT violation to the host VMM) instead of returning:
#: not a status the TD sees.  TDG.MEM.PAGE.ACCEPT of a page that is not AUGed does this.
EPT_VIOLATION: Final = -1
#: Entries per S-EPT page.
PTRS_PER_TABLE: Final = 512
#: ``MIN_NUM_TDCS_PAGES`` (tdx_1.5 ``td_control_structures.h``): TDCS pages before TDH.MNG.INIT.
MIN_NUM_TDCS_PAGES: Final = 6
#: ``MIN_TDVPS_PAGES`` (tdx_1.5 ``tdx_tdvps.h``): the TDVPR and 5 TDCX pages of a vCPU.
MIN_TDVPS_PAGES: Final = 6


class Lifecycle(enum.Enum):
    """``TDR.LIFECYCLE_STATE``."""

    HKID_ASSIGNED = "TD_HKID_ASSIGNED"
    KEYS_CONFIGURED = "TD_KEYS_CONFIGURED"
    BLOCKED = "TD_BLOCKED"
    TEARDOWN = "TD_TEARDOWN"


class OpState(enum.Enum):
    """``TDCS.OP_STATE`` (the states a non-migrating TD goes through)."""

    UNINITIALIZED = "OP_STATE_UNINITIALIZED"
    INITIALIZED = "OP_STATE_INITIALIZED"
    RUNNABLE = "OP_STATE_RUNNABLE"


_I, _R = OpState.INITIALIZED, OpState.RUNNABLE
#: ``seamcall_state_lookup`` (``op_state_lookup.c``) for the leaves modelled.
OP_STATES: Final[dict[str, frozenset[OpState]]] = {
    "TDH.MNG.ADDCX": frozenset({OpState.UNINITIALIZED}),
    "TDH.MNG.INIT": frozenset({OpState.UNINITIALIZED}),
    "TDH.MEM.PAGE.ADD": frozenset({_I}),
    "TDH.MR.EXTEND": frozenset({_I}),
    "TDH.MR.FINALIZE": frozenset({_I}),
    "TDH.VP.CREATE": frozenset({_I}),
    "TDH.VP.ADDCX": frozenset({_I}),
    "TDH.VP.INIT": frozenset({_I}),
    "TDH.MEM.SEPT.ADD": frozenset({_I, _R}),
    "TDH.MEM.PAGE.AUG": frozenset({_I, _R}),
    "TDH.MEM.RANGE.BLOCK": frozenset({_I, _R}),
    "TDH.MEM.RANGE.UNBLOCK": frozenset({_I, _R}),
    "TDH.MEM.PAGE.REMOVE": frozenset({_I, _R}),
    "TDH.MEM.TRACK": frozenset({_I, _R}),
}


class Memory(Protocol):
    """Host physical memory as the module touches it (a ``HostView`` is one)."""

    def read(self, pfn: int, offset: int, n: int) -> bytes: ...

    def write(self, pfn: int, offset: int, data: bytes) -> None: ...

    def zero(self, pfn: int, npages: int) -> None: ...


@attrs.frozen
class Outcome:
    """What a (batched) call did: the status of the first call that did not succeed
    (``TDX_SUCCESS`` if none), how many calls succeeded before it, and the S-EPT state
    the failing call found (``None`` when it failed before reaching an entry)."""

    status: int
    done: int
    state: SeptState | None = None

    @property
    def calls(self) -> int:
        """SEAMCALLs issued: the successful ones and the failing one."""
        return self.done + (1 if self.status else 0)

    def __bool__(self) -> bool:
        return self.status == st.TDX_SUCCESS


@attrs.define(eq=False)
class Vp:
    """A TD vCPU: its TDVPR page, TDCX pages, and whether it is associated with a CPU."""

    td: Td
    tdvpr: int
    tdcx: list[int] = attrs.Factory(list)
    initialized: bool = False
    associated: bool = False


@attrs.define(eq=False)
class Td:
    """One TD, known by its TDR page."""

    tdr: int
    hkid: int
    lifecycle: Lifecycle = Lifecycle.HKID_ASSIGNED
    op_state: OpState = OpState.UNINITIALIZED
    #: ``TDR.FATAL``: a machine check in the TD's memory; every TD-scope call fails.
    fatal: bool = False
    configured_packages: set[int] = attrs.Factory(set)
    tdcs: list[int] = attrs.Factory(list)
    vps: list[Vp] = attrs.Factory(list)
    num_vcpus: int = 0
    attributes: int = 0
    xfam: int = 0
    #: GPAW 52 (5-level S-EPT, shared bit 51) instead of 48 (4-level, shared bit 47).
    gpaw52: bool = False
    #: ``TDCS.TD_EPOCH``, bumped by TDH.MEM.TRACK.
    epoch: int = 1
    #: ``TDR.CHLDCNT``: pages (other than the TDR) the TD owns in the PAMT.
    chldcnt: int = 0
    leaves: RangeMap[SeptLeaf] = attrs.Factory(RangeMap)
    #: level -> index of the level-``l`` entry -> (table pfn - index, blocked).
    tables: dict[int, RangeMap[tuple[int, bool]]] = attrs.Factory(dict)
    chain: MrtdChain = attrs.Factory(MrtdChain)
    #: MRTD, frozen by TDH.MR.FINALIZE.
    mrtd: bytes | None = None

    @property
    def top_level(self) -> int:
        """The highest level whose entries hold tables added by TDH.MEM.SEPT.ADD."""
        return 4 if self.gpaw52 else 3

    @property
    def shared_bit(self) -> int:
        """The GPA shared bit (47 or 51)."""
        return 51 if self.gpaw52 else 47

    def table(self, level: int) -> RangeMap[tuple[int, bool]]:
        """The non-leaf entries of *level*."""
        found = self.tables.get(level)
        if found is None:
            found = self.tables[level] = RangeMap()
        return found

    def leaf(self, gfn: int) -> SeptLeaf | None:
        """The S-EPT leaf at *gfn* (None: FREE)."""
        return self.leaves.get(gfn)

    def leaf_state(self, gfn: int) -> SeptState:
        """The state of the level-0 entry at *gfn*."""
        leaf = self.leaves.get(gfn)
        return SeptState.FREE if leaf is None else leaf.state

    def walk_missing(self, start: int, end: int, level: int = 0) -> int | None:
        """The first gfn of ``[start, end)`` whose walk down to a level-*level* entry fails
        (a table above it is missing), or None."""
        first: int | None = None
        for lvl in range(level + 1, self.top_level + 1):
            shift = 9 * lvl
            for s, _ in self.table(lvl).gaps(start >> shift, ((end - 1) >> shift) + 1):
                gfn = max(start, s << shift)
                if first is None or gfn < first:
                    first = gfn
                break
        return first

    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, SeptLeaf | None]]:
        """Level-0 entries over ``[start, end)`` as runs; FREE runs as ``None``."""
        pos = start
        for s, e, leaf in self.leaves.items(start, end):
            if s > pos:
                yield pos, s, None
            yield s, e, leaf
            pos = e
        if pos < end:
            yield pos, end, None

    def mapped_pages(self) -> int:
        """Level-0 entries that map a page."""
        return sum(e - s for s, e, _ in self.leaves.items())

    def table_pages(self) -> int:
        """S-EPT page-table pages added."""
        return sum(e - s for table in self.tables.values() for s, e, _ in table.items())


@attrs.define
class _Kot:
    """A KOT entry: the TD a private HKID is assigned to and the packages whose caches
    still hold lines of it (TDH.PHYMEM.CACHE.WB clears them)."""

    td: Td
    wbinvd_pending: set[int] = attrs.Factory(set)


#: ``on_change(table, first, npages, old, new, td)``: an ownership table changed.
ChangeHook = Callable[[str, int, int, Any, Any, Td | None], None]


class TdxModule:
    """The TDX module of one host: PAMT, KOT and every TD.

    *packages* is the number of physical packages (KEY.CONFIG and CACHE.WB run once on
    each).  ``stats`` counts every call by leaf name.  *on_change* sees every S-EPT
    (``"sept"``, keyed by gfn; ``"sept.nl"`` for page-table entries) and PAMT (``"pamt"``,
    keyed by pfn) change, one call per run.
    """

    def __init__(self, memory: Memory, packages: int = 2, on_change: ChangeHook | None = None) -> None:
        if packages < 1:
            raise ValueError("a host has at least one package")
        self.memory = memory
        self.packages = packages
        self.on_change = on_change
        self.pamt: RangeMap[PamtEntry] = RangeMap()
        self.kot: dict[int, _Kot] = {}
        self.tds: dict[int, Td] = {}
        self.stats: Counter[str] = Counter()
        self._injected: dict[str, list[int]] = {}

    # --- fault injection -------------------------------------------------------------------------
    def inject(self, leaf: str, status: int, times: int = 1) -> None:
        """Make the next *times* calls of *leaf* fail with *status* and change nothing
        (a lock held by a TD vCPU: ``TDX_OPERAND_BUSY``; a module bug: anything else)."""
        self._injected.setdefault(leaf, []).extend([status] * times)

    def _enter(self, leaf: str, n: int = 1) -> int:
        """Count *n* calls of *leaf*; return an injected status for the first, if any."""
        self.stats[leaf] += n
        queue = self._injected.get(leaf)
        if queue:
            return queue.pop(0)
        return st.TDX_SUCCESS

    # --- events ---------------------------------------------------------------------------------
    def _emit(self, table: str, first: int, npages: int, old: Any, new: Any, td: Td | None) -> None:
        if self.on_change is not None and npages:
            self.on_change(table, first, npages, old, new, td)

    def _set_pamt(self, start: int, end: int, entry: PamtEntry | None, td: Td | None) -> None:
        for s, e, old in list(self._pamt_runs(start, end)):
            if old != entry:
                self._emit("pamt", s, e - s, old, entry, td)
        self.pamt.set(start, end, entry)

    def _pamt_runs(self, start: int, end: int) -> Iterator[tuple[int, int, PamtEntry | None]]:
        pos = start
        for s, e, old in list(self.pamt.items(start, end)):
            if s > pos:
                yield pos, s, None
            yield s, e, old
            pos = e
        if pos < end:
            yield pos, end, None

    def _set_leaves(self, td: Td, start: int, end: int, state: SeptState | None, pfn: int = 0) -> None:
        """Level-0 entries ``[start, end)`` become *state* mapping pfns from *pfn* (None: FREE)."""
        new = None if state is None else SeptLeaf(state, pfn - start)
        for s, e, old in list(td.runs(start, end)):
            if old is None and new is None:
                continue
            old_state = None if old is None else old.state
            self._emit("sept", s, e - s, old_state, state, td)
        if new is None:
            td.leaves.erase(start, end)
        else:
            td.leaves.set(start, end, new)

    def _set_states(self, td: Td, start: int, end: int, mapping: dict[SeptState, SeptState]) -> None:
        """Move every leaf of ``[start, end)`` to ``mapping[state]``, keeping its pfn."""
        for s, e, leaf in list(td.leaves.items(start, end)):
            new_state = mapping[leaf.state]
            self._emit("sept", s, e - s, leaf.state, new_state, td)
            td.leaves.set(s, e, SeptLeaf(new_state, leaf.delta))

    # --- common checks ------------------------------------------------------------------------
    def pamt_entry(self, pfn: int) -> PamtEntry | None:
        """The PAMT entry of *pfn* (None: ``PT_NDA``)."""
        return self.pamt.get(pfn)

    def _td_state(self, td: Td, leaf: str) -> int:
        """``check_lock_and_map_explicit_tdr`` + ``check_state_map_tdcs_and_lock``."""
        if self.tds.get(td.tdr) is not td:
            return st.with_operand(st.TDX_PAGE_METADATA_INCORRECT, st.OPERAND_ID_RDX)
        if td.fatal:
            return st.TDX_TD_FATAL
        if td.lifecycle is not Lifecycle.KEYS_CONFIGURED:
            return st.TDX_TD_KEYS_NOT_CONFIGURED
        if len(td.tdcs) < MIN_NUM_TDCS_PAGES:
            return st.TDX_TDCS_NOT_ALLOCATED
        if td.op_state not in OP_STATES[leaf]:
            return st.TDX_OP_STATE_INCORRECT
        return st.TDX_SUCCESS

    def _private_gfn(self, td: Td, gfn: int) -> bool:
        """``check_gpa_validity(..., PRIVATE_ONLY)``: below GPAW and the shared bit clear."""
        return 0 <= gfn < 1 << (td.shared_bit - uapi.PAGE_SHIFT)

    def _first_not_nda(self, pfn: int, npages: int) -> int | None:
        ent = next(self.pamt.items(pfn, pfn + npages), None)
        return None if ent is None else ent[0]

    def _own(self, td: Td, pfn: int, npages: int, pt: PamtType, gfn: int | None = None) -> None:
        entry = PamtEntry(pt, td.tdr, 0, None if gfn is None else gfn - pfn)
        self._set_pamt(pfn, pfn + npages, entry, td)
        td.chldcnt += npages

    # --- TD creation ----------------------------------------------------------------------------
    def mng_create(self, tdr: int, hkid: int) -> tuple[int, Td | None]:
        """TDH.MNG.CREATE: *tdr* becomes the TDR of a new TD keyed with *hkid*."""
        err = self._enter("TDH.MNG.CREATE")
        if err:
            return err, None
        if self.pamt.get(tdr) is not None:
            return st.with_operand(st.TDX_PAGE_METADATA_INCORRECT, st.OPERAND_ID_RCX), None
        if hkid in self.kot:
            return st.with_operand(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RDX), None
        td = Td(tdr, hkid)
        self.tds[tdr] = td
        self.kot[hkid] = _Kot(td)
        self._set_pamt(tdr, tdr + 1, PamtEntry(PamtType.TDR, tdr), td)
        return st.TDX_SUCCESS, td

    def mng_key_config(self, td: Td, package: int) -> int:
        """TDH.MNG.KEY.CONFIG on one CPU of *package*: program the HKID's key there."""
        err = self._enter("TDH.MNG.KEY.CONFIG")
        if err:
            return err
        if td.lifecycle is not Lifecycle.HKID_ASSIGNED:
            return st.TDX_LIFECYCLE_STATE_INCORRECT
        if package in td.configured_packages:
            return st.TDX_KEY_CONFIGURED
        td.configured_packages.add(package)
        if len(td.configured_packages) == self.packages:
            td.lifecycle = Lifecycle.KEYS_CONFIGURED
        return st.TDX_SUCCESS

    def mng_addcx(self, td: Td, pfn: int) -> int:
        """TDH.MNG.ADDCX: one TDCS page."""
        err = self._enter("TDH.MNG.ADDCX")
        if err:
            return err
        if td.lifecycle is not Lifecycle.KEYS_CONFIGURED:
            return st.TDX_TD_KEYS_NOT_CONFIGURED
        if td.op_state is not OpState.UNINITIALIZED:
            return st.TDX_OP_STATE_INCORRECT
        if self.pamt.get(pfn) is not None:
            return st.with_operand(st.TDX_PAGE_METADATA_INCORRECT, st.OPERAND_ID_RDX)
        td.tdcs.append(pfn)
        self._own(td, pfn, 1, PamtType.TDCX)
        return st.TDX_SUCCESS

    def mng_init(self, td: Td, attributes: int, xfam: int, gpaw52: bool) -> int:
        """TDH.MNG.INIT: the TD_PARAMS; starts the MRTD."""
        err = self._enter("TDH.MNG.INIT") or self._td_state(td, "TDH.MNG.INIT")
        if err:
            return err
        td.attributes, td.xfam, td.gpaw52 = attributes, xfam, gpaw52
        td.chain = MrtdChain()
        td.op_state = OpState.INITIALIZED
        return st.TDX_SUCCESS

    def vp_create(self, td: Td, tdvpr: int) -> tuple[int, Vp | None]:
        """TDH.VP.CREATE: *tdvpr* becomes the TDVPR page of a new vCPU."""
        err = self._enter("TDH.VP.CREATE") or self._td_state(td, "TDH.VP.CREATE")
        if err:
            return err, None
        if self.pamt.get(tdvpr) is not None:
            return st.with_operand(st.TDX_PAGE_METADATA_INCORRECT, st.OPERAND_ID_RCX), None
        vp = Vp(td, tdvpr)
        td.vps.append(vp)
        self._own(td, tdvpr, 1, PamtType.TDVPR)
        return st.TDX_SUCCESS, vp

    def vp_addcx(self, vp: Vp, pfn: int) -> int:
        """TDH.VP.ADDCX: one TDVPS page."""
        err = self._enter("TDH.VP.ADDCX") or self._td_state(vp.td, "TDH.VP.ADDCX")
        if err:
            return err
        if self.pamt.get(pfn) is not None:
            return st.with_operand(st.TDX_PAGE_METADATA_INCORRECT, st.OPERAND_ID_RCX)
        vp.tdcx.append(pfn)
        self._own(vp.td, pfn, 1, PamtType.TDCX)
        return st.TDX_SUCCESS

    def vp_init(self, vp: Vp) -> int:
        """TDH.VP.INIT: the vCPU is initialised (and associated with this CPU)."""
        err = self._enter("TDH.VP.INIT") or self._td_state(vp.td, "TDH.VP.INIT")
        if err:
            return err
        if vp.initialized:
            return st.TDX_VCPU_STATE_INCORRECT
        if len(vp.tdcx) != MIN_TDVPS_PAGES - 1:
            return st.TDX_TDCX_NUM_INCORRECT
        vp.initialized = vp.associated = True
        vp.td.num_vcpus += 1
        return st.TDX_SUCCESS

    # --- Secure EPT -------------------------------------------------------------------------------
    def sept_add(self, td: Td, level: int, index: int, pfn: int, count: int = 1) -> Outcome:
        """TDH.MEM.SEPT.ADD of pages ``[pfn, pfn + count)`` into the level-*level* entries
        ``[index, index + count)`` (entry ``i`` covers gfns ``i << 9 * level`` onwards)."""
        leaf = "TDH.MEM.SEPT.ADD"
        err = self._enter(leaf, count) or self._td_state(td, leaf)
        if err:
            return self._finish(leaf, count, Outcome(err, 0))
        shift = 9 * level
        if not 1 <= level <= td.top_level or not self._private_gfn(td, ((index + count) << shift) - 1):
            return self._finish(
                leaf, count, Outcome(st.with_operand(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX), 0)
            )
        fail, status, found = count, st.TDX_SUCCESS, None
        missing = td.walk_missing(index << shift, (index + count) << shift, level)
        if missing is not None:
            fail, status = (
                (missing >> shift) - index,
                st.with_operand(st.TDX_EPT_WALK_FAILED, st.OPERAND_ID_RCX),
            )
        present = next(td.table(level).items(index, index + fail), None)
        if present is not None:
            fail, found = present[0] - index, SeptState.NL_MAPPED
            status = st.with_operand(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX)
        busy = self._first_not_nda(pfn, fail)
        if busy is not None:
            fail, status, found = (
                busy - pfn,
                st.with_operand(st.TDX_PAGE_METADATA_INCORRECT, st.OPERAND_ID_R8),
                None,
            )
        if fail:
            self.memory.zero(pfn, fail)  # fill_area_cacheline with the "free" S-EPT entry value
            td.table(level).set(index, index + fail, (pfn - index, False))
            self._emit("sept.nl", index << shift, fail << shift, None, SeptState.NL_MAPPED, td)
            self._own(td, pfn, fail, PamtType.EPT)
        return self._finish(leaf, count, Outcome(status, fail, found))

    def _leaf_checks(self, td: Td, leaf: str, gfn: int, npages: int) -> tuple[int, int, SeptState | None]:
        """The walk and state checks of a level-0 SEAMCALL over ``[gfn, gfn + npages)``:
        ``(calls that pass, status of the first that does not, the state it found)``."""
        if not self._private_gfn(td, gfn) or not self._private_gfn(td, gfn + npages - 1):
            return 0, st.with_operand(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX), None
        fail, status, found = npages, st.TDX_SUCCESS, None
        missing = td.walk_missing(gfn, gfn + npages)
        if missing is not None:
            fail, status = missing - gfn, st.with_operand(st.TDX_EPT_WALK_FAILED, st.OPERAND_ID_RCX)
        ok = ALLOWED[leaf]
        for s, _, entry in td.runs(gfn, gfn + fail):
            state = SeptState.FREE if entry is None else entry.state
            if state not in ok:
                fail, found = s - gfn, state
                code = st.TDX_EPT_ENTRY_STATE_INCORRECT
                if leaf == "TDH.MEM.RANGE.BLOCK" and state.any_blocked:
                    code = st.TDX_GPA_RANGE_ALREADY_BLOCKED
                status = st.with_operand(code, st.OPERAND_ID_RCX)
                break
        return fail, status, found

    def _finish(self, leaf: str, requested: int, out: Outcome) -> Outcome:
        """Take back the count of calls a batch stopped before issuing."""
        self.stats[leaf] -= requested - out.calls
        return out

    def page_aug(self, td: Td, gfn: int, pfn: int, npages: int = 1) -> Outcome:
        """TDH.MEM.PAGE.AUG: FREE (or REMOVED) -> PENDING, the page becomes ``PT_REG``."""
        leaf = "TDH.MEM.PAGE.AUG"
        err = self._enter(leaf, npages) or self._td_state(td, leaf)
        if err:
            return self._finish(leaf, npages, Outcome(err, 0))
        fail, status, found = self._leaf_checks(td, leaf, gfn, npages)
        busy = self._first_not_nda(pfn, fail)
        if busy is not None:
            fail, status, found = (
                busy - pfn,
                st.with_operand(st.TDX_PAGE_METADATA_INCORRECT, st.OPERAND_ID_R8),
                None,
            )
        self._set_leaves(td, gfn, gfn + fail, SeptState.PENDING, pfn)
        self._own(td, pfn, fail, PamtType.REG, gfn)
        return self._finish(leaf, npages, Outcome(status, fail, found))

    def page_add(self, td: Td, gfn: int, pfn: int, source: bytes) -> int:
        """TDH.MEM.PAGE.ADD (pre-finalize): copy *source* into *pfn*, FREE -> MAPPED,
        extend MRTD with the gpa."""
        leaf = "TDH.MEM.PAGE.ADD"
        err = self._enter(leaf) or self._td_state(td, leaf)
        if err:
            return err
        fail, status, _ = self._leaf_checks(td, leaf, gfn, 1)
        if not fail:
            return status
        if self.pamt.get(pfn) is not None:
            return st.with_operand(st.TDX_PAGE_METADATA_INCORRECT, st.OPERAND_ID_R8)
        self.memory.write(pfn, 0, source[:PAGE_SIZE].ljust(PAGE_SIZE, b"\0"))
        self._set_leaves(td, gfn, gfn + 1, SeptState.MAPPED, pfn)
        self._own(td, pfn, 1, PamtType.REG, gfn)
        td.chain.page_add(gfn << uapi.PAGE_SHIFT)
        return st.TDX_SUCCESS

    def mr_extend(self, td: Td, gpa: int) -> int:
        """TDH.MR.EXTEND: measure the 256 bytes at *gpa* of a MAPPED page."""
        leaf = "TDH.MR.EXTEND"
        err = self._enter(leaf) or self._td_state(td, leaf)
        if err:
            return err
        if gpa % TDX_EXTENDMR_CHUNKSIZE or not self._private_gfn(td, gpa >> uapi.PAGE_SHIFT):
            return st.with_operand(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
        gfn = gpa >> uapi.PAGE_SHIFT
        if td.walk_missing(gfn, gfn + 1) is not None:
            return st.with_operand(st.TDX_EPT_ENTRY_NOT_PRESENT, st.OPERAND_ID_RCX)
        entry = td.leaf(gfn)
        if entry is None or entry.state not in ALLOWED[leaf]:
            return st.TDX_EPT_ENTRY_NOT_PRESENT
        off = gpa % PAGE_SIZE
        td.chain.mr_extend(gpa, self.memory.read(gfn + entry.delta, off, TDX_EXTENDMR_CHUNKSIZE))
        return st.TDX_SUCCESS

    def mr_finalize(self, td: Td) -> int:
        """TDH.MR.FINALIZE: freeze MRTD; the TD becomes RUNNABLE."""
        err = self._enter("TDH.MR.FINALIZE") or self._td_state(td, "TDH.MR.FINALIZE")
        if err:
            return err
        if td.num_vcpus == 0:
            return st.TDX_NO_VCPUS
        td.mrtd = td.chain.finalize()
        td.op_state = OpState.RUNNABLE
        return st.TDX_SUCCESS

    def range_block(self, td: Td, gfn: int, npages: int = 1, level: int = 0) -> Outcome:
        """TDH.MEM.RANGE.BLOCK of level-0 entries (or, *level* 1, of the 2 MiB entries
        holding page tables): MAPPED -> BLOCKED, PENDING -> PENDING_BLOCKED, NL_MAPPED ->
        NL_BLOCKED; the page's PAMT BEPOCH records the TD epoch."""
        leaf = "TDH.MEM.RANGE.BLOCK"
        err = self._enter(leaf, npages) or self._td_state(td, leaf)
        if err:
            return self._finish(leaf, npages, Outcome(err, 0))
        if level == 1:
            return self._finish(leaf, npages, self._block_tables(td, gfn, npages))
        if level != 0:
            return self._finish(
                leaf, npages, Outcome(st.with_operand(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX), 0)
            )
        fail, status, found = self._leaf_checks(td, leaf, gfn, npages)
        for s, e, entry in list(td.leaves.items(gfn, gfn + fail)):
            pfn = s + entry.delta
            for ps, pe, pamt in list(self.pamt.items(pfn, pfn + e - s)):
                self._set_pamt(ps, pe, attrs.evolve(pamt, bepoch=td.epoch), td)
        self._set_states(td, gfn, gfn + fail, BLOCKED_FROM)
        return self._finish(leaf, npages, Outcome(status, fail, found))

    def _block_tables(self, td: Td, gfn: int, count: int) -> Outcome:
        index = gfn >> 9
        if gfn % PTRS_PER_TABLE or td.walk_missing(gfn, gfn + count * PTRS_PER_TABLE, 1) is not None:
            return Outcome(st.with_operand(st.TDX_EPT_WALK_FAILED, st.OPERAND_ID_RCX), 0)
        table = td.table(1)
        for i in range(index, index + count):
            entry = table.get(i)
            if entry is None or entry[1]:
                state = SeptState.FREE if entry is None else SeptState.NL_BLOCKED
                code = (
                    st.TDX_GPA_RANGE_ALREADY_BLOCKED
                    if entry is not None
                    else st.TDX_EPT_ENTRY_STATE_INCORRECT
                )
                return Outcome(st.with_operand(code, st.OPERAND_ID_RCX), i - index, state)
            table.set(i, i + 1, (entry[0], True))
            pfn = i + entry[0]
            pamt = self.pamt.get(pfn)
            assert pamt is not None, "an S-EPT page is PT_EPT"
            self._set_pamt(pfn, pfn + 1, attrs.evolve(pamt, bepoch=td.epoch), td)
            self._emit("sept.nl", i << 9, PTRS_PER_TABLE, SeptState.NL_MAPPED, SeptState.NL_BLOCKED, td)
        return Outcome(st.TDX_SUCCESS, count)

    def range_unblock(self, td: Td, gfn: int, npages: int = 1) -> Outcome:
        """TDH.MEM.RANGE.UNBLOCK of level-0 entries (KVM never calls it): the blocked
        states go back, once the TLB was tracked since the block."""
        leaf = "TDH.MEM.RANGE.UNBLOCK"
        err = self._enter(leaf, npages) or self._td_state(td, leaf)
        if err:
            return self._finish(leaf, npages, Outcome(err, 0))
        fail, status, found = self._leaf_checks(td, leaf, gfn, npages)
        fail, status, found = self._tracked(td, gfn, fail, status, found)
        self._set_states(td, gfn, gfn + fail, UNBLOCKED_FROM)
        return self._finish(leaf, npages, Outcome(status, fail, found))

    def _tracked(
        self, td: Td, gfn: int, fail: int, status: int, found: SeptState | None
    ) -> tuple[int, int, SeptState | None]:
        """``is_tlb_tracked``: a TRACK bumped the epoch since the entry's BEPOCH (no vCPU of
        the model runs concurrently, so an older epoch is always drained)."""
        for s, e, entry in td.leaves.items(gfn, gfn + fail):
            pfn = s + entry.delta
            for ps, _, pamt in self.pamt.items(pfn, pfn + e - s):
                if pamt.bepoch >= td.epoch:
                    at = s + ps - pfn - gfn
                    code = st.with_operand(st.TDX_TLB_TRACKING_NOT_DONE, st.OPERAND_ID_RCX)
                    return at, code, entry.state
        return fail, status, found

    def mem_track(self, td: Td, times: int = 1) -> Outcome:
        """TDH.MEM.TRACK: advance the TD epoch (*times* calls: that many epochs)."""
        leaf = "TDH.MEM.TRACK"
        err = self._enter(leaf, times) or self._td_state(td, leaf)
        if err:
            return self._finish(leaf, times, Outcome(err, 0))
        td.epoch += times
        return Outcome(st.TDX_SUCCESS, times)

    def page_remove(self, td: Td, gfn: int, npages: int = 1) -> Outcome:
        """TDH.MEM.PAGE.REMOVE: a leaf becomes FREE and its page ``PT_NDA``.  While the TD
        is RUNNABLE the entry must be blocked and the TLB tracked since."""
        leaf = "TDH.MEM.PAGE.REMOVE"
        err = self._enter(leaf, npages) or self._td_state(td, leaf)
        if err:
            return self._finish(leaf, npages, Outcome(err, 0))
        fail, status, found = self._leaf_checks(td, leaf, gfn, npages)
        if td.op_state is OpState.RUNNABLE:  # op_state_is_tlb_tracking_required
            for s, _, entry in td.leaves.items(gfn, gfn + fail):
                if not entry.state.any_blocked:
                    fail, found = s - gfn, entry.state
                    status = st.with_operand(st.TDX_GPA_RANGE_NOT_BLOCKED, st.OPERAND_ID_RCX)
                    break
            fail, status, found = self._tracked(td, gfn, fail, status, found)
        for s, e, entry in list(td.leaves.items(gfn, gfn + fail)):
            self._set_pamt(s + entry.delta, e + entry.delta, None, td)
            td.chldcnt -= e - s
        self._set_leaves(td, gfn, gfn + fail, None)
        return self._finish(leaf, npages, Outcome(status, fail, found))

    # --- cache and page reclaim ---------------------------------------------------------------
    def page_wbinvd(self, hkid: int, pfn: int, npages: int = 1) -> Outcome:
        """TDH.PHYMEM.PAGE.WBINVD: write back and invalidate the lines of the pages tagged
        with private *hkid* (it must be assigned in the KOT)."""
        err = self._enter("TDH.PHYMEM.PAGE.WBINVD", npages)
        if err:
            return self._finish("TDH.PHYMEM.PAGE.WBINVD", npages, Outcome(err, 0))
        if hkid not in self.kot:
            out = Outcome(st.with_operand(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX), 0)
            return self._finish("TDH.PHYMEM.PAGE.WBINVD", npages, out)
        return Outcome(st.TDX_SUCCESS, npages)

    def page_wbinvd_tdr(self, td: Td) -> int:
        """TDH.PHYMEM.PAGE.WBINVD of the TDR with the global KeyID (teardown)."""
        err = self._enter("TDH.PHYMEM.PAGE.WBINVD")
        if err:
            return err
        entry = self.pamt.get(td.tdr)
        if entry is not None and entry.pt is not PamtType.NDA:
            return st.with_operand(st.TDX_PAGE_METADATA_INCORRECT, st.OPERAND_ID_RCX)
        return st.TDX_SUCCESS

    def page_reclaim(self, pfn: int, npages: int = 1) -> Outcome:
        """TDH.PHYMEM.PAGE.RECLAIM: take back pages of a TD in TEARDOWN (HKID freed) as
        ``PT_NDA``; the TDR last, once the TD owns nothing else."""
        leaf = "TDH.PHYMEM.PAGE.RECLAIM"
        err = self._enter(leaf, npages)
        if err:
            return self._finish(leaf, npages, Outcome(err, 0))
        pos, end = pfn, pfn + npages
        for s, e, entry in list(self._pamt_runs(pfn, end)):
            if entry is None:
                status = st.with_operand(st.TDX_PAGE_METADATA_INCORRECT, st.OPERAND_ID_RCX)
                return self._finish(leaf, npages, Outcome(status, s - pfn))
            td = self.tds.get(entry.owner)
            assert td is not None, "a TD page's owner exists until its TDR is reclaimed"
            if td.lifecycle is not Lifecycle.TEARDOWN:
                return self._finish(leaf, npages, Outcome(st.TDX_LIFECYCLE_STATE_INCORRECT, s - pfn))
            if entry.pt is PamtType.TDR:
                if td.chldcnt:
                    return self._finish(leaf, npages, Outcome(st.TDX_TD_ASSOCIATED_PAGES_EXIST, s - pfn))
                self._set_pamt(s, e, None, td)
                del self.tds[td.tdr]
                pos = e
                continue
            self._forget(td, entry, s, e)
            self._set_pamt(s, e, None, td)
            td.chldcnt -= e - s
            pos = e
        return Outcome(st.TDX_SUCCESS, pos - pfn)

    def _forget(self, td: Td, entry: PamtEntry, start: int, end: int) -> None:
        """Drop the TD's references to reclaimed pages (its S-EPT is dead in TEARDOWN)."""
        if entry.pt is PamtType.REG and entry.gfn_delta is not None:
            self._set_leaves(td, start + entry.gfn_delta, end + entry.gfn_delta, None)
        elif entry.pt is PamtType.EPT:
            for level, table in td.tables.items():
                for s, e, (delta, _) in list(table.items()):
                    lo, hi = max(s, start - delta), min(e, end - delta)
                    if lo < hi:
                        table.erase(lo, hi)
                        self._emit("sept.nl", lo << 9 * level, (hi - lo) << 9 * level, None, None, td)

    # --- HKID release -----------------------------------------------------------------------------
    def vp_flush(self, vp: Vp) -> int:
        """TDH.VP.FLUSH: flush the vCPU's state and TLB entries off its CPU."""
        err = self._enter("TDH.VP.FLUSH")
        if err:
            return err
        if not vp.associated:
            return st.TDX_VCPU_NOT_ASSOCIATED
        vp.associated = False
        return st.TDX_SUCCESS

    def mng_vpflushdone(self, td: Td) -> int:
        """TDH.MNG.VPFLUSHDONE: every vCPU is flushed; the TD is BLOCKED, its key's cache
        lines must be written back on every package."""
        err = self._enter("TDH.MNG.VPFLUSHDONE")
        if err:
            return err
        if td.lifecycle not in (Lifecycle.HKID_ASSIGNED, Lifecycle.KEYS_CONFIGURED):
            return st.TDX_LIFECYCLE_STATE_INCORRECT
        if td.op_state is not OpState.UNINITIALIZED and any(vp.associated for vp in td.vps):
            return st.TDX_FLUSHVP_NOT_DONE
        td.lifecycle = Lifecycle.BLOCKED
        self.kot[td.hkid].wbinvd_pending = set(range(self.packages))
        return st.TDX_SUCCESS

    def phymem_cache_wb(self, package: int, resume: bool = False) -> int:
        """TDH.PHYMEM.CACHE.WB on *package*: write back the lines of every blocked HKID."""
        err = self._enter("TDH.PHYMEM.CACHE.WB")
        if err:
            return err
        ready = [k for k in self.kot.values() if package in k.wbinvd_pending]
        if not ready:
            return st.TDX_NO_HKID_READY_TO_WBCACHE
        for kot in ready:
            kot.wbinvd_pending.discard(package)
        return st.TDX_SUCCESS

    def mng_key_freeid(self, td: Td) -> int:
        """TDH.MNG.KEY.FREEID: the HKID is free again; the TD is in TEARDOWN."""
        err = self._enter("TDH.MNG.KEY.FREEID")
        if err:
            return err
        if td.lifecycle is not Lifecycle.BLOCKED:
            return st.TDX_LIFECYCLE_STATE_INCORRECT
        if self.kot[td.hkid].wbinvd_pending:
            return st.TDX_WBCACHE_NOT_COMPLETE
        del self.kot[td.hkid]
        td.lifecycle = Lifecycle.TEARDOWN
        return st.TDX_SUCCESS

    # --- TDCALLs -------------------------------------------------------------------------------------
    def page_accept(self, td: Td, gfn: int, level: int = 0, npages: int = 1) -> Outcome:
        """TDG.MEM.PAGE.ACCEPT of *npages* level-*level* pages from *gfn* (level 0: 4 KiB,
        1: 2 MiB): PENDING -> MAPPED, zeroed with the TD's key.  ``EPT_VIOLATION`` when
        the entry is not AUGed (the TD exits to the VMM and retries once it is);
        ``TDX_PAGE_ALREADY_ACCEPTED`` for a MAPPED page, ``TDX_PAGE_SIZE_MISMATCH`` for a
        2 MiB request where the S-EPT has a page table (``tdg_mem_page_accept.c``)."""
        leaf = "TDG.MEM.PAGE.ACCEPT"
        self.stats[leaf] += npages
        if level not in (0, 1) or gfn % (PTRS_PER_TABLE**level):
            return self._finish(
                leaf, npages, Outcome(st.with_operand(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX), 0)
            )
        span = PTRS_PER_TABLE**level
        if not self._private_gfn(td, gfn) or not self._private_gfn(td, gfn + npages * span - 1):
            return self._finish(
                leaf, npages, Outcome(st.with_operand(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX), 0)
            )
        if level == 1:
            return self._finish(leaf, npages, self._accept_2m(td, gfn))
        fail, status, found = npages, st.TDX_SUCCESS, None
        missing = td.walk_missing(gfn, gfn + npages)
        if missing is not None:
            fail, status, found = missing - gfn, EPT_VIOLATION, SeptState.FREE
        for s, _, entry in td.runs(gfn, gfn + fail):
            state = SeptState.FREE if entry is None else entry.state
            if state.guest_accessible_leaf:
                fail, status, found = s - gfn, st.with_operand(st.TDX_PAGE_ALREADY_ACCEPTED, 0), state
                break
            if state not in ALLOWED[leaf]:
                fail, status, found = s - gfn, EPT_VIOLATION, state
                break
        for s, e, entry in list(td.leaves.items(gfn, gfn + fail)):
            self.memory.zero(s + entry.delta, e - s)  # zero_area_cacheline with the TD's key
        self._set_states(td, gfn, gfn + fail, ACCEPTED_FROM)
        return self._finish(leaf, npages, Outcome(status, fail, found))

    def _accept_2m(self, td: Td, gfn: int) -> Outcome:
        """A 2 MiB ACCEPT: with 4 KiB leaves only, the level-1 entry holds a page table
        (size mismatch) or is FREE, or the walk ends above it (an EPT violation)."""
        if td.walk_missing(gfn, gfn + 1, 1) is None and td.table(1).get(gfn >> 9) is not None:
            return Outcome(st.with_operand(st.TDX_PAGE_SIZE_MISMATCH, 1), 0, SeptState.NL_MAPPED)
        return Outcome(EPT_VIOLATION, 0, SeptState.FREE)

    # --- debugging --------------------------------------------------------------------------------
    def sept_write(self, td: Td, gfn: int, state: SeptState, pfn: int) -> None:
        """Force the level-0 entry at *gfn* into *state* mapping *pfn* (``PT_REG``) as the
        migration SEAMCALLs (``TDH.EXPORT.*``, not modelled) would leave it; for tests."""
        if state is SeptState.FREE:
            self._set_leaves(td, gfn, gfn + 1, None)
            return
        if state.is_leaf and self.pamt.get(pfn) is None:
            self._own(td, pfn, 1, PamtType.REG, gfn)
        self._set_leaves(td, gfn, gfn + 1, state, pfn)
