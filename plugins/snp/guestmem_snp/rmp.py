"""The Reverse Map Table: SEV-SNP's per-host-page ownership table (spec section 2.2).

One RMP entry exists per 4 KiB host page.  A 2 MiB entry (``level == PG_LEVEL_2M``) is
authoritative for its 512 subpages: a lookup of any subpage returns the 2 MiB entry, as
``__snp_lookup_rmpentry()`` does.

Storage is range based (a :class:`guestmem.ranges.RangeMap` keyed by pfn).  The stored
value holds ``gfn - pfn`` instead of the gpa, so a run of pages assigned to consecutive
gpas is one range: a 64 GiB guest whose memory is contiguous on the host costs a handful of
entries however it was assigned.  Absent means "Hypervisor" (assigned=0).  A 2 MiB entry is
stored over all of its 512 pfns with ``level == PG_LEVEL_2M``; 2 MiB entries always cover
whole 2 MiB-aligned blocks.

The operations are the instructions and firmware steps that change the table, each
returning the instruction's return code (``RMPUPDATE_*``, ``PSMASH_*``, ``PVALIDATE_*``)
rather than raising, as the hardware does.  Batched forms (``npages``) stand for the same
instruction executed once per page (or per 2 MiB block) and count accordingly; they are
what keeps a 64 GiB guest cheap and they are tested against the one-at-a-time forms.

This module does not depend on the core model.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator

import attrs

from guestmem.backend import RangeMap
from guestmem.uapi import PAGE_SHIFT, PG_LEVEL_2M, PG_LEVEL_4K

PTRS_PER_PMD = 512
"""4 KiB pages per 2 MiB page."""

# RMPUPDATE / PSMASH return codes (AMD APM vol. 3; arch/x86/include/asm/sev.h).
RMP_SUCCESS = 0
FAIL_INPUT = 1
FAIL_PERMISSION = 2
FAIL_INUSE = 3
FAIL_OVERLAP = 4

# PVALIDATE return codes (arch/x86/include/asm/sev.h).
PVALIDATE_FAIL_INPUT = 1
PVALIDATE_FAIL_SIZEMISMATCH = 6
PVALIDATE_FAIL_NOUPDATE = 255  # rFLAGS.CF=1: validated already had the requested value

RMP_RC_NAMES = {
    RMP_SUCCESS: "SUCCESS",
    FAIL_INPUT: "FAIL_INPUT",
    FAIL_PERMISSION: "FAIL_PERMISSION",
    FAIL_INUSE: "FAIL_INUSE",
    FAIL_OVERLAP: "FAIL_OVERLAP",
}


class RmpState(enum.Enum):
    """Architectural page states (AMD SNP whitepaper table 3)."""

    HYPERVISOR = "Hypervisor"
    PRE_GUEST = "Pre-Guest"
    GUEST_INVALID = "Guest-Invalid"
    GUEST_VALID = "Guest-Valid"
    FIRMWARE = "Firmware"
    RECLAIM = "Reclaim"


@attrs.frozen(slots=True)
class _Stored:
    """The stored, mergeable form of an assigned entry (gpa kept as ``gfn - pfn``)."""

    asid: int
    gfn_delta: int
    level: int
    validated: bool = False
    immutable: bool = False
    vmsa: bool = False


@attrs.frozen
class RmpEntry:
    """One RMP entry as ``snp_lookup_rmpentry()`` reports it.

    For a page covered by a 2 MiB entry, ``pfn`` and ``gpa`` are those of the 2 MiB page.
    """

    pfn: int
    assigned: bool
    level: int = PG_LEVEL_4K
    validated: bool = False
    immutable: bool = False
    asid: int = 0
    gpa: int = 0
    vmsa: bool = False

    @property
    def npages(self) -> int:
        """Pages this entry covers (1 or 512)."""
        return PTRS_PER_PMD if self.level == PG_LEVEL_2M else 1

    @property
    def state(self) -> RmpState:
        """The architectural state of the page."""
        if not self.assigned:
            return RmpState.HYPERVISOR
        if self.asid == 0:
            return RmpState.FIRMWARE if self.immutable else RmpState.RECLAIM
        if self.immutable:
            return RmpState.PRE_GUEST
        return RmpState.GUEST_VALID if self.validated else RmpState.GUEST_INVALID


class RmpViolation(Exception):
    """A guest RMP check failed: the hardware raises #NPF with the RMP bit set.

    ``size_mismatch`` is ``PFERR_GUEST_SIZEM``: a 4 KiB guest operation hit a 2 MiB entry
    (KVM answers with PSMASH, ``sev_handle_rmp_fault``).
    """

    def __init__(self, pfn: int, why: str, size_mismatch: bool = False) -> None:
        self.pfn = pfn
        self.size_mismatch = size_mismatch
        super().__init__(f"RMP #NPF at pfn {pfn:#x}: {why}")


#: Observer of table changes: ``(pfn, npages, old, new)`` per uniform run (None = unassigned).
ChangeCallback = Callable[[int, int, "RmpEntry | None", "RmpEntry | None"], None]


def _align_down(value: int, n: int = PTRS_PER_PMD) -> int:
    return value - (value % n)


class RmpTable:
    """The RMP of one host.

    ``stats`` counts the instructions executed (``rmpupdate``, ``psmash``, ``pvalidate``,
    ``page_reclaim``); a caller that wants per-VM costs reads the return values instead.
    ``on_change`` (optional) is told of every change as uniform runs.
    """

    def __init__(self, on_change: ChangeCallback | None = None) -> None:
        self._map: RangeMap[_Stored] = RangeMap()
        self.on_change = on_change

    # --- queries -------------------------------------------------------------------------
    def __len__(self) -> int:
        """Stored ranges (what the table costs), not pages."""
        return len(self._map)

    def lookup(self, pfn: int) -> RmpEntry:
        """``snp_lookup_rmpentry``: the entry authoritative for *pfn*."""
        value = self._map.get(pfn)
        if value is None:
            return RmpEntry(pfn=pfn, assigned=False)
        return self._entry(pfn, value)

    def is_assigned(self, pfn: int) -> bool:
        """True iff *pfn* is assigned (to a guest or to the firmware)."""
        return self._map.get(pfn) is not None

    def any_assigned(self, pfn: int, npages: int) -> bool:
        """True iff any page of ``[pfn, pfn + npages)`` is assigned."""
        return self._map.overlaps(pfn, pfn + npages)

    def runs(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, RmpEntry]]:
        """Assigned runs ``(start_pfn, end_pfn, entry_of_first_pfn)`` in ``[start, end)``.

        Every page of a run has the same fields but the gpa, which grows with the pfn.
        """
        items = self._map.items() if end is None and start == 0 else self._map.items(start, end)
        for s, e, value in items:
            yield s, e, self._entry(s, value)

    def unassigned(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """Runs of unassigned (Hypervisor) pages in ``[start, end)``."""
        return self._map.gaps(start, end)

    def level_run(self, pfn: int, npages: int) -> int:
        """How many pages from *pfn* (at most *npages*, at least 1) have the page size of
        *pfn*'s entry, an unassigned page counting as 4K (``snp_lookup_rmpentry``'s level).

        Walks the stored ranges lazily: O(log n) per range passed.
        """
        end = pfn + npages
        first = self._map.get(pfn)
        level = PG_LEVEL_4K if first is None else first.level
        pos = pfn
        while pos < end:
            ent = self._map.first_overlap(pos, end)
            if ent is None:
                return (end if level == PG_LEVEL_4K else pos) - pfn
            s, e, value = ent
            if s > pos and level != PG_LEVEL_4K:
                break  # a gap: unassigned pages are 4K
            if value.level != level:
                return max(1, s - pfn)
            pos = e
        return max(1, min(pos, end) - pfn)

    def assigned_pages(self, asid: int | None = None) -> int:
        """Number of assigned pages (of *asid* if given); costs O(stored ranges)."""
        return sum(e - s for s, e, v in self._map.items() if asid is None or v.asid == asid)

    @staticmethod
    def _entry(pfn: int, value: _Stored) -> RmpEntry:
        base = _align_down(pfn) if value.level == PG_LEVEL_2M else pfn
        return RmpEntry(
            pfn=base,
            assigned=True,
            level=value.level,
            validated=value.validated,
            immutable=value.immutable,
            asid=value.asid,
            gpa=(base + value.gfn_delta) << PAGE_SHIFT,
            vmsa=value.vmsa,
        )

    # --- internal update with change notification ------------------------------------------
    def _store(self, start: int, end: int, value: _Stored | None) -> None:
        if self.on_change is not None:
            pos = start
            for s, e, old in list(self._map.items(start, end)):
                if s > pos:
                    self._notify(pos, s, None, value)
                self._notify(s, e, old, value)
                pos = e
            if pos < end:
                self._notify(pos, end, None, value)
        self._map.set(start, end, value)

    def _notify(self, start: int, end: int, old: _Stored | None, new: _Stored | None) -> None:
        if old is None and new is None:
            return
        assert self.on_change is not None
        self.on_change(
            start,
            end - start,
            None if old is None else self._entry(start, old),
            None if new is None else self._entry(start, new),
        )

    # --- RMPUPDATE (host) ----------------------------------------------------------------
    def _check_update(self, pfn: int, npages: int, level: int, gpa: int, assigned: bool) -> int:
        """RMPUPDATE's checks for *npages* consecutive updates of size *level*."""
        if level == PG_LEVEL_2M:
            gpa_misaligned = assigned and gpa % (PTRS_PER_PMD << PAGE_SHIFT)
            if pfn % PTRS_PER_PMD or npages % PTRS_PER_PMD or gpa_misaligned:
                return FAIL_INPUT
        elif level != PG_LEVEL_4K:
            return FAIL_INPUT
        for s, e, value in self._map.items(pfn, pfn + npages):
            if value.immutable:
                return FAIL_PERMISSION
            if level == PG_LEVEL_4K and value.level == PG_LEVEL_2M:
                # A 4K update inside an assigned 2M page: PSMASH first.
                return FAIL_OVERLAP
            lone_head = s % PTRS_PER_PMD == 0 and e == s + 1
            if level == PG_LEVEL_2M and value.level == PG_LEVEL_4K and not lone_head:
                # Assigned 4K entries behind the head of a 2M page; the head itself is overwritten.
                return FAIL_OVERLAP
        return RMP_SUCCESS

    def rmpupdate(
        self,
        pfn: int,
        *,
        assigned: bool,
        level: int = PG_LEVEL_4K,
        gpa: int = 0,
        asid: int = 0,
        immutable: bool = False,
        vmsa: bool = False,
        npages: int | None = None,
    ) -> int:
        """RMPUPDATE of *pfn* (or, with *npages*, of that many pages one entry after the other).

        Returns ``RMP_SUCCESS`` or the failure code; on failure nothing changed.  The new
        entry is never validated: any RMPUPDATE clears ``validated`` (spec 2.2).  With
        *npages*, the gpa grows with the pfn and *level* 2M means ``npages/512`` 2 MiB updates.
        """
        n = npages if npages is not None else (PTRS_PER_PMD if level == PG_LEVEL_2M else 1)
        if n <= 0:
            return FAIL_INPUT
        rc = self._check_update(pfn, n, level, gpa, assigned)
        if rc:
            return rc
        if assigned:
            value: _Stored | None = _Stored(
                asid=asid, gfn_delta=(gpa >> PAGE_SHIFT) - pfn, level=level, immutable=immutable, vmsa=vmsa
            )
        else:
            value = None
        self._store(pfn, pfn + n, value)
        return RMP_SUCCESS

    def make_private(
        self, pfn: int, gpa: int, level: int, asid: int, *, immutable: bool, npages: int | None = None
    ) -> int:
        """``rmp_make_private()``: assign to *asid* at *gpa* (Hypervisor -> Guest-Invalid/Pre-Guest)."""
        return self.rmpupdate(
            pfn, assigned=True, level=level, gpa=gpa, asid=asid, immutable=immutable, npages=npages
        )

    def make_shared(self, pfn: int, level: int = PG_LEVEL_4K, npages: int | None = None) -> int:
        """``rmp_make_shared()``: back to the hypervisor (assigned=0)."""
        return self.rmpupdate(pfn, assigned=False, level=level, npages=npages)

    def mark_firmware(self, pfn: int, npages: int = 1) -> int:
        """``rmp_mark_pages_firmware()``: assigned, ASID 0, immutable (Firmware state)."""
        if self.any_assigned(pfn, npages):
            return FAIL_OVERLAP
        for i in range(npages):
            # gpa 0 for every page, as the kernel passes it: one stored range per page.
            value = _Stored(asid=0, gfn_delta=-(pfn + i), level=PG_LEVEL_4K, immutable=True)
            self._store(pfn + i, pfn + i + 1, value)
        return RMP_SUCCESS

    # --- PSMASH (host) -------------------------------------------------------------------
    def psmash(self, pfn: int) -> int:
        """PSMASH: split the 2 MiB entry at 2 MiB-aligned *pfn* into 512 4 KiB entries.

        Every subpage keeps assigned, validated, immutable, ASID and its own gpa.
        """
        if pfn % PTRS_PER_PMD:
            return FAIL_INPUT
        value = self._map.get(pfn)
        if value is None or value.level != PG_LEVEL_2M:
            return FAIL_INPUT
        self._store(pfn, pfn + PTRS_PER_PMD, attrs.evolve(value, level=PG_LEVEL_4K))
        return RMP_SUCCESS

    def psmash_range(self, pfn: int, nblocks: int) -> int:
        """*nblocks* PSMASHes of consecutive 2 MiB entries from 2 MiB-aligned *pfn*, as
        one update per stored run.  ``FAIL_INPUT`` (and nothing changed) unless every
        block is a 2 MiB entry."""
        end = pfn + nblocks * PTRS_PER_PMD
        if pfn % PTRS_PER_PMD or nblocks <= 0:
            return FAIL_INPUT
        runs = self._map.span(pfn, end)
        if sum(e - s for s, e, _ in runs) != end - pfn or any(v.level != PG_LEVEL_2M for _, _, v in runs):
            return FAIL_INPUT
        for s, e, value in runs:
            self._store(s, e, attrs.evolve(value, level=PG_LEVEL_4K))
        return RMP_SUCCESS

    def run_end(self, pfn: int) -> int:
        """One past the last pfn of the stored run holding *pfn*: the pages from *pfn* whose
        entries have the same fields (but the gpa, growing with the pfn); *pfn* itself if
        it is not assigned."""
        ent = self._map.entry(pfn)
        return pfn if ent is None else ent[1]

    # --- firmware ------------------------------------------------------------------------
    def launch_update(self, pfn: int, npages: int = 1, vmsa: bool = False) -> int:
        """``SNP_LAUNCH_UPDATE`` on Pre-Guest pages: they become Guest-Valid (not immutable).

        Returns ``FAIL_INPUT`` (the firmware's INVALID_PAGE_STATE) unless every page is a
        4 KiB Pre-Guest page.
        """
        pos = pfn
        runs = list(self._map.items(pfn, pfn + npages))
        for s, _e, value in runs:
            if s != pos or not value.immutable or value.asid == 0 or value.level != PG_LEVEL_4K:
                return FAIL_INPUT
            pos = _e
        if pos != pfn + npages:
            return FAIL_INPUT
        for s, e, value in runs:
            self._store(s, e, attrs.evolve(value, immutable=False, validated=True, vmsa=vmsa))
        return RMP_SUCCESS

    def page_reclaim(self, pfn: int, npages: int = 1) -> int:
        """``SEV_CMD_SNP_PAGE_RECLAIM``: an assigned page goes to the Reclaim state.

        Clears immutable and validated and the owner, so a following RMPUPDATE to shared
        succeeds.  Unassigned pages are an error (``FAIL_INPUT``).
        """
        runs = list(self._map.items(pfn, pfn + npages))
        if sum(e - s for s, e, _ in runs) != npages:
            return FAIL_INPUT
        for s, e, value in runs:
            self._store(s, e, _Stored(asid=0, gfn_delta=value.gfn_delta, level=value.level))
        return RMP_SUCCESS

    # --- PVALIDATE (guest) ----------------------------------------------------------------
    def pvalidate(self, pfn: int, gfn: int, asid: int, level: int, validate: bool, *, count: int = 1) -> int:
        """PVALIDATE of the page backing *gfn* (host *pfn*) by a guest with *asid*.

        *count* > 1 stands for that many consecutive PVALIDATEs of size *level* (gfn and
        pfn growing together).  Returns 0, ``PVALIDATE_FAIL_INPUT``,
        ``PVALIDATE_FAIL_SIZEMISMATCH`` or ``PVALIDATE_FAIL_NOUPDATE`` (of the first
        instruction that did not succeed; the ones before it took effect).  Raises
        :class:`RmpViolation` where the hardware raises #NPF: entry not assigned to this
        guest at this gpa, immutable, or a 4 KiB PVALIDATE inside a 2 MiB entry.
        """
        return self.pvalidate_run(pfn, gfn, asid, level, validate, count)[0]

    def pvalidate_run(
        self, pfn: int, gfn: int, asid: int, level: int, validate: bool, count: int = 1, *, apply: bool = True
    ) -> tuple[int, int]:
        """:meth:`pvalidate` of *count* instructions: ``(code, done)``, *done* the
        instructions that succeeded before the first that did not (all of them on success).

        With ``apply=False`` nothing changes: what the instructions would do.  An
        :class:`RmpViolation` is raised all the same, after the instructions before the
        faulting one took effect (``(exc.pfn - pfn) // pages per instruction`` of them).
        """
        step = PTRS_PER_PMD if level == PG_LEVEL_2M else 1
        if level not in (PG_LEVEL_4K, PG_LEVEL_2M) or count <= 0:
            return PVALIDATE_FAIL_INPUT, 0
        if level == PG_LEVEL_2M and gfn % PTRS_PER_PMD:
            return PVALIDATE_FAIL_INPUT, 0  # the guest's gpa; the host pfn's alignment is the RMP's business
        end = pfn + count * step
        done = pfn
        rc = 0
        updates: list[tuple[int, int, _Stored]] = []
        try:
            pos = pfn
            for s, e, value in self._map.items(pfn, end):
                if s > pos:
                    raise RmpViolation(pos, "page not assigned")
                if value.asid != asid or value.asid == 0:
                    raise RmpViolation(s, f"page assigned to ASID {value.asid}, not {asid}")
                if value.gfn_delta != gfn - pfn:
                    raise RmpViolation(s, "gpa in the RMP entry does not match")
                if value.immutable:
                    raise RmpViolation(s, "page is immutable")
                if level == PG_LEVEL_4K and value.level == PG_LEVEL_2M:
                    raise RmpViolation(s, "4K PVALIDATE inside a 2M RMP entry", size_mismatch=True)
                if level == PG_LEVEL_2M and (value.level == PG_LEVEL_4K or pfn % PTRS_PER_PMD):
                    rc = PVALIDATE_FAIL_SIZEMISMATCH
                    break
                if value.validated == validate:
                    rc = PVALIDATE_FAIL_NOUPDATE
                    break
                updates.append((s, e, attrs.evolve(value, validated=validate)))
                pos = done = e
            else:
                if pos < end:
                    raise RmpViolation(pos, "page not assigned")
        finally:
            # The instructions before the failing one took effect.
            if apply:
                for s, e, value in updates:
                    self._store(s, min(e, done), value)
        return rc, (done - pfn) // step
