"""``/dev/kvm`` of the model: the host process (fd table, address space, memory) and its VMs."""

from __future__ import annotations

import errno
import heapq
import itertools
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from guestmem import api, cabi, uapi
from guestmem.backend import HostView, OwnershipEvent, TraceEvent, VmView
from guestmem.errors import KvmError, ObserverError
from guestmem.hooks import ObserverFailure
from guestmem.model.events import Counters, make_event, next_seq
from guestmem.model.host import AddressSpace, HostMemory
from guestmem.model.mapping import AnonVma, ModelHostMapping
from guestmem.model.operation import Operation, uapi_call
from guestmem.model.profile import KernelProfile, get_profile
from guestmem.recording import Recorder

if TYPE_CHECKING:
    from guestmem.model.vm import ModelVm
    from guestmem.registry import Backend, Registry
    from guestmem.snapshot import HostSnapshot


def _structlog_configured() -> bool:
    """True once the application configured structlog (it cannot be, if it was never
    imported: the library then stays silent without importing it)."""
    structlog = sys.modules.get("structlog")
    return structlog is not None and bool(structlog.is_configured())


_FIRST_FD = 3


class ModelKvm(api.Kvm):
    """One host process with ``/dev/kvm`` open, modelled.

    *profile* selects the kernel modelled (default ``upstream-6.18``); *record* keeps every
    trace event in :attr:`events`.
    """

    def __init__(
        self,
        backend: Backend,
        registry: Registry,
        *,
        profile: str | KernelProfile | None = None,
        record: bool = False,
    ) -> None:
        self.backend_info = backend
        self.backend = backend.name
        self.registry = registry
        self.kvm = self  # every uAPI object of the model knows its host (operations)
        self.profile = get_profile(profile)
        self.host = HostMemory()
        self.mm = AddressSpace()
        self.vms: list[ModelVm] = []
        self.events: list[TraceEvent] | None = [] if record else None
        #: Every VM this host created, destroyed or not (their counters, for call records).
        self.all_vms: list[ModelVm] = []
        self._recorder: Recorder | None = None
        #: Host-level cost counters (direct-map changes...).
        self.counters = Counters()
        #: The host lock: every operation holds it (:mod:`guestmem.model.operation`).
        self.lock = threading.RLock()
        #: One entry per thread waiting for :attr:`lock`, and how many times a waiting
        #: thread got it.
        self.lock_waiters: list[None] = []
        self.lock_handoffs = 0
        #: Depth of the uAPI operations under way (of the thread holding :attr:`lock`), and
        #: what observers raised meanwhile.
        self.op_depth = 0
        self.observer_failures: list[ObserverFailure] = []
        #: Releases deferred to the end of the outermost operation (:meth:`fput`).
        self.task_work: list[tuple[bool, Callable[[], None]]] = []
        self.hooks = registry.hooks_for(backend, self.observer_failed)
        self._fds: dict[int, object] = {}
        # O(1) in the number of open fds: the numbers freed below the high-water mark (a
        # min-heap: the lowest comes first, as get_unused_fd_flags) and the owners by id.
        self._free_fds: list[int] = []
        self._next_fd = _FIRST_FD
        self._fd_owners: dict[int, int] = {}
        self._vm_ids = itertools.count(1)
        self._closed = False
        self.fd = self.fd_install(self)  # /dev/kvm passed as guest_memfd is not one (B-2)
        self.view = HostView(self)
        self.view.arch = self.hooks.host_init(self.view)

    def __repr__(self) -> str:
        return f"<ModelKvm backend={self.backend!r} profile={self.profile.name!r}>"

    # --- api.Kvm -------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        """The descriptor number of ``/dev/kvm`` in the model's fd table."""
        if self._closed:
            raise ValueError("I/O operation on closed /dev/kvm fd")
        return self.fd

    @property
    def backend_view(self) -> HostView:
        """:func:`guestmem.backend.view` of this host."""
        return self.view

    @uapi_call
    def close(self) -> None:
        """Close ``/dev/kvm`` (VMs and files stay alive while referenced, as in the kernel)."""
        if not self._closed:
            self.fd_remove(self.fd)
        self._closed = True

    def _check(self) -> None:
        if self._closed:
            raise KvmError(errno.EBADF, "", "/dev/kvm is closed")
        self.host.check_alive()

    @uapi_call
    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION``: *cap* is the ``long`` of
        ``kvm_vm_ioctl_check_extension_generic``."""
        cap = cabi.long(cap, "cap")
        self._check()
        return self.extension(None, cap)

    @uapi_call
    def create_vm(self, vm_type: int = uapi.KVM_X86_DEFAULT_VM) -> ModelVm:
        """``KVM_CREATE_VM`` (CAP-6: an unsupported type is EINVAL); *vm_type* is the
        ``unsigned long`` of ``kvm_dev_ioctl_create_vm``."""
        vm_type = cabi.ulong(vm_type, "vm_type")
        self._check()
        info = self.backend_info.vm_type(vm_type)
        if info is None or (self.profile.vm_types is not None and vm_type not in self.profile.vm_types):
            raise KvmError(errno.EINVAL, "CAP-6", f"VM type {vm_type} is not supported by {self.backend!r}")
        if info.type == uapi.KVM_X86_SW_PROTECTED_VM and not self.profile.tdp_mmu:
            raise KvmError(errno.EINVAL, "CAP-6", "KVM_X86_SW_PROTECTED_VM needs the TDP MMU")
        from guestmem.model.vm import ModelVm

        vm = ModelVm(self, info, next(self._vm_ids))
        self.vms.append(vm)
        self.all_vms.append(vm)
        vm.trace("vm_create", vm_type=vm_type, type_name=info.name)
        return vm

    @uapi_call
    def mmap_anonymous(self, length: int) -> ModelHostMapping:
        """Anonymous shared host memory (for ``userspace_addr``); ``mmap(2)`` needs no
        ``/dev/kvm``, so it works after :meth:`close` too.  *length* is a ``size_t``."""
        length = cabi.size_t(length, "length")
        self.host.check_alive()
        from guestmem.model.files import mmap_length

        vma = AnonVma(self, mmap_length(length))
        self.mm.insert(vma)
        return ModelHostMapping(vma)

    def snapshot(self) -> HostSnapshot:
        """The host's state as values (:class:`guestmem.snapshot.HostSnapshot`): every VM,
        mapping, descriptor and allocation, and the backend's host-wide tables."""
        from guestmem.model.snapshot import host_snapshot

        with self.operation():
            return host_snapshot(self)

    # --- capabilities (2.A) -----------------------------------------------------------------
    def attributes_built(self, vm: ModelVm | None) -> bool:
        """CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES for this kernel and architecture (A-1)."""
        if vm is None:  # the architecture has it if any of its VM types does
            arch_ok = any(t.memory_attributes for t in self.backend_info.vm_types)
        else:
            arch_ok = vm.type_info.memory_attributes
        return self.profile.memory_attributes and arch_ok

    def gmem_supported_flags(self, vm: ModelVm | None) -> int:
        """``kvm_gmem_get_supported_flags`` (CAP-2, CAP-3)."""
        flags = uapi.GUEST_MEMFD_FLAG_MMAP
        if vm is None or vm.type_info.init_shared_allowed:
            flags |= uapi.GUEST_MEMFD_FLAG_INIT_SHARED
        return flags

    def vm_types_mask(self) -> int:
        """``KVM_CAP_VM_TYPES`` bitmap (CAP-6)."""
        mask = 0
        for info in self.backend_info.vm_types:
            if self.profile.vm_types is not None and info.type not in self.profile.vm_types:
                continue
            if info.type == uapi.KVM_X86_SW_PROTECTED_VM and not self.profile.tdp_mmu:
                continue
            if 0 <= info.type < 64:
                mask |= 1 << info.type
        return mask

    def extension(self, vm: ModelVm | None, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on ``/dev/kvm`` (*vm* None) or a VM fd."""
        override = self.hooks.check_extension(self.view, None if vm is None else vm.view, cap)
        if override is not None:
            return int(override)
        if cap in (uapi.KVM_CAP_USER_MEMORY, uapi.KVM_CAP_USER_MEMORY2, uapi.KVM_CAP_MEMORY_FAULT_INFO):
            return 1  # CAP-7, CAP-8
        if cap == uapi.KVM_CAP_GUEST_MEMFD:
            return 1  # CAP-1 (6.18: every VM type)
        if cap == uapi.KVM_CAP_GUEST_MEMFD_FLAGS:
            return self.gmem_supported_flags(vm)
        if cap == uapi.KVM_CAP_MEMORY_ATTRIBUTES:
            if not self.attributes_built(vm):
                return 0
            return uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if vm is None else vm.supported_attributes()
        if cap == uapi.KVM_CAP_VM_TYPES:
            return self.vm_types_mask()
        if cap == uapi.KVM_CAP_PRE_FAULT_MEMORY:
            return int(self.profile.tdp_mmu)
        if cap == uapi.KVM_CAP_NR_MEMSLOTS:
            return uapi.KVM_USER_MEM_SLOTS
        if cap == uapi.KVM_CAP_MULTI_ADDRESS_SPACE:
            if not self.profile.smm:  # KVM_MAX_NR_ADDRESS_SPACES == 1: the cap is not built
                return 0
            return 2 if vm is None else vm.type_info.nr_memslot_as_ids
        if cap == uapi.KVM_CAP_READONLY_MEM:
            return 1 if vm is None else int(vm.type_info.readonly_mem)
        if cap == uapi.KVM_CAP_EXIT_HYPERCALL:
            return uapi.KVM_EXIT_HYPERCALL_VALID_MASK
        return 0

    # --- the process: fds, mm, trace -------------------------------------------------------
    def fd_install(self, obj: object) -> int:
        """Give *obj* the lowest free descriptor number (``get_unused_fd_flags``)."""
        if self._free_fds:
            fd = heapq.heappop(self._free_fds)
        else:
            fd = self._next_fd
            self._next_fd += 1
        self._fds[fd] = obj
        self._fd_owners[id(obj)] = self._fd_owners.get(id(obj), 0) + 1
        return fd

    def fd_remove(self, fd: int) -> None:
        """close(fd)."""
        obj = self._fds.pop(fd, None)
        if obj is None:
            return
        heapq.heappush(self._free_fds, fd)
        left = self._fd_owners.pop(id(obj)) - 1
        if left:
            self._fd_owners[id(obj)] = left

    def fd_table(self) -> dict[int, object]:
        """The open files by descriptor number (a copy)."""
        return dict(self._fds)

    def fd_lookup(self, fd: int) -> object | None:
        """``fget``: the open file behind *fd* (0-2 are the process's stdio), or None."""
        if fd in (0, 1, 2):
            return f"stdio:{fd}"
        return self._fds.get(fd)

    def owns(self, obj: object) -> bool:
        """True iff *obj* has a descriptor in this process's fd table."""
        return id(obj) in self._fd_owners

    def mmu_notifier_invalidate(self, address: int, length: int) -> None:
        """``mmu_notifier_invalidate_range``: zap guest mappings of host ``[address, +length)``."""
        for vm in list(self.vms):
            if not vm.destroyed:
                vm.mmu_notifier_invalidate_range(address, address + length)

    def vm_destroyed(self, vm: ModelVm) -> None:
        """Forget *vm* once its last reference is gone."""
        if vm in self.vms:
            self.vms.remove(vm)

    # --- events, observers, the host kernel -------------------------------------------------
    @property
    def tracing(self) -> bool:
        """Somebody listens to trace events: an observer or the policy, a recording, a
        configured structlog."""
        return self.events is not None or self.hooks.implemented("trace") or _structlog_configured()

    def trace(self, vm: ModelVm | None, kind: str, fields: dict[str, Any]) -> None:
        """Emit a trace event: recorded, logged (structlog, once configured), observed."""
        if not self.tracing:
            return
        event = make_event(kind, None if vm is None else vm.vm_id, fields)
        if self.events is not None:
            self.events.append(event)
        if _structlog_configured():  # unconfigured: the library stays silent
            sys.modules["structlog"].get_logger("guestmem").debug(event.kind, vm=event.vm, **event.fields)
        self.hooks.trace(self.view, None if vm is None else vm.view, event)

    def warn(self, logger: str, event: str, fields: dict[str, Any]) -> None:
        """The kernel's ``pr_warn``: logged on *logger* once the application configured
        structlog; silent otherwise (without importing it), as the trace events are."""
        if _structlog_configured():
            sys.modules["structlog"].get_logger(logger).warning(event, **fields)

    # --- recording uAPI calls (guestmem.recording) ----------------------------------------------
    def counter_totals(self) -> dict[str, int]:
        """Host counters plus every VM's, summed by name."""
        total: dict[str, int] = dict(self.counters)
        for vm in self.all_vms:
            for name, value in vm.counters.items():
                total[name] = total.get(name, 0) + value
        return total

    def call_started(self) -> tuple[int, list[tuple[dict[str, int], dict[str, int]]]]:
        """What a recorded call needs from its start: the next seq and a copy of every
        counter table (the host's and each VM's)."""
        tables: list[dict[str, int]] = [self.counters, *(vm.counters for vm in self.all_vms)]
        return next_seq(), [(table, dict(table)) for table in tables]

    def call_finished(
        self,
        started: tuple[int, list[tuple[dict[str, int], dict[str, int]]]],
        owner: object,
        method: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        result: Any,
        error: BaseException | None,
    ) -> None:
        """Emit the ``uapi`` event of a call of the uAPI face (``uapi_call``), with the
        counters it moved, summed by name over the host and its VMs."""
        if self._recorder is None:
            self._recorder = Recorder()
            self._recorder.handle(self)
        first, tables = started
        fields = self._recorder.fields(owner, method, args, kwargs, first, result=result, error=error)
        delta: dict[str, int] = {}
        for table, before in tables:
            if table != before:  # most calls move one table, or none
                for k, v in table.items():
                    moved = v - before.get(k, 0)
                    if moved:
                        delta[k] = delta.get(k, 0) + moved
        if len(tables) != len(self.all_vms) + 1:  # VMs the call created: all they counted
            seen = {id(table) for table, _ in tables}
            for vm in self.all_vms:
                if id(vm.counters) not in seen:
                    for k, v in vm.counters.items():
                        delta[k] = delta.get(k, 0) + v
        delta = {k: v for k, v in delta.items() if v}
        if delta:
            fields["counters"] = delta
        self.trace(_vm_of(owner), "uapi", fields)

    def ownership_update(self, vm: VmView | None, event: OwnershipEvent) -> None:
        """Fan a backend's ownership-table change out to observers (and the trace)."""
        self.hooks.ownership_update(self.view, vm, event)
        if self.tracing:
            fields = {
                "table": event.table,
                "pfn": event.pfn,
                "npages": event.npages,
                "old_owner": event.old_owner.value,
                "new_owner": event.new_owner.value,
            }
            self.trace(None if vm is None else vm._vm, "ownership_update", fields)

    def fput(self, release: Callable[[], None], *, held: bool = False) -> None:
        """The last reference to a file went: run its *release* (``__fput``), at the end of
        the operation under way if there is one.

        ``fput`` defers ``__fput`` to ``task_work``, which runs on the way back to userspace
        and, inside ``KVM_RUN``, before the guest is entered again
        (``xfer_to_guest_mode_handle_work``).  So a file closed in the middle of a system
        call (by a hook calling ``close()``) is released once the call is done with it.
        *held* is for the descriptor the call itself works on (the VM and vCPU fds a
        ``close()`` drops): ``fdget`` holds it until ``fdput`` at the end of the call, so
        ``KVM_RUN`` never loses its vCPU or VM (``kvm_get_kvm``/``kvm_put_kvm``).
        """
        if self.op_depth:
            self.task_work.append((held, release))
        else:
            release()

    def run_task_work(self, *, guest_entry: bool = False) -> bool:
        """Run the releases deferred by :meth:`fput`, in order; at a *guest_entry* (the
        ``KVM_RUN`` loop) only those no operation holds.  Returns True if one ran.

        Each runs even if one before it raised (the kernel always finishes ``__fput``); the
        first exception is raised at the end.  Releases that close more files defer them to
        this same loop.
        """
        failed: BaseException | None = None
        ran = False
        work = self.task_work
        self.op_depth += 1
        try:
            i = 0
            while i < len(work):
                held, release = work[i]
                if guest_entry and held:
                    i += 1
                    continue
                del work[i]
                ran = True
                try:
                    release()
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    failed = failed or exc
        finally:
            self.op_depth -= 1
        if failed is not None:
            raise failed
        return ran

    def operation(self) -> Operation:
        """One operation (see :mod:`guestmem.model.operation`), for the views' entry points."""
        return Operation(self)

    def operation_done(self, operation: str) -> None:
        """The outermost operation ended: the deferred releases (:meth:`fput`),
        ``guestmem_operation_done``, then what observers raised meanwhile."""
        try:
            if self.task_work:
                self.run_task_work()
        finally:
            if self.hooks.implemented("operation_done"):
                self.hooks.operation_done(self.view, operation)
            if self.observer_failures:
                self.report_observer_failures()

    def observer_failed(self, failure: ObserverFailure) -> None:
        """Keep *failure* until the operation ends; outside any operation, report it now."""
        self.observer_failures.append(failure)
        if not self.op_depth:
            self.report_observer_failures()

    def report_observer_failures(self) -> None:
        """Raise what observers raised during the operation that just ended.

        An :class:`~guestmem.invariants.InvariantViolation` is raised as itself (with a
        note naming the observer); anything else as :class:`ObserverError`.
        """
        from guestmem.invariants import InvariantViolation

        failures, self.observer_failures[:] = list(self.observer_failures), []
        first = failures[0]
        more = f" (and {len(failures) - 1} more observer failure(s))" if len(failures) > 1 else ""
        if isinstance(first.error, InvariantViolation):
            first.error.add_note(f"reported by observer {first.plugin} in guestmem_{first.hook}{more}")
            raise first.error
        err = ObserverError(first.plugin, first.distribution, f"guestmem_{first.hook}", first.error)
        if more:
            err.add_note(more.strip(" ()"))
        raise err from first.error

    def kernel_access(self, pfn: int, offset: int, data: bytes) -> None:
        """A host kernel store through the direct map (:meth:`HostView.kernel_write`)."""
        self.host.check_alive()
        if self.host.direct_map_invalid.get(pfn) is not None:
            self.trace(None, "host_kernel_fault", {"pfn": pfn})
            self.host.crash(f"kernel page fault: pfn {pfn:#x} is not in the host's direct map")
        verdict = self.hooks.host_access(self.view, pfn, True, None, offset, len(data))
        if verdict is not None:
            self.trace(None, "host_crash", {"pfn": pfn, "verdict": verdict})
            self.host.crash(verdict)
        self.host.write(pfn, offset, data)


def _vm_of(obj: object) -> ModelVm | None:
    """The VM a uAPI object belongs to (a mapping or ``/dev/kvm`` belongs to none)."""
    vm = getattr(obj, "vm", None)  # a vCPU's; a VM is its own (below)
    if vm is None:
        file = getattr(obj, "file", None)  # a guest_memfd's
        vm = getattr(file, "vm", None)
    if vm is None and hasattr(obj, "vm_id"):
        vm = obj
    return cast("ModelVm | None", vm)
