"""The RMP table and its state machine (backends.md 2.2), without the core model.

Every transition of the table in section 2.2 and every illegal one is tested with the
outcome the spec gives: the instruction's return code, or an RMP #NPF for guest checks.
A per-page reference model checks the range-based table under random operation
sequences.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestmem.uapi import PAGE_SHIFT, PG_LEVEL_2M, PG_LEVEL_4K
from guestmem_snp.rmp import (
    FAIL_INPUT,
    FAIL_OVERLAP,
    FAIL_PERMISSION,
    PTRS_PER_PMD,
    PVALIDATE_FAIL_INPUT,
    PVALIDATE_FAIL_NOUPDATE,
    PVALIDATE_FAIL_SIZEMISMATCH,
    RMP_SUCCESS,
    RmpState,
    RmpTable,
    RmpViolation,
)

ASID = 5
GPA = 0x4000_0000  # 2 MiB aligned
GFN = GPA >> PAGE_SHIFT
PFN = 0x10_0000  # 2 MiB aligned
GIB = 1 << 30


def guest_invalid_4k(rmp: RmpTable, pfn: int = PFN, gfn: int = GFN) -> None:
    assert rmp.make_private(pfn, gfn << PAGE_SHIFT, PG_LEVEL_4K, ASID, immutable=False) == RMP_SUCCESS


def guest_invalid_2m(rmp: RmpTable, pfn: int = PFN, gfn: int = GFN) -> None:
    assert rmp.make_private(pfn, gfn << PAGE_SHIFT, PG_LEVEL_2M, ASID, immutable=False) == RMP_SUCCESS


# --- Hypervisor -> Guest-Invalid (rmp_make_private in sev_gmem_prepare) ----------------------
def test_hypervisor_to_guest_invalid_4k() -> None:
    """2.2 row 1: RMPUPDATE assigns the page, not validated, to the ASID and gpa."""
    rmp = RmpTable()
    assert rmp.lookup(PFN).state is RmpState.HYPERVISOR
    guest_invalid_4k(rmp)
    entry = rmp.lookup(PFN)
    assert entry.state is RmpState.GUEST_INVALID
    assert (entry.asid, entry.gpa, entry.level, entry.immutable) == (ASID, GPA, PG_LEVEL_4K, False)
    assert not rmp.is_assigned(PFN + 1)


def test_hypervisor_to_guest_invalid_2m_covers_every_subpage() -> None:
    """2.2: a 2M entry is authoritative for its 512 subpages (lookup returns the 2M entry)."""
    rmp = RmpTable()
    guest_invalid_2m(rmp)
    for sub in (0, 1, 511):
        entry = rmp.lookup(PFN + sub)
        assert (entry.pfn, entry.gpa, entry.level) == (PFN, GPA, PG_LEVEL_2M)
        assert entry.state is RmpState.GUEST_INVALID
    assert not rmp.is_assigned(PFN + 512)


@pytest.mark.parametrize(("pfn", "gpa"), [(PFN + 1, GPA), (PFN, GPA + 4096)])
def test_2m_update_needs_2m_aligned_pfn_and_gpa(pfn: int, gpa: int) -> None:
    """2.2 row 1: gpa/pfn 2M-aligned for a 2M entry, else RMPUPDATE FAIL_INPUT."""
    rmp = RmpTable()
    assert rmp.make_private(pfn, gpa, PG_LEVEL_2M, ASID, immutable=False) == FAIL_INPUT
    assert len(rmp) == 0


def test_2m_update_over_an_assigned_subpage_overlaps() -> None:
    """RMPUPDATE 2M with an assigned 4K entry behind the head: FAIL_OVERLAP, nothing changed."""
    rmp = RmpTable()
    guest_invalid_4k(rmp, PFN + 7, GFN + 7)
    assert rmp.make_private(PFN, GPA, PG_LEVEL_2M, ASID, immutable=False) == FAIL_OVERLAP
    assert not rmp.is_assigned(PFN)
    assert rmp.lookup(PFN + 7).level == PG_LEVEL_4K


def test_2m_update_overwrites_an_assigned_head_entry() -> None:
    """Only the 511 entries behind the head are checked for overlap (4K x 512 -> 2M)."""
    rmp = RmpTable()
    guest_invalid_4k(rmp)
    guest_invalid_2m(rmp)
    assert rmp.lookup(PFN + 3).level == PG_LEVEL_2M


def test_4k_update_inside_an_assigned_2m_page_overlaps() -> None:
    """RMPUPDATE 4K of a subpage of an assigned 2M entry: FAIL_OVERLAP (PSMASH first)."""
    rmp = RmpTable()
    guest_invalid_2m(rmp)
    assert rmp.make_shared(PFN + 3) == FAIL_OVERLAP
    assert rmp.make_shared(PFN) == FAIL_OVERLAP
    assert rmp.lookup(PFN + 3).level == PG_LEVEL_2M


def test_bad_level_is_fail_input() -> None:
    rmp = RmpTable()
    assert rmp.make_private(PFN, GPA, 3, ASID, immutable=False) == FAIL_INPUT


# --- Guest-Invalid <-> Guest-Valid (PVALIDATE) -----------------------------------------------
def test_pvalidate_guest_invalid_to_guest_valid_and_back() -> None:
    """2.2 row 2: PVALIDATE by the owning guest at the matching gpa validates; rescinding clears."""
    rmp = RmpTable()
    guest_invalid_4k(rmp)
    assert rmp.pvalidate(PFN, GFN, ASID, PG_LEVEL_4K, True) == 0
    assert rmp.lookup(PFN).state is RmpState.GUEST_VALID
    assert rmp.pvalidate(PFN, GFN, ASID, PG_LEVEL_4K, False) == 0
    assert rmp.lookup(PFN).state is RmpState.GUEST_INVALID


def test_pvalidate_twice_is_noupdate() -> None:
    """PVALIDATE that does not change validated sets CF: PVALIDATE_FAIL_NOUPDATE."""
    rmp = RmpTable()
    guest_invalid_4k(rmp)
    assert rmp.pvalidate(PFN, GFN, ASID, PG_LEVEL_4K, False) == PVALIDATE_FAIL_NOUPDATE
    assert rmp.pvalidate(PFN, GFN, ASID, PG_LEVEL_4K, True) == 0
    assert rmp.pvalidate(PFN, GFN, ASID, PG_LEVEL_4K, True) == PVALIDATE_FAIL_NOUPDATE


@pytest.mark.parametrize(
    ("pfn", "gfn", "asid", "why"),
    [
        (PFN + 1, GFN + 1, ASID, "not assigned"),
        (PFN, GFN, ASID + 1, "ASID"),
        (PFN, GFN + 1, ASID, "gpa"),
    ],
)
def test_pvalidate_rmp_check_failures_are_npf(pfn: int, gfn: int, asid: int, why: str) -> None:
    """2.2 illegal access: unassigned, wrong ASID or wrong gpa -> #NPF with the RMP bit."""
    rmp = RmpTable()
    guest_invalid_4k(rmp)
    with pytest.raises(RmpViolation, match=why) as info:
        rmp.pvalidate(pfn, gfn, asid, PG_LEVEL_4K, True)
    assert not info.value.size_mismatch
    assert rmp.lookup(PFN).state is RmpState.GUEST_INVALID


