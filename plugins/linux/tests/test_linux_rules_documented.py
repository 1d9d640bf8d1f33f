"""Every rule ID guestmem_linux raises is listed in the Rules section of its README."""

from __future__ import annotations

import pathlib

import guestmem_linux
from guestmem.rules import raised_rule_ids, readme_rule_problems

PACKAGE = pathlib.Path(guestmem_linux.__file__).resolve().parent


def test_every_rule_raised_is_in_the_readme() -> None:
    assert {"F-1", "F-3", "G-3", "M-4"} <= set(raised_rule_ids(PACKAGE))
    assert readme_rule_problems(PACKAGE) == []
