"""Work functions for the campaign tests: module-level, so that spawned worker processes
import them by name (pytest puts ``tests/`` on ``sys.path``, and a spawned worker gets the
parent's path); not a test module."""

from __future__ import annotations

import os


def square(n: int) -> int:
    """A unit's result."""
    return n * n


def raise_on_two(n: int) -> int:
    """A unit that raises."""
    if n == 2:
        raise ValueError("two is refused")
    return n


def die_on_three(n: int) -> int:
    """A unit that kills its worker process (as a segfault or the OOM killer would)."""
    if n == 3:
        os._exit(7)
    return n
