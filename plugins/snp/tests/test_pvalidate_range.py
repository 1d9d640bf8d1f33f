"""``SnpGuest.pvalidate_range`` is the guest kernel's loop of PVALIDATEs (Linux's
``pvalidate_pages``): whatever the state it meets, it leaves the RMP, the stage-2, the
folios and every counter as :meth:`SnpGuest.pvalidate` page by page does, returns the same
code and stops (or raises) at the same page, at the cost of the runs of memory."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from snp_helpers import MIB, SnpVm, make_snp_vm

from guestmem import uapi
from guestmem.backend import view
from guestmem.errors import GuestExit, KvmError
from guestmem_snp import SnpGuest
from guestmem_snp.rmp import PVALIDATE_FAIL_NOUPDATE, PVALIDATE_FAIL_SIZEMISMATCH, RmpViolation

PAGE = uapi.PAGE_SIZE
L4K, L2M = uapi.PG_LEVEL_4K, uapi.PG_LEVEL_2M
SIZE = 6 * MIB
NPAGES = SIZE // PAGE
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE


def page_loop(
    g: SnpGuest, gpa: int, size: int, level: int, validate: bool, fallback: bool
) -> tuple[Any, int]:
    """The reference: one :meth:`SnpGuest.pvalidate` per page, as ``pvalidate_pages`` issues
    them (a 2M one that says SIZEMISMATCH is redone as 512 4K ones when *fallback*).
    Returns ``(code or exception type, pages validated before it)``."""
    span = PAGE << (9 if level == L2M else 0)
    done = 0
    try:
        for pos in range(gpa, gpa + size, span):
            rc = g.pvalidate(pos, level, validate)
            if rc == PVALIDATE_FAIL_SIZEMISMATCH and level == L2M and fallback:
                for page in range(pos, pos + span, PAGE):
                    rc = g.pvalidate(page, L4K, validate)
                    if rc:
                        return rc, done
                    done += 1
                continue
            if rc:
                return rc, done
            done += span // PAGE
    except (KvmError, GuestExit, RmpViolation) as exc:
        return type(exc), done
    return 0, done


def ranged(g: SnpGuest, gpa: int, size: int, level: int, validate: bool, fallback: bool) -> tuple[Any, int]:
    try:
        rc: Any = g.pvalidate_range(gpa, size, level, validate, fallback=fallback)
    except (KvmError, GuestExit, RmpViolation) as exc:
        rc = type(exc)
    return rc, g.progress


def state(snp: SnpVm) -> tuple[Any, ...]:
    """What the guest's PVALIDATEs can change: the RMP, the leaves, the folios, the counters."""
    return (
        list(snp.rmp.runs()),
        list(view(snp.vm).leaves()),
        list(view(snp.gmem).folios()),
        dict(snp.vm.counters),
    )


def apply(snp: SnpVm, op: tuple[str, int, int, int, bool]) -> None:
    """One step of the state the range meets, through the uAPI, the guest or the host."""
    kind, page, npages, level, flag = op
    npages = min(npages, NPAGES - page)
    gpa, length = page * PAGE, npages * PAGE
    if kind == "private":
        snp.vm.set_memory_attributes(gpa, length, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if flag else 0)
    elif kind == "punch":
        snp.gmem.fallocate(PUNCH, gpa, length)
    elif kind == "zap":
        view(snp.vm).zap_gfn_range(page, page + npages)
    elif kind == "access" and snp.vm.is_private(page):
        snp.vcpu.access(gpa, 1, private=True)
    elif kind == "pvalidate":
        with contextlib.suppress(KvmError, GuestExit, RmpViolation):
            snp.guest.pvalidate(gpa - gpa % (2 * MIB) if level == L2M else gpa, level, flag)
    elif kind == "steal":  # the host hands a guest page to another ASID
        pfn = snp.vm.gmem_pfn(page)
        if pfn is not None:
            snp.rmp.make_private(pfn, gpa, L4K, snp.sev.asid + 1, immutable=False)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["private", "private", "punch", "zap", "access", "pvalidate", "steal"]),
        st.integers(0, NPAGES - 1),
        st.sampled_from([1, 3, 511, 512, 700, 1024, NPAGES]),
        st.sampled_from([L4K, L2M]),
        st.booleans(),
    ),
    max_size=6,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    backend=st.sampled_from(["snp", "snp-hugepage"]),
    ops=OPS,
    first=st.one_of(st.sampled_from([0, 512, 1024]), st.integers(0, NPAGES - 1)),
    npages=st.one_of(st.just(NPAGES), st.integers(1, NPAGES)),
    level=st.sampled_from([L4K, L2M]),
    validate=st.booleans(),
    fallback=st.booleans(),
)
def test_pvalidate_range_equals_the_page_loop(
    backend: str,
    ops: list[tuple[str, int, int, int, bool]],
    first: int,
    npages: int,
    level: int,
    validate: bool,
    fallback: bool,
) -> None:
    a, b = make_snp_vm(backend, SIZE), make_snp_vm(backend, SIZE)
    for snp in (a, b):
        snp.private(0, SIZE)
        for op in ops:
            apply(snp, op)
    assert state(a) == state(b)
    if level == L2M:
        first, npages = first - first % 512, max(512, npages - npages % 512)
    npages = min(npages, NPAGES - first)
    if npages <= 0:
        return
    ga, gb = a.guest, b.guest
    got = ranged(ga, first * PAGE, npages * PAGE, level, validate, fallback)
    want = page_loop(gb, first * PAGE, npages * PAGE, level, validate, fallback)
    assert got == want
    assert state(a) == state(b)


