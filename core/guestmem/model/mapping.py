"""Host userspace mappings: anonymous memory and guest_memfd VMAs (spec 2.E).

A gmem VMA faults pages in one at a time following ``kvm_gmem_fault_user_mapping``;
faulted pages stay mapped until a punch hole, a memory failure, ``MADV_DONTNEED`` or
munmap removes them.  A SIGBUS is raised as :class:`guestmem.HostSigbus`.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from guestmem import api, cabi, uapi
from guestmem.backend import HostFault
from guestmem.errors import HostSigbus
from guestmem.model.gmem import Folio
from guestmem.model.operation import uapi_call
from guestmem.ranges import RangeMap

if TYPE_CHECKING:
    from guestmem.model.gmem import GmemFile
    from guestmem.model.kvm import ModelKvm
    from guestmem.model.vm import ModelVm

PAGE_SHIFT = uapi.PAGE_SHIFT
PAGE_SIZE = uapi.PAGE_SIZE


class Vma(abc.ABC):
    """A mapped address range of the host process."""

    def __init__(self, kvm: ModelKvm, length: int) -> None:
        self.kvm = kvm
        self.length = length
        self.address = kvm.mm.reserve(length)
        self.unmapped = False

    @abc.abstractmethod
    def fault(self, page: int, write: bool) -> int:
        """Fault page number *page* (relative to the VMA) in; returns its host pfn."""

    def host_level(self, page: int) -> int:
        """The largest page size (``PG_LEVEL_*``) backing *page* (``host_pfn_mapping_level``)."""
        return uapi.PG_LEVEL_4K

    def madv_dontneed(self, offset: int, length: int) -> None:
        """``madvise_dontneed_free``: drop the PTEs of ``[offset, offset+length)`` (the MMU
        notifier zaps guest mappings of them); the pages themselves stay."""
        self.kvm.mmu_notifier_invalidate(self.address + offset, length)

    def madv_remove(self, offset: int, length: int) -> None:
        """``madvise_remove``: punch a hole in the file behind ``[offset, offset+length)``
        (reads zero after)."""
        self.madv_dontneed(offset, length)

    def unmap(self) -> None:
        """munmap."""
        if self.unmapped:
            return
        self.unmapped = True
        self.kvm.mm.remove(self)
        self.kvm.mmu_notifier_invalidate(self.address, self.length)


_THP_PAGES = 1 << uapi.PMD_ORDER


class AnonVma(Vma):
    """``MAP_ANONYMOUS|MAP_SHARED`` memory: zero-filled, transparently huge where aligned.

    Host pages come in 2 MiB-aligned chunks (by host address), so a guest mapping can be
    huge when the gpa and the host address agree modulo 2 MiB (H-2, H-6).
    """

    def __init__(self, kvm: ModelKvm, length: int) -> None:
        super().__init__(kvm, length)
        self._chunks: dict[int, int] = {}  # hva >> 21 -> first pfn

    def fault(self, page: int, write: bool) -> int:
        hpage = (self.address >> PAGE_SHIFT) + page
        chunk = hpage >> uapi.PMD_ORDER
        base = self._chunks.get(chunk)
        if base is None:
            base = self.kvm.host.alloc(_THP_PAGES)
            self._chunks[chunk] = base
        return base + (hpage & (_THP_PAGES - 1))

    def chunks(self) -> list[tuple[int, int]]:
        """``(first page of the mapping, first pfn)`` of every 2 MiB chunk it holds, by
        address (a chunk may begin before the mapping: huge pages are aligned by address)."""
        first = self.address >> PAGE_SHIFT
        return sorted(((chunk << uapi.PMD_ORDER) - first, base) for chunk, base in self._chunks.items())

    def madv_remove(self, offset: int, length: int) -> None:
        """The shmem file of ``MAP_SHARED|MAP_ANONYMOUS`` loses the pages: zeroes after; the
        cost follows the 2 MiB chunks the range touches and the mapping has, never the
        range's length."""
        super().madv_remove(offset, length)
        first = (self.address + offset) >> PAGE_SHIFT
        last = (self.address + offset + length + PAGE_SIZE - 1) >> PAGE_SHIFT
        lo_chunk, hi_chunk = first >> uapi.PMD_ORDER, (last - 1) >> uapi.PMD_ORDER
        chunks = self._chunks
        if hi_chunk - lo_chunk < len(chunks):
            touched = [(c, chunks[c]) for c in range(lo_chunk, hi_chunk + 1) if c in chunks]
        else:
            touched = [(c, base) for c, base in chunks.items() if lo_chunk <= c <= hi_chunk]
        for chunk, base in touched:
            lo = max(first, chunk << uapi.PMD_ORDER)
            hi = min(last, (chunk + 1) << uapi.PMD_ORDER)
            self.kvm.host.zero(base + (lo & (_THP_PAGES - 1)), hi - lo)

    def host_level(self, page: int) -> int:
        hpage = (self.address >> PAGE_SHIFT) + page
        first = (hpage & ~(_THP_PAGES - 1)) - (self.address >> PAGE_SHIFT)
        if first >= 0 and first + _THP_PAGES <= self.length >> PAGE_SHIFT:
            return uapi.PG_LEVEL_2M
        return uapi.PG_LEVEL_4K

    def unmap(self) -> None:
        if self.unmapped:
            return
        super().unmap()
        for base in self._chunks.values():
            self.kvm.host.free(base, _THP_PAGES)
        self._chunks.clear()


