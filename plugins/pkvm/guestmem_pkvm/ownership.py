"""The pKVM hypervisor's page-ownership tables and their transitions (backends.md 3.2).

The nVHE hypervisor at EL2 keeps, for every physical page, a state per component: the host
(``hyp_vmemmap`` ``host_state`` plus the host stage-2 owner annotation), the hypervisor
itself (``hyp_state``) and each guest (software bits of the guest stage-2 PTE).  Every
transition is a pair "initiator goes from A to B, completer from C to D"; a call whose
pages are not in the expected states fails with the hypervisor's errno and changes nothing.

This module is pure: it knows nothing about the guestmem core model.  A :class:`Hypervisor`
is given callbacks to zero/write host pages, to count costs and to report every table change,
so it can be driven and tested on its own (``tests/test_ownership.py``).

Storage is by ranges (:class:`guestmem.backend.RangeMap`): a host page absent from the host
table is host ``OWNED`` (pristine), a gfn absent from a guest table is ``NOPAGE``.  A guest
mapping is stored as ``pfn - gfn`` so a physically contiguous run is one entry.

Sources: ``torvalds/linux`` and Android ``arch/arm64/kvm/hyp/nvhe/mem_protect.c``
(``__pkvm_host_donate_guest``, ``__pkvm_guest_share_host``, ``__pkvm_guest_unshare_host``,
``__pkvm_guest_relinquish_to_host``, ``__pkvm_host_share_guest``,
``__pkvm_host_unshare_guest``, ``__pkvm_host_reclaim_page_guest``,
``__pkvm_host_force_reclaim_page_guest``, the ``*_hyp`` transitions and
``pkvm_ownership_selftest()``), ``nvhe/memory.h`` (``enum pkvm_page_state``) and
``nvhe/pkvm.c`` (VM table, handles, VMIDs, pvmfw loading).
"""

from __future__ import annotations

import enum
import errno
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from guestmem.backend import RangeMap
from guestmem.errors import KvmError

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
#: Pages in one level-2 block (2 MiB with a 4K granule): the only multi-page transition size.
PMD_NR_PAGES = 512
#: ``HANDLE_OFFSET`` of ``nvhe/pkvm.c``: handle = VM table index + 0x1000.
HANDLE_OFFSET = 0x1000
#: Leaf entries one guest share/unshare request may cover: ``GUEST_WALKER_DATA_INIT`` sets
#: ``max_ptes = 512`` and ``guest_request_walker`` spends two per leaf.
GUEST_REQUEST_MAX_LEAVES = 256
#: ``KVM_MAX_PVMS``: size of the hypervisor's VM table.
KVM_MAX_PVMS = 255

HOST_TABLE = "pkvm.host"
HYP_TABLE = "pkvm.hyp"
GUEST_TABLE = "pkvm.guest"


class PageState(enum.IntEnum):
    """``enum pkvm_page_state`` (``nvhe/memory.h``), values as the kernel's."""

    OWNED = 0
    SHARED_OWNED = 1 << 0
    SHARED_BORROWED = 1 << 1
    NOPAGE = (1 << 0) | (1 << 1)
    #: Guest only: an invalid guest PTE annotated as poisoned (after a force reclaim).
    POISON = 1 << 2


class Component(enum.IntEnum):
    """``enum pkvm_component_id``: who a host stage-2 annotation names as the owner."""

    HOST = 0
    HYP = 1
    GUEST = 2


@attrs.frozen
class HostPage:
    """One host-table entry: the host's state of a page and, if it gave the page away, to whom.

    ``owner`` is the host stage-2 annotation (``PKVM_ID_*``); for pages of a guest,
    ``handle`` names the guest and ``delta`` is ``pfn - gfn`` of its stage-2 mapping.
    ``share_count`` is ``host_share_guest_count`` (shares with non-protected guests).
    """

    state: PageState = PageState.OWNED
    owner: Component = Component.HOST
    handle: int = 0
    delta: int = 0
    share_count: int = 0

    def gfn(self, pfn: int) -> int:
        """The guest frame *pfn* is mapped at (meaningful when ``owner`` is a guest)."""
        return pfn - self.delta


#: The state of every page the host never gave away (absent from the table).
HOST_OWNED = HostPage()


@attrs.frozen
class GuestPage:
    """One guest-table entry: the guest's state of a gfn and its mapping (``pfn - gfn``)."""

    state: PageState
    delta: int = 0

    def pfn(self, gfn: int) -> int:
        """The host page *gfn* maps to."""
        return gfn + self.delta


GUEST_NOPAGE = GuestPage(PageState.NOPAGE)


class HypError(KvmError):
    """A hypervisor call refused: *err* is what the EL2 function returns (negated)."""

    def __init__(self, err: int, call: str, why: str) -> None:
        self.call = call
        super().__init__(err, "pKVM-3.2", f"{call}: {why}")


#: ``listener(table, pfn, npages, old, new)``: a table entry changed over ``[pfn, pfn+npages)``.
Listener = Callable[[str, int, int, Any, Any], None]
#: ``count(name, n)``: add *n* to a cost counter.
CountFn = Callable[[str, int], None]


