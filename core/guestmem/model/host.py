"""Host physical memory and the host process address space.

Physical memory is sparse: pfns are handed out by a bump allocator (never reused, so a
stale reference to a freed page is always detectable) and only the written part of a page
holds bytes (the window from its first to its last written byte; the rest reads zero), so
a guest scattering small writes over a terabyte costs what it wrote.  Allocated pfns are
tracked as ranges.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

from guestmem import uapi
from guestmem.errors import HostCrash
from guestmem.ranges import RangeMap

if TYPE_CHECKING:
    from guestmem.model.mapping import Vma

PAGE_SIZE = uapi.PAGE_SIZE
_PMD_PAGES = 1 << uapi.PMD_ORDER
_FIRST_PFN = 0x100000  # above the first 4 GiB, as a real host's high memory would be


class HostMemory:
    """Host physical pages: allocation, sparse contents, and the host's crash verdict."""

    def __init__(self) -> None:
        self._next_pfn = _FIRST_PFN
        self._allocated: RangeMap[bool] = RangeMap()
        #: pfn -> [first byte held, the bytes from there]: a window of the page, zero outside.
        self._pages: dict[int, list[Any]] = {}
        self.crashed: str | None = None
        self.allocated_pages = 0
        #: pfns the host kernel's direct map does not cover (``set_direct_map_invalid_noflush``).
        self.direct_map_invalid: RangeMap[bool] = RangeMap()

    # --- allocation ------------------------------------------------------------------------
    def alloc(self, npages: int, *, align: bool = True) -> int:
        """Allocate *npages* contiguous zeroed pages; returns the first pfn.

        A run of whole 2 MiB pages starts 2 MiB-aligned, as the buddy allocator hands out
        large folios naturally aligned (2 MiB mappings and SNP 2 MiB RMP entries need it);
        ``align=False`` is a run of order-0 pages, which the buddy allocator does not align.
        """
        pfn = self._next_pfn
        if align and npages % _PMD_PAGES == 0:
            pfn = -(-pfn // _PMD_PAGES) * _PMD_PAGES
        self._next_pfn = pfn + npages
        self._allocated.set(pfn, pfn + npages, True)
        self.allocated_pages += npages
        return pfn

    def free(self, pfn: int, npages: int) -> None:
        """Return ``[pfn, pfn+npages)`` to the allocator (contents are dropped)."""
        self.free_runs([(pfn, npages)])

    def free_runs(self, runs: list[tuple[int, int]]) -> None:
        """Return every ``(pfn, npages)`` run to the allocator (contents are dropped); many
        runs leave the allocation map in one sweep."""
        if self._pages:
            for pfn, npages in runs:
                self._drop(pfn, npages)
        self.allocated_pages -= self._allocated.erase_runs([(pfn, pfn + n) for pfn, n in runs])

    def unallocated(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The runs of ``[start, end)`` that are not allocated."""
        return self._allocated.gaps(start, end)

    def allocated_runs(self) -> Iterator[tuple[int, int]]:
        """Every allocated pfn run ``[s, e)``, ascending."""
        for s, e, _ in self._allocated.items():
            yield s, e

    def is_allocated(self, pfn: int) -> bool:
        """True iff *pfn* is currently allocated."""
        return self._allocated.get(pfn) is not None

    # --- contents ------------------------------------------------------------------------
    def _drop(self, pfn: int, npages: int) -> None:
        pages = self._pages
        if not pages:
            return
        if npages <= len(pages):
            for key in range(pfn, pfn + npages):
                pages.pop(key, None)
        else:
            for key in [k for k in pages if pfn <= k < pfn + npages]:
                del pages[key]

    def zero(self, pfn: int, npages: int) -> None:
        """Clear ``[pfn, pfn+npages)`` (``clear_highpage`` per page)."""
        self._drop(pfn, npages)

    def is_zero(self, pfn: int, npages: int) -> bool:
        """True iff every byte of ``[pfn, pfn+npages)`` is zero."""
        pages = self._pages
        if npages <= len(pages):
            held = (pages.get(key) for key in range(pfn, pfn + npages))
        else:
            held = (page for key, page in pages.items() if pfn <= key < pfn + npages)
        return not any(page is not None and any(page[1]) for page in held)

    def digest(self, pfn: int, npages: int) -> str:
        """A hash of the bytes of ``[pfn, pfn + npages)``: equal for equal bytes, whatever the
        pfns.  Costs what the pages holding bytes cost, never the run's length: each page's
        window is hashed without its zero edges, with where it lies in the run."""
        found = hashlib.blake2b(npages.to_bytes(8, "little"), digest_size=16)
        pages = self._pages
        if npages <= len(pages):
            keys: Iterable[int] = (key for key in range(pfn, pfn + npages) if key in pages)
        else:
            keys = sorted(key for key in pages if pfn <= key < pfn + npages)
        for key in keys:
            start, held = pages[key]
            data = bytes(held)
            body = data.lstrip(b"\0")
            if not body:
                continue
            first = start + len(data) - len(body)
            body = body.rstrip(b"\0")
            found.update(struct.pack("<QQQ", key - pfn, first, len(body)))
            found.update(body)
        return found.hexdigest()

    def read(self, pfn: int, offset: int, n: int) -> bytes:
        """Bytes ``[offset, offset+n)`` of page *pfn* (must not cross the page)."""
        page = self._pages.get(pfn)
        if page is None:
            return bytes(n)
        start, held = page
        lo = offset - start
        if lo >= 0 and lo + n <= len(held):
            return bytes(held[lo : lo + n])
        out = bytearray(n)
        a, b = max(offset, start), min(offset + n, start + len(held))
        if a < b:
            out[a - offset : b - offset] = held[a - start : b - start]
        return bytes(out)

    def write(self, pfn: int, offset: int, data: bytes) -> None:
        """Store *data* at *offset* of page *pfn* (must not cross the page)."""
        page = self._pages.get(pfn)
        if page is None:
            if any(data):
                self._pages[pfn] = [offset, bytearray(data)]
            return
        start, held = page
        if offset < start:
            held[0:0] = bytes(start - offset)
            page[0] = start = offset
        lo = offset - start
        if lo > len(held):
            held.extend(bytes(lo - len(held)))
        held[lo : lo + len(data)] = data

    def copy(self, dst: int, src: int, npages: int) -> None:
        """Copy *npages* whole pages from pfn *src* to pfn *dst*."""
        self._drop(dst, npages)
        pages = self._pages
        if npages <= len(pages):
            found = [(key, pages[key]) for key in range(src, src + npages) if key in pages]
        else:
            found = [(key, page) for key, page in pages.items() if src <= key < src + npages]
        for key, (start, held) in found:
            pages[dst + key - src] = [start, bytearray(held)]

    # --- modelled hardware outcomes ------------------------------------------------------------
    def crash(self, verdict: str) -> NoReturn:
        """Record that the host went down with *verdict* and raise :class:`HostCrash`."""
        if self.crashed is None:
            self.crashed = verdict
        raise HostCrash(verdict)

    def check_alive(self) -> None:
        """Raise :class:`HostCrash` again if the host already went down."""
        if self.crashed is not None:
            raise HostCrash(self.crashed)


class AddressSpace:
    """The host process's VMAs, by address (``mm_struct``)."""

    _BASE = 0x7F0000000000

    def __init__(self) -> None:
        self._vmas: RangeMap[Vma] = RangeMap()
        self._next = self._BASE

    def reserve(self, length: int) -> int:
        """A free, page-aligned address range of *length* bytes (plus a guard page)."""
        addr = self._next
        self._next += (length + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE + PAGE_SIZE
        return addr

    def insert(self, vma: Vma) -> None:
        """Install *vma* at ``vma.address``."""
        self._vmas.set(vma.address, vma.address + vma.length, vma)

    def remove(self, vma: Vma) -> None:
        """munmap *vma*."""
        self._vmas.erase(vma.address, vma.address + vma.length)

    def vmas(self) -> list[Vma]:
        """Every VMA, by address."""
        return [vma for _, _, vma in self._vmas.items()]

    def find(self, address: int) -> Vma | None:
        """The VMA containing *address*, or None."""
        return self._vmas.get(address)
