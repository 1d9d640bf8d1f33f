"""The TDX module on its own: every S-EPT transition KVM and the TD can cause, every
illegal one with the module's status (intel/tdx-module tdx_1.5 ``sept_state_lookup.c``
and the ``tdh_*``/``tdg_*`` handlers), the PAMT, the KOT and HKID release."""

from __future__ import annotations

import pytest
from tdx_helpers import PAGE, Seam

from guestmem_tdx import status as st
from guestmem_tdx.measure import MrtdChain
from guestmem_tdx.module import EPT_VIOLATION, Lifecycle, OpState
from guestmem_tdx.sept import ALLOWED, BLOCKED_FROM, UNBLOCKED_FROM, PamtType, SeptState

G = 0x1000  # a gfn away from anything else
RCX = st.OPERAND_ID_RCX
LEAF_STATES = [s for s in SeptState if s not in (SeptState.NL_MAPPED, SeptState.NL_BLOCKED)]


def _at(seam: Seam, state: SeptState, *, runnable: bool) -> int:
    """The level-0 entry at G in *state* (mapping a fresh page for leaf states)."""
    seam.link(G)
    if runnable:
        seam.finalize()
    pfn = seam.alloc()
    seam.module.sept_write(seam.td, G, state, pfn)
    return pfn


def _incorrect() -> int:
    return st.with_operand(st.TDX_EPT_ENTRY_STATE_INCORRECT, RCX)


# --- the leaf state machine, state by state -----------------------------------------------------
@pytest.mark.parametrize("state", LEAF_STATES, ids=lambda s: s.name)
def test_page_aug_from_every_state(seam: Seam, state: SeptState) -> None:
    """TDH.MEM.PAGE.AUG: FREE or REMOVED -> PENDING, the page PT_REG; else ENTRY_STATE_INCORRECT."""
    _at(seam, state, runnable=True)
    page = seam.alloc()
    out = seam.module.page_aug(seam.td, G, page)
    if state in (SeptState.FREE, SeptState.REMOVED):
        assert out.status == st.TDX_SUCCESS and out.done == 1
        assert seam.td.leaf_state(G) is SeptState.PENDING
        entry = seam.module.pamt_entry(page)
        assert entry is not None and entry.pt is PamtType.REG and entry.owner == seam.td.tdr
        assert entry.gfn_delta == G - page and entry.bepoch == 0
    else:
        assert (out.status, out.done, out.state) == (_incorrect(), 0, state)
        assert seam.td.leaf_state(G) is state and seam.module.pamt_entry(page) is None


@pytest.mark.parametrize("state", LEAF_STATES, ids=lambda s: s.name)
def test_page_add_from_every_state(seam: Seam, state: SeptState) -> None:
    """TDH.MEM.PAGE.ADD (before FINALIZE): FREE -> MAPPED with the source copied in and MRTD
    extended by the gpa; any other entry is ENTRY_STATE_INCORRECT."""
    _at(seam, state, runnable=False)
    page = seam.alloc()
    before = seam.td.chain.finalize()
    err = seam.module.page_add(seam.td, G, page, b"\xaa" * PAGE)
    if state is SeptState.FREE:
        assert err == st.TDX_SUCCESS
        assert seam.td.leaf_state(G) is SeptState.MAPPED
        assert seam.host.read(page, 0, 4) == b"\xaa" * 4
        assert seam.td.chain.finalize() != before
    else:
        assert err == _incorrect()
        assert seam.td.chain.finalize() == before


@pytest.mark.parametrize("state", LEAF_STATES, ids=lambda s: s.name)
def test_range_block_from_every_state(seam: Seam, state: SeptState) -> None:
    """TDH.MEM.RANGE.BLOCK: MAPPED/PENDING/*BLOCKEDW -> the blocked state, BEPOCH = TD epoch;
    already blocked is the warning GPA_RANGE_ALREADY_BLOCKED; else ENTRY_STATE_INCORRECT."""
    pfn = _at(seam, state, runnable=True)
    seam.module.mem_track(seam.td, 3)
    out = seam.module.range_block(seam.td, G)
    if state in ALLOWED["TDH.MEM.RANGE.BLOCK"]:
        assert out.status == st.TDX_SUCCESS
        assert seam.td.leaf_state(G) is BLOCKED_FROM[state]
        entry = seam.module.pamt_entry(pfn)
        assert entry is not None and entry.bepoch == seam.td.epoch
    elif state.any_blocked:
        assert out.status == st.with_operand(st.TDX_GPA_RANGE_ALREADY_BLOCKED, RCX)
        assert not out.status >> 63  # a warning, not an error
    else:
        assert out.status == _incorrect()
    if not out:
        assert seam.td.leaf_state(G) is state


