"""Campaigns that outgrow one process: independent units of work sharded over worker
processes, or over a Dask distributed cluster, merged in the order of the units.

``guestmem fuzz`` and ``guestmem diff`` cut a campaign (seeds x backends x profiles) into
units, each a frozen, picklable value that says everything its worker needs (no state
is shared between units), and a module-level function that runs one unit.
:func:`run_units` runs them:

- in this process, when there is one unit or one job (what a test or a throwaway backend
  registered in-process needs: worker processes see only installed plugins);
- over ``jobs`` worker processes (``concurrent.futures.ProcessPoolExecutor``, spawned, so
  a worker starts from a clean interpreter whatever threads the caller runs: a progress
  bar's);
- over a Dask distributed cluster when a *scheduler* address is given
  (``tcp://HOST:PORT``; the optional extra ``guestmem[dask]``).

Results come back in the order of the units whatever the order they finished in, so the
merged result of a campaign depends on its units alone, never on the sharding.  A unit
whose worker process died (a segfault, ``os._exit``, the OOM killer) or that raised is
reported as :class:`Failed`, never as a hang: a broken process pool is started again for
the units left, and units that were in flight when it broke run again, alone if they
break it twice, so that only the unit that kills its worker is blamed.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Generic, TypeVar

import attrs

U = TypeVar("U")
R = TypeVar("R")

#: What ``pip install`` needs for ``--scheduler``.
DASK_EXTRA = "guestmem[dask]"


@attrs.frozen
class Failed(Generic[U]):
    """A unit that produced no result: its worker process died, or it raised."""

    unit: U
    #: What happened, one line (``worker process died ...`` or ``ValueError: ...``).
    error: str

    def to_json(self) -> dict[str, Any]:
        """The failure as plain data."""
        unit = self.unit
        shown = unit.to_json() if hasattr(unit, "to_json") else repr(unit)
        return {"unit": shown, "error": self.error}


def add_cli_options(parser: Any, *, unit: str, chunk: int) -> None:
    """The options every sharded subcommand takes: ``--jobs``, ``--scheduler``, ``--chunk``
    (*chunk* of *unit*, ``"steps"`` or ``"operations"``, per unit of work), ``--json`` and
    ``--output``."""
    parser.add_argument(
        "--jobs", type=int, default=None, help="worker processes (default: one per CPU; 1: this process)"
    )
    parser.add_argument(
        "--scheduler", metavar="ADDRESS", help="run on the Dask cluster at ADDRESS (tcp://HOST:PORT)"
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=chunk,
        help=f"{unit} per unit of work (default {chunk}): the result depends on it, not on --jobs",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the merged result as JSON (no progress bar)"
    )
    parser.add_argument("--output", metavar="FILE", help="write the merged result as JSON to FILE")


def default_jobs() -> int:
    """Worker processes by default: one per CPU."""
    return os.cpu_count() or 1


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def run_units(
    work: Callable[[U], R],
    units: Sequence[U],
    *,
    jobs: int | None = None,
    scheduler: str | None = None,
    on_done: Callable[[int, R | Failed[U]], None] | None = None,
) -> list[R | Failed[U]]:
    """Run ``work(unit)`` for every unit; the results in the order of *units*.

    *work* must be a module-level function and each unit picklable (both travel to the
    workers).  *jobs* worker processes (default: :func:`default_jobs`), or the Dask
    cluster at *scheduler*.  *on_done* is called in this process as each unit finishes,
    with its index and result (a progress bar).
    """
    done: dict[int, R | Failed[U]] = {}

    def finish(index: int, result: R | Failed[U]) -> None:
        done[index] = result
        if on_done is not None:
            on_done(index, result)

    if scheduler is not None:
        _run_dask(work, units, scheduler, finish)
    elif len(units) <= 1 or (jobs if jobs is not None else default_jobs()) <= 1:
        for index, unit in enumerate(units):
            try:
                result: R | Failed[U] = work(unit)
            except Exception as exc:  # noqa: BLE001 - a unit that raised is reported
                result = Failed(unit, _error(exc))
            finish(index, result)
    else:
        _run_processes(work, units, jobs or default_jobs(), finish)
    return [done[index] for index in range(len(units))]


def _run_processes(
    work: Callable[[U], R], units: Sequence[U], jobs: int, finish: Callable[[int, R | Failed[U]], None]
) -> None:
    context = multiprocessing.get_context("spawn")
    pending = list(range(len(units)))
    breaks: dict[int, int] = {}
    while pending:
        # Units that broke a pool twice run alone: a pool of their own, one at a time.
        alone = [i for i in pending if breaks.get(i, 0) >= 2]
        together = [i for i in pending if breaks.get(i, 0) < 2]
        batches = [together] if together else []
        batches += [[i] for i in alone]
        pending = []
        for batch in batches:
            workers = max(1, min(jobs, len(batch)))
            broken: list[int] = []
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                futures: dict[Future[R], int] = {pool.submit(work, units[i]): i for i in batch}
                for future in as_completed(futures):
                    index = futures[future]
                    try:
                        finish(index, future.result())
                    except BrokenProcessPool:
                        broken.append(index)
                    except Exception as exc:  # noqa: BLE001 - a unit that raised is reported
                        finish(index, Failed(units[index], _error(exc)))
            for index in sorted(broken):
                breaks[index] = breaks.get(index, 0) + 1
                if len(batch) == 1 or breaks[index] > 2:
                    finish(index, Failed(units[index], "worker process died while running this unit"))
                else:
                    pending.append(index)


def _run_dask(
    work: Callable[[U], R], units: Sequence[U], scheduler: str, finish: Callable[[int, R | Failed[U]], None]
) -> None:
    try:
        distributed: Any = importlib.import_module("distributed")
    except ImportError as exc:
        raise RuntimeError(f"--scheduler needs Dask distributed (pip install '{DASK_EXTRA}'): {exc}") from exc
    with distributed.Client(scheduler) as client:
        futures = client.map(work, list(units), pure=False)
        index_of = {future.key: index for index, future in enumerate(futures)}
        for future in distributed.as_completed(futures):
            index = index_of[future.key]
            try:
                finish(index, future.result())
            except Exception as exc:  # noqa: BLE001 - KilledWorker (a worker died) or the unit raised
                what = _error(exc)
                if type(exc).__name__ == "KilledWorker":
                    what = f"worker process died while running this unit ({what})"
                finish(index, Failed(units[index], what))
