"""Scale: guest size costs ranges, not pages (benchmarks/bench_snp.py, smaller)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from guestmem import uapi

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_snp.py"


@pytest.mark.skipif(not BENCH.exists(), reason="benchmarks/ is not next to the plugin")
@pytest.mark.parametrize("level", [uapi.PG_LEVEL_2M, uapi.PG_LEVEL_4K])
def test_accepting_a_gib_costs_a_few_rmp_ranges(level: int) -> None:
    spec = importlib.util.spec_from_file_location("bench_snp", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.scenario(1 << 30, level)
    assert result["rmp_ranges"] <= 8
    counters = result["counters"]
    assert counters["psc_exits"] == counters["psc_requests"] == 3  # 511 entries, 253 per request
    if level == uapi.PG_LEVEL_4K:
        assert counters["psmash"] == counters["rmp_npf"] == 511
        assert counters["faults"] == (1 << 18) - 512 + 511
    else:
        assert counters["pvalidate"] == 511 and counters["psmash"] == 0
