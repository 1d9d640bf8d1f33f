"""A pytest plugin collecting the conformance kit for installed backends, by name.

``pytest -p guestmem.conformance.pytest_plugin`` adds, next to whatever else is
collected, the kit classes :func:`~guestmem.conformance.kits_for` builds for each backend
named in the environment variable ``GUESTMEM_KIT_BACKENDS`` or the ini option
``guestmem_kit_backends`` (comma-separated; the variable wins).  No test file and no
subclass is needed: the flags come from the backend's declarations and its
``guestmem_conformance_options``; the invariant checkers are on.

This module is not registered as a ``pytest11`` entry point and adds no command-line
option.  guestmem's own pytest plugin (:mod:`guestmem.pytest_plugin`, always loaded) offers
the same as ``--guestmem-kit``, for the backends ``--guestmem-backend NAME[,NAME]``
selects: it calls :func:`collect_kit` (and :func:`backend_names` reads a list the same
way) rather than loading this module, and refuses to run with it loaded (the kit would be
collected twice).
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from guestmem.conformance.options import kits_for
from guestmem.errors import PluginError

ENV = "GUESTMEM_KIT_BACKENDS"
INI = "guestmem_kit_backends"


def backend_names(value: str) -> list[str]:
    """The backend names of a comma-separated list, in order, without repeats."""
    names: list[str] = []
    for name in (part.strip() for part in value.split(",")):
        if name and name not in names:
            names.append(name)
    return names


def kit_module(backends: Iterable[str]) -> types.ModuleType:
    """A module holding the kit classes of every VM type of each of *backends* (as
    :func:`~guestmem.conformance.kits_for` builds them), for pytest to collect."""
    module = types.ModuleType("guestmem_kit", "The conformance kit of the named backends.")
    for backend in backends:
        for kit in kits_for(backend):
            setattr(module, kit.__name__, kit)
    return module


class KitModule(pytest.Module):
    """A collector over a module that exists only in memory (:func:`kit_module`)."""

    kit: types.ModuleType

    def _getobj(self) -> Any:
        return self.kit

    def _register_setup_module_fixture(self) -> None:
        """The kit module has no setup_module."""

    def _register_setup_function_fixture(self) -> None:
        """The kit module has no setup_function."""


def collect_kit(session: pytest.Session, backends: Sequence[str]) -> list[pytest.Item]:
    """The kit's test items for *backends*, as children of *session*."""
    node = KitModule.from_parent(session, path=Path(__file__), nodeid=f"guestmem-kit[{','.join(backends)}]")
    node.kit = kit_module(backends)
    return list(session.genitems(node))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(INI, "backends to run the guestmem conformance kit against (comma-separated)", default="")


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    backends = backend_names(os.environ.get(ENV) or str(config.getini(INI)))
    if not backends:
        return
    try:
        items.extend(collect_kit(session, backends))
    except (LookupError, PluginError) as exc:
        raise pytest.UsageError(f"guestmem conformance kit: {exc}") from exc