def test_pvalidate_4k_inside_2m_entry_is_size_mismatch_npf() -> None:
    """2.2: 4K PVALIDATE under a 2M entry -> #NPF PFERR_GUEST_SIZEM (KVM then PSMASHes)."""
    rmp = RmpTable()
    guest_invalid_2m(rmp)
    with pytest.raises(RmpViolation) as info:
        rmp.pvalidate(PFN + 5, GFN + 5, ASID, PG_LEVEL_4K, True)
    assert info.value.size_mismatch
    assert rmp.psmash(PFN) == RMP_SUCCESS
    assert rmp.pvalidate(PFN + 5, GFN + 5, ASID, PG_LEVEL_4K, True) == 0
    assert rmp.lookup(PFN + 5).validated and not rmp.lookup(PFN + 4).validated


def test_pvalidate_2m_on_4k_entries_is_sizemismatch() -> None:
    """2M PVALIDATE over 4K RMP entries: PVALIDATE_FAIL_SIZEMISMATCH (guest falls back to 4K)."""
    rmp = RmpTable()
    assert rmp.make_private(PFN, GPA, PG_LEVEL_4K, ASID, immutable=False, npages=512) == RMP_SUCCESS
    assert rmp.pvalidate(PFN, GFN, ASID, PG_LEVEL_2M, True) == PVALIDATE_FAIL_SIZEMISMATCH
    assert not rmp.lookup(PFN).validated


