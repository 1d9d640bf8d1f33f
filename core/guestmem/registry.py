"""The backend registry: plugin discovery, validation and per-VM hook callers.

Plugins come from the ``guestmem`` entry-point group plus the built-in ``sw`` backend.
Loading is lazy and idempotent.  ``GUESTMEM_DISABLE_PLUGINS`` (comma-separated entry-point
or distribution names) keeps installed plugins out, like tox's plugin block list.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from guestmem import hookspecs
from guestmem.errors import PluginError

if TYPE_CHECKING:
    from guestmem.api import Kvm

ENTRY_POINT_GROUP = "guestmem"
_DISABLE_ENV = "GUESTMEM_DISABLE_PLUGINS"
BUILTIN_DISTRIBUTION = "guestmem"


@attrs.frozen
class VmTypeInfo:
    """What the core needs to know about one VM type a backend offers.

    The flags mirror the kernel's per-VM predicates (spec CAP-3..CAP-6, S-4, S-7, PF-2).
    """

    type: int
    name: str
    has_private_mem: bool = False
    #: ``kvm_arch_supports_gmem_init_shared`` (x86: ``not has_private_mem``).
    supports_init_shared: bool | None = None
    #: ``kvm_arch_has_readonly_mem`` (x86: ``not has_protected_state``).
    readonly_mem: bool = True
    #: ``KVM_PRE_FAULT_MEMORY`` allowed (SNP: never).
    pre_fault_allowed: bool = True
    #: ``kvm_arch_nr_memslot_as_ids`` (x86: 2 with SMM, 1 for private-mem VMs).
    nr_memslot_as_ids: int = 2
    #: Folio order of this VM type's gmem files (0 in 6.18; 9 models hugepage gmem).
    gmem_folio_order: int = 0
    #: arm64 ``kvm_arch_prepare_memory_region``: GUEST_MEMFD slots must be gmem-only (S-16).
    gmem_slot_requires_mmap: bool = False
    #: ``KVM_CAP_MEMORY_ATTRIBUTES`` exists on this architecture (x86 only in 6.18).
    memory_attributes: bool = True

    @property
    def init_shared_allowed(self) -> bool:
        """Resolved ``kvm_arch_supports_gmem_init_shared``."""
        if self.supports_init_shared is None:
            return not self.has_private_mem
        return self.supports_init_shared


def _as_tuple(types: Iterable[VmTypeInfo]) -> tuple[VmTypeInfo, ...]:
    return tuple(types)


@attrs.frozen
class Backend:
    """A backend, as a plugin registers it.

    ``policy`` is the object carrying the arch policy hookimpls; it is registered with the
    plugin manager and reached only by VMs of this backend.  ``opener`` builds the
    :class:`guestmem.api.Kvm` for :func:`guestmem.open`; ``None`` means the core model,
    driven by ``policy``.
    """

    name: str
    summary: str
    vm_types: tuple[VmTypeInfo, ...] = attrs.field(converter=_as_tuple)
    policy: object | None = None
    opener: Callable[..., Kvm] | None = None
    #: Filled in by the registry.
    distribution: str = ""
    version: str = ""

    def vm_type(self, vm_type: int) -> VmTypeInfo | None:
        """The info of *vm_type*, or None if the backend does not offer it."""
        for info in self.vm_types:
            if info.type == vm_type:
                return info
        return None


class Registry:
    """The plugin manager and the table of backends."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._load_entry_points = load_entry_points
        self._backends: dict[str, Backend] | None = None
        self._lock = threading.RLock()
        self._dists: dict[int, tuple[str, str]] = {}
        #: Bumped whenever plugins are added or removed at run time (VmHooks re-derive then).
        self.revision = 0
        #: id(plugin) -> the policies of the backends it registered in the last collection.
        self._owned: dict[int, list[object]] = {}

    # --- plugin loading ------------------------------------------------------------------
    def _load(self) -> None:
        from guestmem import sw

        self._register(sw, "guestmem.sw", (BUILTIN_DISTRIBUTION, _core_version()))
        if not self._load_entry_points:
            return
        blocked = {n.strip() for n in os.environ.get(_DISABLE_ENV, "").split(",") if n.strip()}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist
            dist_name = dist.name if dist is not None else "<unknown>"
            if ep.name in blocked or dist_name in blocked:
                continue
            if self.pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin {ep.name!r} from distribution {dist_name!r} failed to import: {exc}"
                ) from exc
            self._register(plugin, ep.name, (dist_name, dist.version if dist else ""))

    def _register(self, plugin: object, name: str, dist: tuple[str, str]) -> None:
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.pm.is_registered(plugin):  # pluggy >= 1.7 refuses bad signatures in register()
                self.pm.unregister(plugin)
            raise PluginError(f"plugin {name!r} from distribution {dist[0]!r} is invalid: {exc}") from exc
        self._dists[id(plugin)] = dist

    def _collect(self) -> dict[str, Backend]:
        backends: dict[str, Backend] = {}
        owners: dict[str, object] = {}
        caller = self.pm.hook.guestmem_register_backends
        for impl in caller.get_hookimpls():
            dist_name, version = self._dists.get(id(impl.plugin), ("<unregistered>", ""))

            def register(
                backend: Backend, _dist: str = dist_name, _ver: str = version, _owner: object = impl.plugin
            ) -> None:
                if not isinstance(backend, Backend):
                    raise PluginError(
                        f"distribution {_dist!r} registered {backend!r}, which is not a guestmem.Backend"
                    )
                if backend.name in backends:
                    other = backends[backend.name].distribution
                    raise PluginError(f"backend {backend.name!r} registered by both {other!r} and {_dist!r}")
                if backend.policy is None and backend.opener is None:
                    raise PluginError(
                        f"backend {backend.name!r} of {_dist!r} has neither a policy nor an opener"
                    )
                backends[backend.name] = attrs.evolve(
                    backend, distribution=_dist, version=backend.version or _ver
                )
                owners[backend.name] = _owner

            impl.function(register=register)
        owned: dict[int, list[object]] = {}
        for backend in backends.values():
            if backend.policy is not None:
                owned.setdefault(id(owners[backend.name]), []).append(backend.policy)
        # A plugin may hand out a new policy object per collection: the old one must not stay
        # registered, where it would act as an observer of every VM.
        keep = {id(p) for policies in owned.values() for p in policies}
        for policies in self._owned.values():
            for stale in policies:
                if id(stale) not in keep and self.pm.is_registered(stale):
                    self.pm.unregister(stale)
        self._owned = owned
        for backend in backends.values():
            policy = backend.policy
            if policy is not None and not self.pm.is_registered(policy):
                pname = f"guestmem.backend.{backend.name}"
                try:
                    self.pm.register(policy, name=pname)
                    self.pm.check_pending()
                except pluggy.PluginValidationError as exc:
                    if self.pm.is_registered(policy):
                        self.pm.unregister(policy)
                    raise PluginError(
                        f"policy of backend {backend.name!r} from distribution "
                        f"{backend.distribution!r} is invalid: {exc}"
                    ) from exc
        return backends

    def backends(self) -> dict[str, Backend]:
        """All registered backends by name (loads plugins on first use)."""
        with self._lock:
            if self._backends is None:
                if not self._dists:
                    self._load()
                self._backends = self._collect()
            return self._backends

    def backend(self, name: str) -> Backend:
        """The backend called *name*; ``LookupError`` listing the known ones otherwise."""
        table = self.backends()
        try:
            return table[name]
        except KeyError:
            known = ", ".join(sorted(table)) or "none"
            raise LookupError(f"no guestmem backend named {name!r} (installed: {known})") from None

    # --- throwaway plugins (tests, notebooks) -----------------------------------------------
    def add_plugin(self, plugin: object, *, name: str | None = None, distribution: str = "<local>") -> None:
        """Register *plugin* at run time (a backend or an observer) and refresh the table.

        The plugin and the policies of the backends it registers are validated at once: a
        :class:`PluginError` (naming *distribution*) leaves the registry as it was.
        """
        with self._lock:
            self.backends()
            self._register(plugin, name or f"local.{id(plugin):x}", (distribution, ""))
            self._backends = None
            self.revision += 1
            try:
                self.backends()
            except PluginError:
                self.remove_plugin(plugin)
                raise

    def remove_plugin(self, plugin: object) -> None:
        """Undo :meth:`add_plugin`: *plugin* and the policies of the backends it registers."""
        with self._lock:
            owned = {id(plugin)} | {id(p) for p in self._owned.pop(id(plugin), [])}
            self._dists.pop(id(plugin), None)
            for p in list(self.pm.get_plugins()):
                if id(p) in owned and self.pm.is_registered(p):
                    self.pm.unregister(p)
            self._backends = None
            self.revision += 1

    # --- per-VM hook callers ----------------------------------------------------------------
    def policies(self) -> set[object]:
        """Every backend policy object (what a VM's hooks exclude, but for its own)."""
        return {b.policy for b in self.backends().values() if b.policy is not None}

    def hooks_for(self, backend: Backend) -> VmHooks:
        """Hook callers that reach *backend*'s policy and the observers, nothing else."""
        return VmHooks(self, backend.policy)


