"""The ``guestmem`` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from guestmem import uapi
from guestmem.backend import Backend
from guestmem.errors import BackendError, PluginError, PluginWarning
from guestmem.registry import DISABLE_ENV, get_registry

_CAPS = (
    uapi.KVM_CAP_GUEST_MEMFD,
    uapi.KVM_CAP_GUEST_MEMFD_FLAGS,
    uapi.KVM_CAP_MEMORY_ATTRIBUTES,
    uapi.KVM_CAP_VM_TYPES,
    uapi.KVM_CAP_PRE_FAULT_MEMORY,
    uapi.KVM_CAP_USER_MEMORY2,
    uapi.KVM_CAP_MEMORY_FAULT_INFO,
)


_SHORT_CAPS = {
    "KVM_CAP_GUEST_MEMFD": "GUEST_MEMFD",
    "KVM_CAP_GUEST_MEMFD_FLAGS": "GMEM_FLAGS",
    "KVM_CAP_MEMORY_ATTRIBUTES": "MEM_ATTRS",
    "KVM_CAP_VM_TYPES": "VM_TYPES",
    "KVM_CAP_PRE_FAULT_MEMORY": "PRE_FAULT",
    "KVM_CAP_USER_MEMORY2": "USER_MEM2",
    "KVM_CAP_MEMORY_FAULT_INFO": "FAULT_INFO",
}


def configure_logging(json_logs: bool) -> None:
    """structlog for the CLI: quiet unless asked, console on a TTY, JSON otherwise."""
    import logging

    import structlog

    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_logs or not sys.stderr.isatty()
        else (structlog.dev.ConsoleRenderer())
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def backend_row(backend: Backend, *, hooks: bool = False) -> dict[str, Any]:
    """What ``guestmem backends`` reports for one backend (capabilities from a live open;
    with *hooks*, the hooks its policy and its plugin implement)."""
    import guestmem

    row: dict[str, Any] = {
        "name": backend.name,
        "version": backend.version,
        "distribution": backend.distribution,
        "summary": backend.summary,
        "vm_types": {str(t.type): t.name for t in backend.vm_types},
    }
    if hooks:
        registry = get_registry()
        row["hooks"] = registry.plugin_hook_names(backend) + registry.hook_names(backend)
    try:
        with guestmem.open(backend.name) as kvm:
            row["capabilities"] = {uapi.CAP_NAMES.get(c, str(c)): kvm.check_extension(c) for c in _CAPS}
        row["available"] = True
    except OSError as exc:
        row["available"] = False
        row["error"] = str(exc)
    return row


def broken_rows() -> list[dict[str, Any]]:
    """Installed plugins the registry left out, as ``guestmem backends`` reports them."""
    return [
        {"name": b.name, "distribution": b.distribution, "broken": b.error, "hint": b.hint}
        for b in sorted(get_registry().broken.values(), key=lambda b: b.name)
    ]


def cmd_backends(args: argparse.Namespace) -> int:
    registry = get_registry()
    rows = [
        backend_row(b, hooks=args.hooks) for b in sorted(registry.backends().values(), key=lambda b: b.name)
    ]
    broken = broken_rows()
    if args.json:
        print(json.dumps(rows + broken, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="guestmem backends")
    columns = ["backend", "distribution", "VM types", "capabilities"] + (["hooks"] if args.hooks else [])
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        caps = row.get("capabilities")
        cap_text = (
            "\n".join(f"{_SHORT_CAPS.get(k, k)}={v:#x}" for k, v in caps.items())
            if caps
            else f"unavailable: {row.get('error', '')}"
        )
        types = "\n".join(name.removeprefix("KVM_") for name in row["vm_types"].values())
        cells = [row["name"], f"{row['distribution']} {row['version']}", types, cap_text]
        if args.hooks:
            cells.append("\n".join(h.removeprefix("guestmem_") for h in row["hooks"]) or "-")
        table.add_row(*cells)
    for row in broken:
        cells = [row["name"], row["distribution"], "-", f"[red]broken[/red]: {row['broken']} ({row['hint']})"]
        table.add_row(*cells, *(["-"] if args.hooks else []))
    Console().print(table)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from guestmem.demo import DEFAULT_REPORT, run_demo

    backends = [n.strip() for value in args.backend or ["sw"] for n in value.split(",") if n.strip()]
    report = None if args.no_report else (args.report or DEFAULT_REPORT)
    if args.trace is None:
        return run_demo(backends, scenario=args.scenario, report=report)
    with open(args.trace, "w", encoding="utf-8") as trace:
        return run_demo(backends, scenario=args.scenario, report=report, trace=trace)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guestmem", description="Executable model of Linux KVM guest private memory (guest_memfd)."
    )
    parser.add_argument("--log", action="store_true", help="print every modelled event (structlog) on stderr")
    parser.add_argument("--log-json", action="store_true", help="print events as JSON lines on stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="list installed backends, their VM types and capabilities")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--hooks", action="store_true", help="also the hooks each backend implements")
    p.set_defaults(func=cmd_backends)
    p = sub.add_parser(
        "demo", help="run a built-in scenario (a VM's guest_memfd lifecycle) with its tables and report"
    )
    p.add_argument(
        "--backend", action="append", metavar="NAME", help="backend(s) to run on, repeatable (default: sw)"
    )
    p.add_argument("--scenario", default="lifecycle", help="the built-in scenario (guestmem scenarios)")
    p.add_argument("--report", metavar="HTML", help="where the report goes (default: in the temp directory)")
    p.add_argument("--no-report", action="store_true", help="write no report")
    p.add_argument("--trace", metavar="FILE", help="write the first backend's events to FILE as JSON lines")
    p.set_defaults(func=cmd_demo)
    for module in _SUBCOMMAND_MODULES:
        importlib.import_module(module).add_cli(sub)
    return parser


#: Core modules that contribute subcommands through ``add_cli(subparsers)``.
_SUBCOMMAND_MODULES: tuple[str, ...] = (
    "guestmem.scenario.cli",
    "guestmem.report",
    "guestmem.traces",
    "guestmem.diff",
    "guestmem.rules",
    "guestmem.hookref",
    "guestmem.fuzz",
    "guestmem.newbackend",
)


def _warn_in_one_line(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, *_: Any, **__: Any
) -> None:
    print(f"guestmem: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``guestmem`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log or args.log_json:
        configure_logging(args.log_json)
    with warnings.catch_warnings():
        warnings.simplefilter("always", PluginWarning)
        warnings.showwarning = _warn_in_one_line
        try:
            result: int = args.func(args)
        except LookupError as exc:
            print(f"guestmem: {exc}", file=sys.stderr)
            return 2
        except PluginError as exc:
            print(f"guestmem: {exc} (set {DISABLE_ENV}=NAME to leave a plugin out)", file=sys.stderr)
            return 2
        except BackendError as exc:
            print(f"guestmem: {exc}", file=sys.stderr)
            return 1
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
