"""pKVM guest memory figures (run: ``python benchmarks/bench_pkvm.py``).

Prints, on a protected VM (``KVM_VM_TYPE_ARM_PROTECTED``) with one gmem-only memslot:

- faulting in 1 GiB of 4 KiB pages, the guest touching every page in order (each run of
  pages takes the stage-2 fault and ``__pkvm_host_donate_guest`` of every page, counted
  per page), target under 0.5 s; a normal VM's fault-in (shares) next to it;
- the same faults page by page (one vCPU access each) over a slice, extrapolated: the
  ratio;
- MEM_SHARE and MEM_UNSHARE of donated pages, one page per hypercall and 2 MiB per
  hypercall (which shares at most 256 pages per call, the hypervisor's walker limit, so
  the guest calls again from where it stopped): microseconds per page and the ratio.

Each figure is the best of three fresh VMs.  ``--json`` prints the targets (``target``,
``figure``, ``unit``, ``limit``: met iff ``figure <= limit``) and the figures; ``--quick``
faults in 256 MiB.  Needs guestmem and guestmem-pkvm installed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import verdicts  # a sibling module: the targets and their verdicts

import guestmem
from guestmem import uapi
from guestmem.backend import view
from guestmem_pkvm import abi
from guestmem_pkvm.exits import HypercallExit
from guestmem_pkvm.policy import pkvm_state

MiB = 1 << 20
GiB = 1 << 30
PAGE = uapi.PAGE_SIZE
GPA = 1 << 32
GMEM_FLAGS = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
SHARE = abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_SHARE_FUNC_ID
UNSHARE = abi.ARM_SMCCC_VENDOR_HYP_KVM_MEM_UNSHARE_FUNC_ID
#: Pages faulted one by one, and shared one per call, for the per-page figures.
SLICE_PAGES = 2048
REPEAT = 3


def guest(kvm: Any, size: int, protected: bool = True) -> tuple[Any, Any]:
    """A VM with *size* bytes of guest_memfd at :data:`GPA` and vCPU 0, which has run."""
    vm = kvm.create_vm(abi.KVM_VM_TYPE_ARM_PROTECTED if protected else abi.KVM_VM_TYPE_ARM_DEFAULT)
    gmem = vm.create_guest_memfd(size, GMEM_FLAGS)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, GPA, size, guest_memfd=gmem)
    vcpu = vm.create_vcpu(0)
    view(vcpu).check_run()  # the first KVM_RUN: the hypervisor's VM exists
    return vm, vcpu


def best(run: Callable[[], float]) -> float:
    return min(run() for _ in range(REPEAT))


def fault_in(size: int, protected: bool) -> float:
    """Seconds for the guest to touch every page of *size* bytes in order (fault_range)."""
    with guestmem.open("pkvm") as kvm:
        vm, vcpu = guest(kvm, size, protected)
        t0 = time.perf_counter()
        mapped = view(vm).fault_range(GPA >> 12, size >> 12, private=False, vcpu=view(vcpu))
        elapsed = time.perf_counter() - t0
        assert mapped == size >> 12
        counters = vm.counters
        key = "pkvm.donations" if protected else "pkvm.stage2_map"
        assert counters[key] == counters["faults"] == size >> 12, counters
        return elapsed


def fault_in_page_by_page() -> float:
    """Seconds per page of the same faults, one vCPU access each."""
    with guestmem.open("pkvm") as kvm:
        _, vcpu = guest(kvm, SLICE_PAGES * PAGE)
        t0 = time.perf_counter()
        for page in range(SLICE_PAGES):
            vcpu.access(GPA + page * PAGE, 1)
        return (time.perf_counter() - t0) / SLICE_PAGES


def hvc(vm: Any, vcpu: Any, nr: int, ipa: int, npages: int) -> int:
    """One MEM_SHARE/MEM_UNSHARE; the pages it converted (x1), also through its exit to
    userspace (``KVM_CAP_EXIT_HYPERCALL``: on by default)."""
    try:
        rc = vcpu.hypercall(nr, ipa, npages, 0)
    except HypercallExit as exit_:
        return int(exit_.args[1])
    assert rc == abi.SMCCC_RET_SUCCESS, rc
    return int(pkvm_state(vm).ret[1])


def conversions(per_call: int) -> tuple[float, float, int]:
    """(share, unshare) seconds per page of donated memory, *per_call* pages asked per
    hypercall (the guest calling again from where the hypervisor stopped); the calls made."""
    npages = SLICE_PAGES
    with guestmem.open("pkvm") as kvm:
        vm, vcpu = guest(kvm, npages * PAGE)
        view(vm).fault_range(GPA >> 12, npages, private=False, vcpu=view(vcpu))
        times, calls = [], 0
        for nr in (SHARE, UNSHARE):
            t0 = time.perf_counter()
            pos = 0
            while pos < npages:
                pos += hvc(vm, vcpu, nr, GPA + pos * PAGE, min(per_call, npages - pos))
                calls += 1
            times.append((time.perf_counter() - t0) / npages)
        assert vm.counters["pkvm.converted_pages"] == 2 * npages
        return times[0], times[1], calls // 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fault in 256 MiB (a smoke run)")
    parser.add_argument("--json", action="store_true", help="print the targets and figures as JSON")
    args = parser.parse_args()
    size = 256 * MiB if args.quick else GiB
    pages = size // PAGE
    ranged = best(lambda: fault_in(size, True))
    normal = best(lambda: fault_in(size, False))
    per_page = best(fault_in_page_by_page)
    share_1, unshare_1, _ = min(conversions(1) for _ in range(REPEAT))
    share_2m, unshare_2m, calls_2m = min(conversions(512) for _ in range(REPEAT))
    label = f"{size // MiB} MiB" if size < GiB else f"{size // GiB} GiB"
    figures = {
        "pages": pages,
        "fault_in_s": ranged,
        "fault_in_normal_vm_s": normal,
        "page_by_page_us_per_page": per_page * 1e6,
        "page_by_page_s": per_page * pages,
        "fault_in_speedup": per_page * pages / ranged,
        "mem_share_per_page_us": share_1 * 1e6,
        "mem_unshare_per_page_us": unshare_1 * 1e6,
        "mem_share_2m_us_per_page": share_2m * 1e6,
        "mem_unshare_2m_us_per_page": unshare_2m * 1e6,
        "mem_share_2m_calls_per_2m": calls_2m * 512 / SLICE_PAGES,
        "share_speedup": share_1 / share_2m,
        "unshare_speedup": unshare_1 / unshare_2m,
    }
    targets = [verdicts.row(f"{label} fault-in, 4K pages (protected VM)", round(ranged, 4), "s", 0.5)]
    if args.json:
        verdicts.print_json(targets, figures=figures)
        return
    f = figures
    print(f"pKVM protected VM, {label} of guest_memfd ({pages:,} pages of 4 KiB), best of {REPEAT}")
    print(f"  fault-in, the guest touching every page in order   {ranged * 1e3:8.2f} ms")
    print(f"  the same on a normal VM (shares, not donations)     {normal * 1e3:8.2f} ms")
    print(
        f"  page by page (one access each, {SLICE_PAGES} pages)         {per_page * 1e6:8.2f} us per page: "
        f"{per_page * pages:.1f} s for {label} ({f['fault_in_speedup']:.0f}x the run)"
    )
    print(
        f"  MEM_SHARE   one page per call {share_1 * 1e6:7.2f} us per page; 2 MiB per call "
        f"{share_2m * 1e6:6.2f} us per page ({f['mem_share_2m_calls_per_2m']:.0f} calls per 2 MiB; "
        f"{f['share_speedup']:.0f}x)"
    )
    print(
        f"  MEM_UNSHARE one page per call {unshare_1 * 1e6:7.2f} us per page; 2 MiB per call "
        f"{unshare_2m * 1e6:6.2f} us per page ({f['unshare_speedup']:.0f}x)"
    )
    verdicts.print_verdicts(targets)


if __name__ == "__main__":
    main()
