"""SEV ASID allocation and recycling (``sev_asid_new``, ``sev_asid_free``, spec 2.1).

ASIDs ``[1, min_sev_asid)`` are for encrypted-state guests (SEV-ES and SNP),
``[min_sev_asid, max_sev_asid]`` for plain SEV guests.  With CipherText Hiding
(``ciphertext_hiding_asids = n``), SNP guests get ``[1, n]`` and SEV-ES guests
``[n + 1, min_sev_asid)``.

A freed ASID is not reusable at once: its cache lines and TLB entries may still be
tagged with it.  It goes to a reclaim bitmap; when an allocation finds its range full,
``__sev_recycle_asids()`` flushes (WBINVD on all CPUs + ``SEV_CMD_[SNP_]DF_FLUSH``) and
makes every reclaimed ASID of that range free again.  No free ASID even after recycling:
``-EBUSY``.

This module does not depend on the core model.
"""

from __future__ import annotations

import errno
from collections import Counter

import attrs

from guestmem.errors import KvmError


@attrs.frozen
class AsidRange:
    """An inclusive ``[min_asid, max_asid]``; empty when ``min_asid > max_asid``."""

    min_asid: int
    max_asid: int

    def __contains__(self, asid: object) -> bool:
        return isinstance(asid, int) and self.min_asid <= asid <= self.max_asid

    @property
    def size(self) -> int:
        """Number of ASIDs in the range."""
        return max(0, self.max_asid - self.min_asid + 1)


class AsidAllocator:
    """The host's ASID space (one per host, shared by every SEV VM on it).

    ``stats`` counts ``asid_recycle``, ``wbinvd`` and ``df_flush``.
    """

    def __init__(
        self, max_sev_asid: int = 509, min_sev_asid: int = 100, ciphertext_hiding_asids: int = 0
    ) -> None:
        if not 1 <= min_sev_asid <= max_sev_asid + 1:
            raise ValueError(f"min_sev_asid {min_sev_asid} outside [1, max_sev_asid + 1]")
        if not 0 <= ciphertext_hiding_asids < min_sev_asid:
            raise ValueError("ciphertext_hiding_asids must be below min_sev_asid")
        self.max_sev_asid = max_sev_asid
        self.min_sev_asid = min_sev_asid
        self.ciphertext_hiding_asids = ciphertext_hiding_asids
        self._used: set[int] = set()  # sev_asid_bitmap
        self._reclaim: set[int] = set()  # sev_reclaim_asid_bitmap
        self.stats: Counter[str] = Counter()

    # --- ranges (sev_asid_new's min/max) ----------------------------------------------------
    def range_for(self, *, es: bool, snp: bool) -> AsidRange:
        """The ASID range a guest of that kind allocates from."""
        cth = self.ciphertext_hiding_asids
        if snp:
            return AsidRange(1, cth if cth else self.min_sev_asid - 1)
        if es:
            return AsidRange(cth + 1 if cth else 1, self.min_sev_asid - 1)
        return AsidRange(self.min_sev_asid, self.max_sev_asid)

    # --- allocation -------------------------------------------------------------------------
    def allocate(self, *, es: bool, snp: bool) -> int:
        """``sev_asid_new()``: the lowest free ASID of the range; recycles once if full."""
        rng = self.range_for(es=es, snp=snp)
        if rng.size == 0:
            raise KvmError(errno.ENOTTY, "", f"no ASIDs for this guest type ({rng.min_asid}..{rng.max_asid})")
        for attempt in range(2):
            for asid in range(rng.min_asid, rng.max_asid + 1):
                if asid not in self._used:
                    self._used.add(asid)
                    return asid
            if attempt == 0 and not self._recycle(rng):
                break
        raise KvmError(errno.EBUSY, "", f"all {rng.size} ASIDs {rng.min_asid}..{rng.max_asid} are in use")

    def _recycle(self, rng: AsidRange) -> bool:
        """``__sev_recycle_asids()``: flush, then free every reclaimed ASID (of any range)."""
        if not any(asid in rng for asid in self._reclaim):
            return False
        self.stats["asid_recycle"] += 1
        self.stats["wbinvd"] += 1
        self.stats["df_flush"] += 1
        self._used -= self._reclaim
        self._reclaim.clear()
        return True

    def free(self, asid: int) -> None:
        """``sev_asid_free()``: *asid* waits in the reclaim bitmap for the next flush."""
        if asid not in self._used or asid in self._reclaim:
            raise ValueError(f"ASID {asid} is not allocated")
        self._reclaim.add(asid)

    # --- queries ----------------------------------------------------------------------------
    def in_use(self, asid: int) -> bool:
        """Allocated and not freed."""
        return asid in self._used and asid not in self._reclaim

    def bitmaps(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``sev_asid_bitmap`` and ``sev_reclaim_asid_bitmap``, as sorted ASIDs."""
        return tuple(sorted(self._used)), tuple(sorted(self._reclaim))

    def awaiting_flush(self, asid: int) -> bool:
        """Freed but not yet recycled (not reusable)."""
        return asid in self._reclaim
