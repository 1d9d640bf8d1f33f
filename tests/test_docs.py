"""The Python examples of README.md and docs/*.md run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
SOURCES = [ROOT / "README.md", ROOT / "docs" / "backends.md"]


def _blocks() -> list[tuple[str, str]]:
    found = []
    for path in SOURCES:
        for i, code in enumerate(BLOCK.findall(path.read_text())):
            if "class Test" in code:  # conformance-kit snippets are collected, not run
                continue
            found.append((f"{path.name}#{i}", code))
    return found


@pytest.mark.parametrize(("where", "code"), _blocks(), ids=[w for w, _ in _blocks()])
def test_example_runs(where: str, code: str) -> None:
    exec(compile(code, where, "exec"), {"__name__": f"docs_{where}"})