def test_pvalidate_2m_needs_alignment() -> None:
    rmp = RmpTable()
    guest_invalid_2m(rmp)
    assert rmp.pvalidate(PFN + 1, GFN + 1, ASID, PG_LEVEL_2M, True) == PVALIDATE_FAIL_INPUT
    with pytest.raises(RmpViolation):  # gpa aligned, pfn inside the 2M page: gpa mismatch
        rmp.pvalidate(PFN + 1, GFN, ASID, PG_LEVEL_2M, True)
    assert rmp.pvalidate(PFN, GFN, ASID, PG_LEVEL_2M, True) == 0
    assert all(rmp.lookup(PFN + i).validated for i in (0, 200, 511))


def test_rmpupdate_clears_validated() -> None:
    """2.2 row 3: any RMPUPDATE clears validated; the guest must PVALIDATE again."""
    rmp = RmpTable()
    guest_invalid_4k(rmp)
    rmp.pvalidate(PFN, GFN, ASID, PG_LEVEL_4K, True)
    guest_invalid_4k(rmp)
    assert rmp.lookup(PFN).state is RmpState.GUEST_INVALID


# --- Pre-Guest (launch) -------------------------------------------------------------------
def test_hypervisor_to_pre_guest_to_guest_valid() -> None:
    """2.2 rows 4-5: rmp_make_private(immutable) then LAUNCH_UPDATE -> Guest-Valid, not immutable."""
    rmp = RmpTable()
    assert rmp.make_private(PFN, GPA, PG_LEVEL_4K, ASID, immutable=True) == RMP_SUCCESS
    assert rmp.lookup(PFN).state is RmpState.PRE_GUEST
    assert rmp.launch_update(PFN) == RMP_SUCCESS
    entry = rmp.lookup(PFN)
    assert entry.state is RmpState.GUEST_VALID and not entry.immutable


def test_pre_guest_is_immutable_for_the_host_and_the_guest() -> None:
    """Immutable entries: RMPUPDATE FAIL_PERMISSION; guest PVALIDATE -> #NPF."""
    rmp = RmpTable()
    rmp.make_private(PFN, GPA, PG_LEVEL_4K, ASID, immutable=True)
    assert rmp.make_shared(PFN) == FAIL_PERMISSION
    assert rmp.make_private(PFN, GPA, PG_LEVEL_4K, ASID, immutable=False) == FAIL_PERMISSION
    with pytest.raises(RmpViolation, match="immutable"):
        rmp.pvalidate(PFN, GFN, ASID, PG_LEVEL_4K, True)
    assert rmp.lookup(PFN).state is RmpState.PRE_GUEST


@pytest.mark.parametrize("setup", ["unassigned", "guest-invalid", "firmware", "2m"])
def test_launch_update_needs_pre_guest_4k_pages(setup: str) -> None:
    """LAUNCH_UPDATE of anything but a 4K Pre-Guest page fails; nothing changes."""
    rmp = RmpTable()
    if setup == "guest-invalid":
        guest_invalid_4k(rmp)
    elif setup == "firmware":
        rmp.mark_firmware(PFN)
    elif setup == "2m":
        rmp.make_private(PFN, GPA, PG_LEVEL_2M, ASID, immutable=True)
    before = rmp.lookup(PFN)
    assert rmp.launch_update(PFN) == FAIL_INPUT
    assert rmp.lookup(PFN) == before


def test_launch_update_is_all_or_nothing_over_a_range() -> None:
    rmp = RmpTable()
    rmp.make_private(PFN, GPA, PG_LEVEL_4K, ASID, immutable=True, npages=3)
    assert rmp.launch_update(PFN, 4) == FAIL_INPUT
    assert rmp.lookup(PFN).state is RmpState.PRE_GUEST
    assert rmp.launch_update(PFN, 3) == RMP_SUCCESS
    assert rmp.lookup(PFN + 2).state is RmpState.GUEST_VALID


