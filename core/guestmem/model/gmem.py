"""guest_memfd (``virt/kvm/guest_memfd.c``): the inode and its folios, the file (one VM's
view, with bindings), invalidation, ``kvm_gmem_get_pfn`` and ``kvm_gmem_populate``.

Folio state is a range map of page index -> :class:`Folio`, whose ``delta`` keeps
``pfn - index`` constant, so contiguous allocations of any size are one entry.  Rules:
C-*, F-*, FA-*, M-*, B-*, L-*, E-*, G-11, G-12, P-* of ``docs/rules.md``; invalidation
as spec 3.2.
"""

from __future__ import annotations

import errno
import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import attrs

from guestmem import uapi
from guestmem.backend import GfnRange, GmemView
from guestmem.errors import EHWPOISON, KvmError
from guestmem.ranges import RangeMap

if TYPE_CHECKING:
    from guestmem.model.host import HostMemory
    from guestmem.model.mapping import GmemVma
    from guestmem.model.memslots import Memslot
    from guestmem.model.vm import ModelVm

PAGE_SHIFT = uapi.PAGE_SHIFT
PAGE_SIZE = uapi.PAGE_SIZE
_ino = itertools.count(0x4000)


@attrs.frozen
class Folio:
    """State of a run of pages: ``pfn = index + delta``; uptodate means zeroed/prepared."""

    delta: int
    uptodate: bool = False
    hwpoison: bool = False


