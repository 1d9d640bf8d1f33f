"""Every rule ID guestmem_tdx raises is listed in the Rules section of its README."""

from __future__ import annotations

import pathlib

import guestmem_tdx
from guestmem.rules import raised_rule_ids, readme_rule_problems

PACKAGE = pathlib.Path(guestmem_tdx.__file__).resolve().parent


def test_every_rule_raised_is_in_the_readme() -> None:
    assert {"TDX-1.1", "TDX-1.2", "TDX-1.4", "TDX-1.6"} <= set(raised_rule_ids(PACKAGE))
    assert readme_rule_problems(PACKAGE) == []
