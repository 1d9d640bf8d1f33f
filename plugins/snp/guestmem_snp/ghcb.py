"""GHCB page-state changes as KVM handles them (spec 2.3; ``snp_begin_psc``, ``snp_begin_psc_msr``).

A guest asks for shared<->private changes either with the GHCB MSR protocol (one 4 KiB
page per request) or with the ``SVM_VMGEXIT_PSC`` NAE event, whose descriptor in the
GHCB shared buffer holds up to 253 entries of 4 KiB or 2 MiB pages.  KVM changes no RMP
entry here: it coalesces runs of entries into ``KVM_HC_MAP_GPA_RANGE`` exits to
userspace, which flips attributes and (QEMU) punches the old side.

:class:`PscEngine` is the per-vCPU state of ``snp_begin_psc``/``snp_complete_one_psc``;
it is pure (no core model) so its limits and coalescing are unit-tested directly.
"""

from __future__ import annotations

from typing import Final

import attrs

from guestmem import uapi
from guestmem.uapi import PAGE_SHIFT

# --- exit codes the guest uses (arch/x86/include/uapi/asm/svm.h) ---------------------------
SVM_EXIT_VMGEXIT: Final = 0x403
"""VMGEXIT with the GHCB MSR holding a request (the MSR protocol); arg 0 is the MSR value."""
SVM_VMGEXIT_PSC: Final = 0x80000010
"""VMGEXIT NAE event "page state change"; the descriptor is in the vCPU's GHCB."""

# --- KVM hypercall ABI (include/uapi/linux/kvm_para.h) --------------------------------------
# The KVM hypercall ABI (include/uapi/linux/kvm_para.h), as the core's uAPI has it.
KVM_HC_MAP_GPA_RANGE: Final = uapi.KVM_HC_MAP_GPA_RANGE
KVM_ENOSYS: Final = uapi.KVM_ENOSYS
KVM_EINVAL: Final = uapi.KVM_EINVAL
KVM_MAP_GPA_RANGE_PAGE_SZ_4K: Final = uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_4K
KVM_MAP_GPA_RANGE_PAGE_SZ_2M: Final = uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_2M
KVM_MAP_GPA_RANGE_PAGE_SZ_1G: Final = uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_1G
KVM_MAP_GPA_RANGE_ENCRYPTED: Final = uapi.KVM_MAP_GPA_RANGE_ENCRYPTED
KVM_MAP_GPA_RANGE_DECRYPTED: Final = uapi.KVM_MAP_GPA_RANGE_DECRYPTED
KVM_EXIT_HYPERCALL_VALID_MASK: Final = uapi.KVM_EXIT_HYPERCALL_VALID_MASK

# --- PSC descriptor (arch/x86/include/asm/sev-common.h) -------------------------------------
VMGEXIT_PSC_MAX_ENTRY: Final = 64  # what Linux guests send per request
VMGEXIT_PSC_MAX_COUNT: Final = 253  # what KVM accepts: end_entry <= 252
SNP_PAGE_STATE_PRIVATE: Final = 1
SNP_PAGE_STATE_SHARED: Final = 2
SNP_PAGE_STATE_PSMASH: Final = 3
SNP_PAGE_STATE_UNSMASH: Final = 4
RMP_PG_SIZE_4K: Final = 0
RMP_PG_SIZE_2M: Final = 1
VMGEXIT_PSC_ERROR_GENERIC: Final = 0x100 << 32
VMGEXIT_PSC_ERROR_INVALID_HDR: Final = (1 << 32) | 1
VMGEXIT_PSC_ERROR_INVALID_ENTRY: Final = (1 << 32) | 2

# --- GHCB MSR protocol ----------------------------------------------------------------------
GHCB_MSR_INFO_MASK: Final = 0xFFF
GHCB_MSR_PSC_REQ: Final = 0x014
GHCB_MSR_PSC_RESP: Final = 0x015
GHCB_MSR_PSC_RESP_ERROR: Final = (1 << 63) | GHCB_MSR_PSC_RESP


