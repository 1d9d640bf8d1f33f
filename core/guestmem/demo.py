"""``guestmem demo``: a narrated guest_memfd lifecycle on a protected VM."""

from __future__ import annotations

import itertools
from typing import IO, Any

from rich.console import Console
from rich.table import Table

import guestmem
from guestmem import uapi
from guestmem.errors import HostSigbus, KvmError, MemoryFault
from guestmem.invariants import InvariantChecker
from guestmem.serialize import write_trace

MiB = 1 << 20
GUEST_SIZE = 16 * MiB
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE


def _pick_vm_type(backend: guestmem.Backend) -> guestmem.VmTypeInfo | None:
    for info in backend.vm_types:
        if info.has_private_mem and info.memory_attributes:
            return info
    return None


def memory_map(vm: Any) -> Table:
    """The VM's memory as a table: per range, attribute, gmem backing and stage-2 state."""
    table = Table(title=f"memory map of VM {vm.vm_id} ({vm.type_info.name})")
    for col in ("gpa range", "pages", "attribute", "gmem", "stage-2"):
        table.add_column(col)
    for slot in sorted(vm.memslots.values(), key=lambda s: s.base_gfn):
        bounds = {slot.base_gfn, slot.end_gfn}
        for s, e, _ in vm.attributes.items(slot.base_gfn, slot.end_gfn):
            bounds |= {s, e}
        for s, e, _ in vm.mmu.sptes.items(slot.base_gfn, slot.end_gfn):
            bounds |= {s, e}
        inode = slot.gmem_file.inode if slot.gmem_file is not None else None
        if inode is not None:
            lo, hi = slot.gmem_pgoff, slot.gmem_pgoff + slot.npages
            for s, e, _ in inode.pages.items(lo, hi):
                bounds |= {s - slot.gmem_pgoff + slot.base_gfn, e - slot.gmem_pgoff + slot.base_gfn}
        edges = sorted(b for b in bounds if slot.base_gfn <= b <= slot.end_gfn)
        for s, e in itertools.pairwise(edges):
            attr = "private" if vm.is_private(s) else "shared"
            if inode is None:
                backing = "-"
            else:
                idx = slot.gfn_to_index(s)
                folio = inode.pages.get(idx)
                backing = (
                    "hole"
                    if folio is None
                    else ("poisoned" if folio.hwpoison else "prepared" if folio.uptodate else "allocated")
                )
            hit = vm.mmu.lookup(s)
            s2 = "-" if hit is None else f"{'private' if hit[1].private else 'shared'} pfn {hit[0]:#x}"
            table.add_row(f"{s << 12:#x}-{e << 12:#x}", str(e - s), attr, backing, s2)
    return table


def run_demo(backend: str = "sw", console: Console | None = None, trace: IO[str] | None = None) -> int:
    """Run the demo with the invariant checker on; returns the process exit status.

    *trace* receives every modelled event as a JSON line.
    """
    out = console or Console()
    registry = guestmem.get_registry()
    vm_type = _pick_vm_type(registry.backend(backend))
    if vm_type is None:
        out.print(
            f"[red]backend {backend!r} has no private-memory VM type with memory attributes; "
            "the demo needs one (try --backend sw)[/]"
        )
        return 2
    checker = InvariantChecker()
    registry.add_plugin(checker, name="guestmem.demo.invariants", distribution="guestmem")
    try:
        status = _demo(backend, vm_type, out, trace)
    finally:
        registry.remove_plugin(checker)
    out.print(
        f"[bold]invariants[/] (mmu-balanced, leaf-backed, leaf-privateness, gmem-leaf) held after "
        f"all {checker.checked} events"
    )
    return status