def test_failed_launch_page_is_reclaimed() -> None:
    """2.2 row 5 failure: snp_page_reclaim() = PAGE_RECLAIM + rmp_make_shared."""
    rmp = RmpTable()
    rmp.make_private(PFN, GPA, PG_LEVEL_4K, ASID, immutable=True)
    assert rmp.page_reclaim(PFN) == RMP_SUCCESS
    assert rmp.lookup(PFN).state is RmpState.RECLAIM
    assert rmp.make_shared(PFN) == RMP_SUCCESS
    assert rmp.lookup(PFN).state is RmpState.HYPERVISOR


def test_page_reclaim_of_unassigned_page_fails() -> None:
    assert RmpTable().page_reclaim(PFN) == FAIL_INPUT


# --- assigned -> Hypervisor (rmp_make_shared in sev_gmem_invalidate) ---------------------------
def test_guest_valid_to_hypervisor() -> None:
    rmp = RmpTable()
    guest_invalid_4k(rmp)
    rmp.pvalidate(PFN, GFN, ASID, PG_LEVEL_4K, True)
    assert rmp.make_shared(PFN) == RMP_SUCCESS
    assert rmp.lookup(PFN).state is RmpState.HYPERVISOR
    assert len(rmp) == 0


def test_2m_make_shared_of_a_2m_entry() -> None:
    rmp = RmpTable()
    guest_invalid_2m(rmp)
    assert rmp.make_shared(PFN, PG_LEVEL_2M) == RMP_SUCCESS
    assert not rmp.any_assigned(PFN, 512)


def test_2m_make_shared_over_4k_entries_overlaps() -> None:
    rmp = RmpTable()
    rmp.make_private(PFN, GPA, PG_LEVEL_4K, ASID, immutable=False, npages=512)
    assert rmp.make_shared(PFN, PG_LEVEL_2M) == FAIL_OVERLAP
    assert rmp.make_shared(PFN, PG_LEVEL_4K, npages=512) == RMP_SUCCESS


# --- PSMASH -------------------------------------------------------------------------------
def test_psmash_preserves_every_field_per_subpage() -> None:
    """2.2 row 7: 2M -> 512 x 4K keeps validated, ASID and each subpage's gpa."""
    rmp = RmpTable()
    guest_invalid_2m(rmp)
    rmp.pvalidate(PFN, GFN, ASID, PG_LEVEL_2M, True)
    assert rmp.psmash(PFN) == RMP_SUCCESS
    for sub in (0, 1, 300, 511):
        entry = rmp.lookup(PFN + sub)
        want = (PFN + sub, PG_LEVEL_4K, GPA + sub * 4096, ASID)
        assert (entry.pfn, entry.level, entry.gpa, entry.asid) == want
        assert entry.state is RmpState.GUEST_VALID
    assert rmp.make_shared(PFN + 3) == RMP_SUCCESS
    assert rmp.is_assigned(PFN + 2) and not rmp.is_assigned(PFN + 3)


@pytest.mark.parametrize("setup", ["unaligned", "4k", "unassigned"])
def test_psmash_illegal(setup: str) -> None:
    rmp = RmpTable()
    pfn = PFN
    if setup == "unaligned":
        guest_invalid_2m(rmp)
        pfn = PFN + 1
    elif setup == "4k":
        guest_invalid_4k(rmp)
    before = rmp.lookup(PFN)
    assert rmp.psmash(pfn) == FAIL_INPUT
    assert rmp.lookup(PFN) == before


# --- firmware pages -------------------------------------------------------------------------
def test_firmware_page_lifecycle() -> None:
    """2.2 last row: firmware pages are immutable; only PAGE_RECLAIM frees them."""
    rmp = RmpTable()
    assert rmp.mark_firmware(PFN, 2) == RMP_SUCCESS
    assert rmp.lookup(PFN + 1).state is RmpState.FIRMWARE
    assert rmp.make_shared(PFN) == FAIL_PERMISSION
    assert rmp.mark_firmware(PFN + 1) == FAIL_OVERLAP
    with pytest.raises(RmpViolation):
        rmp.pvalidate(PFN, 0, 0, PG_LEVEL_4K, True)
    assert rmp.page_reclaim(PFN, 2) == RMP_SUCCESS
    assert rmp.make_shared(PFN, npages=2) == RMP_SUCCESS
    assert len(rmp) == 0


