"""The plugin boundary: backends use the public backend API and nothing of the model.

Every backend the project ships (``plugins/*``, ``examples/*``) is walked with the AST:
it may import ``guestmem`` itself and its public modules, never the model or the
machinery behind the hooks, and it never reaches into another object's private
attributes.  A third-party backend written from ``docs/backends.md`` is held to the same
rules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: What a backend may import of the core.
ALLOWED = frozenset(
    {
        "guestmem",
        "guestmem.backend",
        "guestmem.cabi",
        "guestmem.uapi",
        "guestmem.errors",
        "guestmem.api",
        "guestmem.invariants",
    }
)
PACKAGES = sorted(
    p for pattern in ("plugins/*/guestmem_*", "examples/*/guestmem_*") for p in ROOT.glob(pattern)
)


def violations(source: str, name: str = "<source>") -> list[str]:
    """What in *source* crosses the boundary, one line each."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module] + [
                f"{node.module}.{a.name}" for a in node.names if node.module == "guestmem"
            ]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        else:
            modules = []
        for module in modules:
            top = module.split(".")[0]
            if top == "guestmem" and module not in ALLOWED and not _is_name_of(module):
                found.append(f"{name}:{node.lineno}: imports {module}")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if not (isinstance(base, ast.Name) and base.id in ("self", "cls")):
                found.append(f"{name}:{node.lineno}: touches {ast.unparse(node)}")
    return found


def _is_name_of(module: str) -> bool:
    """``from guestmem import Backend`` names a re-exported value, not a module."""
    import guestmem

    head, _, tail = module.partition(".")
    return head == "guestmem" and "." not in tail and tail in guestmem.__all__ and tail not in ALLOWED


def test_the_project_ships_backends_to_check() -> None:
    names = {p.name for p in PACKAGES}
    assert {"guestmem_snp", "guestmem_tdx", "guestmem_pkvm", "guestmem_gunyah", "guestmem_linux"} <= names


@pytest.mark.parametrize("package", PACKAGES, ids=[p.name for p in PACKAGES])
def test_backend_uses_only_the_public_api(package: Path) -> None:
    found = [v for path in sorted(package.rglob("*.py")) for v in violations(path.read_text(), path.name)]
    assert found == []


@pytest.mark.parametrize(
    "source",
    [
        "from guestmem.model.vm import ModelVm",
        "import guestmem.model.mmu",
        "from guestmem.registry import Backend",
        "from guestmem.ranges import RangeMap",
        "from guestmem import hookspecs",
        "def f(vm):\n    return vm._vm.mmu",
        "def f(vm):\n    return vm.host._allocated",
    ],
)
def test_the_check_catches_what_it_forbids(source: str) -> None:
    assert violations(source)


def test_the_check_allows_the_public_api() -> None:
    source = (
        "from guestmem import uapi, Backend, hookimpl\n"
        "from guestmem.backend import VmView, view\n"
        "from guestmem.errors import KvmError\n"
        "class P:\n    def f(self):\n        return self._private\n"
    )
    assert violations(source) == []
