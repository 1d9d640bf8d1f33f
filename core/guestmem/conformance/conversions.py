"""Conversions never lose data: a reference model of what a guest reads back after
conversions, punches and accesses, and a Hypothesis strategy of such programs."""

from __future__ import annotations

from typing import Any

import pytest

from guestmem import uapi
from guestmem.errors import MemoryFault

PAGE = uapi.PAGE_SIZE
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE

# --- conversions never lose data -----------------------------------------------------------------
#: The guest pages conversion programs use: both ends and the middle of two 2 MiB frames, so
#: that a backend with large folios (hugepage gmem) sees partial conversions and punches.
CONVERSION_PAGES: tuple[int, ...] = tuple(
    frame * 512 + offset for frame in (0, 1) for offset in (0, 1, 2, 511)
)
#: Pages a conversion program's memslot covers (two 2 MiB frames at gpa 0).
CONVERSION_SLOT_PAGES = 1024
_CHUNK = 16  # a store writes 16 bytes at one of the first four 16-byte chunks of its page
_LOAD = 4 * _CHUNK


class ConversionReference:
    """What a guest must read back after conversions, punches and accesses, page by page.

    The destructive-conversion semantics of guest_memfd in Linux 6.18 (spec 0.2, 2.3; G-1..G-4,
    A-10, FA-8), for a memslot bound to guest_memfd whose ``userspace_addr`` is ordinary
    anonymous memory:

    * a private access reaches the page's guest_memfd folio, a shared access the memslot's
      ``userspace_addr``; a page never written reads zeros on either side;
    * an access whose privateness differs from the page's attribute is a
      ``KVM_EXIT_MEMORY_FAULT`` (:class:`~guestmem.errors.MemoryFault`) and changes nothing;
    * ``KVM_SET_MEMORY_ATTRIBUTES`` changes the attribute and nothing else: the kernel frees no
      folio and touches no byte on a conversion (it zaps stage-2 leaves only), so a page
      converted away and back without a punch reads what it held;
    * ``FALLOC_FL_PUNCH_HOLE`` frees the folios of its range: their private bytes read zero
      from then on (the next fault allocates a zeroed folio), and nothing else changes: not
      the shared bytes, not the other pages of a large folio the hole splits;
    * the destructive conversion a VMM such as QEMU makes (attribute to shared, then punch)
      is those two steps in that order.

    The VM has one memslot of :data:`CONVERSION_SLOT_PAGES` pages at gpa 0, bound to *gmem*
    from offset 0, every page private at the start (*private*).  Each step of a program is a
    tuple: ``("store", page, tag)`` and ``("load", page)`` with the
    page's own privateness, ``("mismatch", page)`` with the other one, ``("convert", page,
    npages, private)``, ``("punch", page, npages)``.  :meth:`run` applies the steps to a VM
    and checks every load and, at the end, every page of :data:`CONVERSION_PAGES`.
    """

    def __init__(self, vm: Any, vcpu: Any, gmem: Any, *, private: bool = True) -> None:
        self.vm, self.vcpu, self.gmem = vm, vcpu, gmem
        self.private: dict[int, bool] = {}
        self.default_private = private
        self.bytes: dict[tuple[int, bool], bytes] = {}

    def _private(self, page: int) -> bool:
        return self.private.get(page, self.default_private)

    def expected(self, page: int, private: bool) -> bytes:
        """The first bytes a *private* (or shared) load of *page* must return."""
        return self.bytes.get((page, private), bytes(_LOAD))

    def step(self, op: tuple[Any, ...]) -> None:
        """Apply one step to the VM and to the reference; check what it returned."""
        kind, page = op[0], op[1]
        gpa = page * PAGE
        private = self._private(page)
        if kind == "store":
            offset = op[2] % 4 * _CHUNK
            data = bytes((op[2] * 31 + i) % 251 + 1 for i in range(_CHUNK))
            self.vcpu.access(gpa + offset, data=data, private=private)
            old = bytearray(self.expected(page, private))
            old[offset : offset + _CHUNK] = data
            self.bytes[(page, private)] = bytes(old)
        elif kind == "load":
            got = self.vcpu.access(gpa, _LOAD, private=private)
            assert got == self.expected(page, private), (
                f"page {page:#x} ({'private' if private else 'shared'})"
            )
        elif kind == "mismatch":
            with pytest.raises(MemoryFault) as info:
                self.vcpu.access(gpa, 1, private=not private)
            assert (info.value.gpa, info.value.size) == (gpa, PAGE)
        elif kind == "convert":
            npages, to_private = op[2], op[3]
            attributes = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if to_private else 0
            self.vm.set_memory_attributes(gpa, npages * PAGE, attributes)
            for p in range(page, page + npages):
                self.private[p] = to_private
        elif kind == "punch":
            npages = op[2]
            self.gmem.fallocate(PUNCH, gpa, npages * PAGE)
            for p in range(page, page + npages):
                self.bytes.pop((p, True), None)
        else:
            raise ValueError(f"unknown step {op!r}")

    def run(self, program: list[tuple[Any, ...]]) -> None:
        """Every step, then a load of every page of :data:`CONVERSION_PAGES`."""
        for op in program:
            self.step(op)
        for page in CONVERSION_PAGES:
            self.step(("load", page))


def conversion_programs(min_steps: int = 4, max_steps: int = 40) -> Any:
    """A Hypothesis strategy for :meth:`ConversionReference.run` programs (needs hypothesis).

    Stores, loads and mismatched accesses of :data:`CONVERSION_PAGES`; conversions and punches
    of one page, a few pages or a whole 2 MiB frame starting at one of them.
    """
    from hypothesis import strategies as st

    pages = st.sampled_from(CONVERSION_PAGES)
    counts = st.sampled_from((1, 2, 3))
    frames = st.sampled_from((0, 512))

    def whole_frame(op: tuple[Any, ...]) -> tuple[Any, ...]:
        return (op[0], op[1], 512, *op[3:])

    step = st.one_of(
        st.tuples(st.just("store"), pages, st.integers(0, 255)),
        st.tuples(st.just("load"), pages),
        st.tuples(st.just("mismatch"), pages),
        st.tuples(st.just("convert"), pages, counts, st.booleans()),
        st.tuples(st.just("convert"), frames, st.just(0), st.booleans()).map(whole_frame),
        st.tuples(st.just("punch"), pages, counts),
        st.tuples(st.just("punch"), frames, st.just(0)).map(whole_frame),
    )
    return st.lists(step, min_size=min_steps, max_size=max_steps)