@pytest.mark.parametrize("state", LEAF_STATES, ids=lambda s: s.name)
@pytest.mark.parametrize("runnable", [False, True], ids=["initialized", "runnable"])
def test_page_remove_from_every_state(seam: Seam, state: SeptState, runnable: bool) -> None:
    """TDH.MEM.PAGE.REMOVE: a mapped or pending leaf -> FREE, its page PT_NDA; while the TD
    runs it must be blocked (GPA_RANGE_NOT_BLOCKED) and tracked."""
    pfn = _at(seam, state, runnable=runnable)
    children = seam.td.chldcnt
    out = seam.module.page_remove(seam.td, G)
    if state not in ALLOWED["TDH.MEM.PAGE.REMOVE"]:
        assert out.status == _incorrect()
    elif runnable and not state.any_blocked:
        assert out.status == st.with_operand(st.TDX_GPA_RANGE_NOT_BLOCKED, RCX)
    else:
        assert out.status == st.TDX_SUCCESS
        assert seam.td.leaf_state(G) is SeptState.FREE and seam.module.pamt_entry(pfn) is None
        assert seam.td.chldcnt == children - 1
        return
    assert seam.td.leaf_state(G) is state


@pytest.mark.parametrize("state", LEAF_STATES, ids=lambda s: s.name)
def test_range_unblock_from_every_state(seam: Seam, state: SeptState) -> None:
    """TDH.MEM.RANGE.UNBLOCK (KVM never uses it): BLOCKED -> MAPPED, PENDING_BLOCKED -> PENDING."""
    _at(seam, state, runnable=True)
    out = seam.module.range_unblock(seam.td, G)
    if state in UNBLOCKED_FROM:
        assert out.status == st.TDX_SUCCESS and seam.td.leaf_state(G) is UNBLOCKED_FROM[state]
    else:
        assert out.status == _incorrect() and seam.td.leaf_state(G) is state


@pytest.mark.parametrize("state", LEAF_STATES, ids=lambda s: s.name)
def test_mr_extend_from_every_state(seam: Seam, state: SeptState) -> None:
    """TDH.MR.EXTEND measures a MAPPED page only; else EPT_ENTRY_NOT_PRESENT (no operand)."""
    _at(seam, state, runnable=False)
    err = seam.module.mr_extend(seam.td, (G << 12) + 256)
    expected = st.TDX_SUCCESS if state is SeptState.MAPPED else st.TDX_EPT_ENTRY_NOT_PRESENT
    assert err == expected


@pytest.mark.parametrize("state", LEAF_STATES, ids=lambda s: s.name)
def test_accept_from_every_state(seam: Seam, state: SeptState) -> None:
    """TDG.MEM.PAGE.ACCEPT (4 KiB): PENDING -> MAPPED and zeroed (PENDING_EXPORTED_DIRTY ->
    EXPORTED_DIRTY); a guest-accessible leaf is PAGE_ALREADY_ACCEPTED; anything else makes
    the TD exit with an EPT violation (``tdg_mem_page_accept``)."""
    pfn = _at(seam, state, runnable=True)
    seam.host.write(pfn, 0, b"old")
    out = seam.module.page_accept(seam.td, G)
    if state in ALLOWED["TDG.MEM.PAGE.ACCEPT"]:
        assert out.status == st.TDX_SUCCESS
        assert seam.td.leaf_state(G) in (SeptState.MAPPED, SeptState.EXPORTED_DIRTY)
        assert seam.host.is_zero(pfn)
    elif state.guest_accessible_leaf:
        assert out.status == st.TDX_PAGE_ALREADY_ACCEPTED
        assert seam.host.read(pfn, 0, 3) == b"old"
    else:
        assert out.status == EPT_VIOLATION


