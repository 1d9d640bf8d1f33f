"""Every rule ID guestmem_gunyah raises is listed in the Rules section of its README."""

from __future__ import annotations

import pathlib

import guestmem_gunyah
from guestmem.rules import raised_rule_ids, readme_rule_problems

PACKAGE = pathlib.Path(guestmem_gunyah.__file__).resolve().parent


def test_every_rule_raised_is_in_the_readme() -> None:
    assert {"Gunyah-4.1", "Gunyah-4.2", "Gunyah-4.3", "Gunyah-4.5", "Gunyah-uapi"} <= set(
        raised_rule_ids(PACKAGE)
    )
    assert readme_rule_problems(PACKAGE) == []