class VmHooks:
    """A typed facade over the subset hook callers of one backend (see tox's manager).

    Each attribute calls the hook of the same name (without the ``guestmem_`` prefix)
    on the backend's own policy and every observer.  The set of other backends' policies
    to leave out is re-derived when plugins are added or removed, so a backend that
    appears later never reaches VMs of this one.
    """

    def __init__(self, registry: Registry, policy: object | None) -> None:
        self._registry = registry
        self._policy = policy
        self._revision = -1
        self._callers: dict[str, Any] = {}

    def _refresh(self) -> None:
        registry = self._registry
        remove = list(registry.policies() - {self._policy})
        pm = registry.pm
        self._callers = {
            name: pm.subset_hook_caller(f"guestmem_{name}", remove)
            if remove
            else getattr(pm.hook, f"guestmem_{name}")
            for name in _HOOK_NAMES
        }
        self._revision = registry.revision

    def __getattr__(self, name: str) -> Any:
        if name not in _HOOK_SET:
            raise AttributeError(name)
        if self._revision != self._registry.revision:
            self._refresh()
        return self._callers[name]

    vm_init: Any
    vm_destroy: Any
    check_extension: Any
    gmem_prepare: Any
    gmem_invalidate: Any
    max_mapping_level: Any
    unmap_gfn_range: Any
    fault: Any
    pre_set_memory_attributes: Any
    post_set_memory_attributes: Any
    host_mappable: Any
    host_access: Any
    post_populate: Any
    hypercall: Any
    ownership_update: Any
    trace: Any


_HOOK_NAMES = (
    "vm_init",
    "vm_destroy",
    "check_extension",
    "gmem_prepare",
    "gmem_invalidate",
    "max_mapping_level",
    "unmap_gfn_range",
    "fault",
    "pre_set_memory_attributes",
    "post_set_memory_attributes",
    "host_mappable",
    "host_access",
    "post_populate",
    "hypercall",
    "ownership_update",
    "trace",
)
_HOOK_SET = frozenset(_HOOK_NAMES)


def _core_version() -> str:
    try:
        return importlib.metadata.version("guestmem")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


_default: Registry | None = None
_default_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Registry()
        return _default
