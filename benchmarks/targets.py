"""Every performance target of guestmem, measured in one run, one verdict per target.

Run: ``python benchmarks/targets.py [--quick] [--json]``.

Ratios are measured side by side in the same process (machines are noisy): a model
operation against a bare Python method call, the model against the running kernel
(``linux`` backend, when /dev/kvm is usable), an operation with and without a trace
listener.  The hardware backends' targets come from their own benchmark scripts
(``bench_snp.py``, ``bench_pkvm.py``, ``bench_tdx.py``, ``bench_gunyah.py``) run with
``--json``; a backend that is not installed is reported as skipped, with the reason.

Exit status: 0 when every measured target is met, 1 otherwise (skips do not count).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

import guestmem
from guestmem import uapi

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_linux_vs_sw  # noqa: E402 - a sibling script
from bench_core import best_of  # noqa: E402 - a sibling script

TiB = 1 << 40
PAGE = uapi.PAGE_SIZE
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE


@attrs.frozen
class Result:
    """One target: *figure* in *unit*, met iff ``figure <= limit`` (None: skipped)."""

    target: str
    figure: float | None
    unit: str
    limit: float
    detail: str = ""

    @property
    def verdict(self) -> str:
        if self.figure is None:
            return "SKIP"
        return "OK" if self.figure <= self.limit else "MISSED"

    def line(self) -> str:
        if self.figure is None:
            return f"{self.target:<58} {'-':>10} {'':<6} (target <= {self.limit:g}): SKIP {self.detail}"
        return (
            f"{self.target:<58} {self.figure:>10.3g} {self.unit:<6} (target <= {self.limit:g}): "
            f"{self.verdict}{'  ' + self.detail if self.detail else ''}"
        )


class _Plain:
    def method(self) -> int:
        return 1


class _TraceListener:
    """An observer listening to every trace event (what a tracer costs the hot path)."""

    def __init__(self) -> None:
        self.events = 0

    @guestmem.hookimpl
    def guestmem_trace(self, host: Any, vm: Any, event: Any) -> None:
        self.events += 1


@contextmanager
def _listening() -> Iterator[_TraceListener]:
    listener = _TraceListener()
    registry = guestmem.get_registry()
    registry.add_plugin(listener, distribution="benchmarks")
    try:
        yield listener
    finally:
        registry.remove_plugin(listener)


def _hot_paths(n: int) -> tuple[float, float, float]:
    """(first-touch private fault, mapped access, bare method call) in seconds, medians."""
    with guestmem.open("sw") as kvm:
        vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = vm.create_guest_memfd(TiB)
        vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, TiB, 0, gmem, 0)
        vm.set_memory_attributes(0, TiB, PRIVATE)
        vcpu = vm.create_vcpu(0)
        gpas = iter(range(0, TiB, 1 << 20))
        plain = _Plain()
        calls, faults, hits = [], [], []
        for _ in range(5):
            calls.append(timeit.timeit(plain.method, number=n * 10) / (n * 10))
            faults.append(timeit.timeit(lambda: vcpu.access(next(gpas), 1), number=n) / n)
            hits.append(timeit.timeit(lambda: vcpu.access(0, 1), number=n) / n)
        return statistics.median(faults), statistics.median(hits), statistics.median(calls)


def hot_paths(quick: bool) -> list[Result]:
    n = 2000 if quick else 20000
    fault, hit, call = _hot_paths(n)
    with _listening() as listener:
        traced_fault, traced_hit, traced_call = _hot_paths(n)
    assert listener.events, "the trace listener heard nothing"
    ns = f"call {call * 1e9:.1f} ns"
    return [
        Result(
            "first-touch 4K private fault / method call",
            fault / call,
            "x",
            100,
            f"{fault * 1e6:.2f} us, {ns}",
        ),
        Result("mapped access / method call", hit / call, "x", 10, f"{hit * 1e6:.2f} us"),
        Result(
            "first-touch fault with a trace listener / method call",
            traced_fault / traced_call,
            "x",
            200,
            f"{traced_fault * 1e6:.2f} us, {traced_fault / fault:.2f}x untraced",
        ),
        Result(
            "mapped access with a trace listener / method call",
            traced_hit / traced_call,
            "x",
            20,
            f"{traced_hit * 1e6:.2f} us, {traced_hit / hit:.2f}x untraced",
        ),
    ]


def _kernel_available() -> str | None:
    """None if the linux backend can run here, else why not."""
    try:
        with guestmem.open("linux"):
            return None
    except Exception as exc:  # noqa: BLE001 - any reason is a reason to skip
        return f"linux backend unavailable: {exc}"


def versus_kernel(quick: bool, why_not: str | None) -> list[Result]:
    phases = [
        "create_vm",
        "create_guest_memfd",
        "mmap",
        "fallocate",
        "set_user_memory_region2",
        "host_write",
        "create_vcpu",
        "guest_read",
        "guest_write",
        "punch_hole",
        "host_read",
        "delete_memslot",
        "close",
    ]
    if why_not is not None:
        return [Result(f"bench_linux_vs_sw {p}: sw / linux", None, "x", 1, why_not) for p in phases] + [
            Result("bench_linux_vs_sw whole sequence: sw / linux", None, "x", 0.1, why_not)
        ]
    from guestmem import diff

    rounds = 3 if quick else 7
    kernel = bench_linux_vs_sw.measure("linux", rounds, 64)
    model = bench_linux_vs_sw.measure("sw", rounds, 64, profile=diff.host_profile())
    out = [
        Result(
            f"bench_linux_vs_sw {p}: sw / linux",
            model[p] / kernel[p],
            "x",
            1,
            f"{model[p] * 1e3:.3f} ms vs {kernel[p] * 1e3:.3f} ms",
        )
        for p in phases
    ]
    out.append(
        Result(
            "bench_linux_vs_sw whole sequence: sw / linux",
            model["total"] / kernel["total"],
            "x",
            0.1,
            f"{model['total'] * 1e3:.3f} ms vs {kernel['total'] * 1e3:.3f} ms",
        )
    )
    return out


def _scatter(gmem: Any, n: int, span: int) -> None:
    stride = (span // n) & ~(PAGE - 1)
    for i in range(n):
        gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE, i * stride, PAGE)


def punch_tib(quick: bool, why_not: str | None) -> list[Result]:
    """Punching 1 TiB holding n allocated pages scattered inside it, model vs kernel."""
    n = 10_000 if quick else 100_000

    def measure(backend: str, **options: Any) -> float:
        with guestmem.open(backend, **options) as kvm:
            vm = kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
            gmem = vm.create_guest_memfd(TiB)
            times = []
            for _ in range(3):
                _scatter(gmem, n, TiB)
                t0 = time.perf_counter()
                gmem.fallocate(PUNCH, 0, TiB)
                times.append(time.perf_counter() - t0)
            gmem.close()
            vm.close()
            return min(times)

    model = measure("sw")
    label = f"punch 1 TiB holding {n:,} pages: sw / linux"
    if why_not is not None:
        return [Result(label, None, "x", 1, f"sw {model * 1e3:.1f} ms; {why_not}")]
    kernel = measure("linux")
    return [Result(label, model / kernel, "x", 1, f"{model * 1e3:.1f} ms vs {kernel * 1e3:.1f} ms")]


def set_attributes(quick: bool) -> list[Result]:
    """set_memory_attributes over 1 TiB holding n distinct stored ranges inside it."""
    n = 10_000 if quick else 100_000
    with guestmem.open("sw") as kvm:
        vm: Any = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = vm.create_guest_memfd(TiB)
        vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, TiB, 0, gmem, 0)
        stride = (TiB // n) & ~(PAGE - 1)

        def fragment() -> None:
            for i in range(n):
                vm.set_memory_attributes(i * stride, PAGE, PRIVATE)

        times = []
        for _ in range(3):
            fragment()
            stored = len(vm.attributes)
            t0 = time.perf_counter()
            vm.set_memory_attributes(0, TiB, 0)
            times.append(time.perf_counter() - t0)
        return [
            Result(
                f"set_memory_attributes over 1 TiB holding {stored:,} ranges",
                min(times) * 1e3,
                "ms",
                20,
            )
        ]


RSS_CHILD = """
import sys, guestmem
def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
from guestmem import uapi
TiB = 1 << 40
n = int(sys.argv[1])
kvm = guestmem.open("sw")
vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
gmem = vm.create_guest_memfd(TiB)
vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, TiB, 0, gmem, 0)
vm.set_memory_attributes(0, TiB, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
vcpu = vm.create_vcpu(0)
vcpu.access(0, data=b"x")
before = rss_kib()
stride = (TiB // n) & ~4095
for i in range(n):
    vcpu.access(i * stride + 512, data=bytes(range(64)))
assert vm.mmu.mapped_pages() == n
print(before, rss_kib())
"""


def rss(quick: bool) -> list[Result]:
    if not Path("/proc/self/status").exists():
        return [Result("RSS growth, scattered 64-byte stores in a 1 TiB guest", None, "MiB", 100, "no /proc")]
    n = 10_000 if quick else 100_000
    out = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, str(n)], check=True, capture_output=True, text=True
    )
    before, after = (int(x) for x in out.stdout.split())
    return [
        Result(
            f"RSS growth, {n:,} scattered 64-byte stores in a 1 TiB guest",
            (after - before) / 1024,
            "MiB",
            100,
            f"{before / 1024:.1f} -> {after / 1024:.1f} MiB resident",
        )
    ]


def fd_table(quick: bool) -> list[Result]:
    """create+close of a guest_memfd with 10,000 other fds open, against none open."""
    with guestmem.open("sw") as kvm:
        vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)

        n = 2000 if quick else 10000

        def cycles() -> None:
            for _ in range(n):
                vm.create_guest_memfd(PAGE).close()

        empty = best_of(cycles) / n
        held = [vm.create_guest_memfd(PAGE) for _ in range(10_000)]
        busy = best_of(cycles) / n
        for f in held:
            f.close()
    return [
        Result(
            "create+close gmem with 10,000 fds open / with none",
            busy / empty,
            "x",
            1.5,
            f"{busy * 1e6:.1f} us vs {empty * 1e6:.1f} us",
        )
    ]


def import_time() -> list[Result]:
    code = "import time; t = time.perf_counter(); import guestmem; print(time.perf_counter() - t)"
    runs = [
        float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
        for _ in range(7)
    ]
    code = (
        "import time; t = time.perf_counter(); import guestmem; guestmem.open('sw').close(); "
        "print(time.perf_counter() - t)"
    )
    opened = statistics.median(
        float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
        for _ in range(3)
    )
    return [
        Result(
            "import guestmem",
            statistics.median(runs) * 1e3,
            "ms",
            30,
            f"then guestmem.open('sw') with every installed plugin: {opened * 1e3:.0f} ms",
        )
    ]


PLUGIN_BENCHES = {
    "snp": "bench_snp.py",
    "pkvm": "bench_pkvm.py",
    "tdx": "bench_tdx.py",
    "gunyah": "bench_gunyah.py",
}


def plugins(quick: bool) -> list[Result]:
    """The hardware backends' own targets, from their benchmark scripts' ``--json``."""
    out: list[Result] = []
    installed = guestmem.backends()
    for backend, script in PLUGIN_BENCHES.items():
        path = HERE / script
        if backend not in installed or not path.exists():
            reason = "not installed" if backend not in installed else f"{script} missing"
            out.append(Result(f"{backend}: its benchmark's targets", None, "", 0, reason))
            continue
        argv = [sys.executable, str(path), "--json"] + (["--quick"] if quick else [])
        proc = subprocess.run(argv, check=False, capture_output=True, text=True)
        try:
            rows = json.loads(proc.stdout)["targets"]
        except (ValueError, KeyError, TypeError):
            why = (proc.stderr.strip().splitlines() or ["no --json output"])[-1]
            out.append(Result(f"{backend}: its benchmark's targets", None, "", 0, why))
            continue
        for row in rows:
            out.append(Result(f"{backend}: {row['target']}", row["figure"], row["unit"], row["limit"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes (a smoke run; verdicts are indicative)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    why_not = _kernel_available()
    sections: list[tuple[str, Callable[[], list[Result]]]] = [
        ("hot paths (sw)", lambda: hot_paths(args.quick)),
        ("the model against the running kernel", lambda: versus_kernel(args.quick, why_not)),
        ("range operations", lambda: punch_tib(args.quick, why_not) + set_attributes(args.quick)),
        ("memory and descriptors", lambda: rss(args.quick) + fd_table(args.quick)),
        ("startup", import_time),
        ("hardware backends", lambda: plugins(args.quick)),
    ]
    results: list[Result] = []
    for title, run in sections:
        if not args.json:
            print(f"== {title}", flush=True)
        for result in run():
            results.append(result)
            if not args.json:
                print(result.line(), flush=True)
    met = sum(r.verdict == "OK" for r in results)
    missed = [r for r in results if r.verdict == "MISSED"]
    skipped = sum(r.verdict == "SKIP" for r in results)
    if args.json:
        rows = [attrs.asdict(r) | {"verdict": r.verdict} for r in results]
        print(json.dumps({"targets": rows, "met": met, "missed": len(missed), "skipped": skipped}, indent=2))
    else:
        print(f"\n{met} targets met, {len(missed)} missed, {skipped} skipped (cpus: {os.cpu_count()})")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
