"""Calling one backend's hooks: its policy first and alone answering, then the observers.

:class:`Hooks` is a typed facade over the plugin manager (as tox has one), one method per
hook of :mod:`guestmem.hookspecs` (:data:`HOOK_NAMES` is tied to the spec module by a
test).  For each hook it keeps the backend's own implementation and the observers'
(every registered plugin that is no backend's policy), re-derived when plugins come or
go, so a VM reaches nothing of another backend.  A hook nobody implements costs one
dictionary lookup.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from guestmem import hookspecs
from guestmem.backend import (
    Fault,
    GfnRange,
    GmemView,
    HostFault,
    HostView,
    Leaf,
    OwnershipEvent,
    SlotView,
    TraceEvent,
    VcpuView,
    VmView,
)
from guestmem.cabi import ArgumentTypeError
from guestmem.errors import BackendError, GuestExit, HostCrash
from guestmem.uapi import PAGE_SIZE

if TYPE_CHECKING:
    from guestmem.registry import Registry

#: Hooks a plugin implements for itself, never on a policy: called by the registry and the
#: tools, not by hosts and VMs.
PLUGIN_HOOK_NAMES: tuple[str, ...] = ("register_backends", "conformance_options")

#: Every hook a host or VM calls (all of hookspecs.py but the plugin hooks), in spec order.
HOOK_NAMES: tuple[str, ...] = (
    "host_init",
    "vm_init",
    "vm_pre_destroy",
    "vm_destroy",
    "vcpu_init",
    "vcpu_destroy",
    "check_extension",
    "vm_ioctl",
    "vcpu_ioctl",
    "vcpu_pre_run",
    "prepare_memory_region",
    "gmem_bind",
    "gmem_unbind",
    "gmem_prepare",
    "gmem_invalidate",
    "max_mapping_level",
    "fault",
    "set_external_spte",
    "remove_external_spte",
    "unmap_gfn_range",
    "pre_set_memory_attributes",
    "post_set_memory_attributes",
    "gmem_fault_user_mapping",
    "host_access",
    "guest_access",
    "hypercall",
    "post_populate",
    "snapshot",
    "ownership_update",
    "trace",
    "operation_done",
)

#: Exceptions a backend raises on purpose: the kernel's outcomes, passed through as they are.
_OUTCOMES = (OSError, GuestExit, HostCrash, BackendError, ArgumentTypeError)


def _spec_args(name: str) -> tuple[str, ...]:
    return tuple(inspect.signature(getattr(hookspecs, f"guestmem_{name}")).parameters)


_SPEC_ARGS: dict[str, tuple[str, ...]] = {name: _spec_args(name) for name in HOOK_NAMES}


@attrs.frozen
class Impl:
    """One plugin's implementation of one hook, ready to call positionally."""

    plugin: str
    distribution: str
    function: Callable[..., Any]
    #: Positions, in the spec's argument order, of the arguments the function takes.
    picks: tuple[int, ...]

    def __call__(self, args: Sequence[Any]) -> Any:
        return self.function(*[args[i] for i in self.picks])


@attrs.frozen
class ObserverFailure:
    """An observer raised: *error* from *plugin* (of *distribution*) in hook *hook*."""

    plugin: str
    distribution: str
    hook: str
    error: Exception