# --- walks, pages and operands ------------------------------------------------------------------------
def test_leaf_calls_need_the_whole_sept_walk(seam: Seam) -> None:
    """No S-EPT page table under the gpa: EPT_WALK_FAILED (KVM adds them with SEPT.ADD first)."""
    seam.finalize()
    walk_failed = st.with_operand(st.TDX_EPT_WALK_FAILED, RCX)
    assert seam.module.page_aug(seam.td, G, seam.alloc()).status == walk_failed
    assert seam.module.range_block(seam.td, G).status == walk_failed
    assert seam.module.page_remove(seam.td, G).status == walk_failed
    assert seam.module.page_accept(seam.td, G).status == EPT_VIOLATION


def test_sept_add_top_down_once(seam: Seam) -> None:
    """TDH.MEM.SEPT.ADD: a level-l entry needs the levels above; an entry takes one page,
    which becomes PT_EPT; a second add is ENTRY_STATE_INCORRECT, a page the module owns
    PAGE_METADATA_INCORRECT (R8), a level above the root OPERAND_INVALID."""
    m, td = seam.module, seam.td
    page = seam.alloc()
    assert m.sept_add(td, 1, G >> 9, page).status == st.with_operand(st.TDX_EPT_WALK_FAILED, RCX)
    assert m.sept_add(td, 3, G >> 27, seam.alloc()).status == st.TDX_SUCCESS
    assert m.sept_add(td, 2, G >> 18, seam.alloc()).status == st.TDX_SUCCESS
    assert m.sept_add(td, 1, G >> 9, page).status == st.TDX_SUCCESS
    entry = m.pamt_entry(page)
    assert entry is not None and entry.pt is PamtType.EPT
    out = m.sept_add(td, 1, G >> 9, seam.alloc())
    assert (out.status, out.state) == (_incorrect(), SeptState.NL_MAPPED)
    busy = m.sept_add(td, 1, (G >> 9) + 1, page)
    assert busy.status == st.with_operand(st.TDX_PAGE_METADATA_INCORRECT, st.OPERAND_ID_R8)
    assert m.sept_add(td, 4, 0, seam.alloc()).status == st.with_operand(st.TDX_OPERAND_INVALID, RCX)
    assert td.table_pages() == 3


def test_five_level_sept_has_one_more_level() -> None:
    """GPAW 52: the shared bit is 51, and the walk needs a PML4 page (level 4)."""
    seam = Seam(gpaw52=True)
    td = seam.td
    assert (td.top_level, td.shared_bit) == (4, 51)
    high = 1 << (48 - 12)  # above GPAW 48, private with GPAW 52
    seam.link(high)
    assert td.table_pages() == 4
    seam.finalize()
    assert seam.module.page_aug(td, high, seam.alloc())


def test_aug_needs_a_free_page_and_a_private_gpa(seam: Seam) -> None:
    """AUG of a page the module owns: PAGE_METADATA_INCORRECT (R8); of a shared gpa (bit 47
    set) or one above GPAW: OPERAND_INVALID (RCX)."""
    seam.link(G)
    seam.finalize()
    m, td = seam.module, seam.td
    owned = seam.td.tdcs[0]
    assert m.page_aug(td, G, owned).status == st.with_operand(
        st.TDX_PAGE_METADATA_INCORRECT, st.OPERAND_ID_R8
    )
    shared = G | 1 << (47 - 12)
    assert m.page_aug(td, shared, seam.alloc()).status == st.with_operand(st.TDX_OPERAND_INVALID, RCX)
    assert m.page_accept(td, shared).status == st.with_operand(st.TDX_OPERAND_INVALID, RCX)


def test_op_state_decides_who_may_map(seam: Seam) -> None:
    """PAGE.ADD and MR.EXTEND only before FINALIZE, TRACK/BLOCK/REMOVE/AUG before and
    after (``op_state_lookup.c``): wrong state is OP_STATE_INCORRECT."""
    seam.link(G, 2)
    m, td = seam.module, seam.td
    assert m.page_add(td, G, seam.alloc(), bytes(PAGE)) == st.TDX_SUCCESS
    assert m.page_aug(td, G + 1, seam.alloc())  # the module allows AUG before finalize
    seam.finalize()
    assert td.op_state is OpState.RUNNABLE and td.mrtd is not None
    assert m.page_add(td, G + 2, seam.alloc(), bytes(PAGE)) == st.TDX_OP_STATE_INCORRECT
    assert m.mr_extend(td, G << 12) == st.TDX_OP_STATE_INCORRECT
    assert m.mr_finalize(td) == st.TDX_OP_STATE_INCORRECT


