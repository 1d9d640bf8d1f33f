"""The README's example runs as written, and says what the model does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README lost its example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "b'shared hello'" in out and "b'lent secret'" in out
    assert "'gunyah.sanitized_bytes': 4096" in out and "'gunyah.rm.VM_START': 1" in out
