"""Every rule ID guestmem_pkvm raises is listed in the Rules section of its README."""

from __future__ import annotations

import pathlib

import guestmem_pkvm
from guestmem.rules import raised_rule_ids, readme_rule_problems

PACKAGE = pathlib.Path(guestmem_pkvm.__file__).resolve().parent


def test_every_rule_raised_is_in_the_readme() -> None:
    assert {"pKVM-3", "pKVM-3.2", "pKVM-3.3", "pKVM-3.5"} <= set(raised_rule_ids(PACKAGE))
    assert readme_rule_problems(PACKAGE) == []
