"""The guest side of a TD: TDG.MEM.PAGE.ACCEPT, TDG.VP.VMCALL<MapGPA>, loads and stores.

``guestmem_tdx.guest(vcpu)`` returns a :class:`TdxGuest` that executes TD instructions
on that vCPU, each inside ``KVM_RUN`` (the checks of ``tdx_vcpu_pre_run`` first).  What
needs the host shows up as it would for a VMM: an ACCEPT of a page that is not AUGed
exits to KVM (EPT violation) which faults it in and re-enters, invisibly unless the fault
fails (``guestmem.MemoryFault`` for a gpa whose attribute is shared); MapGPA leaves to
userspace as :class:`guestmem.HypercallExit` (``KVM_HC_MAP_GPA_RANGE``), after which the
VMM re-enters with :meth:`TdxGuest.resume`.  As ``KVM_RUN`` completes an exit left
pending first (``complete_userspace_io``, with ``run->hypercall.ret`` as KVM left it: 0),
an instruction executed while a MapGPA exit is unanswered first gives the TD that chunk
as converted (or makes the next chunk's exit, and the instruction is not executed).

:meth:`TdxGuest.accept_range` and :meth:`TdxGuest.accept_memory` are batched: they stand
for the instructions a guest issues one by one (``accept_memory_stepwise`` is that
reference, literally Linux's ``tdx_accept_memory``) and cost what the runs of memory
cost, not the pages.  The tests compare the two.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from typing import Any, Final

from guestmem import cabi, uapi
from guestmem.backend import VcpuView, VmView, view
from guestmem.errors import HypercallExit, KvmError
from guestmem_tdx import abi
from guestmem_tdx import status as st
from guestmem_tdx.kvm import KvmTdx, TdxVcpu, as_tdx
from guestmem_tdx.module import EPT_VIOLATION, PTRS_PER_TABLE, Td

PAGE_SHIFT: Final = uapi.PAGE_SHIFT
PAGE_SIZE: Final = uapi.PAGE_SIZE
_CHUNK: Final = PTRS_PER_TABLE  # 4 KiB pages per 2 MiB
_GIANT: Final = PTRS_PER_TABLE * PTRS_PER_TABLE  # 4 KiB pages per 1 GiB
_LEVELS: Final = {
    uapi.PG_LEVEL_4K: abi.TDX_PS_4K,
    uapi.PG_LEVEL_2M: abi.TDX_PS_2M,
    uapi.PG_LEVEL_1G: abi.TDX_PS_1G,
}
#: How often one ACCEPT may exit for the same page before the model gives up (the kernel
#: would re-enter forever): core rule 3.3's bound.
MAX_ACCEPT_EXITS: Final = 16


class TdxGuest:
    """TD instructions executed on one vCPU."""

    def __init__(self, vcpu: Any) -> None:
        self.vcpu = vcpu
        self.cpu: VcpuView = view(vcpu)
        self.vm: VmView = self.cpu.vm
        self.tdx: KvmTdx = as_tdx(self.vm)
        #: 4 KiB pages the last batched ACCEPT got through.
        self.progress = 0
        #: Where the guest's last accept loop (:meth:`accept_range`, :meth:`accept_memory`
        #: and its stepwise reference) stood when an exit interrupted it: the gpa of the
        #: ACCEPT the TD executes again once it is re-entered (Linux's loop variable).
        self.position = 0

    def __repr__(self) -> str:
        return f"<TdxGuest vcpu {self.cpu.vcpu_id} of {self.tdx!r}>"

    @property
    def state(self) -> TdxVcpu:
        """This vCPU's ``struct vcpu_tdx``."""
        return self.tdx.vcpu_state(self.cpu)

    @property
    def shared_bit(self) -> int:
        """The gpa bit that makes an access shared (``1 << 47`` or ``1 << 51``)."""
        return 1 << self.tdx.shared_bit

    @property
    def r11(self) -> int:
        """R11 after the last TDG.VP.VMCALL (MapGPA: where to resume, or what failed)."""
        return self.state.r11

    def _td(self) -> Td:
        td = self.tdx.td
        assert td is not None, "a vCPU runs only in a finalized TD"
        return td

    # --- KVM_RUN ----------------------------------------------------------------------------------
    def _run(self) -> None:
        """What ``KVM_RUN`` does before the TD executes anything (``kvm_vcpu_ioctl``,
        ``kvm_arch_vcpu_ioctl_run``): an open vCPU fd (EBADF), a live host and VM (EIO,
        CAP-9), then, through the policy's ``guestmem_vcpu_pre_run``, the pending exit's
        ``complete_userspace_io`` (which may raise the next exit instead of entering) and
        ``tdx_vcpu_pre_run``."""
        self.cpu.check_run()

    def resume(self, ret: int = 0) -> int | None:
        """``KVM_RUN`` after userspace wrote ``run->hypercall.ret = ret`` (a ``__u64``).

        After a ``KVM_EXIT_HYPERCALL`` of this vCPU: what the TD's TDG.VP.VMCALL finally
        returns (R10; :attr:`r11` says more), or the next exit raised.  With no exit pending,
        ``complete_userspace_io`` is ``NULL`` and KVM ignores the field: the TD runs on and
        None is returned.  The checks of ``KVM_RUN`` come first (EBADF for a closed vCPU fd,
        EIO for a dead VM).
        """
        with self.vm.host.operation():
            return self._resume(ret)

    def _resume(self, ret: int = 0) -> int | None:
        ret = cabi.u64(ret, "ret")
        state = self.cpu.arch
        if isinstance(state, TdxVcpu):
            state.hypercall_ret, state.completed = ret, None  # userspace's store into kvm_run
        self._run()
        return state.completed if isinstance(state, TdxVcpu) else None

    def _tdcalls(self, n: int) -> None:
        if n:
            self.vm.count("tdcalls", n)
            self.vm.count("tdcall.TDG.MEM.PAGE.ACCEPT", n)

    # --- TDG.MEM.PAGE.ACCEPT ------------------------------------------------------------------------
    def accept(self, gpa: int, level: int = uapi.PG_LEVEL_4K) -> int:
        """One TDG.MEM.PAGE.ACCEPT of the *level* page at *gpa*; returns its status.

        A page that is not AUGed exits to KVM, which faults it in (TDH.MEM.PAGE.AUG), and the
        TD executes the ACCEPT again.  With 4 KiB S-EPT leaves only (Linux 6.18), a 2 MiB
        ACCEPT ends in ``TDX_PAGE_SIZE_MISMATCH`` and a 1 GiB one is ``TDX_OPERAND_INVALID``.
        *gpa* is RCX (a 64-bit register).
        """
        with self.vm.host.operation():
            return self._accept(gpa, level)

    def _accept(self, gpa: int, level: int = uapi.PG_LEVEL_4K) -> int:
        gpa, level = cabi.u64(gpa, "gpa"), cabi.index(level, "level")
        self._run()
        return self._accept_one(gpa, level)

    def _accept_one(self, gpa: int, level: int) -> int:
        tdx_level = _LEVELS.get(level, -1)
        if gpa % PAGE_SIZE or tdx_level < 0:
            self._tdcalls(1)
            return st.with_operand(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
        gfn = gpa >> PAGE_SHIFT
        for _ in range(MAX_ACCEPT_EXITS):
            out = self.tdx.module.page_accept(self._td(), gfn, tdx_level)
            self._tdcalls(1)
            if out.status != EPT_VIOLATION:
                if out.status == st.TDX_SUCCESS:
                    self._accepted(gfn, 1)
                return out.status
            self.tdx.handle_accept_violation(self.cpu, gfn, 1)
        raise KvmError(errno.EAGAIN, "3.3", f"TDG.MEM.PAGE.ACCEPT at gpa {gpa:#x} keeps exiting")

    def _accepted(self, gfn: int, npages: int) -> None:
        """The pages were zeroed with the TD's key: any poison is gone."""
        for s, e, leaf in self._td().leaves.items(gfn, gfn + npages):
            self.tdx.host.clear(s + leaf.delta, e - s)
        self.vm.count("tdx.accepted_pages", npages)
        self.vm.count("tdx.accept_zeroed_bytes", npages * PAGE_SIZE)

    def accept_range(self, gpa: int, size: int, level: int = uapi.PG_LEVEL_4K) -> int:
        """ACCEPT every *level* page of ``[gpa, gpa + size)`` in order; the status of the
        first that does not succeed (those before it took effect), 0 if all did."""
        with self.vm.host.operation():
            return self._accept_range(gpa, size, level)

    def _accept_range(self, gpa: int, size: int, level: int = uapi.PG_LEVEL_4K) -> int:
        gpa, size = cabi.u64(gpa, "gpa"), cabi.index(size, "size")
        level = cabi.index(level, "level")
        span = PAGE_SIZE << (9 * _LEVELS.get(level, 0))
        if size <= 0 or size % span:
            raise ValueError(f"size {size:#x} is not a positive multiple of the page size {span:#x}")
        self._run()
        self.position = gpa
        if level != uapi.PG_LEVEL_4K or gpa % PAGE_SIZE:
            for pos in range(gpa, gpa + size, span):
                self.position = pos
                status = self._accept_one(pos, level)
                if status:
                    return status
            return 0
        try:
            return self._accept_4k(gpa >> PAGE_SHIFT, size >> PAGE_SHIFT)
        finally:
            self.position = gpa + (self.progress << PAGE_SHIFT)

    def _accept_4k(self, gfn: int, npages: int) -> int:
        """Batched 4 KiB ACCEPTs of ``[gfn, gfn + npages)``; the status of the first that
        failed.  ``self.progress`` says how many succeeded, even when an exit raises.
        A run that is not AUGed exits once per page; KVM faults the run in at once."""
        td = self._td()
        pos, end = gfn, gfn + npages
        self.progress = 0
        while pos < end:
            out = self.tdx.module.page_accept(td, pos, 0, end - pos)
            self._tdcalls(out.calls)
            if out.done:
                self._accepted(pos, out.done)
            pos += out.done
            self.progress = pos - gfn
            if out.status != EPT_VIOLATION:
                return out.status
            if td.leaf(pos) is not None:  # a blocked entry: KVM would re-enter forever
                raise KvmError(errno.EAGAIN, "3.3", f"TDG.MEM.PAGE.ACCEPT at gfn {pos:#x} keeps exiting")
            nxt = next(td.leaves.items(pos, end), None)
            run = self._faultable(pos, (end if nxt is None else nxt[0]) - pos)
            mapped = self.tdx.handle_accept_violation(self.cpu, pos, run)
            self._tdcalls(mapped - 1)  # one ACCEPT per page exited; the first is counted
        return st.TDX_SUCCESS

    def accept_memory(self, start: int, end: int) -> bool:
        """Linux's ``tdx_accept_memory(start, end)``: at each position try a 1 GiB, then a
        2 MiB, then a 4 KiB ACCEPT; False when even 4 KiB fails (the guest panics).
        Batched by runs; :meth:`accept_memory_stepwise` is the same one page at a time."""
        with self.vm.host.operation():
            return self._accept_memory(start, end)

    def _accept_memory(self, start: int, end: int) -> bool:
        start, end = cabi.index(start, "start"), cabi.index(end, "end")
        self._run()
        if start % PAGE_SIZE or end % PAGE_SIZE:
            raise ValueError("accept_memory takes page-aligned bounds")
        pos, last = start >> PAGE_SHIFT, end >> PAGE_SHIFT
        table = self._td().table(1)
        self.position = start
        try:
            while pos < last:
                self.progress = 0
                if pos % _CHUNK or last - pos < _CHUNK:
                    stop = min(last, (pos | (_CHUNK - 1)) + 1) if pos % _CHUNK else last
                    ok, pos = self._accept_pages(pos, stop, last)
                    if not ok:
                        return False
                    continue
                nchunks = (last - pos) // _CHUNK
                first = pos // _CHUNK
                ent = table.entry(first)
                if ent is None:
                    nxt = next(table.items(first, first + nchunks), None)
                    n = (first + nchunks if nxt is None else nxt[0]) - first
                    ok, pos = self._accept_unmapped_chunks(pos, n, last)
                else:
                    n = min(ent[1], first + nchunks) - first
                    ok, pos = self._accept_mapped_chunks(pos, n, last)
                if not ok:
                    return False
            return True
        except BaseException:
            self.position = (pos + self.progress) << PAGE_SHIFT  # the ACCEPT that exited
            raise

    def _count_giant(self, first: int, stop: int, last: int) -> None:
        """The 1 GiB ACCEPTs Linux tries at the 1 GiB-aligned positions in ``[first, stop)``
        with a whole GiB left: ``TDX_OPERAND_INVALID`` (the module takes 4K and 2M only)."""
        lo = -(-first // _GIANT) * _GIANT
        hi = min(stop - 1, last - _GIANT)
        if hi >= lo:
            self._tdcalls((hi - lo) // _GIANT + 1)

    def _faultable(self, gfn: int, npages: int) -> int:
        """How much of ``[gfn, gfn + npages)`` one private fault run may cover before a page
        whose fault would exit (a shared attribute, another memslot): at least 1.  (A later
        page's exit would be counted though not raised.)"""
        end = gfn + npages
        slot = self.vm.slot_for_gfn(gfn)
        if slot is not None:
            end = min(end, slot.end_gfn)
        for s, _, value in self.vm.attribute_runs(gfn, end):
            if not value & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE:
                end = s
                break
        return max(1, end - gfn)

    def _accept_pages(self, pos: int, stop: int, last: int) -> tuple[bool, int]:
        """4 KiB ACCEPTs over ``[pos, stop)`` (no 2 MiB-aligned position with 2 MiB left)."""
        status = st.TDX_SUCCESS
        try:
            status = self._accept_4k(pos, stop - pos)
        finally:
            self._count_giant(pos, pos + min(stop - pos, self.progress + 1), last)
        return status == st.TDX_SUCCESS, pos + self.progress

    def _accept_mapped_chunks(self, pos: int, n: int, last: int) -> tuple[bool, int]:
        """*n* 2 MiB chunks whose S-EPT has a page table: each 2 MiB ACCEPT is a size
        mismatch, then 4 KiB ACCEPTs (exiting for the pages not AUGed)."""
        status = st.TDX_SUCCESS
        try:
            status = self._accept_4k(pos, n * _CHUNK)
        finally:
            visited = min(n * _CHUNK, self.progress + 1)
            self._tdcalls(-(-visited // _CHUNK))  # the 2 MiB attempts of the chunks begun
            self._count_giant(pos, pos + visited, last)
        return status == st.TDX_SUCCESS, pos + self.progress

    def _accept_unmapped_chunks(self, pos: int, n: int, last: int) -> tuple[bool, int]:
        """*n* 2 MiB chunks with nothing in the S-EPT: the 2 MiB ACCEPT exits, KVM maps its
        first page (and the page table), the retry is a size mismatch, and the 4 KiB
        ACCEPTs exit for every other page.  KVM's faults are one run here."""
        total = n * _CHUNK
        try:
            mapped = self.tdx.handle_accept_violation(self.cpu, pos, self._faultable(pos, total))
        except BaseException:
            self._tdcalls(1)  # the 2 MiB ACCEPT whose exit could not be served
            self._count_giant(pos, pos + 1, last)
            raise
        full, part = divmod(mapped, _CHUNK)
        # per whole chunk: 2M exit + 2M retry, 512 successful 4K, 511 4K exits
        self._tdcalls(full * (2 + _CHUNK + _CHUNK - 1))
        if part:
            self._tdcalls(2 + part + part - 1)
        out = self.tdx.module.page_accept(self._td(), pos, 0, mapped)
        assert out.status == st.TDX_SUCCESS, "pages KVM just AUGed are PENDING"
        self._accepted(pos, mapped)
        if mapped == total:
            self._count_giant(pos, pos + total, last)
            return True, pos + total
        # the page KVM could not fault: a 4K ACCEPT (or, at a chunk start, the 2M one) exits
        self.progress = mapped
        self._tdcalls(1)
        self._count_giant(pos, pos + mapped + 1, last)
        self.tdx.handle_accept_violation(self.cpu, pos + mapped, 1)
        raise AssertionError("a fault that failed once succeeded when retried")  # pragma: no cover

    def accept_memory_stepwise(self, start: int, end: int) -> bool:
        """Linux's ``tdx_accept_memory`` instruction by instruction (the reference for
        :meth:`accept_memory`)."""
        with self.vm.host.operation():
            return self._accept_memory_stepwise(start, end)

    def _accept_memory_stepwise(self, start: int, end: int) -> bool:
        start, end = cabi.index(start, "start"), cabi.index(end, "end")
        self._run()

        def try_accept_one(pos: int, length: int, level: int) -> int:
            size = PAGE_SIZE << (9 * _LEVELS[level])
            if pos % size or length < size:
                return 0
            return 0 if self._accept_one(pos, level) else size

        while start < end:
            self.position = start
            size = (
                try_accept_one(start, end - start, uapi.PG_LEVEL_1G)
                or try_accept_one(start, end - start, uapi.PG_LEVEL_2M)
                or try_accept_one(start, end - start, uapi.PG_LEVEL_4K)
            )
            if not size:
                return False
            start += size
        return True

    # --- TDG.VP.VMCALL ----------------------------------------------------------------------------
    def tdvmcall(self, leaf: int, *args: int) -> int:
        """TDG.VP.VMCALL with R10 = 0, R11 = *leaf*, R12... = *args*; returns R10."""
        with self.vm.host.operation():
            return self._tdvmcall(leaf, *args)

    def _tdvmcall(self, leaf: int, *args: int) -> int:
        self._run()
        return int(self.vcpu.hypercall(abi.EXIT_REASON_TDCALL, leaf, *args))

    def kvm_hypercall(self, nr: int, *args: int) -> int:
        """TDG.VP.VMCALL with R10 = *nr*: a KVM hypercall (``tdx_emulate_vmcall``)."""
        return int(self.vcpu.hypercall(nr, *args))

    def map_gpa(self, gpa: int, size: int) -> int:
        """One TDG.VP.VMCALL<MapGPA>: ``[gpa, gpa + size)`` becomes private (shared bit
        clear) or shared (set).  Returns R10; R11 (:attr:`r11`) says where to resume after
        ``TDVMCALL_STATUS_RETRY`` or what failed."""
        return self.tdvmcall(abi.TDVMCALL_MAP_GPA, gpa, size)

    def map_gpa_range(
        self,
        start: int,
        end: int,
        *,
        private: bool,
        handle: Callable[[HypercallExit], int] | None = None,
        run: Callable[[Callable[[], int]], int] | None = None,
    ) -> bool:
        """Linux's ``tdx_map_gpa``: MapGPA with the shared bit for shared memory, resumed
        from R11 on RETRY (at most 3 times without progress); *handle* answers each
        ``KVM_EXIT_HYPERCALL`` as the VMM (it returns ``run->hypercall.ret``), or *run*
        runs each TDG.VP.VMCALL to the R10 the TD gets (a VMM loop that re-enters the vCPU
        with :meth:`resume`, such as ``GuestVm.run``)."""
        if run is None:
            if handle is None:
                raise TypeError("map_gpa_range needs the VMM: handle= or run=")
            run = functools.partial(self.serve, handle=handle)
        if not private:
            start |= self.shared_bit
            end |= self.shared_bit
        retries = 0
        while retries < 3:
            ret = run(functools.partial(self.map_gpa, start, end - start))
            if ret != abi.TDVMCALL_STATUS_RETRY:
                return ret == abi.TDVMCALL_STATUS_SUCCESS
            fail = self.r11
            if fail < start or fail >= end:
                return False
            if fail == start:
                retries += 1
                continue
            start, retries = fail, 0
        return False

    def serve(self, call: Callable[[], int], handle: Callable[[HypercallExit], int]) -> int:
        """Run *call* (a TDG.VP.VMCALL of this vCPU); answer each ``KVM_EXIT_HYPERCALL``
        with *handle* (the VMM) and re-enter, until the TD gets its R10."""
        result = _attempt(call)
        while isinstance(result, HypercallExit):
            exit_ = result
            result = _attempt(functools.partial(self._answer, handle, exit_))
        return result

    def _answer(self, handle: Callable[[HypercallExit], int], exit_: HypercallExit) -> int:
        r10 = self.resume(handle(exit_))
        assert r10 is not None, "the exit was pending"
        return r10

    # --- loads and stores -------------------------------------------------------------------------
    def _split(self, gpa: int) -> tuple[int, bool]:
        return gpa & ~self.shared_bit, not gpa & self.shared_bit

    def read(self, gpa: int, length: int) -> bytes:
        """A TD load; the shared bit of *gpa* says which alias."""
        addr, private = self._split(cabi.index(gpa, "gpa"))
        data = self.vcpu.access(addr, length, private=private)
        assert data is not None
        return bytes(data)

    def write(self, gpa: int, data: bytes) -> None:
        """A TD store; the shared bit of *gpa* says which alias."""
        addr, private = self._split(cabi.index(gpa, "gpa"))
        self.vcpu.access(addr, data=data, private=private)


def _attempt(call: Callable[[], int]) -> int | HypercallExit:
    """What entering the TD for *call* ends in: R10, or the exit to userspace."""
    try:
        return call()
    except HypercallExit as exc:
        return exc