def _demo(backend: str, vm_type: guestmem.VmTypeInfo, out: Console, trace: IO[str] | None) -> int:
    step = 0

    def say(text: str) -> None:
        nonlocal step
        step += 1
        out.print(f"[bold cyan]{step:2}.[/] {text}")

    def result(text: str) -> None:
        out.print(f"    [green]->[/] {text}")

    with guestmem.open(backend, record=trace is not None) as kvm:
        say(
            f"open /dev/kvm of backend [bold]{backend}[/]: KVM_CAP_GUEST_MEMFD_FLAGS="
            f"{kvm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS):#x}, "
            f"KVM_CAP_VM_TYPES={kvm.check_extension(uapi.KVM_CAP_VM_TYPES):#x}"
        )
        vm: Any = kvm.create_vm(vm_type.type)
        result(
            f"KVM_CREATE_VM({vm_type.name}); VM CAP_GUEST_MEMFD_FLAGS="
            f"{vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS):#x} (no INIT_SHARED: CAP-3)"
        )

        say(f"create a {GUEST_SIZE // MiB} MiB guest_memfd and a shared anonymous mapping of the same size")
        gmem: Any = vm.create_guest_memfd(GUEST_SIZE)
        shared = kvm.mmap_anonymous(GUEST_SIZE)
        st = gmem.fstat()
        result(
            f"fd {gmem.fileno()}: st_size={st.st_size:#x} st_blksize={st.st_blksize} st_ino={st.st_ino:#x}"
        )

        say("bind memslot 0: gpa 0, KVM_MEM_GUEST_MEMFD, userspace_addr = the shared mapping")
        vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, GUEST_SIZE, shared.address, gmem, 0)
        try:
            vm.set_user_memory_region2(1, uapi.KVM_MEM_GUEST_MEMFD, GUEST_SIZE, 4096, 0, gmem, 0)
        except KvmError as exc:
            result(f"binding the same gmem pages again is refused: {exc.strerror}")

        say("KVM_SET_MEMORY_ATTRIBUTES: the whole guest becomes private")
        vm.set_memory_attributes(0, GUEST_SIZE, PRIVATE)
        vcpu = vm.create_vcpu(0)
        vcpu.access(0x1000, data=b"secret")
        result(f"guest private store+load at 0x1000: {vcpu.access(0x1000, 6)!r}")

        say("the guest touches 0x1000 as shared (a bounce buffer), but it is private")
        try:
            vcpu.access(0x1000, 6, private=False)
        except MemoryFault as exc:
            result(
                f"KVM_EXIT_MEMORY_FAULT errno={exc.errno} gpa={exc.gpa:#x} "
                f"size={exc.size:#x} flags={exc.flags:#x}"
            )

        say("the VMM converts it (set shared, then punch the private copy, as QEMU does)")
        vm.set_memory_attributes(0x1000, 0x1000, 0)
        gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, 0x1000, 0x1000)
        shared.write(0x1000, b"from the host")
        result(f"guest shared load now sees the host's bytes: {vcpu.access(0x1000, 13)!r}")

        say("host mmap of guest_memfd: refused without GUEST_MEMFD_FLAG_MMAP; with it, private pages SIGBUS")
        try:
            gmem.mmap(GUEST_SIZE)
        except KvmError as exc:
            result(f"mmap: {exc.strerror}")
        mappable = vm.create_guest_memfd(MiB, uapi.GUEST_MEMFD_FLAG_MMAP)
        view = mappable.mmap(MiB)
        try:
            view.read(0x2000, 8)
        except HostSigbus as exc:
            result(f"HostSigbus: {exc.strerror}")

        say("convert 0x1000 back to private: the guest sees a fresh, zeroed page")
        vm.set_memory_attributes(0x1000, 0x1000, PRIVATE)
        result(f"guest private load: {vcpu.access(0x1000, 6)!r}")

        say("fill 64 KiB of private memory, then punch a hole in its middle")
        for off in range(0x10000, 0x20000, 0x1000):
            vcpu.access(off, data=b"data")
        gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, 0x14000, 0x8000)
        result(f"0x13000: {vcpu.access(0x13000, 4)!r}, 0x14000 (punched): {vcpu.access(0x14000, 4)!r}")

        say("a hardware memory error hits the page at 0x30000")
        vcpu.access(0x30000, data=b"x")
        gmem.inject_memory_failure(0x30000)
        try:
            vcpu.access(0x30000, 1)
        except MemoryFault as exc:
            result(f"KVM_RUN fails with {exc.strerror}")

        out.print(memory_map(vm))
        counters = Table(title="cost counters")
        counters.add_column("counter")
        counters.add_column("value", justify="right")
        for name, value in vm.counters.snapshot().items():
            counters.add_row(name, str(value))
        out.print(counters)
        if trace is not None:
            n = write_trace(getattr(kvm, "events", None) or [], trace)
            out.print(f"{n} trace events written")
        view.close()
        mappable.close()
        shared.close()
        vcpu.close()
        gmem.close()
        vm.close()
    return 0
