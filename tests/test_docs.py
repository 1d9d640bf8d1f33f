"""The Python examples of README.md and docs/*.md run as written.

The blocks of one page run in order in one namespace, as a reader pastes them; the
conformance-kit snippets (``class Test...``) are collected where they belong, not run.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def page_code(path: pathlib.Path) -> list[str]:
    """The runnable Python blocks of *path*, in order."""
    return [code for code in BLOCK.findall(path.read_text()) if "class Test" not in code]


PAGES = [path for path in SOURCES if page_code(path)]


@pytest.mark.parametrize("path", PAGES, ids=[p.name for p in PAGES])
def test_examples_run(path: pathlib.Path) -> None:
    namespace = {"__name__": f"docs_{path.stem}"}
    for i, code in enumerate(page_code(path)):
        exec(compile(code, f"{path.name}#{i}", "exec"), namespace)
