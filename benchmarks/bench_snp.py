"""A 64 GiB SEV-SNP guest accepting all of its memory (run: ``python benchmarks/bench_snp.py``).

The guest asks for its memory in 2 MiB page-state-change entries (253 per GHCB request,
each request one coalesced ``KVM_HC_MAP_GPA_RANGE`` exit the VMM answers with one
``KVM_SET_MEMORY_ATTRIBUTES``), then PVALIDATEs all of it, once with 2 MiB PVALIDATEs and
once with 4 KiB ones (which first take the #NPF that PSMASHes each 2 MiB RMP entry).
The ``snp-hugepage`` backend is used, so gmem folios (and RMP entries) are 2 MiB.

Each scenario runs in a fresh process and prints wall time, peak RSS, the cost counters
and how many ranges the RMP table stores, next to what a per-4K-page RMP would hold.
Needs guestmem and guestmem-snp installed (``pip install -e . -e plugins/snp``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import guestmem
import guestmem_snp
from guestmem import uapi
from guestmem_snp.ghcb import SNP_PAGE_STATE_PRIVATE, VMGEXIT_PSC_MAX_COUNT, PscEntry

GiB = 1 << 30
MiB = 1 << 20
PAGE = uapi.PAGE_SIZE
# A per-4K-page RMP model: one dict slot + one small object per page, at least ~100 bytes.
PER_PAGE_BYTES = 100


def scenario(size: int, level: int) -> dict[str, Any]:
    """Launch, accept *size* bytes in 2M PSC entries, PVALIDATE at *level*; return figures."""
    t0 = time.perf_counter()
    kvm: Any = guestmem.open("snp-hugepage")
    vm = kvm.create_vm(uapi.KVM_X86_SNP_VM)
    sev = guestmem_snp.sev(vm)
    sev.init2()
    sev.enable_cap_exit_hypercall(1 << 12)
    gmem = vm.create_guest_memfd(size)
    shared = kvm.mmap_anonymous(size)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, size, shared.address, gmem, 0)
    vcpu = vm.create_vcpu(0)
    # launch: a 2 MiB measured firmware image at gpa 0
    vm.set_memory_attributes(0, 2 * MiB, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    sev.snp_launch_start()
    sev.launch_update_data(0, b"\xf4" * (2 * MiB))
    sev.snp_launch_finish()
    g = guestmem_snp.guest(vcpu)
    vmm = guestmem_snp.ConvertingVmm(vm, [guestmem_snp.RamRegion(0, size, gmem, 0, shared)])
    t_launch = time.perf_counter()
    # page-state changes: 2M entries, 253 per request
    gfns = range(512, size // PAGE, 512)
    for i in range(0, len(gfns), VMGEXIT_PSC_MAX_COUNT):
        chunk = [
            PscEntry(gfn=gfn, operation=SNP_PAGE_STATE_PRIVATE, pagesize=1)
            for gfn in gfns[i : i + VMGEXIT_PSC_MAX_COUNT]
        ]
        rc = vmm.run(lambda chunk=chunk: g.page_state_change(chunk), g)  # type: ignore[misc]
        assert rc == 0, hex(rc)
    t_psc = time.perf_counter()
    rc = g.pvalidate_range(2 * MiB, size - 2 * MiB, level)
    assert rc == 0, rc
    t_end = time.perf_counter()
    rmp = sev.host.rmp
    assert rmp.assigned_pages(sev.asid) == size // PAGE + 1  # + the VMSA
    return {
        "size_gib": size / GiB,
        "pvalidate_size": "2M" if level == uapi.PG_LEVEL_2M else "4K",
        "launch_s": round(t_launch - t0, 3),
        "psc_s": round(t_psc - t_launch, 3),
        "pvalidate_s": round(t_end - t_psc, 3),
        "total_s": round(t_end - t0, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rmp_ranges": len(rmp),
        "rmp_pages": size // PAGE,
        "per_page_model_mib": round(size // PAGE * PER_PAGE_BYTES / MiB),
        "counters": {
            k: vm.counters[k]
            for k in (
                "psc_requests",
                "psc_exits",
                "rmpupdate",
                "psmash",
                "pvalidate",
                "rmp_npf",
                "faults",
                "copied_bytes",
            )
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=64.0)
    parser.add_argument("--one", choices=["4K", "2M"], help="run one scenario in this process (JSON out)")
    args = parser.parse_args()
    size = int(args.size_gib * GiB) // (2 * MiB) * (2 * MiB)
    if args.one:
        level = uapi.PG_LEVEL_2M if args.one == "2M" else uapi.PG_LEVEL_4K
        print(json.dumps(scenario(size, level)))
        return
    print(f"SNP guest of {size / GiB:g} GiB accepting its memory in 2 MiB PSC entries (snp-hugepage)")
    for which in ("2M", "4K"):
        out = subprocess.run(
            [sys.executable, __file__, "--size-gib", str(args.size_gib), "--one", which],
            check=True,
            capture_output=True,
            text=True,
        )
        r = json.loads(out.stdout)
        print(
            f"  PVALIDATE {r['pvalidate_size']}: {r['total_s']:8.2f} s wall "
            f"(launch {r['launch_s']} s, PSC {r['psc_s']} s, PVALIDATE {r['pvalidate_s']} s), "
            f"peak RSS {r['peak_rss_mib']} MiB; RMP stores {r['rmp_ranges']} ranges for "
            f"{r['rmp_pages']} pages (a per-4K-page RMP: >= {r['per_page_model_mib']} MiB)"
        )
        print(f"    counters: {r['counters']}")


if __name__ == "__main__":
    main()
