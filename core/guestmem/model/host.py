"""Host physical memory and the host process address space.

Physical memory is sparse: pfns are handed out by a bump allocator (never reused, so a
stale reference to a freed page is always detectable) and only pages that were written
hold bytes.  Allocated pfns are tracked as ranges.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, NoReturn

from sortedcontainers import SortedDict

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
        self._pages: SortedDict = SortedDict()  # pfn -> bytearray(PAGE_SIZE)
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
        self._drop(pfn, npages)
        for s, e, _ in list(self._allocated.items(pfn, pfn + npages)):
            self.allocated_pages -= e - s
        self._allocated.erase(pfn, pfn + npages)

    def unallocated(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The runs of ``[start, end)`` that are not allocated."""
        return self._allocated.gaps(start, end)

    def is_allocated(self, pfn: int) -> bool:
        """True iff *pfn* is currently allocated."""
        return self._allocated.get(pfn) is not None

    # --- contents ------------------------------------------------------------------------
    def _drop(self, pfn: int, npages: int) -> None:
        for key in list(self._pages.irange(pfn, pfn + npages, inclusive=(True, False))):
            del self._pages[key]

    def zero(self, pfn: int, npages: int) -> None:
        """Clear ``[pfn, pfn+npages)`` (``clear_highpage`` per page)."""
        self._drop(pfn, npages)

    def is_zero(self, pfn: int, npages: int) -> bool:
        """True iff every byte of ``[pfn, pfn+npages)`` is zero."""
        keys = self._pages.irange(pfn, pfn + npages, inclusive=(True, False))
        return not any(any(self._pages[key]) for key in keys)

    def read(self, pfn: int, offset: int, n: int) -> bytes:
        """Bytes ``[offset, offset+n)`` of page *pfn* (must not cross the page)."""
        page = self._pages.get(pfn)
        if page is None:
            return bytes(n)
        return bytes(page[offset : offset + n])

    def write(self, pfn: int, offset: int, data: bytes) -> None:
        """Store *data* at *offset* of page *pfn* (must not cross the page)."""
        page = self._pages.get(pfn)
        if page is None:
            if not any(data):
                return
            page = bytearray(PAGE_SIZE)
            self._pages[pfn] = page
        page[offset : offset + len(data)] = data

    def copy(self, dst: int, src: int, npages: int) -> None:
        """Copy *npages* whole pages from pfn *src* to pfn *dst*."""
        self._drop(dst, npages)
        for key in list(self._pages.irange(src, src + npages, inclusive=(True, False))):
            self._pages[dst + key - src] = bytearray(self._pages[key])

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

    def find(self, address: int) -> Vma | None:
        """The VMA containing *address*, or None."""
        return self._vmas.get(address)
