"""RangeMap against a naive per-position dict (the storage under every range-based state)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from guestmem.ranges import RangeMap

ops = st.lists(
    st.tuples(st.integers(0, 300), st.integers(1, 60), st.sampled_from([None, 1, 2, 3])), max_size=80
)


def _build(operations: list[tuple[int, int, int | None]], load: int) -> tuple[RangeMap[int], dict[int, int]]:
    m: RangeMap[int] = RangeMap()
    m._map._list._reset(load)  # tiny sublists: exercise the multi-sublist lookup path
    ref: dict[int, int] = {}
    for start, length, value in operations:
        m.set(start, start + length, value)
        for k in range(start, start + length):
            if value is None:
                ref.pop(k, None)
            else:
                ref[k] = value
    return m, ref


@settings(max_examples=500, deadline=None)
@given(ops, st.sampled_from([4, 1000]))
def test_rangemap_matches_per_position_model(
    operations: list[tuple[int, int, int | None]], load: int
) -> None:
    m, ref = _build(operations, load)
    for k in range(0, 380):
        assert m.get(k) == ref.get(k)
        ent = m.entry(k)
        assert (ent is None) == (k not in ref)
    items = list(m.items())
    for (_, e1, v1), (s2, _, v2) in itertools.pairwise(items):
        assert e1 <= s2
        assert not (e1 == s2 and v1 == v2), "adjacent equal ranges must be merged"
    assert sum(e - s for s, e, _ in items) == len(ref)


@settings(max_examples=100, deadline=None)
@given(ops, st.integers(0, 300), st.integers(1, 80))
def test_rangemap_queries(operations: list[tuple[int, int, int | None]], start: int, length: int) -> None:
    m, ref = _build(operations, 4)
    end = start + length
    clipped = {k for s, e, _ in m.items(start, end) for k in range(s, e)}
    assert clipped == {k for k in ref if start <= k < end}
    gaps = {k for s, e in m.gaps(start, end) for k in range(s, e)}
    assert gaps == {k for k in range(start, end) if k not in ref}
    assert m.overlaps(start, end) == bool(clipped)
    listed = list(m.items(start, end))
    assert m.span(start, end) == listed
    assert m.first_overlap(start, end) == (listed[0] if listed else None)
    for value in (None, 1):
        expect = all(ref.get(k) == value for k in range(start, end))
        assert m.covers(start, end, value) == expect


@settings(max_examples=150, deadline=None)
@given(
    ops,
    st.lists(st.tuples(st.integers(0, 300), st.integers(1, 40)), max_size=30),
    st.sampled_from([4, 1000]),
)
def test_erase_runs_matches_erasing_each_run(
    operations: list[tuple[int, int, int | None]], runs: list[tuple[int, int]], load: int
) -> None:
    """``erase_runs`` (one sweep, one rebuild) leaves what erasing each run in turn leaves,
    and counts the positions that held a value."""
    m, ref = _build(operations, load)
    spans = [(s, s + n) for s, n in runs]
    held = m.erase_runs(spans)
    gone = {k for s, e in spans for k in range(s, e) if k in ref}
    assert held == len(gone)
    for k in gone:
        del ref[k]
    for k in range(0, 380):
        assert m.get(k) == ref.get(k)
    items = list(m.items())
    for (_, e1, v1), (s2, _, v2) in itertools.pairwise(items):
        assert e1 <= s2 and not (e1 == s2 and v1 == v2)
    assert sum(e - s for s, e, _ in items) == len(ref)