class GmemVma(Vma):
    """A ``MAP_SHARED`` mapping of a guest_memfd; holds a file reference (L-6)."""

    def __init__(self, kvm: ModelKvm, file: GmemFile, length: int, pgoff: int) -> None:
        super().__init__(kvm, length)
        self.file = file
        self.pgoff = pgoff
        self.faulted: RangeMap[bool] = RangeMap()  # gmem page indices with a host PTE
        file.get()
        file.inode.vmas.append(self)

    def maps_index(self, index: int) -> bool:
        """True iff gmem page *index* is faulted into this VMA."""
        return self.faulted.get(index) is not None

    def zap_indices(self, start: int, end: int) -> None:
        """Unmap gmem pages ``[start, end)`` from this VMA (``unmap_mapping_range``)."""
        lo, hi = max(start, self.pgoff), min(end, self.pgoff + (self.length >> PAGE_SHIFT))
        if lo >= hi or not self.faulted.overlaps(lo, hi):
            return
        self.faulted.erase(lo, hi)
        self.kvm.mmu_notifier_invalidate(
            self.address + ((lo - self.pgoff) << PAGE_SHIFT), (hi - lo) << PAGE_SHIFT
        )

    def madv_dontneed(self, offset: int, length: int) -> None:
        first = self.pgoff + (offset >> PAGE_SHIFT)
        self.zap_indices(first, first + ((length + PAGE_SIZE - 1) >> PAGE_SHIFT))

    def madv_remove(self, offset: int, length: int) -> None:
        """``vfs_fallocate(PUNCH_HOLE | KEEP_SIZE)`` on the guest_memfd at the mapping's
        file offset (``kvm_gmem_fallocate``)."""
        self.file.inode.fallocate_punch_hole((self.pgoff << PAGE_SHIFT) + offset, length)

    def fault(self, page: int, write: bool) -> int:
        return self.fault_index(self.pgoff + page, write)

    def fault_index(self, index: int, write: bool) -> int:
        """``kvm_gmem_fault_user_mapping`` for gmem page *index*; returns its pfn (M-3..M-5)."""
        inode = self.file.inode
        if self.faulted.get(index) is None:
            self._fault_in(index)
        folio = inode.pages.get(index)
        assert folio is not None, "a host-mapped gmem page has no folio"
        if folio.hwpoison:
            address = self.address + (index - self.pgoff) * PAGE_SIZE
            raise _sigbus(inode.owner, address, index, "E-1", f"gmem page {index:#x} is hardware-poisoned")
        return index + folio.delta

    def _fault_in(self, index: int) -> None:
        """The first touch of gmem page *index* through this VMA: ask the backend, allocate
        and clear the folio, install the host PTE."""
        inode = self.file.inode
        vm = inode.owner
        address = self.address + (index - self.pgoff) * PAGE_SIZE
        if index >= inode.npages:
            why = f"gmem page {index:#x} is beyond i_size {inode.size:#x}"
            raise _sigbus(vm, address, index, "M-3", why)
        outcome = vm.hooks.gmem_fault_user_mapping(vm.view, inode.view, index)
        if outcome is HostFault.RECLAIM:
            self._reclaim(index)
            outcome = vm.hooks.gmem_fault_user_mapping(vm.view, inode.view, index)
            if outcome is HostFault.RECLAIM:
                outcome = HostFault.SIGBUS
        if outcome is None:
            mappable = inode.init_shared
            rule = "M-4"
        else:
            mappable = outcome is HostFault.ALLOW
            rule = "host-mappability"
        if not mappable:
            raise _sigbus(vm, address, index, rule, f"gmem page {index:#x} is private to the guest")
        start, end, folio = inode.get_folio(index)
        if folio.hwpoison:
            raise _sigbus(vm, address, index, "E-1", f"gmem page {index:#x} is hardware-poisoned")
        if not folio.uptodate:  # kvm_gmem_fault_user_mapping clears a folio not yet uptodate
            inode.zero(start, end)
            if end - start == 1:
                inode.pages.set(start, end, Folio(folio.delta, True, False))
            else:
                inode.set_state(start, end, uptodate=True)
        self.faulted.set(index, index + 1, True)
        vm.count("host_faults")
        if vm.tracing:
            vm.trace("host_map", ino=inode.ino, index=index, pfn=index + folio.delta)

    def _reclaim(self, index: int) -> None:
        """Take the folio at *index* back from the guests before mapping it ("launder"):
        every binding's guest mapping is invalidated, which reaches the backend's
        ``guestmem_unmap_gfn_range``."""
        inode = self.file.inode
        start, end = inode.folio_bounds(index)
        with inode.invalidating(start, end):
            pass
        inode.owner.count("host_fault_reclaims")
        inode.owner.trace("host_fault_reclaim", ino=inode.ino, index=index)

    def unmap(self) -> None:
        if self.unmapped:
            return
        super().unmap()
        self.faulted.clear()
        self.file.inode.vmas.remove(self)
        self.file.put()


