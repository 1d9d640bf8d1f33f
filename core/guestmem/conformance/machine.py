"""The stateful machine: random guest_memfd sequences on one VM of a backend, checked step by
step against a naive reference (spec FA-4..FA-8, M-3..M-10, L-7, E-1, E-2, and the declared
conversion semantics).

:class:`GmemMachine` is a Hypothesis ``RuleBasedStateMachine`` over one VM of the backend
under test with the kit's RAM (:class:`~guestmem.conformance.kit.KitGuest`), driven
through the backend's intents (:class:`~guestmem.conformance.vmm.KitVmm`).  Which rules run depends
on the VM type:

* a VM type without private memory gets the guest_memfd file machine: allocate, punch,
  unaligned fallocate, host loads and stores through a mapping that runs past ``i_size``,
  guest loads and stores on the gmem-only memslot, memory failure, memslot rebinding,
  dropped host PTEs;
* a VM type that converts (:attr:`~guestmem.backend.VmTypeInfo.conversion`) gets guest
  private and shared accesses, conversions both ways, host accesses to both sides,
  private/shared mismatches (memory-fault exits) and, for destructive conversion, punches,
  with contents predicted from the declared semantics.

Every step is cross-checked: the reference against what the guest and the host read, and
against the model through the public views (which pages guest_memfd holds and their
bytes, which host pages are mapped, every stage-2 leaf against guest_memfd); the core's
:class:`~guestmem.invariants.InvariantChecker`, the ownership ledger's cross-checks and the
backend's own observers watch every event; at the end of each run everything is closed
and the leak check runs.

:func:`machine_for` makes the machine for one backend and VM type; :func:`run_machine`
runs it for a budget (``GmemConformance.test_stateful_machine``, ``guestmem fuzz``).
Requires Hypothesis.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from hypothesis import HealthCheck, Phase, settings
from hypothesis import seed as fix_seed
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, get_state_machine_test, invariant, precondition, rule

import guestmem
from guestmem import uapi
from guestmem.backend import VmTypeInfo, view
from guestmem.conformance.hostile import Hostility, draw_call, draw_reentrant
from guestmem.conformance.kit import KitGuest, private_probe
from guestmem.conformance.ledger import LeakError, OwnershipLedger, allocated, check_released, has_views
from guestmem.errors import EHWPOISON, GuestExit, HostSigbus, HypercallExit, KvmError, MemoryFault, MmioExit
from guestmem.invariants import InvariantChecker

PAGE = uapi.PAGE_SIZE
KEEP = uapi.FALLOC_FL_KEEP_SIZE
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED
NPAGES = 12  # RAM (and i_size) in pages
MAPPED = NPAGES + 2  # the host mapping runs two pages past EOF (M-3)
SLOT_GPAS = (0x10000000, 0x10040000, 0x10200000)  # where the memslot may be (re)bound


class Draw:
    """One argument of a rule, drawn two ways: as a Hypothesis strategy (the kit's runs,
    which Hypothesis shrinks) and from a :class:`random.Random` (``guestmem fuzz``'s
    driver, :mod:`guestmem.fuzz.hostile`, which counts outcomes instead of stopping at the
    first failure and replays programs without Hypothesis)."""

    def __init__(self, strategy: st.SearchStrategy[Any], draw: Callable[[random.Random, Any], Any]) -> None:
        self.strategy = strategy
        #: ``draw(rng, machine)``: a value from *rng* for a rule of *machine*.
        self.draw = draw


def ints(lo: int, hi: int) -> Draw:
    """An integer in ``[lo, hi]``."""
    return Draw(st.integers(lo, hi), lambda rng, _: rng.randint(lo, hi))


def blobs(lo: int, hi: int) -> Draw:
    """Bytes, ``lo`` to ``hi`` of them."""
    return Draw(st.binary(min_size=lo, max_size=hi), lambda rng, _: rng.randbytes(rng.randint(lo, hi)))


def one_of(items: Sequence[Any]) -> Draw:
    """One of *items*."""
    return Draw(st.sampled_from(items), lambda rng, _: rng.choice(items))


def drawn(draw: Callable[[random.Random, Any], Any]) -> Draw:
    """Whatever *draw* makes of a random source and the machine (Hypothesis's random and
    runner, for the kit)."""
    pair = st.tuples(st.randoms(use_true_random=False), st.runner())
    return Draw(pair.map(lambda both: draw(both[0], both[1])), draw)


#: The mark :func:`step` leaves on a rule for the fuzz driver: ``(arguments, precondition)``.
STEP_MARK = "guestmem_fuzz_step"


def step(
    *, when: Callable[[Any], bool] | None = None, **arguments: Draw
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A rule of the machine (Hypothesis's ``@rule``, and ``@precondition(when)``), marked
    for the fuzz driver with its arguments and its precondition."""

    def mark(function: Callable[..., None]) -> Callable[..., None]:
        strategies: dict[str, Any] = {name: d.strategy for name, d in arguments.items()}
        as_rule: Any = rule(**strategies)
        made: Callable[..., None] = as_rule(function)
        if when is not None:
            guard: Any = precondition(when)
            made = guard(made)
        setattr(made, STEP_MARK, (arguments, when))
        return made

    return mark


