"""ASID allocation and recycling (backends.md 2.1: sev_asid_new / __sev_recycle_asids)."""

from __future__ import annotations

import errno

import pytest

from guestmem.errors import KvmError
from guestmem_snp.asid import AsidAllocator


def test_ranges_split_es_snp_below_min_sev_asid() -> None:
    """SEV-ES and SNP share [1, min_sev_asid); SEV uses [min_sev_asid, max_sev_asid]."""
    alloc = AsidAllocator(max_sev_asid=16, min_sev_asid=5)
    sev = alloc.range_for(es=False, snp=False)
    assert (sev.min_asid, sev.max_asid) == (5, 16)
    assert alloc.range_for(es=True, snp=False) == alloc.range_for(es=True, snp=True)
    assert alloc.range_for(es=True, snp=True).max_asid == 4
    assert alloc.allocate(es=True, snp=True) == 1
    assert alloc.allocate(es=False, snp=False) == 5


def test_ciphertext_hiding_carves_snp_range() -> None:
    """ciphertext_hiding_asids = n: SNP [1, n], SEV-ES [n+1, min_sev_asid)."""
    alloc = AsidAllocator(max_sev_asid=16, min_sev_asid=8, ciphertext_hiding_asids=3)
    snp = alloc.range_for(es=True, snp=True)
    es = alloc.range_for(es=True, snp=False)
    assert (snp.min_asid, snp.max_asid, es.min_asid, es.max_asid) == (1, 3, 4, 7)


def test_freed_asid_is_not_reused_before_a_flush() -> None:
    """2.1: a freed ASID waits in the reclaim bitmap while free ones remain."""
    alloc = AsidAllocator(max_sev_asid=8, min_sev_asid=4)
    a = alloc.allocate(es=True, snp=True)
    alloc.free(a)
    assert alloc.awaiting_flush(a) and not alloc.in_use(a)
    b = alloc.allocate(es=True, snp=True)
    assert b != a
    assert alloc.stats["wbinvd"] == 0


def test_exhausted_range_recycles_with_wbinvd_and_df_flush() -> None:
    """2.1: free bitmap empty -> WBINVD + DF_FLUSH, reclaimed ASIDs become free (lowest first)."""
    alloc = AsidAllocator(max_sev_asid=8, min_sev_asid=4)  # SNP: 1..3
    asids = [alloc.allocate(es=True, snp=True) for _ in range(3)]
    assert asids == [1, 2, 3]
    alloc.free(2)
    assert alloc.allocate(es=True, snp=True) == 2
    assert alloc.stats == {"asid_recycle": 1, "wbinvd": 1, "df_flush": 1}


def test_exhausted_range_without_reclaimable_asids_is_ebusy() -> None:
    """No free and no reclaimed ASID in the range: -EBUSY, and no flush is done."""
    alloc = AsidAllocator(max_sev_asid=8, min_sev_asid=3)  # SNP: 1..2
    alloc.allocate(es=True, snp=True)
    alloc.allocate(es=True, snp=True)
    alloc.allocate(es=False, snp=False)
    alloc.free(3)  # a SEV ASID does not help an SNP guest
    with pytest.raises(KvmError) as info:
        alloc.allocate(es=True, snp=True)
    assert info.value.errno == errno.EBUSY
    assert alloc.stats["wbinvd"] == 0


def test_empty_range_is_enotty() -> None:
    """min_sev_asid == 1: no ASIDs for SEV-ES/SNP at all (sev_asid_new: min > max)."""
    alloc = AsidAllocator(max_sev_asid=8, min_sev_asid=1)
    with pytest.raises(KvmError) as info:
        alloc.allocate(es=True, snp=True)
    assert info.value.errno == errno.ENOTTY


def test_double_free_is_a_bug() -> None:
    alloc = AsidAllocator()
    a = alloc.allocate(es=True, snp=True)
    alloc.free(a)
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free(a)


def test_bad_configuration() -> None:
    with pytest.raises(ValueError, match="min_sev_asid"):
        AsidAllocator(max_sev_asid=4, min_sev_asid=9)
    with pytest.raises(ValueError, match="ciphertext"):
        AsidAllocator(max_sev_asid=8, min_sev_asid=4, ciphertext_hiding_asids=4)
