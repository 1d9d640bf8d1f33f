"""Reports: one self-contained HTML page, its SVG memory maps and cost bars.

The page is checked twice: here as text (structure, region counts, no network), and in a
real headless Chromium (``test_report_browser.py``: no console errors, the slider, a
screenshot whose SVG is not blank).
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from guestmem.cli import main
from guestmem.report import read_run, render_report
from guestmem.report.svg import cost_bars, memory_map, region_count
from guestmem.scenario import builtins
from guestmem.scenario.memmap import Band, MemoryMap
from guestmem.scenario.run import Run, run_scenario

#: A backend no distribution provides: its column is one "not installed" cell.
MISSING = "no-such-backend"


@pytest.fixture(scope="module")
def run() -> Run:
    scenario = builtins.load("destructive-conversion")
    return Run(scenarios=[run_scenario(scenario, ["sw", MISSING], maps=True)])


def large_maps(html: str) -> list[str]:
    return re.findall(r'<svg[^>]*class="memmap"[^>]*>.*?</svg>', html)


def test_one_page_with_every_part(run: Run) -> None:
    html = render_report(run, "demo")
    assert html.startswith("<!DOCTYPE html>") and "<title>demo</title>" in html
    assert "destructive-conversion" in html and "Steps" in html and "Costs" in html and "Memory maps" in html
    rows = len(run.scenarios[0].rows)
    assert f'rowspan="{rows}">n/a: backend not installed' in html  # one cell for the missing column
    assert html.count('class="costbars"') == 10
    assert "✓" in html and "asserted outcomes met" in html


def test_the_page_needs_no_network(run: Run) -> None:
    html = render_report(run)
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "@import" not in html and "url(" not in html


def test_each_row_draws_every_band_as_a_region(run: Run) -> None:
    html = render_report(run)
    (sw, _missing) = run.scenarios[0].backends
    frames = [shot for shots in sw.maps for shot in shots]
    maps = large_maps(html)
    assert len(maps) == len(frames)
    for svg, shot in zip(maps, frames, strict=True):
        assert svg.count('class="region"') == region_count(shot) > 0


def test_memory_map_scales_bands_to_the_gpa_axis() -> None:
    shot = MemoryMap(
        "vm",
        0,
        512,
        {"attribute": [Band(0, 256, "private"), Band(256, 512, "shared")], "gmem": [Band(0, 512, "hole")]},
    )
    svg = memory_map(shot)
    widths = [float(w) for w in re.findall(r'class="region"[^>]*width="([0-9.]+)"', svg)]
    assert widths == [395.0, 395.0, 790.0]
    assert 'data-value="private"' in svg and "<title>attribute: private, gpa [0x0, 0x100000)" in svg
    assert ">2M</text>" in svg  # the axis ends at 2 MiB
    assert region_count(shot) == 3 and memory_map(shot, thumbnail=True).count("<text") == 0


def test_cost_bars_scale_to_the_largest() -> None:
    svg = cost_bars("exits", [("sw", 2), ("snp", 4), ("linux", None)])
    widths = [float(w) for w in re.findall(r'class="bar"[^>]*width="([0-9.]+)"', svg)]
    assert widths == [160.0, 320.0] and "—" in svg


def test_guestmem_report_reads_run_json(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "run.json"
    out = tmp_path / "report.html"
    assert main(["run", "destructive-conversion", "--backend", "sw", "--json", str(data)]) == 0
    assert main(["report", str(data), "-o", str(out)]) == 0
    assert out.read_text().count('class="memmap"') > 5
    assert read_run(str(data)).scenarios[0].name == "destructive-conversion"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"scenarios": [{"nope": 1}]}))
    assert main(["report", str(bad)]) == 2
    assert "cannot read" in capsys.readouterr().out


def test_run_writes_the_report_directly(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "direct.html"
    assert main(["run", "restricted-memslot", "--backend", "sw", "--report", str(out)]) == 0
    assert "restricted-memslot" in out.read_text()
