"""The same uAPI sequence on the sw model and on the running kernel (``linux`` backend).

Run: ``python benchmarks/bench_linux_vs_sw.py [--rounds N] [--pages N]``.  Prints, in one
run, the best wall time of each phase and of the whole sequence on ``sw`` (with this
host's kernel profile) and on ``linux``, and their ratio (sw / linux).  Needs /dev/kvm
and the guestmem-linux distribution.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import guestmem
from guestmem import diff, uapi

PAGE = uapi.PAGE_SIZE
MMAP_SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
GPA = 0x100000


def sequence(kvm: Any, pages: int, times: dict[str, float]) -> None:
    """One VM lifecycle: gmem, memslots, host and guest accesses, punch, teardown."""

    def phase(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        result = fn()
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        return result

    size = pages * PAGE
    vm = phase("create_vm", lambda: kvm.create_vm(uapi.KVM_X86_DEFAULT_VM))
    gmem = phase("create_guest_memfd", lambda: vm.create_guest_memfd(size, MMAP_SHARED))
    host = phase("mmap", lambda: gmem.mmap(size))
    phase("fallocate", lambda: gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE, 0, size))
    phase(
        "set_user_memory_region2",
        lambda: vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, GPA, size, host.address, gmem, 0),
    )
    phase("host_write", lambda: [host.write(i * PAGE, b"page%d" % i) for i in range(pages)])
    vcpu = phase("create_vcpu", lambda: vm.create_vcpu(0))
    phase("guest_read", lambda: [vcpu.access(GPA + i * PAGE, 8) for i in range(pages)])
    phase("guest_write", lambda: [vcpu.access(GPA + i * PAGE + 8, data=b"guest") for i in range(pages)])
    phase("punch_hole", lambda: gmem.fallocate(PUNCH, 0, size))
    phase("host_read", lambda: [host.read(i * PAGE, 8) for i in range(pages)])
    phase("delete_memslot", lambda: vm.set_user_memory_region2(0, 0, GPA, 0, 0))
    phase("close", lambda: (host.close(), gmem.close(), vm.close()))


def measure(backend: str, rounds: int, pages: int, **options: Any) -> dict[str, float]:
    """Best-of-*rounds* time of each phase (and ``total``) on *backend*."""
    best: dict[str, float] = {}
    with guestmem.open(backend, **options) as kvm:
        for _ in range(rounds):
            times: dict[str, float] = {}
            t0 = time.perf_counter()
            sequence(kvm, pages, times)
            times["total"] = time.perf_counter() - t0
            for name, value in times.items():
                best[name] = min(best.get(name, value), value)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="repetitions; the best is shown (default 5)")
    parser.add_argument("--pages", type=int, default=64, help="guest pages touched per sequence (default 64)")
    args = parser.parse_args(argv)
    profile = diff.host_profile()
    try:
        kernel = measure("linux", args.rounds, args.pages)
    except OSError as exc:
        print(f"linux backend unavailable: {exc}", file=sys.stderr)
        return 2
    model = measure("sw", args.rounds, args.pages, profile=profile)
    print(f"same sequence, {args.pages} pages, best of {args.rounds}: sw[{profile}] vs linux")
    print(f"{'phase':<26}{'sw (ms)':>12}{'linux (ms)':>12}{'sw/linux':>10}")
    for name in model:
        ratio = model[name] / kernel[name] if kernel[name] else float("inf")
        print(f"{name:<26}{model[name] * 1e3:>12.3f}{kernel[name] * 1e3:>12.3f}{ratio:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
