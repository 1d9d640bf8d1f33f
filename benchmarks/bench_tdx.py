"""A 64 GiB TD accepting its memory at boot (run: ``python benchmarks/bench_tdx.py``).

The VMM builds the TD (INIT_VM, INIT_VCPU per vCPU, a measured 2 MiB firmware image with
KVM_TDX_INIT_MEM_REGION, FINALIZE), then the guest accepts memory the way Linux does
(``tdx_accept_memory``: 1 GiB, then 2 MiB, then 4 KiB ACCEPTs; with Linux 6.18 KVM maps
private memory at 4 KiB, so every 2 MiB ACCEPT ends in a size mismatch and the pages are
accepted one by one, each first AUGed by KVM on the EPT violation):

``eager``
    all memory at boot, split evenly over the vCPUs;
``lazy``
    the first 256 MiB at boot, then 512 scattered 2 MiB units as the guest first uses
    them (``accept_memory=lazy``), round-robin over the vCPUs.

Teardown (guest_memfd, vCPUs and VM closed) removes every private page as 6.18 does:
BLOCK, TRACK (kicking every vCPU), REMOVE, WBINVD and a clear per 4 KiB page.

Each scenario runs in a fresh process and prints wall time (build, acceptance, teardown),
the SEAMCALLs, TDCALLs and exits counted, peak RSS, and how many ranges the S-EPT and PAMT
store, then a verdict per target: an eager boot (build + acceptance) under one second.
``--json`` prints the targets (``target``, ``figure``, ``unit``, ``limit``: met iff
``figure <= limit``) and the scenarios; ``--quick`` runs a 4 GiB TD.  Needs guestmem and
guestmem-tdx installed (``pip install -e . -e plugins/tdx``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import verdicts  # a sibling module: the targets and their verdicts

import guestmem
import guestmem_tdx
from guestmem import uapi

GiB = 1 << 30
MiB = 1 << 20
PAGE = uapi.PAGE_SIZE
BOOT = 256 * MiB
LAZY_UNITS = 512


def scenario(size: int, nvcpus: int, mode: str) -> dict[str, Any]:
    """Build a TD of *size* bytes with *nvcpus*, accept its memory (*mode*); figures.

    The plugins are loaded first: the build is the VMM's ioctls, not Python's imports."""
    guestmem.backends()
    t0 = time.perf_counter()
    kvm: Any = guestmem.open("tdx")
    vm = kvm.create_vm(uapi.KVM_X86_TDX_VM)
    tdx = guestmem_tdx.tdx(vm)
    tdx.enable_cap_exit_hypercall()
    tdx.init_vm()
    gmem = vm.create_guest_memfd(size)
    shared = kvm.mmap_anonymous(size)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, size, shared.address, gmem, 0)
    vcpus = [vm.create_vcpu(i) for i in range(nvcpus)]
    for vcpu in vcpus:
        tdx.init_vcpu(vcpu)
    vm.set_memory_attributes(0, size, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    tdx.init_mem_region(vcpus[0], 0, b"\xf4" * (2 * MiB))
    tdx.finalize()
    guests = [guestmem_tdx.guest(vcpu) for vcpu in vcpus]
    t_build = time.perf_counter()
    before = dict(vm.counters)
    if mode == "eager":
        slice_ = (size - 2 * MiB) // nvcpus // (2 * MiB) * (2 * MiB)
        for i, g in enumerate(guests):
            start = 2 * MiB + i * slice_
            end = size if i == nvcpus - 1 else start + slice_
            assert g.accept_memory(start, end)
    else:
        assert guests[0].accept_memory(2 * MiB, BOOT)
        stride = (size - BOOT) // LAZY_UNITS // (2 * MiB) * (2 * MiB)
        for i in range(LAZY_UNITS):
            unit = BOOT + i * stride
            assert guests[i % nvcpus].accept_memory(unit, unit + 2 * MiB)
    t_accept = time.perf_counter()
    counters = {k: v - before.get(k, 0) for k, v in vm.counters.items()}
    td = tdx.td
    sept_ranges, pamt_ranges = len(td.leaves), len(tdx.host.module.pamt)
    accepted = sum(e - s for s, e, leaf in td.leaves.items() if leaf.state is guestmem_tdx.SeptState.MAPPED)
    gmem.close()
    for vcpu in vcpus:
        vcpu.close()
    vm.close()
    t_end = time.perf_counter()
    assert not tdx.host.module.pamt and not tdx.host.keyids.in_use
    after = vm.counters
    removal = {
        k: after.get(k, 0) - before.get(k, 0) - counters.get(k, 0)
        for k in (
            "seamcall.TDH.MEM.PAGE.REMOVE",
            "tdx.track_epochs",
            "tdx.vcpu_kicks",
            "seamcall.TDH.PHYMEM.PAGE.RECLAIM",
        )
    }
    seamcalls = {
        k.removeprefix("seamcall."): v for k, v in counters.items() if k.startswith("seamcall.") and v
    }
    return {
        "size_gib": size / GiB,
        "vcpus": nvcpus,
        "mode": mode,
        "build_s": round(t_build - t0, 4),
        "accept_s": round(t_accept - t_build, 4),
        "teardown_s": round(t_end - t_accept, 4),
        "accepted_gib": round(accepted * PAGE / GiB, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "sept_ranges": sept_ranges,
        "pamt_ranges": pamt_ranges,
        "seamcalls": counters.get("seamcalls", 0),
        "by_leaf": seamcalls,
        "tdcalls": counters.get("tdcalls", 0),
        "ept_violation_exits": counters.get("ept_violation_exits", 0),
        "userspace_exits": counters.get("userspace_exits", 0),
        "teardown": {k.removeprefix("seamcall.").removeprefix("tdx."): v for k, v in removal.items()},
    }


#: The scenarios whose boot (build + acceptance at boot) has a target, and the target.
BOOT_TARGETS = {(1, "eager"): 1.0, (8, "eager"): 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-gib", type=float, help="TD size (default 64, --quick 4)")
    parser.add_argument("--quick", action="store_true", help="a 4 GiB TD (a smoke run)")
    parser.add_argument("--json", action="store_true", help="print the targets and figures as JSON")
    parser.add_argument("--one", help="vcpus:mode, one scenario in this process (JSON out)")
    args = parser.parse_args()
    gib = args.size_gib if args.size_gib is not None else (4.0 if args.quick else 64.0)
    size = int(gib * GiB) // (2 * MiB) * (2 * MiB)
    if args.one:
        nvcpus, mode = args.one.split(":")
        print(json.dumps(scenario(size, int(nvcpus), mode)))
        return
    results = []
    for nvcpus in (1, 8):
        for mode in ("eager", "lazy"):
            out = subprocess.run(
                [sys.executable, __file__, "--size-gib", str(gib), "--one", f"{nvcpus}:{mode}"],
                check=True,
                capture_output=True,
                text=True,
            )
            results.append(json.loads(out.stdout))
    targets = [
        verdicts.row(
            f"{gib:g} GiB boot, {r['vcpus']} vCPU(s) {r['mode']} (build + accept)",
            round(r["build_s"] + r["accept_s"], 3),
            "s",
            BOOT_TARGETS[r["vcpus"], r["mode"]],
        )
        for r in results
        if (r["vcpus"], r["mode"]) in BOOT_TARGETS
    ]
    if args.json:
        verdicts.print_json(targets, scenarios=results)
        return
    print(f"TD of {size / GiB:g} GiB accepting its memory at boot (Linux 6.18: 4 KiB private mappings)")
    for r in results:
        print(
            f"  {r['vcpus']} vCPU(s), {r['mode']:16s}: accept {r['accept_s']:6.3f} s "
            f"({r['accepted_gib']:g} GiB accepted), teardown {r['teardown_s']:6.3f} s, "
            f"build {r['build_s']:6.3f} s, peak RSS {r['peak_rss_mib']} MiB; "
            f"S-EPT {r['sept_ranges']} ranges, PAMT {r['pamt_ranges']} ranges"
        )
        leaves = ", ".join(f"{k} {v}" for k, v in sorted(r["by_leaf"].items()))
        print(
            f"      {r['seamcalls']} SEAMCALLs ({leaves}); {r['tdcalls']} TDCALLs; "
            f"{r['ept_violation_exits']} EPT-violation exits; {r['userspace_exits']} userspace exits"
        )
        teardown = ", ".join(f"{k} {v}" for k, v in r["teardown"].items())
        print(f"      teardown: {teardown}")
    verdicts.print_verdicts(targets)


if __name__ == "__main__":
    main()
