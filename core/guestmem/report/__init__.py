"""Reports: a run as one self-contained HTML page with SVG pictures.

``guestmem report RUN.json -o report.html`` (or ``guestmem run ... --report report.html``)
writes the step table, the cost bars and the memory maps of every scenario of a run, with
a slider (and small multiples) over the steps.  The page needs no network and no other
file: styles, pictures and its few lines of script are inline.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from guestmem.scenario.run import Run

__all__ = ["add_cli", "read_run", "render_report", "write_report"]


def render_report(run: Run, title: str = "guestmem run") -> str:
    """The HTML page of *run*."""
    from guestmem.report.html import render

    return render(run, title)


def write_report(run: Run, path: str, title: str = "guestmem run") -> None:
    """Write the HTML page of *run* to *path*."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_report(run, title))


def read_run(path: str) -> Run:
    """A run written by ``guestmem run --json``."""
    from guestmem.serialize import structure

    with open(path, encoding="utf-8") as f:
        run: Run = structure(json.load(f), Run)
    return run


def add_cli(subparsers: Any) -> None:
    """Add ``guestmem report RUN.json -o report.html``."""
    p = subparsers.add_parser(
        "report", help="render a run (guestmem run --json) as a self-contained HTML page"
    )
    p.add_argument("run", metavar="RUN.json", help="what guestmem run --json FILE wrote")
    p.add_argument(
        "-o", "--output", default="report.html", help="the HTML file to write (default: report.html)"
    )
    p.add_argument("--title", default="guestmem run", help="the page's title")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    import cattrs

    try:
        run = read_run(args.run)
    except (OSError, ValueError, cattrs.BaseValidationError) as exc:
        print(f"guestmem: cannot read {args.run}: {exc}")
        return 2
    write_report(run, args.output, args.title)
    print(f"report: {args.output}")
    return 0
