"""Random allocate / punch / host and guest access / poison / rebind sequences on one
guest_memfd, checked page by page against a naive reference (spec FA-4..FA-8, M-3, M-5, M-7,
M-10, L-7, E-1, E-2).

The reference keeps, per page index, whether a folio exists, whether it is poisoned and the
page's bytes.  After every step the model must agree, and every stage-2 leaf of the bound slot
must point at the pfn currently backing its page (no stale mapping survives a punch, a poison or
a slot move).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from gmem_support import INIT_SHARED, KEEP, MMAP, PAGE, PUNCH, bind, delete_slot
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import guestmem
from guestmem import HostSigbus, KvmError, MemoryFault, uapi
from guestmem.errors import EHWPOISON

NPAGES = 12  # i_size in pages
MAPPED = NPAGES + 2  # the host mapping runs two pages past EOF (M-3)
SLOT_PGOFF, SLOT_PAGES = 2, 8  # the gmem-only memslot binds pages [2, 10)
SLOT_GPAS = (0x40000, 0x80000, 0x200000)  # where the slot may be (re)bound

pages = st.integers(0, NPAGES + 3)
counts = st.integers(1, 5)
in_page = st.integers(0, PAGE - 64)
payload = st.binary(min_size=1, max_size=64)


class GmemMachine(RuleBasedStateMachine):
    """One MMAP|INIT_SHARED guest_memfd of a DEFAULT VM, host-mapped and bound as a gmem-only slot."""

    def __init__(self) -> None:
        super().__init__()
        self.kvm = guestmem.open("sw")
        self.vm = self.kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
        self.gmem = self.vm.create_guest_memfd(NPAGES * PAGE, MMAP | INIT_SHARED)
        self.slot_gpa = SLOT_GPAS[0]
        bind(self.vm, self.gmem, self.slot_gpa, SLOT_PAGES * PAGE, offset=SLOT_PGOFF * PAGE)
        self.view = self.gmem.mmap(MAPPED * PAGE)
        self.vcpu = self.vm.create_vcpu(0)
        self.inode = self.gmem.file.inode
        self.allocated: set[int] = set()
        self.poisoned: set[int] = set()
        self.data: dict[int, bytearray] = {}

    def teardown(self) -> None:
        self.view.close()
        self.vcpu.close()
        self.gmem.close()
        self.vm.close()
        self.kvm.close()

    # --- reference helpers --------------------------------------------------------------------
    def _store(self, index: int, offset: int, data: bytes) -> None:
        self.allocated.add(index)
        page = self.data.setdefault(index, bytearray(PAGE))
        page[offset : offset + len(data)] = data

    def _expect(self, index: int, offset: int, n: int) -> bytes:
        page = self.data.get(index)
        return bytes(n) if page is None else bytes(page[offset : offset + n])

    # --- rules -----------------------------------------------------------------------------------
    @rule(start=pages, n=counts)
    def allocate(self, start: int, n: int) -> None:
        """FA-5/FA-6: allocate inside i_size instantiates pages, beyond it is EINVAL and no-op."""
        if start + n > NPAGES:
            try:
                self.gmem.fallocate(KEEP, start * PAGE, n * PAGE)
            except KvmError as exc:
                assert (exc.errno, exc.rule) == (errno.EINVAL, "FA-5")
            else:
                raise AssertionError("allocate beyond i_size succeeded")
            return
        self.gmem.fallocate(KEEP, start * PAGE, n * PAGE)
        self.allocated.update(range(start, start + n))

    @rule(start=pages, n=counts)
    def punch(self, start: int, n: int) -> None:
        """FA-7/FA-8: punch (also past EOF) frees the pages; they read back as zeroes."""
        self.gmem.fallocate(PUNCH, start * PAGE, n * PAGE)
        for index in range(start, start + n):
            self.allocated.discard(index)
            self.poisoned.discard(index)
            self.data.pop(index, None)

    @rule(start=pages, n=counts, mode=st.sampled_from([KEEP, PUNCH]), skew=st.integers(1, PAGE - 1))
    def unaligned(self, start: int, n: int, mode: int, skew: int) -> None:
        """FA-4: an unaligned offset is EINVAL and changes nothing."""
        try:
            self.gmem.fallocate(mode, start * PAGE + skew, n * PAGE)
        except KvmError as exc:
            assert (exc.errno, exc.rule) == (errno.EINVAL, "FA-4")
        else:
            raise AssertionError("unaligned fallocate succeeded")

    @rule(index=st.integers(0, MAPPED - 1), offset=in_page, data=payload)
    def host_write(self, index: int, offset: int, data: bytes) -> None:
        """M-5: a host store faults the page in (allocating it); past EOF it is SIGBUS (M-3)."""
        try:
            self.view.write(index * PAGE + offset, data)
        except HostSigbus as exc:
            assert (exc.rule, index >= NPAGES) in (("M-3", True), ("E-1", False))
            assert index >= NPAGES or index in self.poisoned
            return
        assert index < NPAGES and index not in self.poisoned
        self._store(index, offset, data)

    @rule(index=st.integers(0, MAPPED - 1), offset=in_page, n=st.integers(1, 64))
    def host_read(self, index: int, offset: int, n: int) -> None:
        """M-5: a host load sees the reference bytes (zeroes for a hole, which it allocates)."""
        try:
            got = self.view.read(index * PAGE + offset, n)
        except HostSigbus as exc:
            assert (exc.rule, index >= NPAGES) in (("M-3", True), ("E-1", False))
            assert index >= NPAGES or index in self.poisoned
            return
        assert index not in self.poisoned
        assert got == self._expect(index, offset, n)
        self.allocated.add(index)

    @rule(page=st.integers(0, SLOT_PAGES - 1), offset=in_page, data=payload)
    def guest_write(self, page: int, offset: int, data: bytes) -> None:
        """M-7: a guest store on the gmem-only slot lands in the same folio the host maps."""
        index = SLOT_PGOFF + page
        if self._guest_poisoned(page, lambda gpa: self.vcpu.access(gpa + offset, data=data)):
            return
        self._store(index, offset, data)

    @rule(page=st.integers(0, SLOT_PAGES - 1), offset=in_page, n=st.integers(1, 64))
    def guest_read(self, page: int, offset: int, n: int) -> None:
        """M-7: a guest load sees the reference bytes."""
        index = SLOT_PGOFF + page
        got: list[bytes] = []
        if self._guest_poisoned(page, lambda gpa: got.append(self.vcpu.access(gpa + offset, n))):
            return
        assert got == [self._expect(index, offset, n)]
        self.allocated.add(index)

    def _guest_poisoned(self, page: int, access: Callable[[int], object]) -> bool:
        """Run the guest *access* on slot *page*; True if it failed as E-2 requires."""
        gpa = self.slot_gpa + page * PAGE
        try:
            access(gpa)
        except MemoryFault as exc:
            assert SLOT_PGOFF + page in self.poisoned
            assert (exc.errno, exc.gpa, exc.flags) == (EHWPOISON, gpa, 0)
            return True
        assert SLOT_PGOFF + page not in self.poisoned
        return False

    @precondition(lambda self: bool(self.allocated - self.poisoned))
    @rule(data=st.data())
    def poison(self, data: st.DataObject) -> None:
        """E-1: memory failure on an allocated page keeps the folio (and its bytes)."""
        index = data.draw(st.sampled_from(sorted(self.allocated - self.poisoned)))
        self.gmem.inject_memory_failure(index * PAGE)
        self.poisoned.add(index)

    @rule(gpa=st.sampled_from(SLOT_GPAS))
    def rebind(self, gpa: int) -> None:
        """L-7: delete the slot and bind the same pages elsewhere: contents are kept."""
        delete_slot(self.vm)
        bind(self.vm, self.gmem, gpa, SLOT_PAGES * PAGE, offset=SLOT_PGOFF * PAGE)
        self.slot_gpa = gpa

    @precondition(lambda self: bool(self.allocated))
    @rule()
    def drop_host_ptes(self) -> None:
        """MADV_DONTNEED drops host PTEs only: contents and folios stay."""
        self.view.madvise(uapi.MADV_DONTNEED)

    # --- invariants -----------------------------------------------------------------------------
    @invariant()
    def allocation_matches(self) -> None:
        """Allocated-ness and poison per page, and a distinct live host pfn per allocated page."""
        have = {i for i in range(NPAGES + 4) if self.inode.pfn(i) is not None}
        assert have == self.allocated
        assert {i for i in have if self.inode.is_poisoned(i)} == self.poisoned
        assert self.inode.allocated_pages() == len(self.allocated)
        pfns = [self.inode.pfn(i) for i in sorted(have)]
        assert len(set(pfns)) == len(pfns)
        assert all(self.kvm.host.is_allocated(p) for p in pfns)

    @invariant()
    def contents_match(self) -> None:
        """Every allocated page holds the reference bytes (read from host memory, no fault)."""
        for index in self.allocated:
            pfn = self.inode.pfn(index)
            assert self.kvm.host.read(pfn, 0, PAGE) == self._expect(index, 0, PAGE)

    @invariant()
    def stage2_not_stale(self) -> None:
        """Each stage-2 leaf of the slot maps the pfn currently backing its gmem page."""
        for s, e, spte in self.vm.mmu.sptes.items():
            for gfn in range(s, e):
                index = gfn - (self.slot_gpa >> uapi.PAGE_SHIFT) + SLOT_PGOFF
                assert SLOT_PGOFF <= index < SLOT_PGOFF + SLOT_PAGES
                assert index not in self.poisoned
                assert self.inode.pfn(index) == gfn + spte.delta

    @invariant()
    def host_ptes_not_stale(self) -> None:
        """Host PTEs exist only for allocated pages (a punch unmaps them, M-10)."""
        for index in range(NPAGES):
            if self.inode.host_mapped(index):
                assert index in self.allocated


GmemMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestGmemStateMachine = GmemMachine.TestCase
