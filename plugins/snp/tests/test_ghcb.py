"""KVM's handling of GHCB page-state-change requests (backends.md 2.3), without the core."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestmem_snp.ghcb import (
    GHCB_MSR_PSC_RESP,
    GHCB_MSR_PSC_RESP_ERROR,
    KVM_EINVAL,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
    KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
    SNP_PAGE_STATE_PRIVATE,
    SNP_PAGE_STATE_PSMASH,
    SNP_PAGE_STATE_SHARED,
    SNP_PAGE_STATE_UNSMASH,
    VMGEXIT_PSC_ERROR_GENERIC,
    VMGEXIT_PSC_ERROR_INVALID_ENTRY,
    VMGEXIT_PSC_ERROR_INVALID_HDR,
    VMGEXIT_PSC_MAX_COUNT,
    MapGpaRange,
    PscBuffer,
    PscEngine,
    PscEntry,
    begin_psc_msr,
    check_map_gpa_range,
    complete_psc_msr,
    ghcb_msr_psc_req,
)

PRIV, SHARED = SNP_PAGE_STATE_PRIVATE, SNP_PAGE_STATE_SHARED


def run_all(buf: PscBuffer, answer: int = 0) -> tuple[int, list[MapGpaRange]]:
    """Drive the engine as a VMM that answers every exit with *answer*."""
    engine = PscEngine()
    exits: list[MapGpaRange] = []
    result = engine.begin(buf, True)
    while isinstance(result, MapGpaRange):
        exits.append(result)
        result = engine.complete(buf, answer)
    return result, exits


def test_adjacent_entries_coalesce_into_one_exit() -> None:
    """2.3: consecutive entries with same op, same size and contiguous gfns: one exit."""
    buf = PscBuffer([PscEntry(gfn=0x200 + i * 512, operation=PRIV, pagesize=1) for i in range(4)])
    result, exits = run_all(buf)
    assert result == 0
    assert exits == [
        MapGpaRange(0x200 << 12, 2048, KVM_MAP_GPA_RANGE_ENCRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_2M)
    ]
    assert buf.cur_entry == 4 and all(e.cur_page == 512 for e in buf.entries)


@pytest.mark.parametrize(
    "second",
    [
        PscEntry(gfn=0x11, operation=SHARED),  # other operation
        PscEntry(gfn=0x12, operation=PRIV),  # gap
        PscEntry(gfn=0x200, operation=PRIV, pagesize=1),  # other page size
    ],
)
def test_entries_that_do_not_coalesce(second: PscEntry) -> None:
    first = PscEntry(gfn=second.gfn - 1 if second.pagesize else 0x10, operation=PRIV)
    buf = PscBuffer([first, second])
    result, exits = run_all(buf)
    assert result == 0 and len(exits) == 2
    assert exits[0] == MapGpaRange(
        first.gfn << 12, 1, KVM_MAP_GPA_RANGE_ENCRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_4K
    )
    attrs = KVM_MAP_GPA_RANGE_DECRYPTED if second.operation == SHARED else KVM_MAP_GPA_RANGE_ENCRYPTED
    assert exits[1].attrs & KVM_MAP_GPA_RANGE_ENCRYPTED == attrs


def test_entry_limit_is_253() -> None:
    """VMGEXIT_PSC_MAX_COUNT: end_entry <= 252, else INVALID_HDR with no exit."""
    ok = PscBuffer([PscEntry(gfn=i, operation=PRIV) for i in range(VMGEXIT_PSC_MAX_COUNT)])
    assert run_all(ok) == (0, [MapGpaRange(0, 253, KVM_MAP_GPA_RANGE_ENCRYPTED)])
    too_many = PscBuffer([PscEntry(gfn=i, operation=PRIV) for i in range(VMGEXIT_PSC_MAX_COUNT + 1)])
    assert run_all(too_many) == (VMGEXIT_PSC_ERROR_INVALID_HDR, [])


def test_end_entry_beyond_the_buffer_is_invalid_hdr() -> None:
    """The newer bound by the scratch length: end_entry past the entries given."""
    buf = PscBuffer([PscEntry(gfn=0, operation=PRIV)], end_entry=5)
    assert run_all(buf) == (VMGEXIT_PSC_ERROR_INVALID_HDR, [])


@pytest.mark.parametrize(
    "entry",
    [
        PscEntry(gfn=0x201, operation=PRIV, pagesize=1),  # 2M entry, unaligned gfn
        PscEntry(gfn=0x200, operation=PRIV, pagesize=1, cur_page=513),  # cur_page > npages
        PscEntry(gfn=0x10, operation=PRIV, cur_page=2),
    ],
)
def test_invalid_entries(entry: PscEntry) -> None:
    assert run_all(PscBuffer([entry])) == (VMGEXIT_PSC_ERROR_INVALID_ENTRY, [])


def test_done_entries_are_skipped_and_partial_2m_finishes_as_4k() -> None:
    """cur_page == npages is skipped; a 2M entry with cur_page != 0 continues as 4K pages."""
    buf = PscBuffer(
        [
            PscEntry(gfn=0x10, operation=PRIV, cur_page=1),
            PscEntry(gfn=0x200, operation=SHARED, pagesize=1, cur_page=12),
        ]
    )
    result, exits = run_all(buf)
    assert result == 0
    assert exits == [
        MapGpaRange((0x200 + 12) << 12, 500, KVM_MAP_GPA_RANGE_DECRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_2M)
    ]


def test_psmash_and_unsmash_are_completed_without_an_exit() -> None:
    """KVM treats guest PSMASH/UNSMASH operations as no-ops (2.2)."""
    buf = PscBuffer(
        [
            PscEntry(gfn=0x200, operation=SNP_PAGE_STATE_PSMASH, pagesize=1),
            PscEntry(gfn=0x400, operation=SNP_PAGE_STATE_UNSMASH, pagesize=1),
            PscEntry(gfn=0x600, operation=SHARED, pagesize=1),
        ]
    )
    result, exits = run_all(buf)
    assert result == 0 and [e.gpa for e in exits] == [0x600 << 12]
    assert buf.cur_entry == 3


def test_vmm_failure_is_generic_error_and_stops() -> None:
    buf = PscBuffer([PscEntry(gfn=0, operation=PRIV), PscEntry(gfn=5, operation=PRIV)])
    result, exits = run_all(buf, answer=1)
    assert (result, len(exits)) == (VMGEXIT_PSC_ERROR_GENERIC, 1)
    assert buf.cur_entry == 0  # nothing completed


def test_without_exit_hypercall_the_request_fails_generic() -> None:
    """KVM_CAP_EXIT_HYPERCALL lacking KVM_HC_MAP_GPA_RANGE: VMGEXIT_PSC_ERROR_GENERIC."""
    buf = PscBuffer([PscEntry(gfn=0, operation=PRIV)])
    assert PscEngine().begin(buf, False) == VMGEXIT_PSC_ERROR_GENERIC


def test_msr_protocol() -> None:
    """GHCB MSR PSC: one 4K page per request; bad op or no exits -> RESP_ERROR."""
    req = ghcb_msr_psc_req(0x1234, SHARED)
    assert begin_psc_msr(req, True) == MapGpaRange(0x1234 << 12, 1, KVM_MAP_GPA_RANGE_DECRYPTED)
    assert begin_psc_msr(req, False) == GHCB_MSR_PSC_RESP_ERROR
    assert begin_psc_msr(ghcb_msr_psc_req(0x1234, 3), True) == GHCB_MSR_PSC_RESP_ERROR
    assert complete_psc_msr(0) == GHCB_MSR_PSC_RESP
    assert complete_psc_msr(5) == GHCB_MSR_PSC_RESP_ERROR


@pytest.mark.parametrize(
    ("gpa", "npages"),
    [(0x1001, 1), (0x1000, 0), (0x1000, -1), (0x1000, (1 << 64) - 1), (1 << 63, (1 << 64) - (1 << 51))],
)
def test_map_gpa_range_argument_checks(gpa: int, npages: int) -> None:
    """__kvm_emulate_hypercall: unaligned gpa, npages 0 or gfn + npages wrapping in u64: -KVM_EINVAL."""
    assert check_map_gpa_range(gpa, npages, 0) == -KVM_EINVAL


def test_map_gpa_range_leaves_large_ranges_to_userspace() -> None:
    """__kvm_emulate_hypercall checks only the u64 wrap: a range past MAXPHYADDR still exits."""
    assert check_map_gpa_range(0x1000, 1 << 60, 0) == MapGpaRange(0x1000, 1 << 60, 0)
    assert check_map_gpa_range((1 << 52) - 0x1000, 2, 0) == MapGpaRange((1 << 52) - 0x1000, 2, 0)


def test_map_gpa_range_exit() -> None:
    assert check_map_gpa_range(0x2000, 3, KVM_MAP_GPA_RANGE_ENCRYPTED) == MapGpaRange(0x2000, 3, 0x10)


entry_strategy = st.builds(
    lambda block, sub, op, huge: PscEntry(
        gfn=block * 512 if huge else block * 512 + sub, operation=op, pagesize=int(huge)
    ),
    st.integers(0, 3),
    st.integers(0, 511),
    st.sampled_from([PRIV, SHARED, SNP_PAGE_STATE_PSMASH]),
    st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(entry_strategy, min_size=1, max_size=40))
def test_exits_apply_exactly_the_requested_changes_in_order(entries: list[PscEntry]) -> None:
    """Coalescing never changes the outcome: the exits, applied in order, equal the entries."""
    want: dict[int, int] = {}
    for e in entries:
        if e.operation in (PRIV, SHARED):
            for gfn in range(e.gfn, e.gfn + e.npages):
                want[gfn] = e.operation
    buf = PscBuffer([PscEntry(e.gfn, e.operation, e.pagesize) for e in entries])
    result, exits = run_all(buf)
    assert result == 0
    assert len(exits) <= len(entries)
    got: dict[int, int] = {}
    for x in exits:
        op = PRIV if x.to_private else SHARED
        for gfn in range(x.gpa >> 12, (x.gpa >> 12) + x.npages):
            got[gfn] = op
    assert got == want
    assert buf.cur_entry == len(entries)
