"""Random programs over the whole uAPI face, drawn from one :class:`random.Random`.

Arguments come mostly from shapes the kernel accepts, and often from its limits (rule IDs
of shared/spec/kernel-gmem.md in the comments).  The generator keeps track of what a
program has created so far (VMs, guest_memfds, mappings, memslots, guest RAM, vCPUs), and
stays clear of what only the real process could tell (host memory outside the generated
mappings, which a guest could read through a memslot) and of what would cost the real
host much memory (large allocations and memslots).  The same seed makes the same program:
the order of the draws is part of the behaviour.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from guestmem import uapi
from guestmem.diff.program import Op

PAGE = uapi.PAGE_SIZE

#: Capabilities compared by ``check_extension`` ops.
CAPS = (
    uapi.KVM_CAP_USER_MEMORY,
    uapi.KVM_CAP_USER_MEMORY2,
    uapi.KVM_CAP_EXIT_HYPERCALL,
    uapi.KVM_CAP_MEMORY_FAULT_INFO,
    uapi.KVM_CAP_MEMORY_ATTRIBUTES,
    uapi.KVM_CAP_GUEST_MEMFD,
    uapi.KVM_CAP_VM_TYPES,
    uapi.KVM_CAP_PRE_FAULT_MEMORY,
    uapi.KVM_CAP_GUEST_MEMFD_FLAGS,
    uapi.KVM_CAP_NR_MEMSLOTS,
    uapi.KVM_CAP_READONLY_MEM,
    uapi.KVM_CAP_MULTI_ADDRESS_SPACE,
)

_GMEM_SIZES = (PAGE, 2 * PAGE, 4 * PAGE, 8 * PAGE, 16 * PAGE)
#: Sizes KVM_CREATE_GUEST_MEMFD refuses (C-4) or accepts only at the loff_t edge.
_BAD_GMEM_SIZES = (0, PAGE + 1, 1 << 63, uapi.U64_MAX & ~(PAGE - 1), uapi.U64_MAX)
#: A file size at the loff_t limit: offsets near ``LOFF_MAX`` are in the file.
_HUGE_GMEM = (1 << 63) - PAGE
_GMEM_FLAGS = (
    0,
    uapi.GUEST_MEMFD_FLAG_MMAP,
    uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED,
    uapi.GUEST_MEMFD_FLAG_INIT_SHARED,
)
_BAD_GMEM_FLAGS = (4, 8, 1 << 31, 1 << 63, 7)
_KEEP = uapi.FALLOC_FL_KEEP_SIZE
_PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
#: fallocate modes beyond allocate/punch: NO_HIDE_STALE, COLLAPSE, ZERO, INSERT, UNSHARE,
#: WRITE_ZEROES (with and without KEEP_SIZE), combinations, an unknown bit.
_ODD_FALLOC_MODES = (
    0x04,
    0x08,
    0x09,
    0x10,
    0x11,
    0x20,
    0x21,
    0x40,
    0x41,
    0x80,
    0x81,
    0x13,
    0x0B,
    0x100,
    0x03 | 0x10,
)
_GPA_PAGES = 48  # guest-physical space the programs access: [0, 48 pages)
_SLOT_IDS = (0, 1, 2, 3, 4, 5)
_RAM_SLOT = 8  # guest RAM memslots: ids 8..15, gpa pages [_GPA_PAGES, _GPA_PAGES + _RAM_PAGES)
_RAM_PAGES = 32
_MMAP_SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
_MODIFY_KINDS = ("same", "log_dirty", "log_dirty", "readonly", "move", "move", "delete", "other_ioctl")
#: Slot ids (bits 15:0) and address spaces (bits 31:16) at the limits (S-3, S-7).  The id
#: ``KVM_USER_MEM_SLOTS - 1`` is left out: the ``linux`` backend's guest runner owns it.
_ODD_SLOTS = (
    uapi.KVM_USER_MEM_SLOTS - 2,
    uapi.KVM_USER_MEM_SLOTS,
    uapi.KVM_MEM_SLOTS_NUM - 1,
    uapi.KVM_MEM_SLOTS_NUM,
    0xFFFF,
    1 << 16,
    (1 << 16) | 3,
    2 << 16,
    0x8000 << 16,
    0xFFFF << 16,
    0xFFFF_FFFF,
)
_ODD_MEMSLOT_FLAGS = (
    1 << 3,
    1 << 31,
    uapi.KVM_MEM_READONLY | uapi.KVM_MEM_LOG_DIRTY_PAGES,
    uapi.KVM_MEM_READONLY | uapi.KVM_MEM_GUEST_MEMFD,
    uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_GUEST_MEMFD,
    0x7,
    0xFFFF_FFFF,
)
#: Memslots far from the programs' accesses: above 4 GiB (clear of the ``linux`` guest
#: runner below it), at the guest physical width (S-7) and at the u64 wrap.
_HIGH_GPAS = (1 << 32, 1 << 40, (1 << 52) - 16 * PAGE, 1 << 52, uapi.U64_MAX & ~(PAGE - 1))
#: Memslot sizes at the limits.  None the kernel accepts is above 4 GiB: a memslot costs the
#: kernel rmap memory per page (shadow paging), which the model does not account; sizes up to
#: KVM_MEM_MAX_NR_PAGES pages would exhaust the host.
_ODD_SIZES = (
    PAGE - 1,
    PAGE + 8,
    1 << 31,
    1 << 32,
    (uapi.KVM_MEM_MAX_NR_PAGES + 1) * PAGE,
    1 << 63,
    uapi.U64_MAX & ~(PAGE - 1),
)
#: The most a generated fallocate allocates: the kernel really allocates what it is asked.
_MAX_ALLOCATE = 64 * PAGE
_ODD_ADDRESSES = (
    0,
    0x10000,
    0x10008,
    uapi.TASK_SIZE,
    uapi.TASK_SIZE - PAGE,
    uapi.TASK_SIZE - 16 * PAGE,
    1 << 47,
    1 << 63,
    uapi.U64_MAX & ~(PAGE - 1),
)
_ODD_GMEM_OFFSETS = (
    PAGE - 1,
    1 << 62,
    _HUGE_GMEM - PAGE,
    _HUGE_GMEM,
    1 << 63,
    uapi.U64_MAX & ~(PAGE - 1),
)
#: loff_t values at the edges, negative included (fallocate, mmap offsets).
_EDGE_LOFFS = (-PAGE, -1, 0, PAGE - 1, 1 << 62, _HUGE_GMEM - PAGE, _HUGE_GMEM, uapi.LOFF_MAX)
_VCPU_IDS = (0, 1, 2, 3, 1023, 4095, 4096, 16383, 16384, 1 << 31, 0xFFFF_FFFF, 1 << 32, -1)
_ACCESS_READ_STYLES = ("positional", "positional", "keywords")
_ACCESS_WRITE_STYLES = ("write", "data", "data", "length", "other_length", "no_data")
#: ``KVM_CREATE_VM`` types around the real ones of both architectures (x86 1..5, arm64
#: ``KVM_VM_TYPE_ARM_PROTECTED`` 1 << 31, bits past either): drawn now and then next to the
#: base backend's own types.
_ODD_VM_TYPES = (1, 2, 3, 4, 5, 31, 32, 1 << 31, uapi.U64_MAX)


def vm_type_choices(default: int, declared: Sequence[int] = ()) -> tuple[int, ...]:
    """What a program's rare ``create_vm`` draws from: the *default* VM type weighted three
    times, then the *declared* types of the backend and the odd values, once each."""
    others = sorted((set(declared) | set(_ODD_VM_TYPES)) - {default})
    return (default, default, default, *others)


def _loff(value: int) -> int:
    """*value* as a ``loff_t`` (two's complement): programs pass only values of the C type."""
    value &= uapi.U64_MAX
    return value - (1 << 64) if value >> 63 else value


class Generator:
    """Random programs from a :class:`random.Random` (Hypothesis can pass its own)."""

    def __init__(self, rng: random.Random, vm_types: Sequence[int] = (uapi.KVM_X86_DEFAULT_VM,)) -> None:
        self.rng = rng
        #: The base backend's VM types, its default first (``Backend.default_vm_type``).
        self.vm_type = vm_types[0]
        self.vm_type_choices = vm_type_choices(vm_types[0], vm_types)
        self.ops: list[Op] = []
        self.vms: list[int] = []
        self.gmems: list[tuple[int, int, int]] = []  # (id, size, flags)
        self.maps: list[tuple[int, int]] = []  # (id, length)
        self.gmem_maps: dict[int, list[tuple[int, int, int]]] = {}  # gmem id -> (map id, offset, length)
        #: Mappings a memslot points into.  They are never unmapped: the real process may
        #: reuse the freed range for anything, which the guest would then read.
        self.slot_maps: set[int] = set()
        self.vcpus: list[tuple[int, int]] = []  # (id, vm id)
        self.slots: list[tuple[int, int, int]] = []  # (vm id, gpa, size) of memslot ops
        #: Guest RAM that works: (vm id, gpa, size, mapping id, gmem id or None) of memslots
        #: on fresh host memory, side by side above the other memslots (_RAM_PAGES).
        self.ram: list[tuple[int, int, int, int, int | None]] = []
        self.ram_next: dict[int, tuple[int, int]] = {}  # vm id -> (next slot id, next gpa page)
        self.writable: set[tuple[int, int]] = set()  # (vm id, gpa page) of RAM memslots without READONLY

    def _op(self, name: str, *args: Any) -> int:
        op_id = len(self.ops)
        self.ops.append(Op(op_id, name, args))
        return op_id

    def _pick(self, items: Sequence[Any]) -> Any:
        return self.rng.choice(items)

    def _chance(self, p: float) -> bool:
        return self.rng.random() < p

    def _offset(self, limit: int) -> int:
        """A file offset or length (``loff_t``) around *limit*: aligned, unaligned, beyond,
        at the limits; always in the range of the C type (past ``LOFF_MAX`` it wraps)."""
        r = self.rng.random()
        if r < 0.65:
            value = self.rng.randrange(0, max(1, limit // PAGE) + 1) * PAGE
        elif r < 0.8:
            value = self.rng.randrange(0, limit + PAGE)
        elif r < 0.92:
            value = limit + self.rng.randrange(0, 4) * PAGE
        else:
            value = int(self._pick(_EDGE_LOFFS))
        return _loff(value)

    def _address(self, size: int) -> tuple[Any, int]:
        """A ``userspace_addr`` and the memslot size to use with it.

        A memslot inside a mapping never extends past its end: past it, the real process
        has whatever the allocator put there.  Raw addresses are unmapped in both (0x10000
        is below every mapping), not user addresses (TASK_SIZE) or unaligned.
        """
        if self.maps and self._chance(0.8):
            map_id, length = self._pick(self.maps)
            pages = length // PAGE
            first = self.rng.randrange(0, pages)
            off = first * PAGE + (8 if self._chance(0.05) else 0)
            self.slot_maps.add(map_id)
            return ("map", map_id, off), min(size, (pages - first) * PAGE)
        return self._pick((0, 0x10000, 0x10008, uapi.TASK_SIZE)), size

    def step(self) -> None:
        rng = self.rng
        if not self.vms or rng.random() < 0.04:
            vm_type = self.vm_type if rng.random() < 0.9 else self._pick(self.vm_type_choices)
            self.vms.append(self._op("create_vm", vm_type))
            return
        vm = self._pick(self.vms)
        choices: list[tuple[float, Callable[[], object]]] = [
            (0.11, lambda: self._create_gmem(vm)),
            (0.09, self._fallocate),
            (0.07, self._mmap),
            (0.04, self._mmap_anonymous),
            (0.12, self._host_access),
            (0.17, lambda: self._memslot(vm)),
            (0.04, lambda: self._odd_memslot(vm)),
            (0.05, lambda: self._delete_slot(vm)),
            (0.04, lambda: self._modify_slot(vm)),
            (0.20, lambda: self._access(vm)),
            (0.06, lambda: self._ram_slot(vm)),
            (0.16, lambda: self._ram_access(vm)),
            (0.02, lambda: self._check_extension(vm)),
            (0.04, self._file_op),
            (0.02, self._close),
            (0.02, lambda: self._pre_fault(vm)),
            (0.01, lambda: self._create_vcpu(vm)),
            (0.01, self._dup),
            (0.02, lambda: self._set_memory_attributes(vm)),
        ]
        total = sum(w for w, _ in choices)
        r = rng.random() * total
        for weight, action in choices:
            r -= weight
            if r <= 0:
                action()
                return
        choices[-1][1]()

    def _check_extension(self, vm: int) -> None:
        cap = self._pick(CAPS) if self._chance(0.9) else self._pick((9999, -1, 1 << 31))  # unknown caps
        self._op("check_extension", self._pick((None, vm)), cap)

    def _create_gmem(self, vm: int) -> None:
        r = self.rng.random()
        if r < 0.08:
            size = self._pick(_BAD_GMEM_SIZES + _GMEM_SIZES)
            flags = self._pick(_BAD_GMEM_FLAGS + _GMEM_FLAGS)
            self._op("create_guest_memfd", vm, size, flags)
            return
        size, flags = self._pick(_GMEM_SIZES), self._pick(_GMEM_FLAGS)
        if r < 0.13:  # a file at the loff_t limit: every offset near LOFF_MAX is inside it
            size = _HUGE_GMEM
        self.gmems.append((self._op("create_guest_memfd", vm, size, flags), size, flags))

    def _fallocate(self) -> None:
        if not self.gmems:
            return
        gmem, size, _ = self._pick(self.gmems)
        if self._chance(0.15):
            mode = self._pick(_ODD_FALLOC_MODES)
        else:
            mode = self._pick((_KEEP, _PUNCH, _PUNCH, 0, _KEEP | 0x4))
        offset = self._offset(size)
        if size == _HUGE_GMEM and self._chance(0.5):  # near the end of a huge file
            offset = size - self.rng.randrange(0, 4) * PAGE
        length = self._offset(min(size, 16 * PAGE)) or PAGE
        allocates = not mode & ~_KEEP and offset >= 0 and offset + length <= size
        if allocates and length > _MAX_ALLOCATE:  # valid: it would allocate that much memory
            length = PAGE
        self._op("fallocate", gmem, mode, offset, length)

    def _mmap(self) -> None:
        if not self.gmems:
            return
        gmem, size, _ = self._pick(self.gmems)
        small = min(size, 16 * PAGE)
        length = self._pick((small, small, PAGE, 2 * small, small + 8))
        offset = self._pick((0, 0, PAGE, size, 2 * PAGE))
        if size == _HUGE_GMEM:
            offset = self._pick((0, size - PAGE, size - 4 * PAGE, size))
        if self._chance(0.08):  # bad shapes: unaligned, beyond loff_t, empty, huge
            length, offset = self._pick(
                (
                    (PAGE, 1),
                    (PAGE, PAGE + 8),
                    (0, 0),
                    (PAGE, -PAGE),
                    (PAGE, 1 << 63),
                    (8 * PAGE, uapi.LOFF_MAX & ~(PAGE - 1)),
                    (1 << 50, 0),
                    (uapi.U64_MAX, 0),
                    (uapi.U64_MAX & ~(PAGE - 1), PAGE),
                )
            )
            self._op("mmap", gmem, length, offset, True)
            return
        shared = self._chance(0.9)
        map_id = self._op("mmap", gmem, length, offset, shared)
        length = (length + PAGE - 1) & ~(PAGE - 1)
        self.maps.append((map_id, length))
        self.gmem_maps.setdefault(gmem, []).append((map_id, offset, length))

    def _mmap_anonymous(self) -> None:
        if self._chance(0.1):
            self._op("mmap_anonymous", self._pick((0, 1 << 50, uapi.U64_MAX, uapi.TASK_SIZE + PAGE)))
            return
        length = self._pick((8 * PAGE, 8 * PAGE, 16 * PAGE, 3 * PAGE + 8))
        self.maps.append((self._op("mmap_anonymous", length), (length + PAGE - 1) & ~(PAGE - 1)))

    def _host_access(self) -> None:
        if not self.maps:
            return
        mapping, length = self._pick(self.maps)
        if self._chance(0.3):  # across a page boundary
            boundary = self.rng.randrange(1, max(2, length // PAGE)) * PAGE
            offset = max(0, boundary - self.rng.randrange(1, 16))
            n = self.rng.randrange(1, 40)
        else:
            offset = self.rng.randrange(0, length)
            n = self.rng.randrange(1, 16)
        if not self._chance(0.03):  # rarely outside the mapping (EFAULT on both)
            n = min(n, length - offset)
        if self._chance(0.5):
            self._op("host_read", mapping, offset, n)
        else:
            self._op("host_write", mapping, offset, self.rng.randbytes(n))

    def _slot_gpa(self, vm: int, size: int) -> int:
        """Mostly random; often right after or before another memslot of *vm* (accesses span both)."""
        near = [s for s in self.slots if s[0] == vm]
        if near and self._chance(0.35):
            _, base, other = self._pick(near)
            gpa = int(base + other if self._chance(0.5) else base - size)
            if gpa >= 0 and gpa + size <= _GPA_PAGES * PAGE:
                return gpa
        return self.rng.randrange(0, _GPA_PAGES - 8) * PAGE

    def _memslot(self, vm: int) -> None:
        rng = self.rng
        odd_slots = (1 << 16, uapi.KVM_USER_MEM_SLOTS)  # address space 1 (S-7); beyond the user slots (S-3)
        slot = self._pick(_SLOT_IDS) if rng.random() < 0.95 else self._pick(odd_slots)
        size = rng.randrange(1, 9) * PAGE
        gpa = self._slot_gpa(vm, size)
        self.slots.append((vm, gpa, size))
        if rng.random() < 0.3 or not self.gmems:
            flags = self._pick((0, 0, uapi.KVM_MEM_READONLY, uapi.KVM_MEM_LOG_DIRTY_PAGES))
            address, size = self._address(size)
            self.slots[-1] = (vm, gpa, size)
            if rng.random() < 0.3:
                self._op("set_user_memory_region", vm, slot, flags, gpa, size, address)
            elif self.gmems and rng.random() < 0.15:  # without GUEST_MEMFD the fd and offset are not read
                ignored = ("gmem", self._pick(self.gmems)[0])
                offset = self._pick(_ODD_GMEM_OFFSETS)
                self._op("set_user_memory_region2", vm, slot, flags, gpa, size, address, ignored, offset)
            else:
                self._op("set_user_memory_region2", vm, slot, flags, gpa, size, address, None, 0)
            return
        gmem, gsize, _ = self._pick(self.gmems)
        flags = uapi.KVM_MEM_GUEST_MEMFD
        if rng.random() < 0.1:
            flags |= self._pick((uapi.KVM_MEM_READONLY, uapi.KVM_MEM_LOG_DIRTY_PAGES))
        target: Any = ("gmem", gmem)
        r = rng.random()
        if r < 0.05:
            target = ("vm", vm)
        elif r < 0.15:
            target = ("fd", gmem)  # the descriptor number instead of the object
        elif r < 0.18:
            target = self._pick((0xFFFF_FFFF, 0x7FFF_FFFF, 1 << 20))  # no such descriptor (B-1)
        address, size = self._address(size) if rng.random() < 0.7 else (0, size)
        own = self.gmem_maps.get(gmem)
        if own and rng.random() < 0.6:  # userspace_addr = the gmem's own mapping of the bound range
            map_id, map_offset, map_length = self._pick(own)
            first = rng.randrange(0, max(1, map_length // PAGE))
            self.slot_maps.add(map_id)
            offset = map_offset + first * PAGE
            size = max(PAGE, min(size, map_length - first * PAGE, gsize - offset))
            self.slots[-1] = (vm, gpa, size)
            self._op(
                "set_user_memory_region2",
                vm,
                slot,
                flags,
                gpa,
                size,
                ("map", map_id, first * PAGE),
                target,
                offset,
            )
            return
        if rng.random() < 0.1:  # the v1 ioctl rejects GUEST_MEMFD (S-2)
            self._op("set_user_memory_region", vm, slot, flags, gpa, size, address)
            return
        r = rng.random()
        if r < 0.65:  # mostly a binding that fits the file (B-4)
            offset = rng.randrange(0, min(gsize, 16 * PAGE) // PAGE) * PAGE
            if gsize == _HUGE_GMEM and self._chance(0.5):
                offset = gsize - size
            size = min(size, gsize - offset)
        elif r < 0.85:
            offset = self._offset(gsize) & uapi.U64_MAX  # a __u64 field
        else:  # offsets at the loff_t / u64 edges (S-6, B-4)
            offset = self._pick(_ODD_GMEM_OFFSETS)
        self.slots[-1] = (vm, gpa, size)
        self._op("set_user_memory_region2", vm, slot, flags, gpa, size, address, target, offset)

    def _odd_memslot(self, vm: int) -> None:
        """Arguments at the limits (S-3..S-7, S-10, B-4): ids, address spaces, flags, sizes,
        addresses and gmem offsets.  Never near the programs' accesses, so a memslot the
        kernel accepts cannot show the guest host memory outside the generated mappings."""
        rng = self.rng
        slot = self._pick(_ODD_SLOTS) if self._chance(0.4) else self._pick(_SLOT_IDS)
        flags = (
            self._pick(_ODD_MEMSLOT_FLAGS)
            if self._chance(0.3)
            else self._pick((0, uapi.KVM_MEM_READONLY, uapi.KVM_MEM_GUEST_MEMFD))
        )
        gpa = self._pick(_HIGH_GPAS) if self._chance(0.8) else self._pick((PAGE + 8, 1 << 63))
        size = self._pick(_ODD_SIZES) if self._chance(0.5) else self._pick((PAGE, 16 * PAGE))
        address: Any = self._pick(_ODD_ADDRESSES) if self._chance(0.5) else 0x10000
        if address == uapi.TASK_SIZE - 16 * PAGE:  # ends exactly at TASK_SIZE when sizes allow
            address = uapi.TASK_SIZE - size if size <= uapi.TASK_SIZE else address
        target: Any = None
        offset = 0
        if flags & uapi.KVM_MEM_GUEST_MEMFD and self.gmems:
            gmem, gsize, _ = self._pick(self.gmems)
            target = ("gmem", gmem)
            offset = self._pick((*_ODD_GMEM_OFFSETS, 0, gsize - PAGE))
        if rng.random() < 0.2:
            self._op("set_user_memory_region", vm, slot, flags, gpa, size, address)
        else:
            self._op("set_user_memory_region2", vm, slot, flags, gpa, size, address, target, offset)
        if self._chance(0.3):  # and delete it again (S-8: deleting what is not there)
            self._op("set_user_memory_region2", vm, slot, 0, 0, 0, 0, None, 0)

    def _ram_slot(self, vm: int) -> None:
        """A memslot the guest can use: fresh anonymous memory, or a guest_memfd
        (``MMAP|INIT_SHARED``) through its own mapping, as a plain or a gmem memslot; next
        to the previous one, so accesses cross from one memslot into the other."""
        rng = self.rng
        slot, page = self.ram_next.get(vm, (_RAM_SLOT, _GPA_PAGES))
        pages = rng.randrange(1, 5)
        if slot >= _RAM_SLOT + 8 or page + pages > _GPA_PAGES + _RAM_PAGES:
            self._ram_access(vm)
            return
        size = pages * PAGE
        kind = self._pick(("anon", "anon", "gmem", "gmem_slot"))
        gmem: int | None = None
        target: Any = None
        flags = self._pick((0, 0, 0, uapi.KVM_MEM_LOG_DIRTY_PAGES, uapi.KVM_MEM_READONLY))
        if kind == "anon":
            map_id = self._op("mmap_anonymous", size)
        else:
            gmem = self._op("create_guest_memfd", vm, size, _MMAP_SHARED)
            self.gmems.append((gmem, size, _MMAP_SHARED))
            map_id = self._op("mmap", gmem, size, 0, True)
            self.gmem_maps.setdefault(gmem, []).append((map_id, 0, size))
            if kind == "gmem_slot":
                flags, target = uapi.KVM_MEM_GUEST_MEMFD, ("gmem", gmem)
        self.maps.append((map_id, size))
        self.slot_maps.add(map_id)
        gpa = page * PAGE
        if target is None and rng.random() < 0.3:
            self._op("set_user_memory_region", vm, slot, flags, gpa, size, ("map", map_id, 0))
        else:
            self._op("set_user_memory_region2", vm, slot, flags, gpa, size, ("map", map_id, 0), target, 0)
        self.ram.append((vm, gpa, size, map_id, gmem))
        if not flags & uapi.KVM_MEM_READONLY:
            self.writable.update((vm, p) for p in range(page, page + pages))
        self.slots.append((vm, gpa, size))
        self.ram_next[vm] = (slot + 1, page + pages)

    def _ram_access(self, vm: int) -> None:
        """Stores and loads on guest RAM, by the guest (every calling convention) and by the
        host through the memslot's mapping, in any order; punch holes in gmem-backed RAM."""
        ram = [r for r in self.ram if r[0] == vm]
        if not ram:
            self._ram_slot(vm)
            return
        rng = self.rng
        _, gpa, size, map_id, gmem = self._pick(ram)
        offset = rng.randrange(0, size)
        if rng.random() < 0.3:  # near a page end: loads cross pages and memslots
            offset = min(size - 1, (offset | (PAGE - 1)) - rng.randrange(0, 16))
        r = rng.random()
        if r < 0.35:
            vcpu, _ = self._vcpu(vm)
            n = min(rng.randrange(1, 16), PAGE - (gpa + offset) % PAGE)
            page = (gpa + offset) // PAGE
            if {(vm, page), (vm, page + 1)} <= self.writable and rng.random() < 0.5:
                # across two pages of writable RAM (maybe two memslots): no partial store
                n = rng.randrange(1, 24)
            style = self._pick(("write", "data", "data", "length", "other_length"))
            self._op("access_write", vcpu, gpa + offset, rng.randbytes(n), style)
        elif r < 0.65:
            vcpu, _ = self._vcpu(vm)
            self._op("access_read", vcpu, gpa + offset, rng.randrange(1, 40), self._pick(_ACCESS_READ_STYLES))
        elif r < 0.8:
            n = min(rng.randrange(1, 24), size - offset)
            self._op("host_write", map_id, offset, rng.randbytes(n))
        elif r < 0.95 or gmem is None:
            self._op("host_read", map_id, offset, min(rng.randrange(1, 24), size - offset))
        else:  # the freed page reads back as zeroes from host and guest (FA-8)
            self._op("fallocate", gmem, _PUNCH, offset & ~(PAGE - 1), PAGE)

    def _modify_slot(self, vm: int) -> None:
        """An earlier memslot op of *vm* (guest RAM included) again: unchanged (S-13 no-op),
        LOG_DIRTY_PAGES or READONLY toggled (FLAGS_ONLY, S-12), moved (MOVE, S-14), deleted,
        or through the other ioctl."""
        earlier = [
            op
            for op in self.ops
            if op.name.startswith("set_user_memory_region")
            and op.args[0] == vm
            and 0 < op.args[4] <= 16 * PAGE
            and op.args[3] + op.args[4] <= (_GPA_PAGES + _RAM_PAGES) * PAGE
        ]
        if not earlier:
            return
        op = self._pick(earlier)
        args = list(op.args) + [None, 0][len(op.args) - 6 :]
        how = self._pick(_MODIFY_KINDS)
        if how in ("move", "delete"):  # the old range is no longer known to be writable RAM
            first = args[3] // PAGE
            self.writable.difference_update((vm, p) for p in range(first, first + args[4] // PAGE))
        if how == "log_dirty":
            args[2] ^= uapi.KVM_MEM_LOG_DIRTY_PAGES
        elif how == "readonly":
            args[2] ^= uapi.KVM_MEM_READONLY
        elif how == "delete":
            args[4] = 0
        elif how == "move":
            args[3] = self._slot_gpa(vm, args[4])
            self.slots.append((vm, args[3], args[4]))
        if how == "other_ioctl" and op.name == "set_user_memory_region2":
            self._op("set_user_memory_region", *args[:6])
        else:
            self._op("set_user_memory_region2", *args)

    def _delete_slot(self, vm: int) -> None:
        slot = self._pick(_SLOT_IDS)
        if self._chance(0.1):  # a delete with leftovers: flags, gpa, address are ignored
            flags = uapi.KVM_MEM_READONLY
            self._op("set_user_memory_region2", vm, slot, flags, 8 * PAGE, 0, 0x10000, None, 0)
            return
        if self._chance(0.2):
            self._op("set_user_memory_region", vm, slot, 0, 0, 0, 0)
            return
        self._op("set_user_memory_region2", vm, slot, 0, 0, 0, 0, None, 0)

    def _vcpu(self, vm: int) -> tuple[int, int]:
        ids = [v for v in self.vcpus if v[1] == vm]
        if not ids or self.rng.random() < 0.05:
            created = (self._op("create_vcpu", vm, len(ids)), vm)
            self.vcpus.append(created)
            return created
        return tuple(self._pick(ids))

    def _create_vcpu(self, vm: int) -> None:
        """vCPU ids at the limits and twice the same id (EEXIST)."""
        op = self._op("create_vcpu", vm, self._pick(_VCPU_IDS))
        self.vcpus.append((op, vm))

    def _access(self, vm: int) -> None:
        vcpu, _ = self._vcpu(vm)
        rng = self.rng
        slots = [s for s in self.slots if s[0] == vm]
        crossing = False
        if slots and rng.random() < 0.8:  # mostly inside (or just past) a memslot
            _, base, size = self._pick(slots)
            if self._chance(0.25):  # at its end or a page end inside it: the access crosses
                end = base + self.rng.randrange(1, max(1, size // PAGE) + 1) * PAGE  # a slot may be < 1 page
                gpa = max(0, end - rng.randrange(1, 24))
                crossing = True
            else:
                gpa = base + rng.randrange(0, size + 16)
        else:
            gpa = rng.randrange(0, _GPA_PAGES * PAGE)
        if rng.random() < 0.5:
            length = rng.randrange(1, 48 if crossing else 24)
            if self._chance(0.05):
                length = rng.randrange(PAGE, 3 * PAGE)  # several pages
            self._op("access_read", vcpu, gpa, length, self._pick(_ACCESS_READ_STYLES))
        else:  # stores stay within one page: the guest runner of the real kernel copies bytewise
            n = min(rng.randrange(1, 16), PAGE - gpa % PAGE)
            self._op("access_write", vcpu, gpa, rng.randbytes(n), self._pick(_ACCESS_WRITE_STYLES))

    def _pre_fault(self, vm: int) -> None:
        vcpu, _ = self._vcpu(vm)
        if self._chance(0.3):  # PF-1 shapes: unaligned, empty, wrapping, flags
            gpa, size, flags = self._pick(
                (
                    (PAGE + 8, PAGE, 0),
                    (0, PAGE - 1, 0),
                    (0, 0, 0),
                    (uapi.U64_MAX & ~(PAGE - 1), PAGE, 0),
                    (uapi.U64_MAX & ~(PAGE - 1), 2 * PAGE, 0),
                    (0, PAGE, 1 << 63),
                    (1 << 52, PAGE, 0),
                )
            )
            self._op("pre_fault_memory", vcpu, gpa, size, flags)
            return
        gpa = self.rng.randrange(0, _GPA_PAGES) * PAGE
        self._op("pre_fault_memory", vcpu, gpa, self.rng.randrange(1, 4) * PAGE, self._pick((0, 0, 1)))

    def _set_memory_attributes(self, vm: int) -> None:
        address, size = self._pick(
            ((0, PAGE), (PAGE, 4 * PAGE), (8, PAGE), (0, 0), (uapi.U64_MAX & ~(PAGE - 1), PAGE))
        )
        attributes, flags = self._pick((0, 8, 1, 1 << 63)), self._pick((0, 0, 1))
        self._op("set_memory_attributes", vm, address, size, attributes, flags)

    def _file_op(self) -> None:
        if not self.gmems:
            return
        gmem = self._pick(self.gmems)[0]
        name = self._pick(("fstat", "fstat", "gmem_read", "gmem_write", "gmem_truncate"))
        arg = {
            "fstat": (),
            "gmem_read": (self._pick((8, 0, PAGE, 1 << 40, uapi.U64_MAX)),),
            "gmem_write": (self._pick((b"x", b"", bytes(PAGE + 1))),),
            "gmem_truncate": (self._pick((0, PAGE, 1 << 40, uapi.LOFF_MAX, -1)),),
        }[name]
        self._op(name, gmem, *arg)

    def _dup(self) -> None:
        """A second descriptor of a guest_memfd (``dup``): it binds, maps and keeps the file."""
        if not self.gmems:
            return
        gmem, size, flags = self._pick(self.gmems)
        self.gmems.append((self._op("dup_gmem", gmem), size, flags))

    def _close(self) -> None:
        r = self.rng.random()
        if r < 0.35 and self.gmems:
            self._op("close_gmem", self._pick(self.gmems)[0])
        elif r < 0.7 and self.maps:
            map_id = self._pick(self.maps)[0]
            if map_id not in self.slot_maps:
                self._op("munmap", map_id)
                self.maps = [m for m in self.maps if m[0] != map_id]
                for own in self.gmem_maps.values():
                    own[:] = [m for m in own if m[0] != map_id]
        elif r < 0.8 and self.vcpus:
            self._op("close_vcpu", self._pick(self.vcpus)[0])
        elif r < 0.83:
            self._op("close_kvm")
        elif self.vms:
            vm = self._pick(self.vms)
            self._op("close_vm", vm)


def generate(
    rng: random.Random, steps: int, vm_types: Sequence[int] = (uapi.KVM_X86_DEFAULT_VM,)
) -> list[Op]:
    """A random program of *steps* ops (a step of several ops may be cut at the end) for a
    backend offering *vm_types*, its default first (``Backend.default_vm_type``)."""
    gen = Generator(rng, vm_types)
    while len(gen.ops) < steps:
        gen.step()
    return gen.ops[:steps]