# --- TLB tracking ----------------------------------------------------------------------------------------
def test_remove_needs_block_then_track(seam: Seam) -> None:
    """The dynamic page removal of a running TD: BLOCK records BEPOCH; REMOVE before a TRACK
    advanced the epoch is TLB_TRACKING_NOT_DONE; after it the page is PT_NDA."""
    seam.link(G)
    seam.finalize()
    m, td = seam.module, seam.td
    page = seam.alloc()
    assert m.page_aug(td, G, page)
    assert m.page_accept(td, G)
    assert m.page_remove(td, G).status == st.with_operand(st.TDX_GPA_RANGE_NOT_BLOCKED, RCX)
    assert m.range_block(td, G)
    out = m.page_remove(td, G)
    assert (out.status, out.state) == (st.with_operand(st.TDX_TLB_TRACKING_NOT_DONE, RCX), SeptState.BLOCKED)
    epoch = td.epoch
    assert m.mem_track(td)
    assert td.epoch == epoch + 1
    assert m.page_remove(td, G)
    assert td.leaf_state(G) is SeptState.FREE and m.pamt_entry(page) is None


def test_unblock_also_waits_for_tracking(seam: Seam) -> None:
    seam.link(G)
    seam.finalize()
    m, td = seam.module, seam.td
    assert m.page_aug(td, G, seam.alloc())
    assert m.range_block(td, G)
    assert m.range_unblock(td, G).status == st.with_operand(st.TDX_TLB_TRACKING_NOT_DONE, RCX)
    assert m.mem_track(td)
    assert m.range_unblock(td, G)
    assert td.leaf_state(G) is SeptState.PENDING


def test_block_of_a_page_table_entry(seam: Seam) -> None:
    """RANGE.BLOCK at level 1 blocks the 2 MiB entry that holds a page table (NL_MAPPED ->
    NL_BLOCKED; again: ALREADY_BLOCKED); a FREE 2 MiB entry is ENTRY_STATE_INCORRECT."""
    seam.link(G)
    seam.finalize()
    m, td = seam.module, seam.td
    chunk = G & ~511
    assert m.range_block(td, chunk, level=1)
    assert td.table(1).get(chunk >> 9) is not None and td.table(1).get(chunk >> 9)[1]  # type: ignore[index]
    again = m.range_block(td, chunk, level=1)
    assert again.status == st.with_operand(st.TDX_GPA_RANGE_ALREADY_BLOCKED, RCX)
    other = m.range_block(td, chunk + 512, level=1)
    assert other.status == _incorrect()


# --- 2 MiB and 1 GiB ACCEPT --------------------------------------------------------------------------
def test_accept_sizes(seam: Seam) -> None:
    """With 4 KiB leaves only: a 2 MiB ACCEPT over a page table is PAGE_SIZE_MISMATCH (detail:
    the level), over a FREE 2 MiB entry an EPT violation; 1 GiB and a misaligned 2 MiB
    request are OPERAND_INVALID (the module takes levels 0 and 1)."""
    seam.finalize()
    m, td = seam.module, seam.td
    chunk = G & ~511
    assert m.page_accept(td, chunk, 1).status == EPT_VIOLATION
    seam.link(chunk)
    assert m.page_accept(td, chunk, 1).status == st.with_operand(st.TDX_PAGE_SIZE_MISMATCH, 1)
    assert m.page_accept(td, chunk + 1, 1).status == st.with_operand(st.TDX_OPERAND_INVALID, RCX)
    assert m.page_accept(td, 0, 2).status == st.with_operand(st.TDX_OPERAND_INVALID, RCX)


# --- batches stand for single calls ------------------------------------------------------------------
def test_batched_aug_block_remove_equal_single_calls() -> None:
    """A batch of n calls leaves the module as n single calls do, and counts n calls."""
    batched, single = Seam(), Seam()
    for seam in (batched, single):
        seam.link(G, 600)
        seam.finalize()
    n = 600
    bpage, spage = batched.alloc(n), single.alloc(n)
    assert batched.module.page_aug(batched.td, G, bpage, n).done == n
    for i in range(n):
        assert single.module.page_aug(single.td, G + i, spage + i)
    assert batched.module.range_block(batched.td, G, n).done == n
    for i in range(n):
        assert single.module.range_block(single.td, G + i)
    for seam in (batched, single):
        seam.module.mem_track(seam.td)
    assert batched.module.page_remove(batched.td, G, n).done == n
    for i in range(n):
        assert single.module.page_remove(single.td, G + i)
    for leaf in ("TDH.MEM.PAGE.AUG", "TDH.MEM.RANGE.BLOCK", "TDH.MEM.PAGE.REMOVE"):
        assert batched.module.stats[leaf] == single.module.stats[leaf] == n
    assert not batched.td.leaves and not single.td.leaves
    assert batched.td.chldcnt == single.td.chldcnt