pages = ints(0, NPAGES - 1)
counts = ints(1, 4)
in_page = ints(0, PAGE - 64)
payload = blobs(1, 64)


def _is(exc: KvmError, err: int, rule: str) -> bool:
    """*exc* is errno *err*, decided by *rule* where the backend names rules (the real
    kernel does not)."""
    return exc.errno == err and exc.rule in ("", rule)


class GmemMachine(RuleBasedStateMachine):
    """One VM of ``backend`` with ``NPAGES`` of RAM; see the module docstring."""

    backend: ClassVar[str] = "sw"
    info: ClassVar[VmTypeInfo | None] = None
    open_options: ClassVar[dict[str, Any]] = {}
    observers: ClassVar[tuple[Callable[[], object], ...]] = ()
    invariants_on: ClassVar[bool] = True
    gmem_only_from_gmem: ClassVar[bool] = True
    #: The kit's ``private_unmap``: what a punch of a private page leaves the guest.
    private_unmap: ClassVar[str] = "keep"
    #: The kit's ``host_private_access``: what a host access to a private page does.
    host_private_access: ClassVar[str] = "sigbus"
    #: Called after every step (a progress bar's advance).
    step_hooks: ClassVar[tuple[Callable[[], None], ...]] = ()
    #: Mix hostile calls and reentrant hooks into the valid rules
    #: (:mod:`guestmem.conformance.hostile`).
    hostile: ClassVar[bool] = False
    #: The backend's arch face for hostile calls (``hostile_ops`` of its options).
    hostile_ops: ClassVar[dict[str, tuple[Any, ...]]] = {}
    #: The backend's modelled verdicts and helpers' usage errors (``hostile_outcomes``).
    hostile_outcomes: ClassVar[tuple[type[BaseException], ...]] = ()
    #: What the backend's host still holds once everything is closed (``leaks``).
    leaks: ClassVar[Callable[[Any], list[str]] | None] = None

    def __init__(self) -> None:
        super().__init__()
        registry = guestmem.get_registry()
        backend = registry.backend(self.backend)
        self.vm_info = self.info or backend.default_vm_type
        self.ledger = OwnershipLedger(cross_check=self.invariants_on)
        plugins: list[object] = [self.ledger]
        if self.invariants_on:
            plugins += [InvariantChecker(), *(factory() for factory in self.observers)]
        self.hostility: Hostility | None = None
        if self.hostile:
            self.hostility = Hostility(self, dict(self.hostile_ops), tuple(self.hostile_outcomes))
            plugins.append(self.hostility.reentrant)
        self.plugins: list[object] = []
        for plugin in plugins:
            registry.add_plugin(plugin, name=f"guestmem.machine.{id(plugin):x}")
            self.plugins.append(plugin)
        try:
            self._start()
        except BaseException:
            # Hypothesis calls no teardown for a machine that failed to start.
            self._remove_plugins()
            raise
        # The reference.  Page contents are bytearrays (absent: zero).
        self.side = dict.fromkeys(range(NPAGES), self.private_mode)  # True: private
        self.private: dict[int, bytearray] = {}  # gmem side (file mode: the only side)
        self.shared: dict[int, bytearray] = {}  # the anonymous shared side (destructive)
        self.allocated: set[int] = set()  # gmem pages known to hold a folio
        self.poisoned: set[int] = set()
        #: Private pages a punch took from the guest (``private_unmap == "revoke"``): its
        #: access may abort until a conversion gives them back.
        self.revoked: set[int] = set()
        #: Pages an aborted access may have faulted a folio in for (the model faults the
        #: folio in before the backend's fault hook aborts).
        self.maybe_allocated: set[int] = set()
        self.closed = False

    def _start(self) -> None:
        """Open the host and make the guest, its RAM and (file mode) the host's mapping."""
        self.kvm = guestmem.open(self.backend, **self.open_options)
        #: The lowest free descriptor number (a VM's, made and closed at once): once
        #: everything is closed, the next VM gets it again, unless a descriptor leaked.
        self.first_free_fd = self._probe_fd()
        self.baseline = allocated(self.kvm)
        self.guest = KitGuest(self.kvm, self.vm_info, NPAGES)
        #: The model's views are there to cross-check (not on the real kernel).
        self.white_box = has_views(self.kvm)
        self.ram = self.guest.ram
        self.private_mode = self.vm_info.private
        self.in_place = self.vm_info.conversion == "in_place"
        self.attributes = self.private_mode and bool(self.guest.vmm.attributes())
        #: The guest converts (not Gunyah's: ``guest.convert`` is not applicable there).
        self.converts = self.private_mode and self.guest.vmm.conversion_not_applicable() is None
        #: The host takes a private page back when it touches it (``host_private_access``).
        self.reclaims = self.private_mode and self.host_private_access == "reclaim"
        #: The file machine needs the guest's memory in guest_memfd and host-mappable.
        self.file_mode = (
            not self.private_mode and self.ram.gmem_only and bool(self.ram.gmem.flags & INIT_SHARED)
        )
        self.view = self.ram.gmem.mmap(MAPPED * PAGE) if self.file_mode else None
        #: The host's read of a private, mmap-able guest_memfd (the RAM's, or a probe's).
        self.probe: Callable[[int, int], bytes] | None = None
        if self.private_mode:
            self.probe = self.ram.gmem_read if self.ram.gmem_mappable else private_probe(self.guest)

    def _probe_fd(self) -> int:
        with self.kvm.create_vm(self.vm_info.type) as vm:
            fd: int = getattr(vm, "fileno", lambda: -1)()
        return fd

    def teardown(self) -> None:
        try:
            if self.hostility is not None:
                self.hostility.close()
            if self.view is not None:
                self.view.close()
            self.guest.close()
            if not self.closed:
                self.closed = True
                check_released(self.kvm, self.ledger, self.baseline)
                if self.white_box and (fd := self._probe_fd()) != self.first_free_fd:
                    raise LeakError(
                        f"fds-closed: the lowest free descriptor is {fd}, not {self.first_free_fd}"
                    )
                leaks = type(self).leaks
                held = leaks(self.kvm) if leaks is not None else []
                if held:
                    raise LeakError(
                        f"backend-released: after closing everything the host holds {', '.join(held)}"
                    )
        finally:
            self._remove_plugins()
            self.kvm.close()

    def _remove_plugins(self) -> None:
        registry = guestmem.get_registry()
        for plugin in reversed(self.plugins):
            registry.remove_plugin(plugin)
        self.plugins.clear()

    # --- the reference --------------------------------------------------------------------------
    def _content(self, table: dict[int, bytearray], page: int, offset: int, n: int) -> bytes:
        data = table.get(page)
        return bytes(n) if data is None else bytes(data[offset : offset + n])

    def _store(self, table: dict[int, bytearray], page: int, offset: int, data: bytes) -> None:
        buf = table.setdefault(page, bytearray(PAGE))
        buf[offset : offset + len(data)] = data

    def _guest_table(self, page: int) -> dict[int, bytearray]:
        """Where the guest's access to *page* lands."""
        if self.in_place or self.file_mode or self.side[page] or self.ram.shared is None:
            return self.private
        return self.shared

    def _gmem_access(self, page: int) -> bool:
        """A guest access to *page* goes to guest_memfd (and may allocate there)."""
        return self._guest_table(page) is self.private

    # --- guest accesses ---------------------------------------------------------------------------
    @step(page=pages, offset=in_page, data=payload)
    def guest_write(self, page: int, offset: int, data: bytes) -> None:
        """A guest store on the page's current side (M-7, G-1)."""
        if self._guest_access(
            page, lambda: self.guest.write(page, data, private=self.side[page], offset=offset)
        ):
            return
        self.revoked.discard(page)
        self._store(self._guest_table(page), page, offset, data)
        if self._gmem_access(page):
            self.allocated.add(page)
            self.maybe_allocated.discard(page)

    @step(page=pages, offset=in_page, n=ints(1, 64))
    def guest_read(self, page: int, offset: int, n: int) -> None:
        """A guest load sees the reference bytes of the page's current side."""
        got: list[bytes] = []
        if self._guest_access(
            page, lambda: got.append(self.guest.read(page, n, private=self.side[page], offset=offset))
        ):
            return
        self.revoked.discard(page)
        assert got == [self._content(self._guest_table(page), page, offset, n)], (
            f"guest read of page {page} ({'private' if self.side[page] else 'shared'})"
        )
        if self._gmem_access(page):
            self.allocated.add(page)
            self.maybe_allocated.discard(page)

    def _guest_poisoned(self, page: int, access: Callable[[], object]) -> bool:
        """Run *access*; True if it failed as E-2 requires for a poisoned page, or as the
        architecture may for a page a punch took away (``private_unmap == "revoke"``)."""
        try:
            access()
        except (KvmError, GuestExit) as exc:
            revoked = page in self.revoked and self.side[page]
            exit_ = isinstance(exc, MemoryFault | MmioExit | HypercallExit)
            if revoked and not exit_ and (not isinstance(exc, KvmError) or exc.errno == errno.EFAULT):
                self.maybe_allocated.add(page)
                return True
            if not isinstance(exc, MemoryFault):
                raise
            assert page in self.poisoned, f"unexpected memory-fault exit on page {page}: {exc}"
            assert (exc.errno, exc.gpa, exc.flags) == (EHWPOISON, self.ram.gpa_of(page), 0)
            return True
        assert page not in self.poisoned, f"a guest access to poisoned page {page} succeeded (E-2)"
        return False

    @step(when=lambda self: self.attributes, page=pages)
    def guest_mismatch(self, page: int) -> None:
        """An access whose privateness differs from the attribute exits to userspace with
        KVM_EXIT_MEMORY_FAULT for the page, flagged PRIVATE iff the access was (G-2)."""
        private = not self.side[page]
        try:
            self.guest.read(page, 1, private=private)
        except MemoryFault as exc:
            flags = uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0
            assert (exc.errno, exc.gpa, exc.size, exc.flags) == (
                errno.EFAULT,
                self.ram.gpa_of(page),
                PAGE,
                flags,
            )
        else:
            raise AssertionError(f"a {'private' if private else 'shared'} access to page {page} did not exit")

    # --- conversions ------------------------------------------------------------------------------
    @step(when=lambda self: self.converts, page=pages, n=counts)
    def convert(self, page: int, n: int) -> None:
        """The guest converts a run of pages to the other side; contents follow the declared
        semantics (destructive: the old side is discarded by the VMM)."""
        to_private = not self.side[page]
        end = page
        while end < min(page + n, NPAGES) and self.side[end] != to_private:
            end += 1
        self.guest.convert(page, end - page, private=to_private)
        for p in range(page, end):
            self._converted(p, to_private)

    def _converted(self, page: int, to_private: bool) -> None:
        """The VMM converted *page* (``kvm_convert_memory``): the side the guest left is
        discarded, unless the VM converts in place."""
        self.side[page] = to_private
        self.revoked.discard(page)
        if self.in_place:
            return
        if to_private:
            self.shared.pop(page, None)
        else:
            self.private.pop(page, None)
            self.allocated.discard(page)
            self.maybe_allocated.discard(page)
            self.poisoned.discard(page)

    def _guest_access(self, page: int, access: Callable[[], object]) -> bool:
        """:meth:`_guest_poisoned` for a plain load or store, then what the VMM converted
        while it ran: a guest that accepts again a page the host took away asks for it as
        private (SNP's page-state change), and QEMU's conversion discards its shared side."""
        conversions: list[tuple[int, int, bool]] = []
        listeners = self.guest.vmm.exits.qemu.on_convert
        listeners.append(lambda *conversion: conversions.append(conversion))
        try:
            return self._guest_poisoned(page, access)
        finally:
            listeners.pop()
            for gpa, size, to_private in conversions:
                first = max(0, (gpa - self.ram.gpa) // PAGE)
                last = min(NPAGES, (gpa + size - self.ram.gpa + PAGE - 1) // PAGE)
                for p in range(first, last):
                    self._converted(p, to_private)

    # --- guest_memfd ------------------------------------------------------------------------------
    @step(when=lambda self: self.file_mode, start=ints(0, NPAGES + 3), n=counts)
    def allocate(self, start: int, n: int) -> None:
        """FA-5/FA-6: allocate inside i_size instantiates pages, beyond it is EINVAL."""
        try:
            self.ram.gmem.fallocate(KEEP, start * PAGE, n * PAGE)
        except KvmError as exc:
            assert start + n > NPAGES and _is(exc, errno.EINVAL, "FA-5")
            return
        assert start + n <= NPAGES, "allocate beyond i_size succeeded"
        self.allocated.update(range(start, start + n))

    @step(
        when=lambda self: self.file_mode or (self.private_mode and not self.in_place),
        start=ints(0, NPAGES + 3),
        n=counts,
    )
    def punch(self, start: int, n: int) -> None:
        """FA-7/FA-8: punch (also past EOF) frees the pages; they read back as zeroes."""
        self.ram.gmem.fallocate(PUNCH, start * PAGE, n * PAGE)
        for p in range(start, start + n):
            self.allocated.discard(p)
            self.maybe_allocated.discard(p)
            self.poisoned.discard(p)
            self.private.pop(p, None)
            if self.private_mode and p < NPAGES and self.side[p] and self.private_unmap == "revoke":
                self.revoked.add(p)

    @step(
        when=lambda self: self.file_mode,
        start=pages,
        n=counts,
        mode=one_of([KEEP, PUNCH]),
        skew=ints(1, PAGE - 1),
    )
    def unaligned(self, start: int, n: int, mode: int, skew: int) -> None:
        """FA-4: an unaligned offset is EINVAL and changes nothing."""
        try:
            self.ram.gmem.fallocate(mode, start * PAGE + skew, n * PAGE)
        except KvmError as exc:
            assert _is(exc, errno.EINVAL, "FA-4")
        else:
            raise AssertionError("unaligned fallocate succeeded")

    @step(
        when=lambda self: (
            self.file_mode and self.gmem_only_from_gmem and bool(self.allocated - self.poisoned)
        ),
        pick=ints(0, NPAGES),
    )
    def poison(self, pick: int) -> None:
        """E-1: memory failure on an allocated page keeps the folio (and its bytes); the
        guest's faults come from guest_memfd, so its access exits with EHWPOISON (E-2).
        The page is the *pick*-th allocated one, counting round."""
        candidates = sorted(self.allocated - self.poisoned)
        page = candidates[pick % len(candidates)]
        try:
            self.ram.gmem.inject_memory_failure(page * PAGE)
        except KvmError as exc:
            assert exc.errno == errno.EOPNOTSUPP
            return
        self.poisoned.add(page)

    @step(when=lambda self: self.file_mode, gpa=one_of(SLOT_GPAS))
    def rebind(self, gpa: int) -> None:
        """L-7: delete the memslot and bind the same pages elsewhere: contents are kept."""
        self.ram.unbind()
        self.ram.bind(gpa)

    @step(when=lambda self: self.file_mode)
    def drop_host_ptes(self) -> None:
        """MADV_DONTNEED: the host's PTEs go, guest_memfd's contents and folios stay."""
        assert self.view is not None
        self.view.madvise(uapi.MADV_DONTNEED)

    # --- host accesses ----------------------------------------------------------------------------
    def _host_may_map(self, page: int) -> bool:
        """The host may reach the page through its shared side."""
        if self.file_mode:
            return page < NPAGES and page not in self.poisoned
        if self.ram.shared is not None:
            return True  # anonymous memory
        return self.private_mode and (not self.side[page] or self.reclaims)

    def _host_table(self, page: int) -> dict[int, bytearray]:
        return self.private if (self.file_mode or self.ram.shared is None) else self.shared

    @step(page=ints(0, MAPPED - 1), offset=in_page, data=payload)
    def host_write(self, page: int, offset: int, data: bytes) -> None:
        """M-5: a host store on the shared side; SIGBUS where the host may not map (M-3, M-4,
        E-1, a private page of an in-place VM)."""
        if page >= NPAGES and not self.file_mode:
            return
        try:
            if self.view is not None:
                self.view.write(page * PAGE + offset, data)
            else:
                self.ram.host_write(page, data, offset)
        except HostSigbus:
            assert not self._host_may_map(page), f"host store to page {page} was SIGBUS"
            return
        assert self._host_may_map(page), f"the host stored to page {page}, which it may not map"
        self._store(self._host_table(page), page, offset, data)
        if self._host_table(page) is self.private:
            self.allocated.add(page)

    @step(page=ints(0, MAPPED - 1), offset=in_page, n=ints(1, 64))
    def host_read(self, page: int, offset: int, n: int) -> None:
        """M-5: a host load sees the reference bytes of the shared side."""
        if page >= NPAGES and not self.file_mode:
            return
        try:
            got = (
                self.view.read(page * PAGE + offset, n)
                if self.view is not None
                else self.ram.host_read(page, n, offset)
            )
        except HostSigbus:
            assert not self._host_may_map(page), f"host load from page {page} was SIGBUS"
            return
        assert self._host_may_map(page), f"the host read page {page}, which it may not map: {got!r}"
        assert got == self._content(self._host_table(page), page, offset, n), f"host read of page {page}"
        if self._host_table(page) is self.private:
            self.allocated.add(page)

    @step(when=lambda self: self.probe is not None and not self.reclaims, page=ints(0, 3))
    def host_probe_private(self, page: int) -> None:
        """The host maps private guest_memfd: a private page is SIGBUS (M-4, and each
        architecture's rule), whatever the guest did with it."""
        assert self.probe is not None
        if self.ram.gmem_mappable and not self.side[page]:
            return  # a shared page of an in-place VM: host_read covers it
        try:
            leaked = self.probe(page, 16)
        except HostSigbus:
            return
        raise AssertionError(f"the host mapped private guest_memfd page {page} and read {leaked!r}")

    # --- cross-checks against the model (public views) ----------------------------------------------
    @invariant()
    def gmem_matches(self) -> None:
        """guest_memfd holds a folio for every page the reference says (exactly, where the
        kit discards order-0 folios, but for zeroed private pages the guest touched without
        writing; at least, where a conversion keeps pages or folios are large) with the
        reference bytes, on distinct live host pages, poisoned where the reference says."""
        if self.ram.gmem.closed or not self.white_box:
            return
        gmem = view(self.ram.gmem)
        host = view(self.kvm)
        have = {i for i in range(NPAGES + 4) if gmem.pfn(i) is not None} - self.maybe_allocated
        if self.in_place or self.vm_info.gmem_folio_order:
            # A conversion in place keeps folios; a large folio comes and stays whole.
            assert self.allocated <= have, f"pages {sorted(self.allocated - have)} lost their folio"
        else:
            # A private page may hold a folio the guest never wrote, holding zeroes: the
            # launch populated it (TDX's KVM_TDX_INIT_MEM_REGION) or the guest accepted it
            # (a TD's ACCEPT at boot and after each conversion to private, as Linux's
            # tdx_enc_status_changed does).
            untouched = {
                i for i in have - self.allocated if self.private_mode and i < NPAGES and self.side[i]
            }
            assert have - untouched == self.allocated, (
                f"guest_memfd holds {sorted(have)}, expected {sorted(self.allocated)}"
            )
            for page in untouched:
                pfn = gmem.pfn(page)
                assert pfn is not None and host.read(pfn, 0, PAGE) == bytes(PAGE), (
                    f"guest_memfd page {page}, which the guest never wrote, is not zero"
                )
        assert {i for i in have if gmem.is_poisoned(i)} == self.poisoned
        pfns = [gmem.pfn(i) for i in sorted(have)]
        assert len(set(pfns)) == len(pfns), "two pages share a pfn"
        for page in self.allocated:
            pfn = gmem.pfn(page)
            assert pfn is not None and host.is_allocated(pfn), f"page {page} maps a freed pfn"
            assert host.read(pfn, 0, PAGE) == self._content(self.private, page, 0, PAGE), (
                f"the host page behind guest_memfd page {page} holds other bytes than the reference"
            )

    @invariant()
    def stage2_not_stale(self) -> None:
        """Each stage-2 leaf over the RAM maps the pfn guest_memfd holds for its page now
        (shared leaves of a VM with an anonymous shared side map that memory instead)."""
        if not self.white_box:
            return
        vm = view(self.guest.vm)
        base = self.ram.gpa >> uapi.PAGE_SHIFT
        for leaf in vm.leaves(base, base + NPAGES):
            if not (leaf.private or self.ram.gmem_only):
                continue
            for gfn in range(leaf.gfn, leaf.end_gfn):
                page = gfn - base
                assert page not in self.poisoned, f"a leaf still maps poisoned page {page}"
                assert vm.gmem_pfn(gfn) == leaf.pfn + gfn - leaf.gfn, f"stale leaf at page {page}"

    @invariant()
    def host_ptes_not_stale(self) -> None:
        """Host PTEs exist only for pages that hold a folio (a punch unmaps them, M-10)."""
        if self.ram.gmem.closed or not self.white_box:
            return
        gmem = view(self.ram.gmem)
        for s, e in gmem.host_mapped_ranges():
            for page in range(s, e):
                assert gmem.pfn(page) is not None, f"host PTE of page {page} survived its folio"

    # --- hostile calls (guestmem fuzz --hostile) ------------------------------------------------
    @step(when=lambda self: self.hostility is not None and not self.hostility.desynced, call=drawn(draw_call))
    def hostile_call(self, call: dict[str, Any]) -> None:
        """A call of the uAPI face or the backend's arch face with hostile arguments or on a
        closed or foreign object: its outcome is counted; a crash or a half-applied change
        fails (:meth:`~guestmem.conformance.hostile.Hostility.call`)."""
        assert self.hostility is not None
        self.hostility.call(call)

    @step(
        when=lambda self: self.hostility is not None and not self.hostility.desynced,
        arm=drawn(draw_reentrant),
    )
    def reentrant(self, arm: dict[str, str]) -> None:
        """A call back into the model from inside a hook of the scratch VM
        (:meth:`~guestmem.conformance.hostile.Hostility.reenter`)."""
        assert self.hostility is not None
        self.hostility.reenter(arm)

    @property
    def ended(self) -> bool:
        """A hostile call changed the machine's own objects: its reference is void."""
        return self.hostility is not None and self.hostility.desynced

    @invariant()
    def count_step(self) -> None:
        """Not a check: tells a progress bar that a step ran."""
        for hook in self.step_hooks:
            hook()


def machine_for(
    backend: str,
    info: VmTypeInfo | None = None,
    *,
    open_options: dict[str, Any] | None = None,
    observers: tuple[Callable[[], object], ...] = (),
    invariants: bool = True,
    gmem_only_from_gmem: bool = True,
    private_unmap: str = "keep",
    host_private_access: str = "sigbus",
    on_step: Callable[[], None] | None = None,
    hostile: bool = False,
    hostile_ops: dict[str, tuple[Any, ...]] | None = None,
    hostile_outcomes: tuple[type[BaseException], ...] = (),
    leaks: Callable[[Any], list[str]] | None = None,
) -> type[GmemMachine]:
    """The machine for *info* (default: the backend's default VM type) of *backend*."""
    attrs: dict[str, Any] = {
        "backend": backend,
        "info": info,
        "open_options": dict(open_options or {}),
        "observers": tuple(observers),
        "invariants_on": invariants,
        "gmem_only_from_gmem": gmem_only_from_gmem,
        "private_unmap": private_unmap,
        "host_private_access": host_private_access,
        "step_hooks": () if on_step is None else (on_step,),
        "hostile": hostile,
        "hostile_ops": dict(hostile_ops or {}),
        "hostile_outcomes": tuple(hostile_outcomes),
        "leaks": staticmethod(leaks) if leaks is not None else None,
    }
    name = "GmemMachine_" + "".join(
        c if c.isalnum() else "_" for c in f"{backend}_{info.name if info else 'default'}"
    )
    return type(name, (GmemMachine,), attrs)


def run_machine(
    machine: type[GmemMachine],
    *,
    examples: int,
    steps: int,
    seed: int | None = None,
    derandomize: bool = True,
    shrink: bool = True,
) -> None:
    """Run *machine* for *examples* runs of up to *steps* steps each.

    A failure raises the broken assertion after Hypothesis has shrunk it (unless
    *shrink* is False); the program is reported through ``hypothesis.reporting`` (printed,
    or captured with ``with_reporter``).  *seed* fixes the random choices; without one,
    *derandomize* makes the runs depend on the machine alone (what CI wants).
    """
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])
    config = settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        derandomize=derandomize and seed is None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
        phases=phases,
    )
    test = get_state_machine_test(machine, settings=config)
    if seed is not None:
        test = fix_seed(seed)(test)
    test()
