"""A sorted map of half-open integer ranges to values.

Attributes, bindings, page state and mappings are all stored as ranges so that an
operation over a terabyte costs O(log n + k) in the number n of stored ranges and the
number k of ranges it touches, never O(pages).  Adjacent ranges with equal values are
merged, so a uniform terabyte is one entry.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from sortedcontainers import SortedDict, SortedList

V = TypeVar("V")


class _Starts(SortedDict):  # type: ignore[misc]  # untyped base
    """The entries by start: a ``SortedDict`` whose empty construction is cheap.

    ``SortedDict.__init__`` handles a key function and initial items, and binds sixteen
    ``SortedList`` methods up front; a model creates many small maps (one per file,
    binding and mapping), for which that costs more than their first hundred updates.
    Here the bound methods are made on first use (the names ``SortedDict`` 2.x binds).
    """

    _BOUND = {
        "_list_add": "add",
        "_list_clear": "clear",
        "_list_iter": "__iter__",
        "_list_reversed": "__reversed__",
        "_list_pop": "pop",
        "_list_remove": "remove",
        "_list_update": "update",
        "bisect_left": "bisect_left",
        "bisect": "bisect_right",
        "bisect_right": "bisect_right",
        "index": "index",
        "irange": "irange",
        "islice": "islice",
        "_reset": "_reset",
    }

    def __init__(self, *args: object) -> None:
        if args:
            super().__init__(*args)
            return
        self._key = None
        self._list = SortedList()

    def __getattr__(self, name: str) -> object:
        target = _Starts._BOUND.get(name)
        if target is None or "_list" not in self.__dict__:
            raise AttributeError(name)
        bound = getattr(self._list, target)
        setattr(self, name, bound)
        return bound


class RangeMap(Generic[V]):
    """Non-overlapping ``[start, end) -> value`` entries; absent means "no value"."""

    __slots__ = ("_map",)

    def __init__(self) -> None:
        # start -> (end, value)
        self._map: SortedDict = _Starts()

    def __len__(self) -> int:
        """Number of stored (maximal) ranges."""
        return len(self._map)

    def __bool__(self) -> bool:
        return bool(self._map)

    def copy(self) -> RangeMap[V]:
        """A shallow copy (values are shared)."""
        other: RangeMap[V] = RangeMap()
        other._map = self._map.copy()
        return other

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeMap) and list(self._map.items()) == list(other._map.items())

    def __repr__(self) -> str:
        inner = ", ".join(f"[{s:#x},{e:#x})={v!r}" for s, e, v in self.items())
        return f"RangeMap({inner})"

    # --- queries -------------------------------------------------------------------------
    def _floor(self, pos: int) -> int | None:
        """Start of the entry that could contain *pos* (the greatest start <= pos).

        The hot path of every lookup: it bisects the sorted key list's sublists directly
        (``SortedList._maxes``/``_lists``, stable since sortedcontainers 2.0) because
        positional indexing (``keys()[i]``) costs several Python calls.
        """
        keys = self._map._list
        maxes = keys._maxes
        if not maxes:
            return None
        i = bisect_left(maxes, pos)
        if i == len(maxes):
            last: int = maxes[-1]
            return last
        sub = keys._lists[i]
        j = bisect_right(sub, pos)
        if j:
            found: int = sub[j - 1]
            return found
        if i:
            prev: int = maxes[i - 1]
            return prev
        return None

    def get(self, pos: int) -> V | None:
        """The value at *pos*, or None."""
        start = self._floor(pos)
        if start is None:
            return None
        end, value = self._map[start]
        return value if pos < end else None

    def entry(self, pos: int) -> tuple[int, int, V] | None:
        """The whole stored entry ``(start, end, value)`` containing *pos*, or None."""
        start = self._floor(pos)
        if start is None:
            return None
        end, value = self._map[start]
        return (start, end, value) if pos < end else None

    def _keys_between(self, lo: int, hi: int) -> list[int]:
        """The stored starts in ``[lo, hi)``, in order (one slice of the sorted key list)."""
        keys = self._map._list
        return keys[keys.bisect_left(lo) : keys.bisect_left(hi)]  # type: ignore[no-any-return]

    def items(self, start: int | None = None, end: int | None = None) -> Iterator[tuple[int, int, V]]:
        """Entries overlapping ``[start, end)``, clipped to it, in order.

        The entries are taken when iteration starts, so the map may be changed meanwhile.
        """
        if start is None:
            m = self._map
            get = dict.__getitem__
            yield from [(s, *get(m, s)) for s in list(m._list)]
            return
        yield from self.span(start, end)

    def span(self, start: int, end: int | None = None) -> list[tuple[int, int, V]]:
        """``list(self.items(start, end))``, built at once (the bulk form)."""
        stop = end if end is not None else 1 << 128
        first = self._floor(start)
        if first is not None:
            first_end, value = self._map[first]
            if start < first_end and stop <= first_end:  # inside one entry: the common case
                return [(start, stop, value)] if start < stop else []
        keys = self._keys_between(first if first is not None else start, stop)
        if not keys:
            return []
        m = self._map
        get = dict.__getitem__
        out: list[tuple[int, int, V]] = [(s, *get(m, s)) for s in keys]
        s, e, v = out[0]
        if e <= start:
            del out[0]
            if not out:
                return out
        elif s < start:
            out[0] = (start, e, v)
        s, e, v = out[-1]
        if e > stop:
            out[-1] = (s, stop, v)
        return out

    def first_overlap(self, start: int, end: int) -> tuple[int, int, V] | None:
        """The first entry overlapping ``[start, end)``, clipped to it, or None (O(log n))."""
        ent = self.entry(start)
        if ent is not None:
            return start, min(ent[1], end), ent[2]
        keys = self._map._list
        i = keys.bisect_left(start)
        if i == len(keys):
            return None
        s: int = keys[i]
        if s >= end:
            return None
        e, v = self._map[s]
        return s, min(e, end), v

    def overlaps(self, start: int, end: int) -> bool:
        """True iff any entry intersects ``[start, end)``."""
        return self.first_overlap(start, end) is not None

    def covers(self, start: int, end: int, value: V | None) -> bool:
        """True iff every position of ``[start, end)`` holds *value* (None: holds nothing)."""
        if value is None:
            return not self.overlaps(start, end)
        ent = self.entry(start)
        return ent is not None and ent[1] >= end and ent[2] == value

    def gaps(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """Sub-ranges of ``[start, end)`` holding no value."""
        pos = start
        for s, e, _ in self.items(start, end):
            if s > pos:
                yield pos, s
            pos = e
        if pos < end:
            yield pos, end

    def first(self) -> tuple[int, int, V] | None:
        """The lowest entry, or None."""
        if not self._map:
            return None
        s = self._map.keys()[0]
        e, v = self._map[s]
        return s, e, v

    # --- updates -------------------------------------------------------------------------
    def _split(self, pos: int) -> None:
        """Make *pos* an entry boundary if it falls inside an entry."""
        start = self._floor(pos)
        if start is None or start == pos:
            return
        end, value = self._map[start]
        if pos < end:
            self._map[start] = (pos, value)
            self._map[pos] = (end, value)

    def set(self, start: int, end: int, value: V | None) -> None:
        """Store *value* over ``[start, end)``; ``None`` erases the range."""
        if start >= end:
            return
        m = self._map
        head = self._floor(start)
        head_end = start
        if head is not None:
            head_end, head_value = m[head]
            if head_end >= end and head_value == value:
                return  # already holds value: nothing to do
        if value is not None and ((head == start and head_end == end) or head_end <= start):
            # Fast path (a fault's folio, leaf or page run): [start, end) is exactly one entry,
            # or lies in a gap when no entry starts inside it.
            if head == start:
                prev = self._floor(start - 1) if start > 0 else None
                nxt = m.get(end)
                if (prev is None or m[prev][0] != start or m[prev][1] != value) and (
                    nxt is None or nxt[1] != value
                ):
                    dict.__setitem__(m, start, (end, value))  # in place: the key list stays
                    return
                del m[start]
                self._put(start, end, value, prev)
                return
            if end - start == 1 or self._floor(end - 1) == head:
                self._put(start, end, value, head)  # head is also the floor of start - 1
                return
        if head is not None and head_end >= end > start >= head and head_end > start:
            # Inside one entry holding another value: cut it in up to three in place.
            head_value = m[head][1]
            if head < start:
                if end < head_end:
                    m[end] = (head_end, head_value)
                dict.__setitem__(m, head, (start, head_value))
                if value is not None:
                    if end < head_end:
                        m[start] = (end, value)
                    else:
                        self._put(start, end, value, head)  # may merge with the next entry
                return
            # head == start: the entry loses its front
            prev = self._floor(start - 1) if start > 0 else None
            joins_prev = value is not None and prev is not None and m[prev] == (start, value)
            if end < head_end and (value is None or joins_prev):
                # the key moves from start to end (nothing is stored between them)
                self._rekey(start, end)
                dict.__setitem__(m, end, (head_end, head_value))
                if joins_prev:
                    assert prev is not None
                    dict.__setitem__(m, prev, (end, value))
                return
            if end < head_end:
                m[end] = (head_end, head_value)
                dict.__setitem__(m, start, (end, value))  # the key stays; the tail was cut
                return
            # end == head_end, value None: the whole entry goes
            del m[start]
            return
        # Split the entry straddling start (the floor found above) and the one at end.
        if head is not None and head < start < m[head][0]:
            head_end, head_value = m[head]
            m[head] = (start, head_value)
            m[start] = (head_end, head_value)
        self._split(end)
        self._delete_starts(self._keys_between(start, end))
        if value is not None:
            self._put(start, end, value, self._floor(start - 1) if start > 0 else None)

    def _rekey(self, old: int, new: int) -> None:
        """Move the entry at *old* to start *new*; no other entry starts between them.

        One slot of the sorted key list changes in place (its order and the sublists'
        lengths stay, so does sortedcontainers' positional index), where a delete and an
        insert would each rebalance it.
        """
        keys = self._map._list
        maxes = keys._maxes
        i = bisect_left(maxes, old)
        sub = keys._lists[i]
        j = bisect_left(sub, old)
        sub[j] = new
        if j == len(sub) - 1:
            maxes[i] = new
        dict.__setitem__(self._map, new, dict.pop(self._map, old))

    def _delete_starts(self, starts: list[int]) -> None:
        """Remove the entries beginning at *starts* (sorted, all stored, one contiguous run
        of keys): one slice of the key list, then the mapping's own entries."""
        if not starts:
            return
        m = self._map
        if len(starts) == 1:
            del m[starts[0]]
            return
        keys = m._list
        i = keys.bisect_left(starts[0])
        del keys[i : i + len(starts)]  # a bulk delete: SortedList rebuilds when it pays
        pop = dict.__delitem__
        for key in starts:
            pop(m, key)

    def erase_runs(self, runs: Iterable[tuple[int, int]]) -> int:
        """Remove every value in each ``[start, end)`` of *runs*; returns the positions that
        held a value.  Many runs cost one sweep over them and the entries they touch, and
        one rebuild of the key list, instead of one update each."""
        ordered = sorted(runs)
        if ordered and any(s >= e for s, e in ordered):
            ordered = [(s, e) for s, e in ordered if s < e]
        if not ordered:
            return 0
        if len(ordered) < 8:
            held = 0
            for s, e in ordered:
                held += sum(b - a for a, b, _ in self.items(s, e))
                self.set(s, e, None)
            return held
        lo = ordered[0][0]
        hi = max(e for _, e in ordered)
        survivors: list[tuple[int, int, V]] = []
        held = 0
        i = 0
        n = len(ordered)
        for s, e, value in self.span(lo, hi):
            pos = s
            while i < n and ordered[i][1] <= pos:
                i += 1
            j = i
            while pos < e:
                if j < n and ordered[j][0] < e:
                    rs, re_ = ordered[j]
                    if rs > pos:
                        survivors.append((pos, rs, value))
                        pos = rs
                    cut_end = re_ if re_ < e else e
                    if cut_end > pos:
                        held += cut_end - pos
                        pos = cut_end
                    if re_ <= e:
                        j += 1
                    else:
                        break
                else:
                    survivors.append((pos, e, value))
                    pos = e
            i = j
        self.set(lo, hi, None)  # splits at the span's ends, then one slice delete
        m = self._map
        if len(survivors) < 8:
            for s, e, value in survivors:
                m[s] = (e, value)
        else:
            m._list.update(s for s, _, _ in survivors)
            dict.update(m, ((s, (e, value)) for s, e, value in survivors))
        return held

    def _put(self, start: int, end: int, value: V, prev: int | None) -> None:
        """Store *value* over ``[start, end)``, which holds nothing, merging with equal
        neighbours; *prev* is the start of the last entry before *start* (or None)."""
        m = self._map
        if prev is not None:
            prev_end, prev_value = m[prev]
            if prev_end == start and prev_value == value:
                start = prev
        nxt = m.get(end)
        if nxt is not None and nxt[1] == value:
            del m[end]
            end = nxt[0]
        m[start] = (end, value)

    def erase(self, start: int, end: int) -> None:
        """Remove every value in ``[start, end)``."""
        self.set(start, end, None)

    def clear(self) -> None:
        """Remove everything."""
        self._map.clear()