def test_a_batch_stops_at_the_first_call_that_fails(seam: Seam) -> None:
    """The calls before the failing one took effect; the one after were never issued."""
    seam.link(G, 8)
    seam.finalize()
    m, td = seam.module, seam.td
    pages = seam.alloc(8)
    seam.module.sept_write(td, G + 5, SeptState.MAPPED, seam.alloc())
    out = m.page_aug(td, G, pages, 8)
    assert (out.status, out.done, out.state, out.calls) == (_incorrect(), 5, SeptState.MAPPED, 6)
    assert [td.leaf_state(G + i) for i in range(7)] == [SeptState.PENDING] * 5 + [
        SeptState.MAPPED,
        SeptState.FREE,
    ]
    assert m.stats["TDH.MEM.PAGE.AUG"] == 6


def test_injected_status_changes_nothing(seam: Seam) -> None:
    """A lock a TD vCPU holds (TDX_OPERAND_BUSY) fails the call without effect."""
    seam.link(G)
    seam.finalize()
    seam.module.inject("TDH.MEM.PAGE.AUG", st.TDX_OPERAND_BUSY)
    out = seam.module.page_aug(seam.td, G, seam.alloc())
    assert st.is_busy(out.status) and seam.td.leaf_state(G) is SeptState.FREE
    assert seam.module.page_aug(seam.td, G, seam.alloc())


def test_every_change_is_an_ownership_event(seam: Seam) -> None:
    """S-EPT (by gfn) and PAMT (by pfn) changes reach on_change once per run."""
    seam.link(G, 4)
    seam.finalize()
    seam.events.clear()
    pages = seam.alloc(4)
    assert seam.module.page_aug(seam.td, G, pages, 4)
    assert ("sept", G, 4, None, SeptState.PENDING) in seam.events
    pamt = [e for e in seam.events if e[0] == "pamt"]
    assert [(e[1], e[2], e[3]) for e in pamt] == [(pages, 4, None)]
    assert pamt[0][4].pt is PamtType.REG


# --- the TD's life: keys, vCPUs, finalize, release, reclaim --------------------------------------
def test_td_build_errors() -> None:
    """MNG.INIT before every TDCS page: TDCS_NOT_ALLOCATED; a second KEY.CONFIG on a package:
    KEY_CONFIGURED; VP.INIT short of TDCX pages: TDCX_NUM_INCORRECT; MR.FINALIZE with no
    vCPU: NO_VCPUS."""
    seam = Seam()
    m = seam.module
    err, td = m.mng_create(seam.alloc(), 40)
    assert err == st.TDX_SUCCESS and td is not None
    assert td.lifecycle is Lifecycle.HKID_ASSIGNED
    assert m.mng_addcx(td, seam.alloc()) == st.TDX_TD_KEYS_NOT_CONFIGURED
    assert m.mng_key_config(td, 0) == st.TDX_SUCCESS
    assert m.mng_key_config(td, 0) == st.TDX_KEY_CONFIGURED
    assert m.mng_key_config(td, 1) == st.TDX_SUCCESS
    assert td.lifecycle is Lifecycle.KEYS_CONFIGURED
    assert m.mng_addcx(td, seam.alloc()) == st.TDX_SUCCESS
    assert m.mng_init(td, 0, 3, False) == st.TDX_TDCS_NOT_ALLOCATED
    for _ in range(5):
        assert m.mng_addcx(td, seam.alloc()) == st.TDX_SUCCESS
    assert m.mng_init(td, 0, 3, False) == st.TDX_SUCCESS
    assert m.mr_finalize(td) == st.TDX_NO_VCPUS
    err, vp = m.vp_create(td, seam.alloc())
    assert err == st.TDX_SUCCESS and vp is not None
    assert m.vp_init(vp) == st.TDX_TDCX_NUM_INCORRECT
    dup, _ = m.mng_create(seam.alloc(), 40)
    assert dup == st.with_operand(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RDX)  # HKID in the KOT


