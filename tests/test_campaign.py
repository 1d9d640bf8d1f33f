"""guestmem.campaign: units sharded over worker processes or a Dask cluster, results in the
order of the units, a unit whose worker died reported as such (not a hang); a fuzz or diff
campaign merges to the same result whatever the sharding."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from campaign_helpers import die_on_three, raise_on_two, square

from guestmem.campaign import Failed, run_units
from guestmem.cli import main
from guestmem.diff import campaign as diff_campaign
from guestmem.fuzz.campaign import campaign_units, run_campaign


def test_results_come_in_the_order_of_the_units() -> None:
    seen: list[int] = []
    assert run_units(square, [3, 1, 2], jobs=1, on_done=lambda i, r: seen.append(i)) == [9, 1, 4]
    assert seen == [0, 1, 2]
    assert run_units(square, list(range(6)), jobs=2) == [0, 1, 4, 9, 16, 25]


def test_a_unit_that_raises_is_a_failure_of_that_unit() -> None:
    for jobs in (1, 2):
        got = run_units(raise_on_two, [1, 2, 3], jobs=jobs)
        assert got == [1, Failed(2, "ValueError: two is refused"), 3]


def test_a_worker_that_dies_is_reported_not_hung() -> None:
    started = time.monotonic()
    got = run_units(die_on_three, [1, 2, 3, 4, 5], jobs=2)
    assert got[:2] == [1, 2] and got[3:] == [4, 5]
    assert got[2] == Failed(3, "worker process died while running this unit")
    assert time.monotonic() - started < 60


def test_a_fuzz_campaign_merges_alike_in_one_process_and_in_two() -> None:
    hostile = campaign_units(["sw"], steps=300, chunk=150, hostile=True, seed=5)
    one = run_campaign(hostile, jobs=1)
    assert run_campaign(hostile, jobs=2) == one
    assert one["results"][0]["units"] == 2 and one["results"][0]["steps"] >= 300
    plain = campaign_units(["sw"], steps=100, chunk=50, run_length=10)
    assert run_campaign(plain, jobs=2) == run_campaign(plain, jobs=1)


def test_fuzz_cli_output_is_the_merged_result(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["fuzz", "--steps", "100", "--chunk", "50", "--run-length", "10", "--jobs", "2"]
    assert main([*argv, "--output", str(tmp_path / "out.json")]) == 0
    merged = json.loads((tmp_path / "out.json").read_text())
    (group,) = merged["results"]
    assert group["units"] == 2 and group["steps"] >= 100 and merged["worker_failures"] == []
    assert "guestmem fuzz: sw KVM_X86_SW_PROTECTED_VM" in capsys.readouterr().out


DIFF = diff_campaign.diff_units("sw", ["sw"], ["kvm_pvm-6.18"], seed=1, steps=600, chunk=200, vm_types=(0, 1))


def test_a_diff_campaign_merges_alike_in_one_process_and_in_two() -> None:
    one = diff_campaign.merge(DIFF, run_units(diff_campaign.run_unit, DIFF, jobs=1))
    assert diff_campaign.merge(DIFF, run_units(diff_campaign.run_unit, DIFF, jobs=2)) == one
    (group,) = one["results"]
    assert group["operations"] == 600 and group["units"] == 3
    assert group["disagreements"]  # the two profiles differ (S-7, G-7, PF-2)
    assert len({tuple(d["key"]) for d in group["disagreements"]}) == len(group["disagreements"])


def test_a_campaign_on_a_dask_cluster_merges_as_in_one_process(capsys: pytest.CaptureFixture[str]) -> None:
    distributed = pytest.importorskip(
        "distributed", reason="Dask distributed is not installed (pip install 'guestmem[dask]')"
    )
    hostile = campaign_units(["sw"], steps=400, chunk=200, hostile=True, seed=7)
    with distributed.LocalCluster(
        processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None
    ) as cluster:
        address = cluster.scheduler_address
        assert run_campaign(hostile, scheduler=address) == run_campaign(hostile, jobs=1)
        on_dask = run_units(diff_campaign.run_unit, DIFF, scheduler=address)
        assert diff_campaign.merge(DIFF, on_dask) == diff_campaign.merge(
            DIFF, run_units(diff_campaign.run_unit, DIFF, jobs=1)
        )
        argv = ["diff", "--against", "sw", "--profile", "kvm_pvm-6.18", "--steps", "400", "--chunk", "200"]
        main([*argv, "--json", "--scheduler", address])
        merged = json.loads(capsys.readouterr().out)
        main([*argv, "--json", "--jobs", "1"])
        assert json.loads(capsys.readouterr().out) == merged
