"""Helpers of the guest_memfd rule tests (spec 2.A-2.E, 2.H, 2.N).

Not a test module: plain functions the gmem test modules import.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from guestmem import KvmError, uapi

PAGE = uapi.PAGE_SIZE
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
KEEP = uapi.FALLOC_FL_KEEP_SIZE
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED
GMEM_SLOT = uapi.KVM_MEM_GUEST_MEMFD


@contextmanager
def raises_kvm(err: int, rule: str | None = None) -> Iterator[pytest.ExceptionInfo[KvmError]]:
    """Expect a :class:`KvmError` with *err* (and, if given, decided by *rule*)."""
    with pytest.raises(KvmError) as info:
        yield info
    assert info.value.errno == err, f"errno {info.value.errno} != {err}: {info.value}"
    if rule is not None:
        assert info.value.rule == rule, f"rule {info.value.rule!r} != {rule!r}: {info.value}"


def bind(vm: Any, gmem: Any, gpa: int, size: int, offset: int = 0, slot: int = 0) -> None:
    """Create a GUEST_MEMFD memslot *slot* of *size* bytes at *gpa* bound to *gmem* at *offset*."""
    vm.set_user_memory_region2(slot, GMEM_SLOT, gpa, size, 0, gmem, offset)


def delete_slot(vm: Any, slot: int = 0) -> None:
    """Delete memslot *slot* (``memory_size == 0``)."""
    vm.set_user_memory_region2(slot, 0, 0, 0)


def pattern(tag: int, n: int = 16) -> bytes:
    """*n* recognisable non-zero bytes derived from *tag*."""
    return bytes((tag * 7 + i) % 255 + 1 for i in range(n))


def inode_state(gmem: Any) -> list[tuple[int, int, Any]]:
    """The folio ranges of *gmem*'s inode (page index ranges -> Folio)."""
    return list(gmem.file.inode.pages.items())