def test_hkid_release_order(seam: Seam) -> None:
    """VPFLUSHDONE needs every vCPU flushed, KEY.FREEID needs VPFLUSHDONE and CACHE.WB on
    every package; then the TD is in TEARDOWN and its HKID free in the KOT."""
    m, td, vp = seam.module, seam.td, seam.vp
    assert m.mng_key_freeid(td) == st.TDX_LIFECYCLE_STATE_INCORRECT
    assert m.mng_vpflushdone(td) == st.TDX_FLUSHVP_NOT_DONE
    assert m.vp_flush(vp) == st.TDX_SUCCESS
    assert m.vp_flush(vp) == st.TDX_VCPU_NOT_ASSOCIATED
    assert m.mng_vpflushdone(td) == st.TDX_SUCCESS
    assert td.lifecycle is Lifecycle.BLOCKED
    assert m.page_aug(td, G, seam.alloc()).status == st.TDX_TD_KEYS_NOT_CONFIGURED
    assert m.phymem_cache_wb(0) == st.TDX_SUCCESS
    assert m.mng_key_freeid(td) == st.TDX_WBCACHE_NOT_COMPLETE
    assert m.phymem_cache_wb(1) == st.TDX_SUCCESS
    assert m.phymem_cache_wb(1) == st.TDX_NO_HKID_READY_TO_WBCACHE
    assert m.mng_key_freeid(td) == st.TDX_SUCCESS
    assert td.lifecycle is Lifecycle.TEARDOWN and td.hkid not in m.kot


def test_reclaim_only_in_teardown_and_the_tdr_last(seam: Seam) -> None:
    """TDH.PHYMEM.PAGE.RECLAIM: PT_NDA is PAGE_METADATA_INCORRECT; a page of a live TD
    LIFECYCLE_STATE_INCORRECT; the TDR while the TD owns pages TD_ASSOCIATED_PAGES_EXIST."""
    m, td, vp = seam.module, seam.td, seam.vp
    seam.link(G)
    page = seam.alloc()
    assert m.page_add(td, G, page, bytes(PAGE)) == st.TDX_SUCCESS
    assert m.page_reclaim(seam.alloc()).status == st.with_operand(st.TDX_PAGE_METADATA_INCORRECT, RCX)
    assert m.page_reclaim(page).status == st.TDX_LIFECYCLE_STATE_INCORRECT
    m.vp_flush(vp)
    m.mng_vpflushdone(td)
    m.phymem_cache_wb(0)
    m.phymem_cache_wb(1)
    assert m.mng_key_freeid(td) == st.TDX_SUCCESS
    assert m.page_reclaim(td.tdr).status == st.TDX_TD_ASSOCIATED_PAGES_EXIST
    owned = [(s, e) for s, e, entry in m.pamt.items() if entry.pt is not PamtType.TDR]
    for s, e in owned:
        assert m.page_reclaim(s, e - s)
    assert td.chldcnt == 0 and not td.leaves and not td.table_pages()
    assert m.page_reclaim(td.tdr)
    assert not m.pamt and td.tdr not in m.tds


def test_a_fatal_td_refuses_every_td_call(seam: Seam) -> None:
    """After a machine check in its memory the TD is fatal: TDX_TD_FATAL for S-EPT calls."""
    seam.link(G)
    seam.finalize()
    seam.td.fatal = True
    assert seam.module.page_aug(seam.td, G, seam.alloc()).status == st.TDX_TD_FATAL
    assert seam.module.mem_track(seam.td).status == st.TDX_TD_FATAL


def test_mrtd_chain_blocks() -> None:
    """MRTD is SHA-384 over 128-byte blocks: 'MEM.PAGE.ADD' + gpa, 'MR.EXTEND' + gpa + 256 B."""
    import hashlib

    chain = MrtdChain()
    chain.page_add(0x1000)
    chain.mr_extend(0x1000, b"\x01" * 256)
    block = b"MEM.PAGE.ADD".ljust(16, b"\0") + (0x1000).to_bytes(8, "little") + bytes(104)
    ext = b"MR.EXTEND".ljust(16, b"\0") + (0x1000).to_bytes(8, "little") + bytes(104) + b"\x01" * 256
    assert chain.finalize() == hashlib.sha384(block + ext).digest()
    with pytest.raises(ValueError, match="256"):
        chain.mr_extend(0, b"short")