def ghcb_msr_psc_req(gfn: int, op: int) -> int:
    """``GHCB_MSR_PSC_REQ_GFN(gfn, op)``."""
    return ((op & 0xF) << 52) | ((gfn & ((1 << 40) - 1)) << 12) | GHCB_MSR_PSC_REQ


def ghcb_msr_psc_req_gfn(msr: int) -> int:
    """``GHCB_MSR_PSC_REQ_TO_GFN``."""
    return (msr >> 12) & ((1 << 40) - 1)


def ghcb_msr_psc_req_op(msr: int) -> int:
    """``GHCB_MSR_PSC_REQ_TO_OP``."""
    return (msr >> 52) & 0xF


@attrs.define
class PscEntry:
    """``struct psc_entry``: {cur_page:12, gfn:40, operation:4, pagesize:1}."""

    gfn: int
    operation: int
    pagesize: int = RMP_PG_SIZE_4K
    cur_page: int = 0

    @property
    def npages(self) -> int:
        """Pages the entry describes (1 or 512)."""
        return 512 if self.pagesize else 1


@attrs.define
class PscBuffer:
    """The PSC descriptor in the GHCB shared buffer: ``struct psc_hdr`` + entries.

    ``end_entry`` defaults to the last entry.  The guest may leave partially processed
    state in ``cur_entry``/``cur_page``; KVM resumes from there.
    """

    entries: list[PscEntry]
    cur_entry: int = 0
    end_entry: int = -1

    def __attrs_post_init__(self) -> None:
        if self.end_entry < 0:
            self.end_entry = len(self.entries) - 1


@attrs.frozen
class MapGpaRange:
    """A ``KVM_EXIT_HYPERCALL`` for ``KVM_HC_MAP_GPA_RANGE``: what userspace receives."""

    gpa: int
    npages: int
    attrs: int

    @property
    def args(self) -> tuple[int, int, int]:
        """``run->hypercall.args[0..2]``."""
        return (self.gpa, self.npages, self.attrs)

    @property
    def to_private(self) -> bool:
        """True for ``KVM_MAP_GPA_RANGE_ENCRYPTED``."""
        return bool(self.attrs & KVM_MAP_GPA_RANGE_ENCRYPTED)


def _map_attrs(operation: int, huge: bool) -> int:
    enc = KVM_MAP_GPA_RANGE_ENCRYPTED if operation == SNP_PAGE_STATE_PRIVATE else KVM_MAP_GPA_RANGE_DECRYPTED
    return enc | (KVM_MAP_GPA_RANGE_PAGE_SZ_2M if huge else KVM_MAP_GPA_RANGE_PAGE_SZ_4K)


