"""The report in a real headless Chromium: it loads without console errors, the slider
shows each step, and a screenshot of the memory map is not blank.

Needs Debian's ``chromium`` (``apt-get install -y chromium``; ``.ci/run`` installs it) and
the ``playwright`` package (``tox -e report``); Playwright drives the system browser, it
never downloads one.  Without them the tests are skipped with the reason; with
``GUESTMEM_BROWSER=required`` (set by ``.ci/run``, where apt installed it) a missing
browser is a failure.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from guestmem.report import write_report
from guestmem.report.svg import region_count
from guestmem.scenario import builtins
from guestmem.scenario.run import Run, run_scenario

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:  # an environment without the report's test dependencies
        pytest.skip("the playwright package is not installed (tox -e report installs it)")
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        reason = f"no browser at {CHROMIUM} (apt-get install -y chromium; .ci/run installs it)"
        if os.environ.get("GUESTMEM_BROWSER") == "required":
            pytest.fail(f"GUESTMEM_BROWSER=required but {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        found = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield found
        found.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, Run]:
    scenarios = [builtins.load(name) for name in ("destructive-conversion", "restricted-memslot")]
    run = Run(scenarios=[run_scenario(s, ["sw", "tdx"], maps=True) for s in scenarios])
    path = tmp_path_factory.mktemp("report") / "report.html"
    write_report(run, str(path))
    return path, run


def open_page(browser: Any, path: pathlib.Path) -> tuple[Any, list[str]]:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on(
        "console",
        lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None,
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on(
        "request", lambda r: problems.append(f"request: {r.url}") if not r.url.startswith("file:") else None
    )
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, problems


def test_the_page_loads_without_console_errors_or_network(
    browser: Any, report: tuple[pathlib.Path, Run]
) -> None:
    page, problems = open_page(browser, report[0])
    assert page.title() == "guestmem run"
    assert problems == []
    page.close()


def test_every_map_has_its_regions(browser: Any, report: tuple[pathlib.Path, Run]) -> None:
    path, run = report
    page, _ = open_page(browser, path)
    frames = page.locator("svg.memmap:not(.thumb)")
    shots = [shot for s in run.scenarios for b in s.backends for row in b.maps for shot in row]
    assert frames.count() == len(shots) > 10
    for i in (0, len(shots) // 2, len(shots) - 1):
        assert frames.nth(i).locator("rect.region").count() == region_count(shots[i])
    page.close()


def test_the_slider_shows_each_step(browser: Any, report: tuple[pathlib.Path, Run]) -> None:
    page, problems = open_page(browser, report[0])
    box = page.locator(".maps").first
    active = box.locator(".frame.active")
    assert active.count() == 1
    last = active.get_attribute("data-row")
    box.locator("input[type=range]").fill("0")
    assert box.locator(".frame.active").get_attribute("data-row") == "0" != last
    assert box.locator(".step-label").inner_text().startswith("after step 0")
    box.locator(".strip button").nth(3).click()
    assert box.locator(".frame.active").get_attribute("data-row") == "3"
    assert problems == []
    page.close()


def test_a_screenshot_of_the_map_is_not_blank(browser: Any, report: tuple[pathlib.Path, Run]) -> None:
    page, _ = open_page(browser, report[0])
    svg = page.locator(".maps .frame.active svg.memmap").first
    width, height, pixels = decode_png(svg.screenshot())
    assert width == 880 and abs(height - int(svg.get_attribute("height") or 0)) <= 1
    colours = {p for p in pixels if p != (255, 255, 255)}
    inked = sum(1 for p in pixels if sum(p) < 600)
    assert len(colours) > 5 and inked > width * 10  # bands and text, not an empty box
    page.close()


def decode_png(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Width, height and RGB pixels of an 8-bit RGB/RGBA PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    height = colour = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    step = 4 if colour == 6 else 3
    raw = zlib.decompress(idat)
    stride = width * step
    rows: list[bytearray] = []
    prev = bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - step] if x >= step else 0
            b = prev[x]
            c = prev[x - step] if x >= step else 0
            if kind == 1:
                line[x] = (line[x] + a) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + b) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(line)
        prev = line
    pixels = [tuple(row[x : x + 3]) for row in rows for x in range(0, stride, step)]
    return width, height, pixels  # type: ignore[return-value]
