"""Core scale and cost figures (run: ``python benchmarks/bench_core.py``).

Prints, in one run:
- the cost of range operations over 1 TiB (set_memory_attributes, punch hole, creating a
  1 TiB VM) as the number of distinct stored ranges n grows: O(log n), not O(pages);
- the resident set of a fresh process running a 1 TiB guest that touched 1,000 pages;
- a first-touch 4 KiB guest fault as a multiple of a bare Python method call.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

import guestmem
from guestmem import uapi

TiB = 1 << 40
PAGES_PER_TIB = TiB >> uapi.PAGE_SHIFT
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE


def best_of(fn: Callable[[], Any], repeat: int = 5) -> float:
    """Best wall time of *fn* over *repeat* runs, in seconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def tib_vm(kvm: Any, size: int = TiB) -> tuple[Any, Any]:
    """A SW_PROTECTED VM with one gmem memslot of *size* at gpa 0."""
    vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    gmem = vm.create_guest_memfd(size)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, size, 0, gmem, 0)
    return vm, gmem


def fragment(vm: Any, gmem: Any, n: int, base: int) -> None:
    """Store n distinct attribute ranges and n gmem folio runs in ``[base, base + 1 TiB)``."""
    stride = (TiB // max(n, 1)) & ~(uapi.PAGE_SIZE - 1)
    for i in range(n):
        vm.set_memory_attributes(base + i * stride, 4096, PRIVATE)
        gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE, base + i * stride, 4096)


def timed(prepare: Callable[[], Any], op: Callable[[], Any], repeat: int = 5) -> float:
    """Best time of *op* over *repeat* runs, each after an untimed *prepare*."""
    times = []
    for _ in range(repeat):
        prepare()
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
    return min(times)


def _measure(kvm: Any, n: int, inside: bool) -> tuple[float, float, float, int]:
    """Operations over ``[0, 1 TiB)`` with n ranges stored inside it (*inside*) or in the
    TiB above it; the fragments are stored again before each timed run."""
    vm, gmem = tib_vm(kvm, 2 * TiB)
    base = 0 if inside else TiB

    def prepare() -> None:
        vm.set_memory_attributes(0, 2 * TiB, 0)
        gmem.fallocate(PUNCH, 0, 2 * TiB)
        fragment(vm, gmem, n, base)

    ranges = 0

    def count() -> None:
        nonlocal ranges
        prepare()
        ranges = len(vm.attributes) + len(gmem.file.inode.pages)

    attr_t = timed(count, lambda: vm.set_memory_attributes(0, TiB, PRIVATE))
    alloc_t = timed(prepare, lambda: gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE, 0, TiB))
    punch_t = timed(prepare, lambda: gmem.fallocate(PUNCH, 0, TiB))
    gmem.close()
    vm.close()
    return attr_t, alloc_t, punch_t, ranges


def range_ops(ns: list[int]) -> None:
    print(f"one operation over 1 TiB ({PAGES_PER_TIB:,} pages) while n other ranges are stored; best of 5")
    with guestmem.open("sw") as kvm:
        for inside in (True, False):
            where = "inside the operated TiB" if inside else "in the TiB above it"
            print(f"n ranges stored {where}:")
            header = f"{'set_attributes':>15} {'fallocate':>12} {'punch hole':>12} {'stored ranges':>14}"
            print(f"{'n':>7} {header}")
            for n in ns:
                attr_t, alloc_t, punch_t, ranges = _measure(kvm, n, inside)
                cols = f"{attr_t * 1e6:>12.1f} us {alloc_t * 1e6:>9.1f} us {punch_t * 1e6:>9.1f} us"
                print(f"{n:>7} {cols} {ranges:>14}")
        create = best_of(lambda: tib_vm(kvm)[0].close())  # noqa: PLW0108 - a fresh VM per run
        print(f"creating a 1 TiB VM (VM + 1 TiB guest_memfd + memslot): {create * 1e6:.1f} us")
        per_page = PAGES_PER_TIB * 50e-9
        print(f"(a per-page model at an optimistic 50 ns/page would need {per_page:.1f} s per operation)")


RSS_CHILD = """
import guestmem, resource
from guestmem import uapi
TiB = 1 << 40
kvm = guestmem.open("sw")
vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
gmem = vm.create_guest_memfd(TiB)
vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, TiB, 0, gmem, 0)
vm.set_memory_attributes(0, TiB, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
vcpu = vm.create_vcpu(0)
stride = (TiB // 1000) & ~4095
for i in range(1000):
    vcpu.access(i * stride, data=b"x" * 64)
assert vm.mmu.mapped_pages() == 1000
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def rss() -> None:
    out = subprocess.run([sys.executable, "-c", RSS_CHILD], check=True, capture_output=True, text=True)
    kib = int(out.stdout.split()[-1])
    verdict = "OK" if kib < 50 * 1024 else "OVER BUDGET"
    print(
        f"peak RSS of a fresh process, 1 TiB guest, 1,000 pages touched: {kib / 1024:.1f} MiB "
        f"(budget 50 MiB: {verdict})"
    )


class _Plain:
    def method(self) -> int:
        return 1


def fault_cost() -> None:
    with guestmem.open("sw") as kvm:
        vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = vm.create_guest_memfd(TiB)
        vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, TiB, 0, gmem, 0)
        vm.set_memory_attributes(0, TiB, PRIVATE)
        vcpu = vm.create_vcpu(0)
        counter = iter(range(0, TiB, 1 << 20))
        plain = _Plain()
        n = 20000
        samples_fault, samples_call, samples_hit = [], [], []
        for _ in range(5):
            samples_call.append(timeit.timeit(plain.method, number=n * 10) / (n * 10))
            samples_fault.append(timeit.timeit(lambda: vcpu.access(next(counter), 1), number=n) / n)
            samples_hit.append(timeit.timeit(lambda: vcpu.access(0, 1), number=n) / n)
        call = statistics.median(samples_call)
        fault = statistics.median(samples_fault)
        hit = statistics.median(samples_hit)
        print(f"bare Python method call:          {call * 1e9:8.1f} ns")
        print(
            f"first-touch 4 KiB private fault:  {fault * 1e6:8.2f} us = {fault / call:,.0f} x a method call"
        )
        print(f"access to an already mapped page: {hit * 1e6:8.2f} us = {hit / call:,.0f} x a method call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer range sizes")
    args = parser.parse_args()
    range_ops([1, 10, 100] if args.quick else [1, 10, 100, 1000, 10000])
    print()
    rss()
    print()
    fault_cost()


if __name__ == "__main__":
    main()
