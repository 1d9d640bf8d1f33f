"""The core's module graph: no import cycle, and the registry names no backend."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "core"


def module_graph() -> dict[str, set[str]]:
    """Runtime (module-level) imports between the core's modules."""
    modules = {}
    for path in CORE.rglob("*.py"):
        name = ".".join(path.relative_to(CORE).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module:
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [node.module, *subs]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's members, found from each module."""
    found = []
    for start in graph:
        stack = [(start, [start])]
        seen = {start}
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    found.append(path)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    return found


def test_no_import_cycle_in_the_core() -> None:
    graph = module_graph()
    assert len(graph) > 30 and "guestmem.model.vm" in graph
    assert cycles(graph) == []


def test_the_cycle_check_can_fail() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}})


def test_the_registry_knows_no_backend_by_name() -> None:
    graph = module_graph()
    assert "guestmem.sw" not in graph["guestmem.registry"]
    assert not any(m.startswith("guestmem.model") for m in graph["guestmem.registry"])


def test_import_guestmem_is_light() -> None:
    """``import guestmem`` loads neither the plugin machinery nor the presentation
    libraries: they come with the first use (``guestmem.open``, the CLI)."""
    import subprocess
    import sys

    heavy = ["pluggy", "attrs", "attr", "importlib.metadata", "structlog", "rich", "sortedcontainers"]
    code = f"import sys, guestmem; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"
    code = "import guestmem; guestmem.KvmError; guestmem.open('sw').close(); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout == "ok\n"


def test_open_with_every_plugin_leaves_logging_unimported() -> None:
    """Opening a backend loads every installed plugin; none of them imports structlog (or
    Rich through it): a backend's ``pr_warn`` goes through ``HostView.warn``, which logs
    only once the application configured structlog."""
    import subprocess
    import sys

    code = (
        "import sys, guestmem; guestmem.open('sw').close(); "
        "print('structlog' in sys.modules, 'rich' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout == "False False\n"


def test_host_warn_logs_once_structlog_is_configured() -> None:
    import guestmem
    from guestmem.backend import view

    structlog = pytest.importorskip("structlog")
    with guestmem.open("sw") as kvm:
        host = view(kvm)
        host.warn("guestmem.test", "unheard", pfn=1)  # unconfigured: silent
        try:
            with structlog.testing.capture_logs() as logs:
                host.warn("guestmem.test", "tdx hkid leaked", hkid=3)
        finally:
            structlog.reset_defaults()  # capture_logs leaves structlog "configured"
    assert logs == [{"event": "tdx hkid leaked", "hkid": 3, "log_level": "warning"}]