@pytest.mark.parametrize("backend", ["snp", "snp-hugepage"])
@pytest.mark.parametrize("level", [L4K, L2M])
def test_accepting_fresh_memory_costs_runs_not_pages(backend: str, level: int) -> None:
    """Fresh private memory validated in one range: the 4K PVALIDATEs over 2M entries take
    their #NPF, PSMASH and zap per block as the page loop does, counted so; the model made
    a handful of calls (one fault per run, one RMP walk per run)."""
    a, b = make_snp_vm(backend, SIZE), make_snp_vm(backend, SIZE)
    for snp in (a, b):
        snp.private(0, SIZE)
    assert ranged(a.guest, 0, SIZE, level, True, True) == (0, NPAGES)
    assert page_loop(b.guest, 0, SIZE, level, True, True) == (0, NPAGES)
    assert state(a) == state(b)
    counters = a.vm.counters
    blocks = NPAGES // 512
    if backend == "snp-hugepage" and level == L4K:
        assert counters["psmash"] == counters["rmp_npf"] == blocks
        assert counters["pvalidate"] == NPAGES + blocks
    elif backend == "snp" and level == L2M:
        assert counters["pvalidate"] == NPAGES + blocks  # each 2M one says SIZEMISMATCH first
    assert a.vm.counters["psmash"] == b.vm.counters["psmash"]


def test_progress_when_a_page_was_validated_already(snp: SnpVm) -> None:
    """The loop stops at the first page that does not change (NOUPDATE); those before it
    were validated: ``progress`` says how many."""
    snp.private(0, 2 * MIB)
    assert snp.guest.pvalidate(0x5000) == 0
    g = snp.guest
    assert g.pvalidate_range(0, 2 * MIB) == PVALIDATE_FAIL_NOUPDATE
    assert g.progress == 5
    assert snp.rmp.lookup(snp.pfn(0x4000)).validated
    assert snp.vm.gmem_pfn(6) is None  # the NPT walk of no PVALIDATE after the failing one


def test_a_violation_mid_range_raises_after_the_pages_before_it(snp: SnpVm) -> None:
    """A page the host gave another ASID is an RMP #NPF KVM cannot resolve: the loop
    raises there, the pages before it validated and counted, ``progress`` saying how many."""
    other = make_snp_vm()
    for vm in (snp, other):
        vm.private(0, 2 * MIB)
        vm.vcpu.access(7 * PAGE, 1, private=True)
        assert vm.rmp.make_private(vm.pfn(7 * PAGE), 7 * PAGE, L4K, vm.sev.asid + 1, immutable=False) == 0
    assert ranged(snp.guest, 0, 2 * MIB, L4K, True, True) == (RmpViolation, 7)
    assert page_loop(other.guest, 0, 2 * MIB, L4K, True, True) == (RmpViolation, 7)
    assert state(snp) == state(other)
    assert snp.vm.counters["pvalidate"] == 7
