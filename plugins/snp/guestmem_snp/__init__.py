"""guestmem-snp: an AMD SEV-SNP host for guestmem.

The pieces that stand alone (no core model needed): :mod:`guestmem_snp.rmp` (the RMP
table and its state machine) and :mod:`guestmem_snp.asid` (ASID allocation/recycling).
"""

from __future__ import annotations

from guestmem_snp.asid import AsidAllocator, AsidRange
from guestmem_snp.rmp import RmpEntry, RmpState, RmpTable, RmpViolation

__all__ = [
    "AsidAllocator",
    "AsidRange",
    "RmpEntry",
    "RmpState",
    "RmpTable",
    "RmpViolation",
]
