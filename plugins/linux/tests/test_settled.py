"""Disagreements `guestmem diff` found between the model and the running kernel, settled.

Each entry is the shrunk reproducer and the outcome of its last op on Linux 6.18 with
kvm_pvm, named after the kernel function that decides it.  The model must give that
outcome (checked everywhere, with this host's kernel profile); where /dev/kvm is usable
the kernel is checked too, so a reproducer whose kernel outcome changes is noticed.
See docs/profiles.md, "Disagreements found and settled".
"""

from __future__ import annotations

from typing import Any

import pytest

from guestmem import diff, uapi
from guestmem_linux.testing import is_kvm_pvm, kvm_unavailable

PAGE = uapi.PAGE_SIZE
GMEM = uapi.KVM_MEM_GUEST_MEMFD
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
HUGE = (1 << 63) - PAGE  # a guest_memfd at the loff_t limit

MODEL = diff.opener("sw", "kvm_pvm-6.18")
KERNEL = diff.opener("linux")

#: name -> (program as (op, *args) tuples, the outcome of its last op on the kernel)
SETTLED: dict[str, tuple[list[tuple[Any, ...]], tuple[Any, ...]]] = {
    "kvm_vcpu_release: a closed vCPU keeps its id (KVM_CREATE_VCPU EEXIST)": (
        [("create_vm", 0), ("create_vcpu", 0, 0), ("close_vcpu", 1), ("create_vcpu", 0, 0)],
        ("errno", "EEXIST"),
    ),
    "vfs_fallocate: exclusive modes are checked before EFBIG (WRITE_ZEROES|KEEP_SIZE)": (
        [
            ("create_vm", 0),
            ("create_guest_memfd", 0, 8 * PAGE, MMAP),
            ("fallocate", 1, 0x81, PAGE, uapi.LOFF_MAX),
        ],
        ("errno", "EOPNOTSUPP"),
    ),
    "vfs_fallocate: two modes at once (COLLAPSE|PUNCH_HOLE|KEEP_SIZE) before EFBIG": (
        [("create_vm", 0), ("create_guest_memfd", 0, 8 * PAGE, 0), ("fallocate", 1, 0x0B, HUGE, 6 * PAGE)],
        ("errno", "EOPNOTSUPP"),
    ),
    "file_mmap_ok: a gmem mapping beyond MAX_LFS_FILESIZE is EOVERFLOW before kvm_gmem_mmap": (
        [("create_vm", 0), ("create_guest_memfd", 0, HUGE, MMAP), ("mmap", 1, 0x10008, HUGE, True)],
        ("errno", "EOVERFLOW"),
    ),
    "file_mmap_ok: EOVERFLOW comes before ENODEV (no GUEST_MEMFD_FLAG_MMAP)": (
        [("create_vm", 0), ("create_guest_memfd", 0, 16 * PAGE, 0), ("mmap", 1, PAGE, 1 << 63, True)],
        ("errno", "EOVERFLOW"),
    ),
    "do_mmap: a length that overflows PAGE_ALIGN is ENOMEM": (
        [("create_vm", 0), ("create_guest_memfd", 0, PAGE, MMAP), ("mmap", 1, uapi.U64_MAX, 0, True)],
        ("errno", "ENOMEM"),
    ),
    "get_unmapped_area: a length beyond TASK_SIZE is ENOMEM before ENODEV": (
        [("create_vm", 0), ("create_guest_memfd", 0, 16 * PAGE, 0), ("mmap", 1, 1 << 50, 0, True)],
        ("errno", "ENOMEM"),
    ),
    "get_unmapped_area: anonymous memory beyond TASK_SIZE is ENOMEM": (
        [("mmap_anonymous", 1 << 50)],
        ("errno", "ENOMEM"),
    ),
    "mmap(2) reads length as a size_t: 2**64 + a page maps one page, a host load past it is outside": (
        [("mmap_anonymous", (1 << 64) + PAGE), ("host_write", 0, 0, b"in"), ("host_read", 0, PAGE, 8)],
        ("errno", "EFAULT"),
    ),
    "a host load at an offset of 2**63 and more is outside the mapping (the length mapped bounds it)": (
        [("mmap_anonymous", (1 << 64) + PAGE), ("host_read", 0, 1 << 63, 1)],
        ("errno", "EFAULT"),
    ),
    "a gmem mapping of 2**64 + a page is one page long too": (
        [
            ("create_vm", 0),
            ("create_guest_memfd", 0, 2 * PAGE, SHARED),
            ("mmap", 1, (1 << 64) + PAGE, 0, True),
            ("host_read", 2, PAGE, 1),
        ],
        ("errno", "EFAULT"),
    ),
    "mmap(2) of anonymous memory needs no /dev/kvm": (
        [("close_kvm",), ("mmap_anonymous", 8 * PAGE)],
        ("ok", None),
    ),
    "kvm_gmem_bind: offset + size wraps past LOFF_MAX and passes the i_size check": (
        [
            ("create_vm", 0),
            ("create_guest_memfd", 0, 4 * PAGE, 0),
            ("set_user_memory_region2", 0, 5, GMEM, 0, 5 * PAGE, 0, ("gmem", 1), HUGE),
        ],
        ("ok", None),
    ),
    "mmap maps whole pages: an unaligned length reaches the end of its last page": (
        [
            ("mmap_anonymous", 3 * PAGE + 8),
            ("host_write", 0, 4 * PAGE - 6, b"abcdef"),
            ("host_read", 0, 4 * PAGE - 6, 6),
        ],
        ("ok", b"abcdef".hex()),
    ),
    "a page of an unaligned gmem mapping beyond EOF is SIGBUS, not outside the mapping": (
        [
            ("create_vm", 0),
            ("create_guest_memfd", 0, 2 * PAGE, SHARED),
            ("mmap", 1, 2 * PAGE + 8, 0, True),
            ("host_read", 2, 2 * PAGE + 0x66B, 1),
        ],
        ("sigbus", 2),
    ),
    "one gmem page, two mappings at different offsets: a store through one reads back through the other": (
        [
            ("create_vm", 0),
            ("create_guest_memfd", 0, 3 * PAGE, SHARED),
            ("mmap", 1, 3 * PAGE, PAGE, True),
            ("host_write", 2, PAGE - 5, bytes(range(1, 27))),
            ("mmap", 1, 3 * PAGE, 0, True),
            ("host_read", 4, 2 * PAGE - 5, 26),
        ],
        ("ok", bytes(range(1, 27)).hex()),
    ),
    "Vcpu.access: data= alone is a store, write=True without data is refused": (
        [
            ("create_vm", 0),
            ("mmap_anonymous", 4 * PAGE),
            ("set_user_memory_region", 0, 0, 0, 0, 4 * PAGE, ("map", 1, 0)),
            ("create_vcpu", 0, 0),
            ("access_write", 3, 0x1FFE, b"xy", "data"),
            ("access_read", 3, 0x1FFE, 2, "keywords"),
            ("access_write", 3, 0x1FFE, b"z", "no_data"),
        ],
        ("raised", "ValueError"),
    ),
    "dup(2) of a guest_memfd: the duplicate binds after the original is closed": (
        [
            ("create_vm", 0),
            ("create_guest_memfd", 0, 4 * PAGE, 0),
            ("dup_gmem", 1),
            ("close_gmem", 1),
            ("set_user_memory_region2", 0, 0, GMEM, 0, 4 * PAGE, 0, ("gmem", 2), 0),
            ("fstat", 2),
        ],
        ("ok", (4 * PAGE, PAGE, 0, 0o100600, 1)),
    ),
}


def _program(ops: list[tuple[Any, ...]]) -> list[diff.Op]:
    return [diff.Op(i, name, tuple(args)) for i, (name, *args) in enumerate(ops)]


@pytest.mark.parametrize("name", sorted(SETTLED))
def test_model_gives_the_kernel_outcome(name: str) -> None:
    ops, kernel = SETTLED[name]
    assert diff.run_program(MODEL, _program(ops))[-1] == kernel


@pytest.mark.skipif(kvm_unavailable() is not None or not is_kvm_pvm(), reason="needs /dev/kvm of kvm_pvm")
@pytest.mark.parametrize("name", sorted(SETTLED))
def test_kernel_still_gives_it_and_agrees(name: str) -> None:
    ops, kernel = SETTLED[name]
    program = _program(ops)
    assert diff.run_program(KERNEL, program)[-1] == kernel
    found = diff.compare(MODEL, KERNEL, program)
    assert found is None, found.render("sw", "linux")
