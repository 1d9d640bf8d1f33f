"""A tiny guest that performs one load or store for :meth:`LinuxVcpu.access`.

The guest runs in flat 32-bit protected mode (CR0.PE=1, paging off, 4 GiB segments set
directly through ``KVM_SET_SREGS``; no GDT is needed because no selector is ever loaded).
Its code and a bounce buffer live in a memslot of their own, the **runner slot**:

* slot id :data:`RUNNER_SLOT` (the highest user slot id, ``KVM_USER_MEM_SLOTS - 1``),
* guest-physical range :data:`RUNNER_GPA` .. ``RUNNER_GPA + RUNNER_SIZE`` (the top 4 MiB
  below 4 GiB), backed by anonymous host memory owned by the VM object.

The slot is installed on the first access of any vCPU of the VM; a program that wants
:meth:`access` must leave that slot id and that GPA range alone (an overlapping slot makes
the first access fail with ``EEXIST``).  Accessible guest-physical addresses are those
below ``RUNNER_GPA``.

The program is a byte loop (``mov al,[esi]; mov [edi],al; inc esi; inc edi; loop``)
followed by ``out 0x10, al; hlt``: a load copies ``length`` bytes from the target GPA into
the bounce buffer, a store copies the bounce buffer to the target GPA.  Reaching the
``out`` means the access completed.  One byte per instruction (not ``rep movsb``) so an
MMIO exit can be completed with ``immediate_exit`` without resuming the copy.
"""

from __future__ import annotations

import struct
from typing import Final

from guestmem import uapi

RUNNER_SLOT: Final = uapi.KVM_USER_MEM_SLOTS - 1
RUNNER_GPA: Final = 0xFFC0_0000
RUNNER_SIZE: Final = 0x40_0000
CODE_GPA: Final = RUNNER_GPA
BOUNCE_GPA: Final = RUNNER_GPA + uapi.PAGE_SIZE
BOUNCE_SIZE: Final = RUNNER_SIZE - uapi.PAGE_SIZE
DONE_PORT: Final = 0x10

CODE: Final = bytes(
    [
        0x8A,
        0x06,  # top: mov al, [esi]
        0x88,
        0x07,  # mov [edi], al
        0x46,  # inc esi
        0x47,  # inc edi
        0xE2,
        0xF8,  # loop top
        0xE6,
        DONE_PORT,  # out DONE_PORT, al
        0xF4,  # hlt
    ]
)

# struct kvm_segment: base u64, limit u32, selector u16, type, present, dpl, db, s, l, g,
# avl, unusable, padding (24 bytes)
_SEGMENT = struct.Struct("<QIHBBBBBBBBBx")
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_CR0_OFFSET = 8 * _SEGMENT.size + 2 * 16  # after the segments and gdt/idt dtables
_CR0_PE = 1


def flat_protected_sregs(sregs: bytearray) -> bytearray:
    """Patch a ``struct kvm_sregs`` (from ``KVM_GET_SREGS``) for flat 32-bit protected mode."""
    out = bytearray(sregs)
    for index, name in enumerate(_SEGMENTS[:6]):
        code = name == "cs"
        seg = _SEGMENT.pack(
            0,  # base
            0xFFFF_FFFF,  # limit
            0x08 if code else 0x10,  # selector
            0x0B if code else 0x03,  # type: execute/read or read/write, accessed
            1,  # present
            0,  # dpl
            1,  # db: 32-bit
            1,  # s: code/data
            0,  # l
            1,  # g
            0,  # avl
            0,  # unusable
        )
        out[index * _SEGMENT.size : (index + 1) * _SEGMENT.size] = seg
    (cr0,) = struct.unpack_from("<Q", out, _CR0_OFFSET)
    struct.pack_into("<Q", out, _CR0_OFFSET, cr0 | _CR0_PE)
    return out


def regs(source: int, destination: int, count: int) -> bytearray:
    """A ``struct kvm_regs`` that starts the program copying *count* bytes."""
    values = [0] * 18  # rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags
    values[2] = count
    values[4] = source
    values[5] = destination
    values[6] = BOUNCE_GPA  # a harmless stack pointer inside the runner slot
    values[16] = CODE_GPA
    values[17] = 0x2  # rflags: the always-one bit; interrupts off
    return bytearray(struct.pack("<18Q", *values))