@attrs.define
class PscEngine:
    """One vCPU's PSC progress (``svm->sev_es.psc_idx/psc_inflight/psc_2m``).

    :meth:`begin` and :meth:`complete` return either the final ``sw_exit_info_2`` for the
    guest (0 = success) or a :class:`MapGpaRange` the VMM must handle first.
    """

    psc_idx: int = 0
    psc_inflight: int = 0
    psc_2m: bool = False

    def _finish(self, result: int) -> int:
        self.psc_inflight = 0
        self.psc_idx = 0
        self.psc_2m = False
        return result

    def _complete_one(self, buf: PscBuffer) -> None:
        """``__snp_complete_one_psc``: every in-flight entry is done."""
        idx = self.psc_idx
        while self.psc_inflight:
            entry = buf.entries[idx]
            entry.cur_page = entry.npages
            self.psc_inflight -= 1
            idx += 1
        buf.cur_entry = idx

    def begin(self, buf: PscBuffer, exits_enabled: bool) -> int | MapGpaRange:
        """``snp_begin_psc``: validate, skip done entries, coalesce the next run."""
        if not exits_enabled:
            return self._finish(VMGEXIT_PSC_ERROR_GENERIC)
        while True:
            if self.psc_inflight:
                return self._finish(VMGEXIT_PSC_ERROR_GENERIC)
            idx_start, idx_end = buf.cur_entry, buf.end_entry
            # The buffer bound: 253 entries, or fewer if the guest's scratch area is shorter.
            if idx_end >= min(VMGEXIT_PSC_MAX_COUNT, len(buf.entries)):
                return self._finish(VMGEXIT_PSC_ERROR_INVALID_HDR)
            idx = idx_start
            gfn, npages, huge = 0, 0, False
            start: PscEntry | None = None
            while idx <= idx_end:
                start = buf.entries[idx]
                gfn, huge = start.gfn, bool(start.pagesize)
                npages = 512 if huge else 1
                if start.cur_page > npages or gfn % npages:
                    return self._finish(VMGEXIT_PSC_ERROR_INVALID_ENTRY)
                if start.cur_page:
                    # A partly done 2M entry is finished as 4K pages.
                    npages -= start.cur_page
                    gfn += start.cur_page
                    huge = False
                if npages:
                    break
                idx += 1
                buf.cur_entry += 1
            if idx > idx_end or start is None:
                return self._finish(0)
            self.psc_2m = huge
            self.psc_idx = idx
            self.psc_inflight = 1
            # Coalesce following entries as KVM does: note it compares against the start
            # entry's original gfn, not the one advanced by cur_page.
            nxt = idx + 1
            while nxt <= idx_end:
                entry = buf.entries[nxt]
                if (
                    entry.operation != start.operation
                    or entry.gfn != start.gfn + npages
                    or entry.cur_page
                    or bool(entry.pagesize) != huge
                ):
                    break
                self.psc_inflight += 1
                npages += 512 if huge else 1
                nxt += 1
            if start.operation in (SNP_PAGE_STATE_PRIVATE, SNP_PAGE_STATE_SHARED):
                return MapGpaRange(
                    gfn << PAGE_SHIFT, npages, _map_attrs(start.operation, bool(start.pagesize))
                )
            # PSMASH/UNSMASH and unknown operations: done without an exit.
            self._complete_one(buf)

    def complete(self, buf: PscBuffer, ret: int, exits_enabled: bool = True) -> int | MapGpaRange:
        """``snp_complete_one_psc``: userspace answered *ret* (``run->hypercall.ret``)."""
        if ret:
            return self._finish(VMGEXIT_PSC_ERROR_GENERIC)
        self._complete_one(buf)
        return self.begin(buf, exits_enabled)


def begin_psc_msr(msr: int, exits_enabled: bool) -> int | MapGpaRange:
    """``snp_begin_psc_msr``: the GHCB MSR response, or the exit to make first."""
    op = ghcb_msr_psc_req_op(msr)
    if op not in (SNP_PAGE_STATE_PRIVATE, SNP_PAGE_STATE_SHARED) or not exits_enabled:
        return GHCB_MSR_PSC_RESP_ERROR
    return MapGpaRange(ghcb_msr_psc_req_gfn(msr) << PAGE_SHIFT, 1, _map_attrs(op, False))


def complete_psc_msr(ret: int) -> int:
    """``snp_complete_psc_msr``: the GHCB MSR value the guest reads back."""
    return GHCB_MSR_PSC_RESP_ERROR if ret else GHCB_MSR_PSC_RESP


_U64 = (1 << 64) - 1


def check_map_gpa_range(gpa: int, npages: int, attrs_: int) -> int | MapGpaRange:
    """``KVM_HC_MAP_GPA_RANGE`` in ``__kvm_emulate_hypercall``: ``-KVM_EINVAL`` or the exit.

    The arguments are the guest's 64-bit registers; the only range check is that
    ``gfn + npages`` does not wrap around in u64 (userspace validates the rest).
    """
    gpa, npages, attrs_ = gpa & _U64, npages & _U64, attrs_ & _U64
    gfn = gpa >> PAGE_SHIFT
    if gpa % (1 << PAGE_SHIFT) or not npages or (gfn + npages) & _U64 <= gfn:
        return -KVM_EINVAL
    return MapGpaRange(gpa, npages, attrs_)
