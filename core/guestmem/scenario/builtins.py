"""The scenarios shipped with guestmem (``guestmem/scenario/builtin/*.toml``).

Each file opens with a comment citing the design discussion or kernel code it shows;
``guestmem scenarios`` lists them and ``guestmem run NAME`` runs one by name.
"""

from __future__ import annotations

import importlib.resources
from importlib.resources.abc import Traversable

from guestmem.scenario.format import Scenario
from guestmem.serialize import parse_scenario

__all__ = ["load", "names", "resolve"]


def _folder() -> Traversable:
    return importlib.resources.files("guestmem.scenario").joinpath("builtin")


def names() -> list[str]:
    """The built-in scenarios' names, sorted."""
    return sorted(p.name.removesuffix(".toml") for p in _folder().iterdir() if p.name.endswith(".toml"))


def load(name: str) -> Scenario:
    """Built-in scenario *name*; ``LookupError`` naming the others if there is none."""
    if name not in names():
        raise LookupError(f"no built-in scenario {name!r} (known: {', '.join(names())})")
    source = _folder().joinpath(f"{name}.toml")
    return parse_scenario(source.read_text(encoding="utf-8"), f"{name}.toml")


def resolve(name_or_path: str) -> Scenario:
    """A scenario file's path, or a built-in scenario's name."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        from guestmem.serialize import load_scenario

        return load_scenario(name_or_path)
    return load(name_or_path)