class Hooks:
    """The hook callers of one backend (or of none: observers only).

    *on_observer_error* receives each :class:`ObserverFailure`; the core reports them when
    the operation that caused them has finished.
    """

    def __init__(
        self,
        registry: Registry,
        backend_name: str | None,
        on_observer_error: Callable[[ObserverFailure], None],
    ) -> None:
        self._registry = registry
        self._backend_name = backend_name
        self._on_observer_error = on_observer_error
        self._revision = -1
        self._table: dict[str, tuple[Impl | None, tuple[Impl, ...]]] = {}

    # --- dispatch --------------------------------------------------------------------------
    def _refresh(self) -> None:
        registry = self._registry
        with registry.lock:  # plugins added or removed by another thread wait for the table
            revision = registry.revision
            policy, policy_dist, observers = registry.dispatch_plugins(self._backend_name)
            table: dict[str, tuple[Impl | None, tuple[Impl, ...]]] = {}
            for name in HOOK_NAMES:
                mine: Impl | None = None
                theirs: list[Impl] = []
                spec = _SPEC_ARGS[name]
                for impl in reversed(getattr(registry.pm.hook, f"guestmem_{name}").get_hookimpls()):
                    picks = tuple(spec.index(arg) for arg in impl.argnames)
                    if policy is not None and impl.plugin is policy:
                        mine = Impl(f"backend {self._backend_name!r}", policy_dist, impl.function, picks)
                    elif id(impl.plugin) in observers:
                        plugin_name, dist = observers[id(impl.plugin)]
                        theirs.append(Impl(plugin_name, dist, impl.function, picks))
                if mine is not None or theirs:
                    table[name] = (mine, tuple(theirs))  # absent: nobody implements it
        self._table = table
        self._revision = revision

    def _entry(self, name: str) -> tuple[Impl | None, tuple[Impl, ...]] | None:
        if self._revision != self._registry.revision:
            self._refresh()
        return self._table.get(name)

    def implemented(self, name: str) -> bool:
        """True iff the policy or an observer implements hook *name*."""
        return self._entry(name) is not None

    def policy_implements(self, name: str) -> bool:
        """True iff the backend's own policy implements hook *name*."""
        entry = self._entry(name)
        return entry is not None and entry[0] is not None

    def _call(self, name: str, args: tuple[Any, ...]) -> Any:
        if self._revision != self._registry.revision:
            self._refresh()
        entry = self._table.get(name)
        if entry is None:
            return None
        policy, observers = entry
        result = None
        if policy is not None:
            try:
                result = policy(args)
            except _OUTCOMES:
                raise
            except Exception as exc:
                raise BackendError(policy.plugin, policy.distribution, f"guestmem_{name}", exc) from exc
        for observer in observers:
            try:
                observer(args)
            except Exception as exc:  # noqa: BLE001 - reported after the operation, never mid-way
                self._on_observer_error(ObserverFailure(observer.plugin, observer.distribution, name, exc))
        return result

    # --- the hooks, typed --------------------------------------------------------------------
    def host_init(self, host: HostView) -> Any:
        """``guestmem_host_init``."""
        return self._call("host_init", (host,))

    def vm_init(self, vm: VmView) -> Any:
        """``guestmem_vm_init``."""
        return self._call("vm_init", (vm,))

    def vm_pre_destroy(self, vm: VmView) -> None:
        """``guestmem_vm_pre_destroy``."""
        self._call("vm_pre_destroy", (vm,))

    def vm_destroy(self, vm: VmView) -> None:
        """``guestmem_vm_destroy``."""
        self._call("vm_destroy", (vm,))

    def vcpu_init(self, vcpu: VcpuView) -> Any:
        """``guestmem_vcpu_init``."""
        return self._call("vcpu_init", (vcpu,))

    def vcpu_destroy(self, vcpu: VcpuView) -> None:
        """``guestmem_vcpu_destroy``."""
        self._call("vcpu_destroy", (vcpu,))

    def check_extension(self, host: HostView, vm: VmView | None, cap: int) -> int | None:
        """``guestmem_check_extension``."""
        result = self._call("check_extension", (host, vm, cap))
        return None if result is None else int(result)

    def vm_ioctl(self, vm: VmView, request: int, arg: Any) -> int | None:
        """``guestmem_vm_ioctl``."""
        result = self._call("vm_ioctl", (vm, request, arg))
        return None if result is None else int(result)

    def vcpu_ioctl(self, vcpu: VcpuView, request: int, arg: Any) -> int | None:
        """``guestmem_vcpu_ioctl``."""
        result = self._call("vcpu_ioctl", (vcpu, request, arg))
        return None if result is None else int(result)

    def vcpu_pre_run(self, vcpu: VcpuView) -> None:
        """``guestmem_vcpu_pre_run``."""
        self._call("vcpu_pre_run", (vcpu,))

    def prepare_memory_region(
        self, vm: VmView, old: SlotView | None, new: SlotView | None, change: str
    ) -> None:
        """``guestmem_prepare_memory_region``."""
        self._call("prepare_memory_region", (vm, old, new, change))

    def gmem_bind(self, vm: VmView, slot: SlotView, gmem: GmemView, pgoff: int, npages: int) -> None:
        """``guestmem_gmem_bind``."""
        self._call("gmem_bind", (vm, slot, gmem, pgoff, npages))

    def gmem_unbind(self, vm: VmView, slot: SlotView, gmem: GmemView) -> None:
        """``guestmem_gmem_unbind``."""
        self._call("gmem_unbind", (vm, slot, gmem))

    def gmem_prepare(self, vm: VmView, gfn: int, pfn: int, order: int, npages: int) -> None:
        """``guestmem_gmem_prepare``."""
        self._call("gmem_prepare", (vm, gfn, pfn, order, npages))

    def gmem_invalidate(self, vm: VmView, start_pfn: int, end_pfn: int) -> None:
        """``guestmem_gmem_invalidate``."""
        self._call("gmem_invalidate", (vm, start_pfn, end_pfn))

    def max_mapping_level(self, vm: VmView, pfn: int, is_private: bool) -> int | None:
        """``guestmem_max_mapping_level``."""
        result = self._call("max_mapping_level", (vm, pfn, is_private))
        return None if result is None else int(result)

    def fault(self, vm: VmView, fault: Fault) -> None:
        """``guestmem_fault``."""
        self._call("fault", (vm, fault))

    def set_external_spte(self, vm: VmView, leaf: Leaf) -> None:
        """``guestmem_set_external_spte``."""
        self._call("set_external_spte", (vm, leaf))

    def remove_external_spte(self, vm: VmView, leaf: Leaf) -> None:
        """``guestmem_remove_external_spte``."""
        self._call("remove_external_spte", (vm, leaf))

    def unmap_gfn_range(self, vm: VmView, range: GfnRange) -> bool:  # noqa: A002
        """``guestmem_unmap_gfn_range``; True if the backend needs a TLB flush."""
        return bool(self._call("unmap_gfn_range", (vm, range)))

    def pre_set_memory_attributes(self, vm: VmView, range: GfnRange) -> bool:  # noqa: A002
        """``guestmem_pre_set_memory_attributes``; True if a flush is needed."""
        return bool(self._call("pre_set_memory_attributes", (vm, range)))

    def post_set_memory_attributes(self, vm: VmView, range: GfnRange) -> None:  # noqa: A002
        """``guestmem_post_set_memory_attributes``."""
        self._call("post_set_memory_attributes", (vm, range))

    def gmem_fault_user_mapping(self, vm: VmView, gmem: GmemView, index: int) -> HostFault | None:
        """``guestmem_gmem_fault_user_mapping``."""
        result = self._call("gmem_fault_user_mapping", (vm, gmem, index))
        if result is None or isinstance(result, HostFault):
            return result
        raise BackendError(
            f"backend {self._backend_name!r}",
            "",
            "guestmem_gmem_fault_user_mapping",
            TypeError(f"returned {result!r}, not a HostFault or None"),
        )

    def host_access(
        self,
        host: HostView,
        pfn: int,
        write: bool,
        address: int | None,
        offset: int = 0,
        length: int = PAGE_SIZE,
    ) -> str | None:
        """``guestmem_host_access``."""
        result = self._call("host_access", (host, pfn, write, address, offset, length))
        return None if result is None else str(result)

    def guest_access(
        self, vcpu: VcpuView, gfn: int, pfn: int, write: bool, private: bool, offset: int, length: int
    ) -> None:
        """``guestmem_guest_access``."""
        self._call("guest_access", (vcpu, gfn, pfn, write, private, offset, length))

    def hypercall(self, vcpu: VcpuView, nr: int, args: tuple[int, ...]) -> int | None:
        """``guestmem_hypercall``."""
        result = self._call("hypercall", (vcpu, nr, args))
        return None if result is None else int(result)

    def post_populate(
        self, vm: VmView, gfn: int, pfn: int, src: bytes | None, order: int, opaque: Any
    ) -> int | None:
        """``guestmem_post_populate``."""
        result = self._call("post_populate", (vm, gfn, pfn, src, order, opaque))
        return None if result is None else int(result)

    def snapshot(self, host: HostView, vm: VmView | None) -> Any:
        """``guestmem_snapshot``."""
        return self._call("snapshot", (host, vm))

    def ownership_update(self, host: HostView, vm: VmView | None, event: OwnershipEvent) -> None:
        """``guestmem_ownership_update``."""
        self._call("ownership_update", (host, vm, event))

    def trace(self, host: HostView, vm: VmView | None, event: TraceEvent) -> None:
        """``guestmem_trace``."""
        self._call("trace", (host, vm, event))

    def operation_done(self, host: HostView, operation: str) -> None:
        """``guestmem_operation_done``."""
        self._call("operation_done", (host, operation))