class GmemInode:
    """The guest_memfd inode: size, flags, backing folios, and the views (files) on it."""

    def __init__(self, owner: ModelVm, size: int, flags: int, folio_order: int) -> None:
        self.owner = owner
        self.host: HostMemory = owner.host
        self.size = size
        self.flags = flags
        self.folio_order = folio_order
        self.ino = next(_ino)
        self.pages: RangeMap[Folio] = RangeMap()
        self.views: list[GmemFile] = []
        self.vmas: list[GmemVma] = []
        self.evicted = False
        #: mtime = ctime (F-2 fstat), set at create and by each successful fallocate (FA-10).
        self.mtime_ns = time.time_ns()
        self.view = GmemView(self)

    # --- properties --------------------------------------------------------------------------
    @property
    def npages(self) -> int:
        """``i_size`` in pages."""
        return self.size >> PAGE_SHIFT

    @property
    def mmap_allowed(self) -> bool:
        """``GUEST_MEMFD_FLAG_MMAP`` (M-1)."""
        return bool(self.flags & uapi.GUEST_MEMFD_FLAG_MMAP)

    @property
    def init_shared(self) -> bool:
        """``GUEST_MEMFD_FLAG_INIT_SHARED`` (M-4)."""
        return bool(self.flags & uapi.GUEST_MEMFD_FLAG_INIT_SHARED)

    @property
    def invalidate_filter(self) -> int:
        """``kvm_gmem_get_invalidate_filter`` (FA-9)."""
        return uapi.KVM_FILTER_SHARED if self.init_shared else uapi.KVM_FILTER_PRIVATE

    # --- folio queries -----------------------------------------------------------------------
    def folio_bounds(self, index: int) -> tuple[int, int]:
        """The folio-aligned page range containing *index*, clipped to i_size."""
        nr = 1 << self.folio_order
        start = index & ~(nr - 1)
        return start, min(start + nr, max(self.npages, index + 1))

    def order_at(self, index: int) -> int:
        """The order of the folio holding *index*: the file's, or 0 for what is left of a
        large folio that was split (punched, or allocated or prepared only in part)."""
        if not self.folio_order:
            return 0
        start, end = self.folio_bounds(index)
        ent = self.pages.entry(index)
        whole = end - start == 1 << self.folio_order and ent is not None and ent[0] <= start and end <= ent[1]
        return self.folio_order if whole else 0

    def same_order_end(self, index: int, end: int, order: int) -> int:
        """Where the run ``[index, end)`` of one stored entry stops holding folios of
        *index*'s *order*: after the last whole folio of the file's order, or at the end of
        *index*'s folio for what is left of a split one (order 0)."""
        nr = 1 << self.folio_order
        if not order:
            return min(end, index - index % nr + nr)
        ent = self.pages.entry(index)
        assert ent is not None, "a whole folio is allocated"
        last = min(ent[1], self.npages)
        return min(end, last - last % nr)

    def pfn(self, index: int) -> int | None:
        """The host pfn backing *index*, or None if no folio is allocated."""
        folio = self.pages.get(index)
        return None if folio is None else index + folio.delta

    def is_prepared(self, index: int) -> bool:
        """True iff *index*'s folio exists and is uptodate ("prepared" in 6.18)."""
        folio = self.pages.get(index)
        return folio is not None and folio.uptodate

    def is_poisoned(self, index: int) -> bool:
        """True iff *index*'s folio is hardware-poisoned."""
        folio = self.pages.get(index)
        return folio is not None and folio.hwpoison

    def allocated_pages(self) -> int:
        """Pages with a folio."""
        return sum(e - s for s, e, _ in self.pages.items())

    def host_mapped(self, index: int) -> bool:
        """True iff some host VMA has page *index* faulted in."""
        return any(vma.maps_index(index) for vma in self.vmas)

    # --- folio lifetime ----------------------------------------------------------------------
    def get_folio(self, index: int) -> tuple[int, int, Folio]:
        """``kvm_gmem_get_folio``: the folio at *index*, allocated if missing."""
        ent = self.pages.entry(index)
        start, end = self.folio_bounds(index)
        if ent is not None:
            return max(ent[0], start), min(ent[1], end), ent[2]
        if start != end - 1 and self.pages.overlaps(start, end):
            # what is left of a split large folio: allocate only the hole around index
            start, end = next((s, e) for s, e in self.pages.gaps(start, end) if s <= index < e)
        return start, end, self._new_folios(start, end, 1)

    def _new_folios(self, start: int, end: int, folios: int, *, align: bool = True) -> Folio:
        """*folios* new folios over pages ``[start, end)``, from one pfn run, counted."""
        pfn = self.host.alloc(end - start, align=align)
        folio = Folio(pfn - start)
        self.pages.set(start, end, folio)
        self.owner.count("gmem_folios_allocated", folios)
        self.owner.count("gmem_pages_allocated", end - start)
        return folio

    def get_run(self, index: int, limit: int) -> tuple[int, int, Folio]:
        """The folio run from *index* (at most to *limit*), allocated if missing.

        What ``kvm_gmem_get_folio`` for each page of ``[index, limit)`` in turn would
        leave: folios missing in a row come from one pfn run (the model's allocator hands
        out consecutive pfns anyway, naturally aligned for large folios); a large folio is
        allocated whole.
        Returns ``(index, end, folio)``, the run clipped to ``[index, limit)``.
        """
        ent = self.pages.entry(index)
        if ent is not None:
            return index, min(ent[1], limit), ent[2]
        if self.folio_order:
            nr = 1 << self.folio_order
            start = index - index % nr
            # the whole folios holding [index, limit) that are missing in a row
            stop = min(-(-limit // nr) * nr, self.npages - self.npages % nr)
            nxt = self.pages.first_overlap(start, stop) if stop > start else None
            if nxt is not None:
                stop = nxt[0] - nxt[0] % nr
            if stop - start <= nr:  # one folio, or what is left of a split one
                _, end, folio = self.get_folio(index)
                return index, min(end, limit), folio
            return index, min(stop, limit), self._new_folios(start, stop, (stop - start) // nr)
        nxt = self.pages.first_overlap(index, limit)
        end = limit if nxt is None else nxt[0]
        return index, end, self._new_folios(index, end, end - index, align=False)

    def allocate(self, start: int, end: int) -> None:
        """``kvm_gmem_allocate`` (FA-6): instantiate folios over ``[start, end)`` pages.

        Existing folios are untouched; each gap gets one contiguous pfn run.
        """
        nr = 1 << self.folio_order
        start &= ~(nr - 1)
        end = min((end + nr - 1) & ~(nr - 1), self.npages)
        for s, e in list(self.pages.gaps(start, end)):
            pfn = self.host.alloc(e - s)
            self.pages.set(s, e, Folio(pfn - s))
            self.owner.count("gmem_pages_allocated", e - s)

    def set_state(
        self, start: int, end: int, *, uptodate: bool | None = None, hwpoison: bool | None = None
    ) -> None:
        """Change the flags of the folios in ``[start, end)`` (which must exist)."""
        for s, e, folio in list(self.pages.items(start, end)):
            new = Folio(
                folio.delta,
                folio.uptodate if uptodate is None else uptodate,
                folio.hwpoison if hwpoison is None else hwpoison,
            )
            self.pages.set(s, e, new)

    def zero(self, start: int, end: int) -> None:
        """``clear_highpage`` over the allocated pages of ``[start, end)``."""
        for s, e, folio in self.pages.span(start, end):
            self.host.zero(s + folio.delta, e - s)
            self.owner.count("zeroed_bytes", (e - s) * PAGE_SIZE)

    def truncate(self, start: int, end: int) -> None:
        """``truncate_inode_pages_range``: unmap from host VMAs, free the folios (L-5).

        Each freed pfn run reaches ``guestmem_gmem_invalidate`` (``free_folio``).  A large
        folio (opt-in hugepage policy) only partly inside the range is split and its
        punched part freed, as the hugepage guest_memfd proposals do, so an ownership
        table sees every freed page and no page is written behind its back.
        """
        for vma in list(self.vmas):
            vma.zap_indices(start, end)
        freed = [(s + folio.delta, e - s) for s, e, folio in self.pages.span(start, end)]
        self.pages.erase(start, end)
        self.free_runs(freed)

    def free_runs(self, runs: list[tuple[int, int]]) -> None:
        """``kvm_gmem_free_folio`` for each ``(pfn, npages)`` run: the arch invalidate hook,
        then back to the host."""
        owner = self.owner
        try:
            if owner.hooks.implemented("gmem_invalidate"):
                for pfn, npages in runs:
                    owner.hooks.gmem_invalidate(owner.view, pfn, pfn + npages)
        finally:  # the kernel frees the folio whatever the arch code did
            self.host.free_runs(runs)
            owner.count("gmem_pages_freed", sum(n for _, n in runs))

    def evict(self) -> None:
        """Inode eviction: every folio is freed (L-5)."""
        if self.evicted:
            return
        self.evicted = True
        freed = [(s + folio.delta, e - s) for s, e, folio in self.pages.items()]
        self.pages.clear()
        self.free_runs(freed)
        self.owner.trace("gmem_evict", ino=self.ino, freed_pages=sum(n for _, n in freed))

    # --- invalidation (spec 3.2) -------------------------------------------------------------
    @contextmanager
    def invalidating(self, start: int, end: int, views: list[GmemFile] | None = None) -> Iterator[None]:
        """``kvm_gmem_invalidate_begin`` ... ``_end`` over the views' bindings in ``[start, end)``.

        Every VM whose bindings overlap begins an MMU invalidation and unmaps them
        (``kvm_mmu_unmap_gfn_range`` with the file's filter); each one begun is ended when
        the block leaves, whatever happened inside.
        """
        flt = self.invalidate_filter
        begun: list[GmemFile] = []
        try:
            for view in list(self.views if views is None else views):
                vm = view.vm
                flush = False
                for s, e, slot in list(view.bindings.items(start, end)):
                    if view not in begun:
                        vm.mmu.invalidate_begin()
                        begun.append(view)
                    gfn_start = slot.base_gfn + s - slot.gmem_pgoff
                    rng = GfnRange(slot.view, gfn_start, gfn_start + (e - s), attr_filter=flt)
                    flush |= vm.mmu.unmap_gfn_range(rng)
                if flush:
                    vm.count("remote_tlb_flushes")
            yield
        finally:
            for view in begun:
                view.vm.mmu.invalidate_end()

    def punch_hole(self, offset: int, length: int) -> None:
        """``kvm_gmem_punch_hole`` (FA-7, FA-8, M-10)."""
        start = offset >> PAGE_SHIFT
        end = min((offset + length) >> PAGE_SHIFT, uapi.LOFF_MAX >> PAGE_SHIFT)
        with self.invalidating(start, end):
            self.truncate(start, end)

    def fallocate_punch_hole(self, offset: int, length: int) -> None:
        """``kvm_gmem_fallocate(PUNCH_HOLE | KEEP_SIZE)`` once its checks passed: the hole,
        then ``file_modified`` (FA-10); reached from ``fallocate(2)`` and from
        ``madvise(MADV_REMOVE)`` of a guest_memfd mapping (``vfs_fallocate``)."""
        self.punch_hole(offset, length)
        self.mtime_ns = time.time_ns()
        self.owner.count("punch_hole")
        self.owner.trace("punch_hole", ino=self.ino, offset=offset, length=length)

    def memory_failure(self, index: int) -> None:
        """``kvm_gmem_error_folio`` (E-1): zap the folio's mappings, keep it, poison it."""
        start, end, _ = self.get_folio(index)
        self.set_state(start, end, hwpoison=True)  # TestSetPageHWPoison comes first
        for vma in list(self.vmas):
            vma.zap_indices(start, end)
        with self.invalidating(start, end):
            pass


class GmemFile:
    """One VM's view of an inode (``struct kvm_gmem`` + ``struct file``), refcounted.

    References: each open fd and each host VMA (L-6).  The last put releases (L-3).
    """

    def __init__(self, vm: ModelVm, inode: GmemInode) -> None:
        self.vm = vm
        self.inode = inode
        self.bindings: RangeMap[Memslot] = RangeMap()
        self.refs = 0
        self.released = False
        inode.views.append(self)
        vm.get()  # C-8 / L-1: the file pins the VM

    def get(self) -> None:
        """Take a file reference."""
        self.refs += 1

    def put(self) -> None:
        """``fput``: drop a file reference; the last one releases the view.

        From then on the file cannot be looked up (``get_file_active`` fails: EFAULT, L-4);
        the release itself runs when the operation under way ends (``task_work``,
        :meth:`guestmem.model.kvm.ModelKvm.fput`), so an invalidation or a fault that uses
        the file finishes first.
        """
        self.refs -= 1
        if self.refs == 0:
            self.released = True
            self.vm.kvm.fput(self.release)

    def release(self) -> None:
        """``kvm_gmem_release`` (L-3): unbind every slot, zap, drop the VM reference."""
        vm, inode = self.vm, self.inode
        self.released = True
        for _, _, slot in list(self.bindings.items()):
            slot.gmem_file = None
        end = uapi.ULONG_MAX >> PAGE_SHIFT
        try:
            with inode.invalidating(0, end, [self]):  # the whole file, for this VM only
                pass
        finally:
            inode.views.remove(self)
            self.bindings.clear()
            vm.trace("gmem_release", ino=inode.ino)
            # kvm_put_kvm ends ->release; the inode (and its folios) goes after it, in __fput's
            # dput/iput, so a VM destroyed by this put is gone before its folios are freed.
            vm.put()
            if not inode.views:
                inode.evict()

    # --- binding (B-4..B-11) -------------------------------------------------------------------
    def bind(self, slot: Memslot, offset: int) -> None:
        """``kvm_gmem_bind`` after the fd checks (B-4, B-5, B-6), then the backend's say."""
        size = slot.npages << PAGE_SHIFT
        # loff_t arithmetic: offset + size wraps negative past LOFF_MAX (the kernel builds with
        # -fno-strict-overflow), and the wrapped end passes the i_size check.
        end = (offset + size) & uapi.U64_MAX
        end = end - (1 << 64) if end > uapi.LOFF_MAX else end
        if offset > uapi.LOFF_MAX or offset % PAGE_SIZE or end > self.inode.size:
            raise KvmError(
                errno.EINVAL,
                "B-4",
                f"guest_memfd_offset {offset:#x} + size {size:#x} outside the file "
                f"(size {self.inode.size:#x})",
            )
        start = offset >> PAGE_SHIFT
        end = start + slot.npages
        clash = self.bindings.first_overlap(start, end)
        if clash is not None:
            raise KvmError(
                errno.EINVAL,
                "B-5",
                f"gmem pages [{start:#x}, {end:#x}) overlap pages bound to {clash[2].describe()}",
            )
        slot.gmem_pgoff = start
        slot.gmem_only = self.inode.mmap_allowed
        self.vm.hooks.gmem_bind(self.vm.view, slot.view, self.inode.view, start, slot.npages)
        slot.gmem_file = self
        self.bindings.set(start, end, slot)
        if self.vm.profile.memslots_pin_gmem:
            self.get()  # what-if: the binding pins the file

    def unbind(self, slot: Memslot) -> None:
        """``kvm_gmem_unbind`` (B-8, B-10): no-op once released; folios are kept (L-7)."""
        if slot.gmem_file is not self:
            return
        self.bindings.erase(slot.gmem_pgoff, slot.gmem_pgoff + slot.npages)
        slot.gmem_file = None
        self.vm.hooks.gmem_unbind(self.vm.view, slot.view, self.inode.view)
        if self.vm.profile.memslots_pin_gmem:
            self.put()  # what-if: the binding's reference goes with it


# --- kvm_gmem_get_pfn ---------------------------------------------------------------------------
def get_pfn(vm: ModelVm, slot: Memslot, gfn: int, max_pages: int = 1) -> tuple[int, int, int]:
    """``kvm_gmem_get_pfn`` (G-5, G-11, G-12, L-4, E-2) for a run from *gfn*.

    Returns ``(pfn, max_order, npages)``: the pfn of *gfn*, the order of its folio, and how
    many pages from *gfn* (at most *max_pages*) the same call would have resolved to
    contiguous pfns in the same prepared, unpoisoned state.
    """
    file = slot.gmem_file
    if file is None or file.released:
        raise KvmError(errno.EFAULT, "L-4", f"the guest_memfd of {slot.describe()} was closed")
    file.get()  # kvm_gmem_get_file: a close meanwhile releases the file when this returns
    try:
        return _get_pfn(vm, slot, file, gfn, max_pages)
    finally:
        file.put()


def _get_pfn(vm: ModelVm, slot: Memslot, file: GmemFile, gfn: int, max_pages: int) -> tuple[int, int, int]:
    index = slot.gfn_to_index(gfn)
    bound = file.bindings.entry(index)
    if bound is None or bound[2] is not slot:
        raise KvmError(errno.EIO, "G-12", f"gmem index {index:#x} is not bound to {slot.describe()}")
    inode = file.inode
    _, end, folio = inode.get_run(index, min(index + max_pages, bound[1]))
    order = inode.order_at(index)
    if folio.hwpoison:
        raise KvmError(EHWPOISON, "E-2", f"gmem page {index:#x} is hardware-poisoned")
    if inode.folio_order:
        end = inode.same_order_end(index, end, order)
    if not folio.uptodate:
        per_folio = vm.hooks.policy_implements("gmem_prepare") and not vm.backend.range_faults
        if order:
            start, stop = inode.folio_bounds(index)
            if not per_folio:  # every whole folio of the run at once
                stop = max(stop, end + (-end) % (1 << order))
        elif per_folio:
            start, stop = index, index + 1
        else:
            start, stop = index, end
        _prepare(vm, slot, inode, start, stop, folio, order)
        ent = inode.pages.entry(index)
        if ent is not None and ent[2].uptodate and not ent[2].hwpoison:
            end, folio = min(end, ent[1]), ent[2]
        else:  # a hook punched or poisoned it: the fault's retry check sees that invalidation
            end = index + 1
    return index + folio.delta, order, end - index


def _prepare(
    vm: ModelVm, slot: Memslot, inode: GmemInode, start: int, end: int, folio: Folio, order: int
) -> None:
    """``kvm_gmem_prepare_folio``: zero, ``kvm_arch_gmem_prepare``, mark uptodate (G-11)."""
    vm.host.zero(start + folio.delta, end - start)
    vm.count("zeroed_bytes", (end - start) * PAGE_SIZE)
    gfn = slot.base_gfn + start - slot.gmem_pgoff
    vm.hooks.gmem_prepare(vm.view, gfn, start + folio.delta, order, end - start)
    ent = inode.pages.entry(start)
    if ent is not None and ent[2] is folio and ent[0] <= start and end <= ent[1]:
        inode.pages.set(start, end, Folio(folio.delta, True, folio.hwpoison))
    else:
        inode.set_state(start, end, uptodate=True)
    vm.count("gmem_prepare", (end - start) >> order)  # one per folio


# --- kvm_gmem_populate --------------------------------------------------------------------------
def populate(vm: ModelVm, gfn: int, src: bytes | None, npages: int, opaque: Any) -> int:
    """``kvm_gmem_populate`` (P-1..P-5); returns the number of pages populated."""
    if npages <= 0:
        raise KvmError(errno.EINVAL, "P-1", "npages must be positive")
    slot = vm.slots.for_gfn(gfn)
    if slot is None or not slot.has_gmem:
        raise KvmError(errno.EINVAL, "P-2", f"gfn {gfn:#x} is not in a guest_memfd memslot")
    file = slot.gmem_file
    if file is None or file.released:
        raise KvmError(errno.EFAULT, "P-2", "the memslot's guest_memfd was closed")
    npages = min(npages, slot.end_gfn - gfn)
    inode = file.inode
    done = 0
    file.get()  # kvm_gmem_get_file: a close meanwhile releases the file only at the end
    try:
        while done < npages:
            # The kernel's order: __kvm_gmem_get_pfn (binding, allocation, poison), then
            # "already prepared", then the attribute check (which leaves the folio allocated).
            cur = gfn + done
            index = slot.gfn_to_index(cur)
            if file.bindings.get(index) is not slot:
                raise KvmError(errno.EIO, "G-12", f"gmem index {index:#x} is not bound to {slot.describe()}")
            _, end, folio = inode.get_folio(index)
            if folio.hwpoison:
                raise KvmError(EHWPOISON, "E-2", f"gmem page {index:#x} is hardware-poisoned")
            if folio.uptodate:
                raise KvmError(errno.EEXIST, "P-4", f"gmem page {index:#x} is already prepared")
            # the largest aligned power of two the folio and the request allow
            n = 1 << (min(end - index, npages - done).bit_length() - 1)
            while index % n:
                n //= 2
            while n > 1 and not vm.attributes.covers(cur, cur + n, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE):
                n //= 2
            if not vm.is_private(cur):
                raise KvmError(errno.EINVAL, "P-3", f"gfn {cur:#x} is not private")
            chunk = None if src is None else src[done * PAGE_SIZE : (done + n) * PAGE_SIZE]
            order = n.bit_length() - 1
            ret = vm.hooks.post_populate(vm.view, cur, index + folio.delta, chunk, order, opaque)
            if ret:  # a nonzero return is the callback's -errno: not prepared, stop
                raise KvmError(abs(int(ret)), "P-5", f"post_populate of gfn {cur:#x} returned {ret}")
            inode.set_state(index, index + n, uptodate=True)
            done += n
    except KvmError:
        if done == 0:
            raise
    finally:
        file.put()
    vm.count("gmem_populated_pages", done)
    return done