@attrs.define(eq=False)
class Pvmfw:
    """The protected-VM firmware the hypervisor copies in at its guest address (``pvmfw``)."""

    ipa: int
    image: bytes

    @classmethod
    def checked(cls, protected: bool, ipa: int, image: bytes) -> Pvmfw:
        """The firmware of a VM: EINVAL for a non-protected VM, an unaligned *ipa* or an
        empty image."""
        call = "pkvm_set_pvmfw"
        if not protected:
            raise HypError(errno.EINVAL, call, "pvmfw is for protected VMs only")
        if ipa & (PAGE_SIZE - 1) or ipa < 0 or not image:
            raise HypError(errno.EINVAL, call, "pvmfw needs a page-aligned address and an image")
        return cls(ipa, bytes(image))

    @property
    def gfn_range(self) -> tuple[int, int]:
        """``[first gfn, end gfn)`` covered by the image."""
        start = self.ipa >> PAGE_SHIFT
        return start, start + max(1, -(-len(self.image) // PAGE_SIZE))


@attrs.define(eq=False)
class HypVm:
    """The hypervisor's view of one VM (``struct pkvm_hyp_vm``)."""

    handle: int
    vmid: int
    protected: bool
    #: gfn -> GuestPage (absent: NOPAGE).
    guest: RangeMap[GuestPage] = attrs.field(factory=RangeMap)
    dying: bool = False
    pvmfw: Pvmfw | None = None
    counters: Counter[str] = attrs.field(factory=Counter)
    count: CountFn | None = None
    listener: Listener | None = None

    def add(self, name: str, n: int = 1) -> None:
        """Count *n* of *name* against this VM."""
        if self.count is not None:
            self.count(name, n)
        else:
            self.counters[name] += n

    def state(self, gfn: int) -> GuestPage:
        """The guest's entry for *gfn*."""
        return self.guest.get(gfn) or GUEST_NOPAGE

    def mapped(self) -> Iterator[tuple[int, int, GuestPage]]:
        """Every guest range with a valid stage-2 mapping (not NOPAGE, not POISON)."""
        for start, end, page in self.guest.items():
            if page.state != PageState.POISON:
                yield start, end, page


def _transition_size(pfn: int, gfn: int, nr_pages: int, call: str) -> None:
    """``__guest_check_transition_size``: one page, or one aligned level-2 block."""
    if nr_pages == 1:
        return
    if nr_pages != PMD_NR_PAGES:
        raise HypError(errno.EINVAL, call, f"{nr_pages} pages is neither one page nor one block")
    if (pfn | gfn) & (PMD_NR_PAGES - 1):
        raise HypError(errno.EINVAL, call, "block transition not aligned to the block size")


class Hypervisor:
    """The EL2 hypervisor of one machine: the host and hyp tables and the VM table.

    *zero* clears host pages (``hyp_poison_page``: memset + D-cache clean to PoC),
    *write* stores bytes into a host page (pvmfw loading).  Costs are counted against the
    VM concerned (:attr:`HypVm.count`), or :attr:`counters` for host<->hyp calls.
    """

    def __init__(
        self,
        *,
        zero: Callable[[int, int], None] | None = None,
        write: Callable[[int, int, bytes], None] | None = None,
        listener: Listener | None = None,
        max_vms: int = KVM_MAX_PVMS,
    ) -> None:
        self._zero = zero
        self._write = write
        self.listener = listener
        self.max_vms = max_vms
        #: pfn -> HostPage (absent: host OWNED).
        self.host: RangeMap[HostPage] = RangeMap()
        #: pfn -> the hypervisor's own state (absent: NOPAGE).
        self.hyp: RangeMap[PageState] = RangeMap()
        self.vm_table: list[HypVm | None] = []
        self.counters: Counter[str] = Counter()

    # --- queries ---------------------------------------------------------------------------
    def host_state(self, pfn: int) -> HostPage:
        """The host's entry for *pfn*."""
        return self.host.get(pfn) or HOST_OWNED

    def hyp_state(self, pfn: int) -> PageState:
        """The hypervisor's own state of *pfn*."""
        state = self.hyp.get(pfn)
        return PageState.NOPAGE if state is None else state

    def host_entries(self, pfn: int, npages: int) -> Iterator[tuple[int, int, HostPage]]:
        """Host entries over ``[pfn, pfn+npages)`` in order, gaps reported as host OWNED."""
        pos, end = pfn, pfn + npages
        for start, stop, page in self.host.items(pfn, end):
            if start > pos:
                yield pos, start, HOST_OWNED
            yield start, stop, page
            pos = stop
        if pos < end:
            yield pos, end, HOST_OWNED

    def host_accessible(self, pfn: int) -> bool:
        """May the host stage-2 map *pfn* (backends.md 3.5: OWNED, SHARED_OWNED, SHARED_BORROWED)?"""
        return self.host_state(pfn).state != PageState.NOPAGE

    def vm(self, handle: int) -> HypVm:
        """The VM of *handle* (``get_vm_by_handle``); ENOENT if there is none."""
        idx = handle - HANDLE_OFFSET
        if 0 <= idx < len(self.vm_table):
            vm = self.vm_table[idx]
            if vm is not None:
                return vm
        raise HypError(errno.ENOENT, "get_vm_by_handle", f"no VM with handle {handle:#x}")

    # --- bookkeeping ----------------------------------------------------------------------
    def _notify(self, vm: HypVm | None, table: str, pfn: int, npages: int, change: tuple[Any, Any]) -> None:
        old, new = change
        listener = vm.listener if vm is not None and vm.listener is not None else self.listener
        if listener is not None and old != new:
            listener(table, pfn, npages, old, new)

    def _count(self, vm: HypVm | None, name: str, n: int = 1) -> None:
        if vm is not None:
            vm.add(name, n)
        else:
            self.counters[name] += n

    def _set_host(self, vm: HypVm | None, pfn: int, npages: int, new: HostPage) -> None:
        old = list(self.host_entries(pfn, npages))
        self.host.set(pfn, pfn + npages, None if new == HOST_OWNED else new)
        for start, stop, page in old:
            self._notify(vm, HOST_TABLE, start, stop - start, (page, new))

    def _set_hyp(self, pfn: int, npages: int, new: PageState) -> None:
        old = self.hyp_state(pfn)
        self.hyp.set(pfn, pfn + npages, None if new == PageState.NOPAGE else new)
        self._notify(None, HYP_TABLE, pfn, npages, (old, new))

    def _set_guest(self, vm: HypVm, gfn: int, npages: int, new: GuestPage) -> None:
        old = vm.guest.items(gfn, gfn + npages)
        changes = [(s, e, p) for s, e, p in old]
        vm.guest.set(gfn, gfn + npages, None if new.state == PageState.NOPAGE else new)
        if not changes:
            changes = [(gfn, gfn + npages, GuestPage(PageState.NOPAGE, new.delta))]
        for start, stop, page in changes:
            # Reported by host page: the guest table is indexed by gfn, the hook by pfn.
            shown_new = new if new.state != PageState.NOPAGE else GuestPage(PageState.NOPAGE, page.delta)
            self._notify(vm, GUEST_TABLE, page.pfn(start), stop - start, (page, shown_new))

    def _zero_pages(self, vm: HypVm | None, pfn: int, npages: int) -> None:
        if self._zero is not None:
            self._zero(pfn, npages)
        self._count(vm, "zeroed_bytes", npages * PAGE_SIZE)
        self._count(vm, "dcache_clean_pages", npages)

    def _guest_run(self, vm: HypVm, gfn: int, npages: int, want: PageState, call: str) -> GuestPage:
        """The single guest entry covering ``[gfn, gfn+npages)`` in state *want*.

        For host-initiated calls (``__check_host_shared_guest``, ``get_valid_guest_pte``): a
        gfn with no valid mapping fails with ENOENT, another state with EPERM, a range that
        is not one mapping with EINVAL.
        """
        entry = vm.guest.entry(gfn)
        page = entry[2] if entry is not None else GUEST_NOPAGE
        if page.state in (PageState.NOPAGE, PageState.POISON) and want != page.state:
            raise HypError(errno.ENOENT, call, f"gfn {gfn:#x} has no valid stage-2 mapping")
        if page.state != want:
            raise HypError(errno.EPERM, call, f"gfn {gfn:#x} is guest {page.state.name}, not {want.name}")
        if entry is None or entry[1] < gfn + npages:
            raise HypError(errno.EINVAL, call, f"gfns [{gfn:#x}, +{npages}) are not one {want.name} run")
        return page

    def guest_request(
        self, vm: HypVm, gfn: int, npages: int, want: PageState, call: str
    ) -> tuple[GuestPage, int]:
        """``__guest_request_page_transition``: the run of *want* pages a guest request covers.

        Walks the guest's leaves from *gfn* as Android's ``guest_request_walker`` does: a
        leaf not in state *want* fails the whole request, with EFAULT for one that has no
        valid mapping (MEM_SHARE then has the host map the range and retries) and EPERM
        otherwise; the walk stops, successfully, at the first physically discontiguous leaf
        or after :data:`GUEST_REQUEST_MAX_LEAVES` leaves.  Returns the entry at *gfn* and
        the number of pages covered (at least one, at most *npages*); changes nothing.
        """
        limit = min(gfn + npages, gfn + GUEST_REQUEST_MAX_LEAVES)
        first: GuestPage | None = None
        pos = gfn
        for start, stop, page in vm.guest.items(gfn, limit):
            if start > pos:
                break  # a gap: the leaf at pos has no valid mapping
            if page.state != want:
                err = errno.EFAULT if page.state == PageState.POISON else errno.EPERM
                raise HypError(err, call, f"gfn {start:#x} is guest {page.state.name}, not {want.name}")
            if first is None:
                first = page
            elif page.delta != first.delta:
                return first, pos - gfn  # -E2BIG from the walker: physically discontiguous
            pos = stop
        if first is None or pos < limit:
            raise HypError(errno.EFAULT, call, f"gfn {pos:#x} has no valid stage-2 mapping")
        return first, pos - gfn

    def _guest_check_nopage(self, vm: HypVm, gfn: int, npages: int, call: str) -> None:
        if vm.guest.overlaps(gfn, gfn + npages):
            state = vm.state(next(s for s, _, _ in vm.guest.items(gfn, gfn + npages))).state
            raise HypError(errno.EPERM, call, f"gfn range at {gfn:#x} is guest {state.name}, not NOPAGE")

    def _host_check(
        self,
        pfn: int,
        npages: int,
        call: str,
        ok: Callable[[HostPage], bool],
        *,
        want: str,
        err: int = errno.EPERM,
    ) -> list[tuple[int, int, HostPage]]:
        entries = list(self.host_entries(pfn, npages))
        for start, _, page in entries:
            if not ok(page):
                raise HypError(err, call, f"pfn {start:#x} is host {page.state.name}, not {want}")
        return entries

    # --- VM lifetime (nvhe/pkvm.c) ----------------------------------------------------------
    def init_vm(self, *, protected: bool) -> HypVm:
        """``__pkvm_init_vm``: insert a VM in the table; its handle and VMID follow the slot.

        ENOMEM when all ``KVM_MAX_PVMS`` slots are taken (``insert_vm_table_entry``).
        """
        try:
            idx = self.vm_table.index(None)
        except ValueError:
            idx = len(self.vm_table)
            if idx >= self.max_vms:
                raise HypError(errno.ENOMEM, "__pkvm_init_vm", f"VM table full ({self.max_vms})") from None
            self.vm_table.append(None)
        # VMID 0 is the host's.
        vm = HypVm(handle=idx + HANDLE_OFFSET, vmid=idx + 1, protected=protected)
        self.vm_table[idx] = vm
        self.counters["init_vm"] += 1
        return vm

    def _table_entry(self, vm: HypVm, call: str) -> None:
        """ENOENT unless *vm* is (still) in the VM table (``get_vm_by_handle``)."""
        idx = vm.handle - HANDLE_OFFSET
        if not (0 <= idx < len(self.vm_table) and self.vm_table[idx] is vm):
            raise HypError(errno.ENOENT, call, f"no VM with handle {vm.handle:#x}")

    def start_teardown_vm(self, vm: HypVm) -> None:
        """``__pkvm_start_teardown_vm``: the VM will not run again; its pages may be reclaimed.

        ENOENT for a VM no longer in the table, EINVAL if teardown already started.
        """
        call = "__pkvm_start_teardown_vm"
        self._table_entry(vm, call)
        if vm.dying:
            raise HypError(errno.EINVAL, call, "teardown already started")
        vm.dying = True

    def finalize_teardown_vm(self, vm: HypVm) -> None:
        """``__pkvm_finalize_teardown_vm``: free the handle once no page is left to reclaim.

        ENOENT for a VM no longer in the table, EBUSY unless teardown started.  EBUSY too
        while the guest still maps a page: the kernel's host reclaims every page first and
        the hypervisor does not check it (a page left would stay the dead guest's forever);
        the model refuses instead of leaking it.
        """
        call = "__pkvm_finalize_teardown_vm"
        self._table_entry(vm, call)
        if not vm.dying:
            raise HypError(errno.EBUSY, call, "teardown was not started")
        left = next(vm.mapped(), None)
        if left is not None:
            raise HypError(errno.EBUSY, call, f"gfn {left[0]:#x} still holds a page")
        vm.guest.clear()
        self.vm_table[vm.handle - HANDLE_OFFSET] = None
        self.counters["teardown_vm"] += 1

    def set_pvmfw(self, vm: HypVm, ipa: int, image: bytes) -> None:
        """Place the protected-VM firmware at guest address *ipa* (loaded at first fault).

        EINVAL for a non-protected VM, an unaligned *ipa* or an empty image; EBUSY once a
        page of that range was already given to the guest.
        """
        call = "pkvm_set_pvmfw"
        fw = Pvmfw.checked(vm.protected, ipa, image)
        if vm.guest.overlaps(*fw.gfn_range):
            raise HypError(errno.EBUSY, call, "the guest already owns pages of the pvmfw range")
        vm.pvmfw = fw

    # --- host <-> protected guest -------------------------------------------------------------
    def host_donate_guest(self, vm: HypVm, pfn: int, gfn: int, nr_pages: int = 1) -> None:
        """``__pkvm_host_donate_guest``: host OWNED -> NOPAGE (owner guest), guest NOPAGE -> OWNED.

        Contents are kept (no copy); pages of the pvmfw range receive the firmware.  EINVAL
        for a non-protected or dying VM (the hypercall handler), EPERM on a state mismatch.
        """
        call = "__pkvm_host_donate_guest"
        if not vm.protected or vm.dying:
            # handle___pkvm_host_donate_guest: no loaded vCPU (a dying VM cannot load one)
            # or a non-protected one.
            raise HypError(errno.EINVAL, call, "needs a loaded vCPU of a live protected VM")
        _transition_size(pfn, gfn, nr_pages, call)
        self._host_check(pfn, nr_pages, call, lambda p: p == HOST_OWNED, want="OWNED")
        self._guest_check_nopage(vm, gfn, nr_pages, call)
        delta = pfn - gfn
        self._set_host(vm, pfn, nr_pages, HostPage(PageState.NOPAGE, Component.GUEST, vm.handle, delta))
        self._count(vm, "host_stage2_unmap")
        self._count(vm, "tlbi")
        self._load_pvmfw(vm, pfn, gfn, nr_pages)
        self._set_guest(vm, gfn, nr_pages, GuestPage(PageState.OWNED, delta))
        self._count(vm, "donations")
        self._count(vm, "donated_pages", nr_pages)
        self._count(vm, "stage2_map")

    def host_donate_guest_pages(self, vm: HypVm, pfn: int, gfn: int, nr_pages: int) -> int:
        """*nr_pages* one-page ``__pkvm_host_donate_guest`` calls in a row, as the host makes
        them for a run of guest stage-2 faults: counted per call, each table changed once.

        The pages up to the first one a call would refuse are donated; that call's error
        is raised (nothing donated) if it is the first page, else the pages donated are
        returned and the refusal is left to the call that reaches it.
        """
        call = "__pkvm_host_donate_guest"
        if not vm.protected or vm.dying:
            raise HypError(errno.EINVAL, call, "needs a loaded vCPU of a live protected VM")
        n = min(self._first_entry(self.host, pfn, nr_pages), self._first_entry(vm.guest, gfn, nr_pages))
        if not n:
            self.host_donate_guest(vm, pfn, gfn)  # raises what the one-page call raises
            return 1
        delta = pfn - gfn
        self._set_host(vm, pfn, n, HostPage(PageState.NOPAGE, Component.GUEST, vm.handle, delta))
        self._load_pvmfw(vm, pfn, gfn, n)
        self._set_guest(vm, gfn, n, GuestPage(PageState.OWNED, delta))
        for name in ("host_stage2_unmap", "tlbi", "donations", "donated_pages", "stage2_map"):
            self._count(vm, name, n)
        return n

    @staticmethod
    def _first_entry(table: RangeMap[Any], start: int, npages: int) -> int:
        """Pages from *start* (at most *npages*) before the first stored entry: host pages
        the host owns (``OWNED`` is not stored), gfns the guest does not map (``NOPAGE``)."""
        ent = table.first_overlap(start, start + npages)
        return npages if ent is None else ent[0] - start

    def _load_pvmfw(self, vm: HypVm, pfn: int, gfn: int, nr_pages: int) -> None:
        """``pkvm_load_pvmfw_pages``: the hypervisor copies the firmware into donated pages."""
        fw = vm.pvmfw
        if fw is None:
            return
        first, end = fw.gfn_range
        for g in range(max(first, gfn), min(end, gfn + nr_pages)):
            offset = (g - first) * PAGE_SIZE
            chunk = fw.image[offset : offset + PAGE_SIZE].ljust(PAGE_SIZE, b"\0")
            if self._write is not None:
                self._write(pfn + (g - gfn), 0, chunk)
            self._count(vm, "pvmfw_bytes", PAGE_SIZE)

    def guest_share_host(self, vm: HypVm, gfn: int, nr_pages: int = 1) -> int:
        """``__pkvm_guest_share_host`` (guest HVC MEM_SHARE): guest OWNED -> SHARED_OWNED,
        host NOPAGE -> SHARED_BORROWED.  In place: same page, contents kept.

        Shares the run :meth:`guest_request` finds (possibly fewer than *nr_pages* pages)
        and returns its length, the ``nr_shared`` the guest gets in x1.
        """
        call = "__pkvm_guest_share_host"
        page, nr_pages = self.guest_request(vm, gfn, nr_pages, PageState.OWNED, call)
        pfn = page.pfn(gfn)
        self._host_check(
            pfn,
            nr_pages,
            call,
            lambda p: p.state == PageState.NOPAGE and p.owner == Component.GUEST and p.handle == vm.handle,
            want="NOPAGE owned by this guest",
        )
        self._set_host(
            vm, pfn, nr_pages, HostPage(PageState.SHARED_BORROWED, Component.GUEST, vm.handle, page.delta)
        )
        self._count(vm, "host_stage2_map")
        self._set_guest(vm, gfn, nr_pages, GuestPage(PageState.SHARED_OWNED, page.delta))
        return nr_pages

    def guest_unshare_host(self, vm: HypVm, gfn: int, nr_pages: int = 1) -> int:
        """``__pkvm_guest_unshare_host`` (HVC MEM_UNSHARE): guest SHARED_OWNED -> OWNED,
        host SHARED_BORROWED -> NOPAGE (re-annotated to the guest).

        Unshares the run :meth:`guest_request` finds and returns its length (``nr_unshared``).
        """
        call = "__pkvm_guest_unshare_host"
        page, nr_pages = self.guest_request(vm, gfn, nr_pages, PageState.SHARED_OWNED, call)
        pfn = page.pfn(gfn)
        self._host_check(
            pfn, nr_pages, call, lambda p: p.state == PageState.SHARED_BORROWED, want="SHARED_BORROWED"
        )
        self._set_host(vm, pfn, nr_pages, HostPage(PageState.NOPAGE, Component.GUEST, vm.handle, page.delta))
        self._count(vm, "host_stage2_unmap")
        self._count(vm, "tlbi")
        self._set_guest(vm, gfn, nr_pages, GuestPage(PageState.OWNED, page.delta))
        return nr_pages

    def guest_relinquish_to_host(self, vm: HypVm, gfn: int) -> int | None:
        """``__pkvm_guest_relinquish_to_host`` (HVC MEM_RELINQUISH): give one page back early.

        The expected guest state depends on the VM type (``relinquish_walker``): a protected
        guest's OWNED page is zeroed, unmapped from the guest and returned to the host; a
        non-protected guest's SHARED_BORROWED page is unmapped and the host's share dropped
        (not zeroed: it is the host's memory).  Returns the pfn; an unmapped gfn does
        nothing (None).  Any other state fails with EPERM.
        """
        call = "__pkvm_guest_relinquish_to_host"
        expected = PageState.OWNED if vm.protected else PageState.SHARED_BORROWED
        page = vm.state(gfn)
        if page.state in (PageState.NOPAGE, PageState.POISON):
            return None
        if page.state != expected:
            raise HypError(errno.EPERM, call, f"gfn {gfn:#x} is guest {page.state.name}, not {expected.name}")
        self._count(vm, "relinquished_pages")
        if not vm.protected:
            self.host_unshare_guest(vm, gfn)
            return page.pfn(gfn)
        return self._give_back(vm, gfn, 1, page, PageState.NOPAGE)

    def _give_back(self, vm: HypVm, gfn: int, npages: int, page: GuestPage, leave: PageState) -> int:
        """Unmap guest pages and return them to the host, zeroed first if the guest owned them.

        *leave* is what the guest PTE becomes (NOPAGE, or POISON for a force reclaim).
        """
        pfn = page.pfn(gfn)
        if page.state == PageState.OWNED:
            self._zero_pages(vm, pfn, npages)
        self._set_guest(vm, gfn, npages, GuestPage(leave, page.delta))
        # The kernel gives pages back one hypercall each: costs are per page.
        self._count(vm, "stage2_unmap", npages)
        self._set_host(vm, pfn, npages, HOST_OWNED)
        self._count(vm, "host_stage2_map", npages)
        return pfn

    # --- host <-> non-protected guest ---------------------------------------------------------
    def host_share_guest(self, vm: HypVm, pfn: int, gfn: int, nr_pages: int = 1) -> None:
        """``__pkvm_host_share_guest``: host OWNED/SHARED_OWNED (count+1), guest NOPAGE -> SHARED_BORROWED."""
        call = "__pkvm_host_share_guest"
        if vm.protected:  # handle___pkvm_host_share_guest
            raise HypError(errno.EINVAL, call, "protected guests get pages by donation")
        _transition_size(pfn, gfn, nr_pages, call)
        entries = self._host_check(
            pfn,
            nr_pages,
            call,
            lambda p: p == HOST_OWNED or (p.state == PageState.SHARED_OWNED and p.share_count > 0),
            want="OWNED or SHARED_OWNED with guests",
        )
        self._guest_check_nopage(vm, gfn, nr_pages, call)
        for start, stop, page in entries:
            shared = HostPage(PageState.SHARED_OWNED, share_count=page.share_count + 1)
            self._set_host(vm, start, stop - start, shared)
        self._set_guest(vm, gfn, nr_pages, GuestPage(PageState.SHARED_BORROWED, pfn - gfn))
        self._count(vm, "stage2_map")

    def host_share_guest_pages(self, vm: HypVm, pfn: int, gfn: int, nr_pages: int) -> int:
        """*nr_pages* one-page ``__pkvm_host_share_guest`` calls in a row (a run of a normal
        VM's stage-2 faults), counted per call: as :meth:`host_donate_guest_pages`, the
        pages up to the first refused one are shared, that refusal raised only if it is
        the first page."""
        call = "__pkvm_host_share_guest"
        if vm.protected:
            raise HypError(errno.EINVAL, call, "protected guests get pages by donation")
        n = self._first_entry(vm.guest, gfn, nr_pages)
        pos = pfn
        for _, stop, page in self.host_entries(pfn, n):
            if not (page == HOST_OWNED or (page.state == PageState.SHARED_OWNED and page.share_count > 0)):
                break
            pos = stop
        n = pos - pfn
        if not n:
            self.host_share_guest(vm, pfn, gfn)  # raises what the one-page call raises
            return 1
        for start, stop, page in list(self.host_entries(pfn, n)):
            shared = HostPage(PageState.SHARED_OWNED, share_count=page.share_count + 1)
            self._set_host(vm, start, stop - start, shared)
        self._set_guest(vm, gfn, n, GuestPage(PageState.SHARED_BORROWED, pfn - gfn))
        self._count(vm, "stage2_map", n)
        return n

    def host_unshare_guest(self, vm: HypVm, gfn: int, nr_pages: int = 1) -> None:
        """``__pkvm_host_unshare_guest``: guest SHARED_BORROWED -> NOPAGE, host count-1 (OWNED at 0)."""
        call = "__pkvm_host_unshare_guest"
        if vm.protected:  # handle___pkvm_host_unshare_guest: get_np_pkvm_hyp_vm
            raise HypError(errno.EINVAL, call, "not a non-protected VM")
        page = self._guest_run(vm, gfn, nr_pages, PageState.SHARED_BORROWED, call)
        pfn = page.pfn(gfn)
        entries = self._host_check(
            pfn,
            nr_pages,
            call,
            lambda p: p.state == PageState.SHARED_OWNED and p.share_count > 0,
            want="SHARED_OWNED",
        )
        self._set_guest(vm, gfn, nr_pages, GuestPage(PageState.NOPAGE, page.delta))
        for start, stop, host in entries:
            count = host.share_count - 1
            new = HOST_OWNED if count == 0 else HostPage(PageState.SHARED_OWNED, share_count=count)
            self._set_host(vm, start, stop - start, new)
        self._count(vm, "stage2_unmap")
        self._count(vm, "tlbi")

    # --- reclaim -----------------------------------------------------------------------------
    def host_reclaim_page_guest(self, vm: HypVm, gfn: int, nr_pages: int = 1) -> int:
        """``__pkvm_host_reclaim_page_guest`` (teardown): take a page back from a dying VM.

        Guest OWNED pages are zeroed and cleaned to PoC first; SHARED_OWNED ones come back as
        they are (the host already sees them).  EINVAL unless teardown started
        (``__pkvm_reclaim_dying_guest_page``), ENOENT for an unmapped gfn, E2BIG for a block
        over smaller mappings, EBUSY for a shared page the host does not borrow; a poisoned
        gfn is a success that changes nothing (``-EHWPOISON`` is ignored).  Returns the pfn.
        """
        call = "__pkvm_host_reclaim_page_guest"
        _transition_size(0, gfn, nr_pages, call)
        return self._reclaim_run(vm, gfn, nr_pages, call)

    def _reclaim_run(self, vm: HypVm, gfn: int, nr_pages: int, call: str) -> int:
        if not vm.dying:  # __pkvm_reclaim_dying_guest_page
            raise HypError(errno.EINVAL, call, "VM is not dying")
        page = vm.state(gfn)
        entry = vm.guest.entry(gfn)
        if page.state == PageState.NOPAGE:
            raise HypError(errno.ENOENT, call, f"gfn {gfn:#x} is not mapped")
        pfn = page.pfn(gfn)
        if page.state == PageState.POISON:
            # -EHWPOISON is success: the force reclaim already gave the page back.
            return pfn
        if entry is None or entry[1] < gfn + nr_pages:
            raise HypError(errno.E2BIG, call, "the guest maps that range with smaller pages")
        if page.state == PageState.SHARED_OWNED:
            # Presumably lent on (FF-A): the hypervisor leaves it to another path.
            self._host_check(
                pfn,
                nr_pages,
                call,
                lambda p: p.state == PageState.SHARED_BORROWED,
                want="SHARED_BORROWED",
                err=errno.EBUSY,
            )
        elif page.state == PageState.SHARED_BORROWED:
            self.host_unshare_guest(vm, gfn, nr_pages)
            self._count(vm, "reclaims", nr_pages)
            return pfn
        elif page.state != PageState.OWNED:
            raise HypError(errno.EPERM, call, f"gfn {gfn:#x} is guest {page.state.name}")
        self._count(vm, "reclaims", nr_pages)
        return self._give_back(vm, gfn, nr_pages, page, PageState.NOPAGE)

    def host_force_reclaim_page_guest(self, vm: HypVm, gfn: int) -> int:
        """``__pkvm_host_force_reclaim_page_guest``: the host takes a donated page from a live guest.

        Only a page the host cannot access is taken: EAGAIN when its host state is not
        NOPAGE (the guest shares it, the host already got it back, or it is the host's page
        lent to a normal VM), EPERM when the guest does not own it.  The guest PTE becomes
        POISON (a later guest access is a poison fault), the page is zeroed and the host
        owns it again.  ENOENT if *gfn* maps nothing.  Returns the pfn.
        """
        call = "__pkvm_host_force_reclaim_page_guest"
        page = vm.state(gfn)
        if page.state == PageState.NOPAGE:
            raise HypError(errno.ENOENT, call, f"gfn {gfn:#x} is not mapped")
        host = self.host_state(page.pfn(gfn))
        if host.state != PageState.NOPAGE:
            raise HypError(errno.EAGAIN, call, f"pfn {page.pfn(gfn):#x} is host {host.state.name}")
        if host.owner != Component.GUEST or host.handle != vm.handle or page.state != PageState.OWNED:
            raise HypError(errno.EPERM, call, f"gfn {gfn:#x} is guest {page.state.name}, not OWNED")
        return self._force_reclaim_run(vm, gfn, 1)

    def _force_reclaim_run(self, vm: HypVm, gfn: int, nr_pages: int) -> int:
        """Poison the guest PTEs of one run and give its pages back (zeroed if OWNED).

        The range form also takes SHARED_OWNED runs: when the VMM frees guest_memfd under a
        live guest, no guest PTE may keep pointing at a freed page.
        """
        page = vm.state(gfn)
        self._count(vm, "force_reclaims", nr_pages)
        return self._give_back(vm, gfn, nr_pages, page, PageState.POISON)

    def reclaim_guest_range(self, vm: HypVm, start: int, end: int) -> int:
        """The host takes back every page the guest maps in gfns ``[start, end)``.

        What a host does page by page (one hypercall each, counted so) done run by run:
        reclaim if the VM is dying, unshare for a non-protected VM, force reclaim for a live
        protected VM.  Returns the number of pages taken back.
        """
        done = 0
        runs = [(s, e, p) for s, e, p in vm.guest.items(start, end) if p.state != PageState.POISON]
        for s, e, page in runs:
            if vm.dying:
                self._reclaim_run(vm, s, e - s, "__pkvm_host_reclaim_page_guest")
            elif page.state == PageState.SHARED_BORROWED:
                self.host_unshare_guest(vm, s, e - s)
            else:
                self._force_reclaim_run(vm, s, e - s)
            done += e - s
        return done

    # --- host <-> hypervisor ---------------------------------------------------------------------
    def host_share_hyp(self, pfn: int) -> None:
        """``__pkvm_host_share_hyp``: host OWNED -> SHARED_OWNED, hyp NOPAGE -> SHARED_BORROWED."""
        call = "__pkvm_host_share_hyp"
        self._host_check(pfn, 1, call, lambda p: p == HOST_OWNED, want="OWNED")
        self._hyp_check(pfn, 1, PageState.NOPAGE, call)
        self._set_host(None, pfn, 1, HostPage(PageState.SHARED_OWNED))
        self._set_hyp(pfn, 1, PageState.SHARED_BORROWED)

    def host_unshare_hyp(self, pfn: int) -> None:
        """``__pkvm_host_unshare_hyp``: host SHARED_OWNED -> OWNED, hyp SHARED_BORROWED -> NOPAGE."""
        call = "__pkvm_host_unshare_hyp"
        self._host_check(
            pfn,
            1,
            call,
            lambda p: p.state == PageState.SHARED_OWNED and p.share_count == 0,
            want="SHARED_OWNED",
        )
        self._hyp_check(pfn, 1, PageState.SHARED_BORROWED, call)
        self._set_host(None, pfn, 1, HOST_OWNED)
        self._set_hyp(pfn, 1, PageState.NOPAGE)

    def host_donate_hyp(self, pfn: int, nr_pages: int = 1) -> None:
        """``__pkvm_host_donate_hyp``: host OWNED -> NOPAGE (owner hyp), hyp NOPAGE -> OWNED."""
        call = "__pkvm_host_donate_hyp"
        self._host_check(pfn, nr_pages, call, lambda p: p == HOST_OWNED, want="OWNED")
        self._hyp_check(pfn, nr_pages, PageState.NOPAGE, call)
        self._set_host(None, pfn, nr_pages, HostPage(PageState.NOPAGE, Component.HYP))
        self._set_hyp(pfn, nr_pages, PageState.OWNED)

    def hyp_donate_host(self, pfn: int, nr_pages: int = 1) -> None:
        """``__pkvm_hyp_donate_host``: hyp OWNED -> NOPAGE, host NOPAGE (owner hyp) -> OWNED."""
        call = "__pkvm_hyp_donate_host"
        self._hyp_check(pfn, nr_pages, PageState.OWNED, call)
        self._host_check(
            pfn,
            nr_pages,
            call,
            lambda p: p.state == PageState.NOPAGE and p.owner == Component.HYP,
            want="NOPAGE",
        )
        self._set_hyp(pfn, nr_pages, PageState.NOPAGE)
        self._set_host(None, pfn, nr_pages, HOST_OWNED)

    def _hyp_check(self, pfn: int, npages: int, want: PageState, call: str) -> None:
        if want == PageState.NOPAGE:
            bad = next(self.hyp.items(pfn, pfn + npages), None)
            state = bad[2] if bad is not None else None
        else:
            state = None if self.hyp.covers(pfn, pfn + npages, want) else self.hyp_state(pfn)
        if state is not None:
            raise HypError(errno.EPERM, call, f"pfn {pfn:#x} is hyp {state.name}, not {want.name}")
