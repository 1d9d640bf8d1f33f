"""The README's example runs as written."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys: object) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md#{i}", "exec"), {"__name__": "readme"})
