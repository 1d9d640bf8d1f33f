"""The backend registry: plugin discovery, validation, containment and the hook callers.

Plugins come from the ``guestmem`` entry-point group; the core declares its own ``sw``
backend there too, so the registry knows no backend by name.  Loading is lazy and
idempotent.  ``GUESTMEM_DISABLE_PLUGINS`` (comma-separated entry-point or distribution
names) keeps installed plugins out, like tox's plugin block list.

A broken installed plugin (it fails to import, a hook is misspelt or unmarked, a policy
hook sits at module level, its backend name is taken) never takes the others down: it is
left out with a :class:`guestmem.errors.PluginWarning` naming its distribution and the fix,
and listed in :attr:`Registry.broken`.  A plugin added at run time with
:meth:`Registry.add_plugin` is checked the same way but refused with a
:class:`guestmem.PluginError`, since its caller is there to hear it.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from guestmem import hookspecs
from guestmem.backend import PROJECT, Backend, VmTypeInfo
from guestmem.errors import PluginError, PluginWarning
from guestmem.hooks import HOOK_NAMES, PLUGIN_HOOK_NAMES, Hooks, ObserverFailure

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

__all__ = ["Backend", "BrokenPlugin", "Registry", "VmTypeInfo", "get_registry"]

ENTRY_POINT_GROUP = "guestmem"
DISABLE_ENV = "GUESTMEM_DISABLE_PLUGINS"
_SPEC_NAMES = frozenset(f"guestmem_{name}" for name in (*HOOK_NAMES, *PLUGIN_HOOK_NAMES))
_PLUGIN_HOOKS = frozenset(f"guestmem_{name}" for name in PLUGIN_HOOK_NAMES)
_OBSERVER_HOOKS = frozenset({"guestmem_trace", "guestmem_ownership_update", "guestmem_operation_done"})
_POLICY_HOOKS = frozenset(f"guestmem_{name}" for name in HOOK_NAMES) - _OBSERVER_HOOKS


@attrs.frozen
class BrokenPlugin:
    """An installed plugin the registry left out, and why."""

    name: str
    distribution: str
    error: str

    @property
    def hint(self) -> str:
        """What the user can do about it."""
        return f"fix or uninstall {self.distribution!r}, or set {DISABLE_ENV}={self.name}"


def _entry_points() -> Iterable[EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def _hookimpl_names(obj: object) -> list[str]:
    return [name for name in dir(obj) if name.startswith("guestmem_")]


def check_plugin(obj: object, *, policy: bool) -> None:
    """The registry's checks of a plugin (or, *policy*, a backend's policy) object.

    Catches what pluggy would silently accept: a ``guestmem_*`` function without
    ``@hookimpl`` (never called), a near-miss hook name, a hook wrapper (observers run
    after the policy, they do not wrap it), and VM policy hooks at module level of a
    plugin that registers backends (they would observe every VM of every backend).
    Raises :class:`PluginError` with the bare reason.
    """
    names = _hookimpl_names(obj)
    for name in names:
        member = getattr(obj, name, None)
        if not callable(member):
            continue
        options = getattr(member, f"{PROJECT}_impl", None)
        if options is None:
            raise PluginError(f"{name} is not marked with @hookimpl: it would never be called")
        if name not in _SPEC_NAMES:
            close = difflib.get_close_matches(name, sorted(_SPEC_NAMES), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise PluginError(f"{name} is not a guestmem hook{hint}")
        if options.get("wrapper") or options.get("hookwrapper"):
            raise PluginError(
                f"{name} is a hook wrapper: guestmem observers run after the backend, not around it"
            )
        if policy and name == "guestmem_register_backends":
            raise PluginError("a backend's policy object must not register backends")
        if policy and name in _PLUGIN_HOOKS:
            raise PluginError(f"{name} belongs on the plugin that registers the backend, not on its policy")
    if not policy and "guestmem_register_backends" in names:
        stray = sorted(set(names) & _POLICY_HOOKS)
        if stray:
            raise PluginError(
                f"{', '.join(stray)} at module level of a plugin that registers backends would observe "
                "every VM of every backend: put the policy hooks on the Backend's policy object"
            )


class Registry:
    """The plugin manager, the table of backends and what was left out.

    *entry_points* returns the installed plugins' entry points (default: the ``guestmem``
    group of the installed distributions).
    """

    def __init__(self, *, entry_points: Callable[[], Iterable[EntryPoint]] = _entry_points) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._entry_points = entry_points
        self._loaded = False
        self._backends: dict[str, Backend] | None = None
        self._lock = threading.RLock()
        #: id(plugin) -> (plugin name, distribution, version)
        self._dists: dict[int, tuple[str, str, str]] = {}
        #: Plugins added at run time (their failures raise instead of warning).
        self._explicit: set[int] = set()
        #: Bumped whenever plugins are added or removed (hook callers re-derive then).
        self.revision = 0
        #: id(plugin) -> the policies of the backends it registered in the last collection.
        self._owned: dict[int, list[object]] = {}
        #: id(policy) -> (backend name, distribution)
        self._policies: dict[int, tuple[str, str]] = {}
        #: backend name -> the plugin that registered it (in the last collection).
        self._registrars: dict[str, object] = {}
        #: Installed plugins left out, by entry-point name.
        self.broken: dict[str, BrokenPlugin] = {}

    # --- plugin loading ----------------------------------------------------------------------
    def _leave_out(self, name: str, distribution: str, error: str) -> None:
        if name in self.broken:
            return
        broken = BrokenPlugin(name, distribution, error)
        self.broken[name] = broken
        warnings.warn(
            f"guestmem plugin {name!r} from distribution {distribution!r} was left out: {error} "
            f"({broken.hint})",
            PluginWarning,
            stacklevel=4,
        )

    def _load(self) -> None:
        self._loaded = True
        blocked = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
        for ep in self._entry_points():
            dist = ep.dist
            dist_name = dist.name if dist is not None else "<unknown>"
            version = dist.version if dist is not None else ""
            if ep.name in blocked or dist_name in blocked or self.pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the others down
                self._leave_out(ep.name, dist_name, f"failed to import: {type(exc).__name__}: {exc}")
                continue
            try:
                self._register(plugin, ep.name, dist_name, version)
            except PluginError as exc:
                self._leave_out(ep.name, dist_name, str(exc))

    def _register(self, plugin: object, name: str, dist: str, version: str) -> None:
        """Validate and register *plugin*; :class:`PluginError` (bare reason) leaves nothing."""
        check_plugin(plugin, policy=False)
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except (pluggy.PluginValidationError, ValueError) as exc:
            if self.pm.is_registered(plugin):  # pluggy >= 1.7 refuses bad signatures in register()
                self.pm.unregister(plugin)
            raise PluginError(str(exc)) from exc
        self._dists[id(plugin)] = (name, dist, version)

    def _collect(self) -> dict[str, Backend]:
        backends: dict[str, Backend] = {}
        owners: dict[str, object] = {}
        for (
            impl
        ) in self.pm.hook.guestmem_register_backends.get_hookimpls():  # oldest first: first come, first named
            name, dist, version = self._dists.get(id(impl.plugin), (impl.plugin_name, "<unregistered>", ""))
            found: list[Backend] = []
            try:
                impl.function(register=found.append)
                for backend in found:
                    self._check_backend(backend, dist, backends)
            except Exception as exc:
                reason = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
                if id(impl.plugin) in self._explicit:
                    raise PluginError(f"plugin {name!r} from distribution {dist!r}: {reason}") from exc
                self._leave_out(name, dist, reason)
                continue
            for backend in found:
                backends[backend.name] = attrs.evolve(
                    backend, distribution=dist, version=backend.version or version
                )
                owners[backend.name] = impl.plugin
        self._sync_policies(backends, owners)
        self._registrars = {name: owners[name] for name in backends}
        return backends

    @staticmethod
    def _check_backend(backend: object, dist: str, taken: dict[str, Backend]) -> None:
        if not isinstance(backend, Backend):
            raise PluginError(f"registered {backend!r}, which is not a guestmem.backend.Backend")
        if backend.name in taken:
            other = taken[backend.name].distribution
            raise PluginError(f"backend {backend.name!r} is already registered by distribution {other!r}")
        if backend.policy is None and backend.opener is None:
            raise PluginError(f"backend {backend.name!r} has neither a policy nor an opener")
        if backend.policy is not None:
            check_plugin(backend.policy, policy=True)

    def _sync_policies(self, backends: dict[str, Backend], owners: dict[str, object]) -> None:
        """Register this collection's policies; unregister any earlier policy left over (a
        plugin may hand out a new policy per collection, and a stale one registered would
        act as an observer of every VM)."""
        owned: dict[int, list[object]] = {}
        for backend in backends.values():
            if backend.policy is not None:
                owned.setdefault(id(owners[backend.name]), []).append(backend.policy)
        keep = {id(p) for policies in owned.values() for p in policies}
        for policies in self._owned.values():
            for stale in policies:
                if id(stale) not in keep and self.pm.is_registered(stale):
                    self.pm.unregister(stale)
        self._owned = owned
        self._policies = {}
        for name, backend in list(backends.items()):
            policy = backend.policy
            if policy is None:
                continue
            if not self.pm.is_registered(policy):
                try:
                    self.pm.register(policy, name=f"guestmem.backend.{name}")
                    self.pm.check_pending()
                except (pluggy.PluginValidationError, ValueError) as exc:
                    if self.pm.is_registered(policy):
                        self.pm.unregister(policy)
                    owner = owners[name]
                    reason = f"the policy of backend {name!r} is invalid: {exc}"
                    if id(owner) in self._explicit:
                        raise PluginError(f"distribution {backend.distribution!r}: {reason}") from exc
                    self._leave_out(
                        self._dists.get(id(owner), (name, "", ""))[0], backend.distribution, reason
                    )
                    del backends[name]
                    continue
            self._policies[id(policy)] = (name, backend.distribution)

    def backends(self) -> dict[str, Backend]:
        """All registered backends by name (loads plugins on first use)."""
        with self._lock:
            if self._backends is None:
                if not self._loaded:
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
            broken = [b for b in self.broken.values() if b.name == name]
            why = f"; plugin {name!r} was left out: {broken[0].error}" if broken else ""
            raise LookupError(f"no guestmem backend named {name!r} (installed: {known}){why}") from None

    # --- throwaway plugins (tests, notebooks) ----------------------------------------------------
    def add_plugin(self, plugin: object, *, name: str | None = None, distribution: str = "<local>") -> None:
        """Register *plugin* at run time (a backend or an observer) and refresh the table.

        The plugin and the policies of the backends it registers are validated at once: a
        :class:`PluginError` naming *distribution* leaves the registry as it was.
        """
        with self._lock:
            self.backends()
            plugin_name = name or f"local.{id(plugin):x}"
            try:
                self._register(plugin, plugin_name, distribution, "")
            except PluginError as exc:
                raise PluginError(
                    f"plugin {plugin_name!r} from distribution {distribution!r}: {exc}"
                ) from exc
            self._explicit.add(id(plugin))
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
            self._explicit.discard(id(plugin))
            for p in list(self.pm.get_plugins()):
                if id(p) in owned and self.pm.is_registered(p):
                    self.pm.unregister(p)
            self._backends = None
            self.revision += 1

    # --- hook dispatch -----------------------------------------------------------------------------
    @property
    def lock(self) -> threading.RLock:
        """Held while plugins are loaded, added or removed; hook callers re-derive their
        tables under it, so that a plugin added by one thread never reaches another's
        half-built table."""
        return self._lock

    def dispatch_plugins(self, backend: str | None) -> tuple[object | None, str, dict[int, tuple[str, str]]]:
        """``(policy, its distribution, observers)`` for hosts of *backend*.

        Observers are every registered plugin that is no backend's policy, by id, with their
        plugin name and distribution.
        """
        with self._lock:
            table = self.backends()
            info = table.get(backend) if backend is not None else None
            policy = info.policy if info is not None else None
            observers = {
                id(p): (f"plugin {self._dists[id(p)][0]!r}", self._dists[id(p)][1])
                for p in self.pm.get_plugins()
                if id(p) not in self._policies and id(p) in self._dists
            }
            return policy, info.distribution if info is not None else "", observers

    def hooks_for(self, backend: Backend, on_observer_error: Callable[[ObserverFailure], None]) -> Hooks:
        """Hook callers reaching *backend*'s policy and the observers, nothing else."""
        return Hooks(self, backend.name, on_observer_error)

    def conformance_options(self, backend: Backend, vm_type: VmTypeInfo) -> dict[str, Any]:
        """What the plugin that registered *backend* says about the conformance kit for
        *vm_type* (``guestmem_conformance_options``); ``{}`` if it says nothing.

        A failing or ill-typed answer is a :class:`PluginError` naming the distribution.
        """
        self.backends()
        registrar = self._registrars.get(backend.name)
        for impl in self.pm.hook.guestmem_conformance_options.get_hookimpls():
            if impl.plugin is not registrar:
                continue
            args = {"backend": backend, "vm_type": vm_type}
            try:
                answer = impl.function(**{name: args[name] for name in impl.argnames})
            except Exception as exc:
                raise PluginError(
                    f"guestmem_conformance_options of distribution {backend.distribution!r} raised "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if answer is None:
                return {}
            if not isinstance(answer, dict):
                raise PluginError(
                    f"guestmem_conformance_options of distribution {backend.distribution!r} returned "
                    f"{answer!r}, not a dict"
                )
            return dict(answer)
        return {}

    def plugin_hook_names(self, backend: Backend) -> list[str]:
        """The plugin-level hooks (``guestmem_register_backends``,
        ``guestmem_conformance_options``) of the plugin that registered *backend*."""
        self.backends()
        registrar = self._registrars.get(backend.name)
        if registrar is None:
            return []
        return sorted(n for n in _hookimpl_names(registrar) if n in _PLUGIN_HOOKS)

    def hook_names(self, backend: Backend) -> list[str]:
        """The hooks *backend*'s policy implements (``guestmem_`` names)."""
        return (
            sorted(n for n in _hookimpl_names(backend.policy) if n in _SPEC_NAMES) if backend.policy else []
        )


_default: Registry | None = None
_default_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Registry()
        return _default