# --- scale and notifications -----------------------------------------------------------------
def test_64_gib_costs_a_few_ranges() -> None:
    """A 64 GiB guest assigned in 2M entries is one range; PSMASH of one block adds two."""
    rmp = RmpTable()
    npages = 64 * GIB >> PAGE_SHIFT
    assert rmp.make_private(PFN, GPA, PG_LEVEL_2M, ASID, immutable=False, npages=npages) == RMP_SUCCESS
    assert len(rmp) == 1 and rmp.assigned_pages(ASID) == npages
    assert rmp.pvalidate(PFN, GFN, ASID, PG_LEVEL_2M, True, count=npages // 512) == 0
    assert len(rmp) == 1
    assert rmp.psmash(PFN + 512 * 1000) == RMP_SUCCESS
    assert len(rmp) == 3
    assert rmp.lookup(PFN + 512 * 1000 + 7).gpa == GPA + (512 * 1000 + 7) * 4096


def test_on_change_reports_uniform_runs() -> None:
    changes: list[tuple[int, int, Any, Any]] = []
    rmp = RmpTable(on_change=lambda pfn, n, old, new: changes.append((pfn, n, old, new)))
    guest_invalid_4k(rmp)
    rmp.make_shared(PFN, npages=2)
    assert [(c[0], c[1], c[2] is None, c[3] is None) for c in changes] == [
        (PFN, 1, True, False),
        (PFN, 1, False, True),
    ]


def test_pvalidate_batch_applies_the_prefix_before_a_failure() -> None:
    """A batch stands for consecutive instructions: those before the failing one took effect."""
    rmp = RmpTable()
    rmp.make_private(PFN, GPA, PG_LEVEL_4K, ASID, immutable=False, npages=4)
    rmp.pvalidate(PFN + 2, GFN + 2, ASID, PG_LEVEL_4K, True)
    assert rmp.pvalidate(PFN, GFN, ASID, PG_LEVEL_4K, True, count=4) == PVALIDATE_FAIL_NOUPDATE
    assert [rmp.lookup(PFN + i).validated for i in range(4)] == [True, True, True, False]
    with pytest.raises(RmpViolation):
        rmp.pvalidate(PFN + 3, GFN + 3, ASID, PG_LEVEL_4K, True, count=2)
    assert rmp.lookup(PFN + 3).validated


# --- a per-page reference model under random operations ----------------------------------------
WINDOW = 4 * PTRS_PER_PMD  # pfns 0..2047 (four 2M blocks)


class PerPageRmp:
    """The same semantics, one dict entry per 4K page: slow and obviously right."""

    def __init__(self) -> None:
        # pfn -> [asid, gfn, level, validated, immutable]
        self.pages: dict[int, list[Any]] = {}

    def rmpupdate(self, pfn: int, assigned: bool, level: int, gfn: int, *, asid: int, immutable: bool) -> int:
        n = 512 if level == PG_LEVEL_2M else 1
        if level == PG_LEVEL_2M and (pfn % 512 or (assigned and gfn % 512)):
            return FAIL_INPUT
        for p in range(pfn, pfn + n):
            cur = self.pages.get(p)
            if cur is None:
                continue
            if cur[4]:
                return FAIL_PERMISSION
            if level == PG_LEVEL_4K and cur[2] == PG_LEVEL_2M:
                return FAIL_OVERLAP
            if level == PG_LEVEL_2M and cur[2] == PG_LEVEL_4K and p != pfn:
                return FAIL_OVERLAP
        for i, p in enumerate(range(pfn, pfn + n)):
            if assigned:
                self.pages[p] = [asid, gfn + i, level, False, immutable]
            else:
                self.pages.pop(p, None)
        return 0

    def psmash(self, pfn: int) -> int:
        cur = self.pages.get(pfn)
        if pfn % 512 or cur is None or cur[2] != PG_LEVEL_2M:
            return FAIL_INPUT
        for p in range(pfn, pfn + 512):
            self.pages[p][2] = PG_LEVEL_4K
        return 0

    def pvalidate(self, pfn: int, gfn: int, asid: int, level: int, validate: bool) -> int | str:
        n = 512 if level == PG_LEVEL_2M else 1
        if level == PG_LEVEL_2M and gfn % 512:
            return PVALIDATE_FAIL_INPUT
        for i, p in enumerate(range(pfn, pfn + n)):
            cur = self.pages.get(p)
            if cur is None or cur[0] != asid or cur[1] != gfn + i or cur[4]:
                return "npf"
            if level == PG_LEVEL_4K and cur[2] == PG_LEVEL_2M:
                return "npf"
            if level == PG_LEVEL_2M and (cur[2] == PG_LEVEL_4K or pfn % 512):
                return PVALIDATE_FAIL_SIZEMISMATCH
        if self.pages[pfn][3] == validate:
            return PVALIDATE_FAIL_NOUPDATE
        for p in range(pfn, pfn + n):
            self.pages[p][3] = validate
        return 0

    def level_run(self, pfn: int, npages: int) -> int:
        def level(p: int) -> int:
            cur = self.pages.get(p)
            return PG_LEVEL_4K if cur is None else int(cur[2])

        n = 1
        while n < npages and level(pfn + n) == level(pfn):
            n += 1
        return n

    def snapshot(self, p: int) -> tuple[Any, ...]:
        cur = self.pages.get(p)
        if cur is None:
            return (False,)
        asid, gfn, level, validated, immutable = cur
        base = p - p % 512 if level == PG_LEVEL_2M else p
        base_gfn = gfn - (p - base)
        return (True, base, asid, base_gfn << PAGE_SHIFT, level, validated, immutable)


def table_snapshot(rmp: RmpTable, p: int) -> tuple[Any, ...]:
    e = rmp.lookup(p)
    if not e.assigned:
        return (False,)
    return (True, e.pfn, e.asid, e.gpa, e.level, e.validated, e.immutable)


op_strategy = st.tuples(
    st.sampled_from(["update", "psmash", "pvalidate"]),
    st.integers(0, WINDOW - 1),  # pfn
    st.booleans(),  # assigned / validate
    st.sampled_from([PG_LEVEL_4K, PG_LEVEL_2M]),
    st.integers(0, 2),  # gfn offset choice
    st.sampled_from([1, 2]),  # asid
    st.booleans(),  # immutable
)


@settings(max_examples=150, deadline=None)
@given(st.lists(op_strategy, max_size=25))
def test_range_table_matches_per_page_reference(ops: list[tuple[Any, ...]]) -> None:
    """Range-based storage gives exactly the per-page semantics (sampled pages and edges)."""
    rmp, ref = RmpTable(), PerPageRmp()
    got: int | str
    want: int | str
    for kind, raw_pfn, flag, level, goff, asid, immutable in ops:
        pfn = raw_pfn
        if level == PG_LEVEL_2M and pfn % 512 and kind != "pvalidate":
            pfn -= pfn % 512  # keep most 2M operations legal, the unaligned ones are tested above
        gfn = pfn + [0, 1, 512][goff]
        if kind == "update":
            gpa = gfn << PAGE_SHIFT
            got = rmp.rmpupdate(pfn, assigned=flag, level=level, gpa=gpa, asid=asid, immutable=immutable)
            want = ref.rmpupdate(pfn, flag, level, gfn, asid=asid, immutable=immutable)
        elif kind == "psmash":
            got, want = rmp.psmash(pfn), ref.psmash(pfn)
        else:
            want = ref.pvalidate(pfn, gfn, asid, level, flag)
            try:
                got = rmp.pvalidate(pfn, gfn, asid, level, flag)
            except RmpViolation:
                got = "npf"
        assert got == want, (kind, pfn, level)
    probes = {0, 1, 511, 512, 513, 1023, 1024, WINDOW - 1} | {op[1] for op in ops}
    for p in probes:
        assert table_snapshot(rmp, p) == ref.snapshot(p), p
        assert rmp.level_run(p, WINDOW) == ref.level_run(p, WINDOW), p


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 1200), st.integers(0, 600), st.booleans())
def test_batched_forms_equal_one_at_a_time(npages: int, start: int, validate_first: bool) -> None:
    """``npages``/``count`` batches equal the same instructions issued one by one."""
    one, batch = RmpTable(), RmpTable()
    for i in range(npages):
        one.make_private(start + i, (GFN + i) << PAGE_SHIFT, PG_LEVEL_4K, ASID, immutable=False)
    batch.make_private(start, GPA, PG_LEVEL_4K, ASID, immutable=False, npages=npages)
    if validate_first:
        one.pvalidate(start, GFN, ASID, PG_LEVEL_4K, True)
        batch.pvalidate(start, GFN, ASID, PG_LEVEL_4K, True)
    rcs = [one.pvalidate(start + i, GFN + i, ASID, PG_LEVEL_4K, True) for i in range(npages)]
    first_fail = next((rc for rc in rcs if rc), 0)
    assert batch.pvalidate(start, GFN, ASID, PG_LEVEL_4K, True, count=npages) == first_fail
    if not first_fail:
        for p in (start, start + npages // 2, start + npages - 1):
            assert table_snapshot(one, p) == table_snapshot(batch, p)
    assert one.assigned_pages() == batch.assigned_pages() == npages


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(0, 3), st.booleans(), st.sampled_from([PG_LEVEL_4K, PG_LEVEL_2M]))
def test_psmash_range_equals_one_psmash_per_block(
    nblocks: int, four_k_block: int, validate: bool, level: int
) -> None:
    """``psmash_range`` is that many PSMASHes in a row, or nothing at all if one block is not
    a 2M entry (a 4K block among them: FAIL_INPUT, nothing changed)."""
    one, batch = RmpTable(), RmpTable()
    for rmp in (one, batch):
        for b in range(4):
            pfn, gfn = PFN + b * PTRS_PER_PMD, GFN + b * PTRS_PER_PMD
            (guest_invalid_4k if b == four_k_block and level == PG_LEVEL_4K else guest_invalid_2m)(
                rmp, pfn, gfn
            )
        if validate:
            rmp.pvalidate(PFN, GFN, ASID, PG_LEVEL_2M, True)
    rcs = [one.psmash(PFN + b * PTRS_PER_PMD) for b in range(nblocks)]
    rc = batch.psmash_range(PFN, nblocks)
    if any(rcs):
        assert rc == FAIL_INPUT and all(
            batch.lookup(PFN + b * 512).level == PG_LEVEL_2M for b in range(4) if b != four_k_block
        )
    else:
        assert rc == RMP_SUCCESS
        for p in range(PFN, PFN + 4 * PTRS_PER_PMD, 97):
            assert table_snapshot(one, p) == table_snapshot(batch, p)


def test_pvalidate_run_dry_changes_nothing_and_says_how_far() -> None:
    """``pvalidate_run(apply=False)``: the same code and count of instructions that would
    succeed as the real thing, with the table untouched."""
    rmp = RmpTable()
    rmp.make_private(PFN, GPA, PG_LEVEL_4K, ASID, immutable=False, npages=8)
    rmp.pvalidate(PFN + 5, GFN + 5, ASID, PG_LEVEL_4K, True)
    before = list(rmp.runs())
    assert rmp.pvalidate_run(PFN, GFN, ASID, PG_LEVEL_4K, True, 8, apply=False) == (
        PVALIDATE_FAIL_NOUPDATE,
        5,
    )
    assert list(rmp.runs()) == before
    assert rmp.pvalidate_run(PFN, GFN, ASID, PG_LEVEL_4K, True, 8) == (PVALIDATE_FAIL_NOUPDATE, 5)
    assert rmp.lookup(PFN + 4).validated and not rmp.lookup(PFN + 6).validated
    assert rmp.pvalidate_run(PFN, GFN, ASID, PG_LEVEL_2M, True, 1) == (PVALIDATE_FAIL_SIZEMISMATCH, 0)
