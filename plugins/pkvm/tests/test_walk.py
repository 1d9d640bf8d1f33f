"""Random guest/host interleavings under the isolation checker (I-1, I-2).

Besides the checker's own invariants: a host access succeeds exactly when the page is
not the guest's private page, and a page's bytes survive every share/unshare (in place).
"""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

import guestmem
from guestmem import HostSigbus, MemoryFault, uapi
from guestmem_pkvm import abi
from guestmem_pkvm.exits import HypercallExit
from guestmem_pkvm.invariants import IsolationChecker
from guestmem_pkvm.ownership import PageState
from guestmem_pkvm.policy import pkvm_state

from .conftest import GPA, Guest

PAGE = uapi.PAGE_SIZE
NPAGES = 4
CALLS = {
    "share": abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_SHARE_FUNC_ID,
    "unshare": abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_UNSHARE_FUNC_ID,
    "relinquish": abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_RELINQUISH_FUNC_ID,
}
OPS = st.lists(
    st.tuples(
        st.sampled_from(["guest_write", "guest_read", "share", "unshare", "relinquish", "host_write", "zap"]),
        st.integers(0, NPAGES - 1),
        st.binary(min_size=1, max_size=8),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(OPS)
def test_random_interleavings_keep_isolation_3_2_3_5(ops: list[tuple[str, int, bytes]]) -> None:
    checker = IsolationChecker()
    registry = guestmem.get_registry()
    registry.add_plugin(checker, name=f"walk-{id(checker):x}")
    try:
        with guestmem.open("pkvm") as kvm:
            g = Guest(kvm)
            state = pkvm_state(g.vm)
            expected: dict[int, bytes] = {}  # what each page holds (first bytes)
            for op, i, data in ops:
                gpa = GPA + i * PAGE
                gfn = gpa >> uapi.PAGE_SHIFT
                if op == "guest_write":
                    try:
                        g.vcpu.access(gpa, data=data)
                        expected[i] = data + expected.get(i, b"")[len(data) :]
                    except MemoryFault:  # the host still maps it: drop the mapping, as a VMM would
                        g.map.madvise(uapi.MADV_DONTNEED, i * PAGE, PAGE)
                elif op == "guest_read":
                    try:
                        got = g.vcpu.access(gpa, 8)
                    except MemoryFault:
                        g.map.madvise(uapi.MADV_DONTNEED, i * PAGE, PAGE)
                        continue
                    assert got is not None
                    want = expected.get(i, b"")
                    assert got[: len(want)] == want
                elif op in CALLS:
                    try:
                        with contextlib.suppress(HypercallExit):
                            g.vcpu.hypercall(CALLS[op], gpa, 1, 0)
                    except MemoryFault:  # MEM_SHARE's fault-in met a host mapping: unmap
                        assert op == "share"
                        g.map.madvise(uapi.MADV_DONTNEED, i * PAGE, PAGE)
                        continue
                    if op == "relinquish" and state.running.state(gfn).state == PageState.NOPAGE:
                        expected.pop(i, None)  # relinquished pages come back zeroed
                else:
                    page = PageState.NOPAGE if state.hvm is None else state.hvm.state(gfn).state
                    private = page == PageState.OWNED
                    try:
                        if op == "host_write":
                            g.map.write(i * PAGE, data)
                            expected[i] = data + expected.get(i, b"")[len(data) :]
                        else:
                            g.map.madvise(uapi.MADV_DONTNEED, i * PAGE, PAGE)
                            continue
                    except HostSigbus:
                        assert private
                    else:
                        assert not private
            g.teardown()
            assert g.vm.destroyed
            assert len(state.hyp.host) == 0
    finally:
        registry.remove_plugin(checker)
    assert checker.violations == []
