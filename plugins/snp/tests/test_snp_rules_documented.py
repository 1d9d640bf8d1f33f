"""Every rule ID guestmem_snp raises is listed in the Rules section of its README."""

from __future__ import annotations

import pathlib

import guestmem_snp
from guestmem.rules import raised_rule_ids, readme_rule_problems

PACKAGE = pathlib.Path(guestmem_snp.__file__).resolve().parent


def test_every_rule_raised_is_in_the_readme() -> None:
    assert {"P-2", "P-5", "SNP-2.1", "SNP-2.4"} <= set(raised_rule_ids(PACKAGE))
    assert readme_rule_problems(PACKAGE) == []
