"""Gunyah boot and teardown figures (run: ``python benchmarks/bench_gunyah.py``).

Prints, for a guest of 64 GiB (``--gib``) in one lent binding:
- the wall time of booting it by demand paging: the VM starts (VMID, DTB parcel, RM
  configuration), then the guest touches every page once, in order (``GunyahFace.touch``:
  each run of pages takes the stage-2 fault, ``gunyah_gmem_demand_page`` and one
  donation and map), target under one second: cost follows runs, not pages;
- the hypercalls the driver would issue (one donation and one map per 4 KiB folio) next
  to the calls the model made (hook calls, ownership-table events);
- the wall time of tearing the VM down (reclaim with NOSYNC batching, reset, free);
- a verdict per target.  ``--json`` prints the targets (``target``, ``figure``, ``unit``,
  ``limit``: met iff ``figure <= limit``) and the figures; ``--quick`` runs a 4 GiB guest.
Needs guestmem and guestmem-gunyah installed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import verdicts  # a sibling module: the targets and their verdicts

import guestmem
from guestmem.backend import OwnershipEvent, hookimpl
from guestmem_gunyah import abi, create_guest_mem, gunyah

GPA = 1 << 30
PAGE = abi.PAGE_SIZE


class Calls:
    """Counts the hook calls and ownership events the boot makes (an observer)."""

    def __init__(self) -> None:
        self.faults = 0
        self.events = 0

    @hookimpl
    def guestmem_fault(self) -> None:
        self.faults += 1

    @hookimpl
    def guestmem_ownership_update(self, event: OwnershipEvent) -> None:
        self.events += 1


def boot(gib: int) -> dict[str, Any]:
    size = gib << 30
    calls = Calls()
    registry = guestmem.get_registry()
    registry.add_plugin(calls, name="bench-calls")
    try:
        with guestmem.open("gunyah") as kvm:
            t0 = time.perf_counter()
            vm = kvm.create_vm(abi.GUNYAH_VM_TYPE)
            gh = gunyah(vm)
            mem = create_guest_mem(vm, size)
            gh.map_mem(mem, GPA, 0, size, abi.GUNYAH_MEM_ALLOW_RWX | abi.GUNYAH_MEM_FORCE_LEND)
            gh.set_dtb_config(GPA, PAGE)
            gh.start()
            t1 = time.perf_counter()
            mapped = gh.touch(GPA, size, write=True)
            t2 = time.perf_counter()
            counters = dict(vm.counters)
            vm.close()
            mem.close()
            t3 = time.perf_counter()
    finally:
        registry.remove_plugin(calls)
    assert mapped == size, (mapped, size)
    return {
        "start_s": t1 - t0,
        "touch_s": t2 - t1,
        "teardown_s": t3 - t2,
        "pages": size // PAGE,
        "donations": counters.get("gunyah.hvc.memextent_donate", 0),
        "maps": counters.get("gunyah.hvc.addrspace_map", 0),
        "fault_hook_calls": calls.faults,
        "ownership_events": calls.events,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=int, help="guest size in GiB (default 64, --quick 4)")
    parser.add_argument("--quick", action="store_true", help="a 4 GiB guest (a smoke run)")
    parser.add_argument("--json", action="store_true", help="print the targets and figures as JSON")
    args = parser.parse_args()
    gib = args.gib if args.gib is not None else (4 if args.quick else 64)
    guestmem.backends()  # the plugins are loaded before the clock starts
    r = boot(gib)
    boot_s = r["start_s"] + r["touch_s"]
    targets = [verdicts.row(f"{gib} GiB boot (VM start + every page touched)", round(boot_s, 4), "s", 1.0)]
    if args.json:
        verdicts.print_json(targets, figures=r)
        return
    print(f"Gunyah guest of {gib} GiB ({r['pages']:,} pages), one lent binding, demand paged")
    print(f"  VM start (VMID, DTB parcel, RM config) {r['start_s'] * 1e3:9.1f} ms")
    print(f"  guest touches every page               {r['touch_s'] * 1e3:9.1f} ms")
    print(f"  boot total                              {boot_s * 1e3:9.1f} ms")
    print(f"  teardown (reclaim, reset, free)         {r['teardown_s'] * 1e3:9.1f} ms")
    print(f"  hypercalls the driver issues: {r['donations']:,} donations, {r['maps']:,} maps")
    calls, events = r["fault_hook_calls"], r["ownership_events"]
    print(f"  calls the model made: {calls} fault hook call(s), {events} ownership events")
    verdicts.print_verdicts(targets)


if __name__ == "__main__":
    main()