def _sigbus(vm: ModelVm, address: int, index: int, rule: str, why: str) -> HostSigbus:
    """``VM_FAULT_SIGBUS`` of a host fault on gmem page *index*, traced."""
    vm.trace("host_sigbus", address=address, index=index, rule=rule)
    return HostSigbus(address, rule, why)


def vma_access(vma: Vma, offset: int, length: int, data: bytes | None) -> bytes:
    """Load *length* bytes at *offset* of *vma*, or store *data* there; page by page.

    Each page is faulted in, then the CPU reaches it: the backend's
    ``guestmem_host_access`` sees the load or store first (a page the hardware took from
    the host raises the signal the host kernel sends, or takes the host down).
    """
    kvm = vma.kvm
    write = data is not None
    host_access = kvm.hooks.host_access if kvm.hooks.implemented("host_access") else None
    out = bytearray()
    pos = 0
    while pos < length:
        off = offset + pos
        page, in_page = off >> PAGE_SHIFT, off & (PAGE_SIZE - 1)
        n = min(length - pos, PAGE_SIZE - in_page)
        pfn = vma.fault(page, write)
        if host_access is not None:
            verdict = host_access(kvm.view, pfn, write, vma.address + off, in_page, n)
            if verdict is not None:
                kvm.trace(None, "host_crash", {"pfn": pfn, "verdict": verdict})
                kvm.host.crash(verdict)
        if data is None:
            if n == length:
                return kvm.host.read(pfn, in_page, n)
            out += kvm.host.read(pfn, in_page, n)
        else:
            kvm.host.write(pfn, in_page, data[pos : pos + n] if n != length else data)
        pos += n
    return bytes(out)


class ModelHostMapping(api.HostMapping):
    """The :class:`guestmem.api.HostMapping` of the model."""

    def __init__(self, vma: Vma) -> None:
        self._vma = vma
        self.kvm = vma.kvm
        self.address = vma.address
        self.length = vma.length

    @property
    def closed(self) -> bool:
        return self._vma.unmapped

    @uapi_call
    def read(self, offset: int, n: int) -> bytes:
        """A host load (:func:`guestmem.api.host_access_arguments`)."""
        offset, n = api.host_access_arguments(offset, n, self.length, self._vma.unmapped)
        self._vma.kvm.host.check_alive()
        return vma_access(self._vma, offset, n, None)

    @uapi_call
    def write(self, offset: int, data: bytes) -> None:
        """A host store of bytes-like *data* (:func:`guestmem.api.host_access_arguments`)."""
        offset = cabi.index(offset, "offset")
        data = cabi.buffer(data, "data")
        offset, n = api.host_access_arguments(offset, len(data), self.length, self._vma.unmapped)
        self._vma.kvm.host.check_alive()
        vma_access(self._vma, offset, n, data)

    @uapi_call
    def madvise(self, advice: int, offset: int = 0, length: int | None = None) -> None:
        """``madvise(2)``: see :meth:`guestmem.api.HostMapping.madvise`."""
        found = api.madvise_range(self, advice, offset, length)
        if found is None:
            return
        self._vma.kvm.host.check_alive()
        start, size = found
        if advice == uapi.MADV_DONTNEED:
            self._vma.madv_dontneed(start, size)
        else:
            self._vma.madv_remove(start, size)

    @uapi_call
    def close(self) -> None:
        self._vma.unmap()
