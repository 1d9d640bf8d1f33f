"""Hostile fuzzing and campaign rates (run: ``python benchmarks/bench_campaigns.py``).

Prints, per installed model backend, the hostile steps per second of ``guestmem fuzz
--hostile`` in this process and sharded over two worker processes (without the
minimisation of finding classes, which depends on what is found), and the operations per
second of a ``guestmem diff`` campaign of sw against itself, the same two ways.  Process
start-up is part of the sharded figures: a campaign pays it once per worker.
"""

from __future__ import annotations

import argparse
import time

import guestmem
from guestmem.campaign import run_units
from guestmem.diff import campaign as diff_campaign
from guestmem.fuzz.campaign import campaign_units, run_campaign

MODEL_BACKENDS = ("sw", "snp", "snp-hugepage", "tdx", "pkvm", "gunyah", "cca")


def fuzz_rate(backend: str, steps: int, chunk: int, jobs: int) -> tuple[float, int]:
    units = campaign_units([backend], steps=steps, chunk=chunk, hostile=True)
    started = time.perf_counter()
    merged = run_campaign(units, jobs=jobs, minimise=False)
    seconds = time.perf_counter() - started
    (group,) = merged["results"]
    return group["steps"] / seconds, group.get("crash_classes", 0)


def diff_rate(steps: int, chunk: int, jobs: int) -> float:
    units = diff_campaign.diff_units("sw", ["sw"], ["kvm_pvm-6.18"], seed=0, steps=steps, chunk=chunk)
    started = time.perf_counter()
    merged = diff_campaign.merge(units, run_units(diff_campaign.run_unit, units, jobs=jobs))
    return sum(g["operations"] for g in merged["results"]) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000, help="hostile steps per backend")
    parser.add_argument("--chunk", type=int, default=2500, help="steps per unit")
    args = parser.parse_args()
    installed = guestmem.get_registry().backends()
    print(f"{'backend':14} {'1 process':>12} {'--jobs 2':>12}  classes (steps/s, {args.steps} hostile steps)")
    for backend in MODEL_BACKENDS:
        if backend not in installed:
            continue
        one, classes = fuzz_rate(backend, args.steps, args.chunk, 1)
        two, _ = fuzz_rate(backend, args.steps, args.chunk, 2)
        print(f"{backend:14} {one:12.0f} {two:12.0f}  {classes}")
    ops = 4 * args.steps
    print(
        f"diff sw vs sw[kvm_pvm-6.18], {ops} ops: 1 process {diff_rate(ops, ops // 8, 1):.0f} ops/s, ", end=""
    )
    print(f"--jobs 2 {diff_rate(ops, ops // 8, 2):.0f} ops/s")


if __name__ == "__main__":
    main()
