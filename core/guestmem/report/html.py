"""One self-contained HTML page for a run: no network, no external file.

Per scenario: what it shows and cites, the step table (per step the outcome on every
backend), the cost bars of every category, and per backend the memory map of each VM
after the selected step (a slider) with the small multiples of every step beside it.
"""

from __future__ import annotations

from html import escape

from guestmem.intents import COST_CATEGORIES
from guestmem.report.svg import cost_bars, legend, memory_map
from guestmem.scenario.memmap import LAYERS
from guestmem.scenario.run import BackendRun, Outcome, Run, ScenarioRun
from guestmem.scenario.table import detail_names

__all__ = ["render"]

_CSS = """
:root { --fg:#1d1d1f; --muted:#6e6e73; --line:#d2d2d7; --ok:#1a7f37; --fail:#cf222e; }
body {
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
  color: var(--fg);
  margin: 24px;
}
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 4px; border-top: 1px solid var(--line); padding-top: 16px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.muted { color: var(--muted); }
code { font-size: 12px; }
table.steps { border-collapse: collapse; font-size: 12.5px; margin: 8px 0; }
table.steps th, table.steps td {
  border: 1px solid var(--line);
  padding: 3px 6px;
  vertical-align: top;
  text-align: left;
}
table.steps th { background: #f5f5f7; }
td.row { color: var(--muted); text-align: right; }
td.ok { color: var(--ok); }
td.error { color: #9a6700; }
td.exit { color: #0969da; }
td.sigbus { color: #8250df; }
td.crash, td.raised { color: var(--fail); font-weight: 600; }
td.na, td.skipped { color: #8c959f; }
td.fail { background: #ffebe9; }
.mark-pass { color: var(--ok); }
.mark-fail { color: var(--fail); font-weight: 700; }
.failures { color: var(--fail); font-size: 11.5px; }
.costs { display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr)); gap: 4px 24px; }
.costs h4 { margin: 6px 0 0; font-size: 12.5px; }
.costs h4 span { font-weight: normal; color: var(--muted); }
svg text { font: 11px system-ui, sans-serif; fill: var(--fg); }
svg .tick { fill: var(--muted); font-size: 10px; }
svg .lane { fill: #fafafa; stroke: #e5e5e5; }
svg .axis { stroke: #c7c7cc; }
svg .bar { fill: #5b8def; }
.maps { margin: 8px 0 18px; }
.vm > span { display: block; font-size: 11px; }
.frame { display: none; }
.frame.active { display: block; }
.strip { display: flex; flex-wrap: wrap; gap: 6px; margin-top: 8px; }
.strip button {
  border: 1px solid var(--line);
  background: #fff;
  padding: 2px;
  cursor: pointer;
  font-size: 10px;
  color: var(--muted);
}
.strip button.active { border-color: #0969da; box-shadow: 0 0 0 1px #0969da; }
.slider { display: flex; align-items: center; gap: 10px; }
.slider input { width: 320px; }
.legend { font-size: 11.5px; margin: 6px 0; }
.legend-row { margin: 2px 0; }
.chip { display: inline-flex; align-items: center; gap: 3px; margin-right: 10px; }
.chip i { display: inline-block; width: 11px; height: 11px; border: 1px solid #999; }
.summary.fail { color: var(--fail); }
.summary.pass { color: var(--ok); }
"""

_JS = """
document.querySelectorAll('.maps').forEach(function (box) {
  var frames = box.querySelectorAll('.frame');
  var buttons = box.querySelectorAll('.strip button');
  var slider = box.querySelector('input[type=range]');
  var label = box.querySelector('.step-label');
  function show(i) {
    frames.forEach(function (f, k) { f.classList.toggle('active', k === i); });
    buttons.forEach(function (b, k) { b.classList.toggle('active', k === i); });
    if (slider) { slider.value = String(i); }
    if (label && frames[i]) { label.textContent = frames[i].getAttribute('data-step'); }
  }
  if (slider) { slider.addEventListener('input', function () { show(Number(slider.value)); }); }
  buttons.forEach(function (b, k) { b.addEventListener('click', function () { show(k); }); });
  show(frames.length - 1);
});
"""


def render(run: Run, title: str = "guestmem run") -> str:
    """The report page of *run*."""
    checks = [o.check for s in run.scenarios for b in s.backends for o in b.outcomes if o.check]
    failed = checks.count("fail")
    summary = f"{len(checks) - failed} of {len(checks)} asserted outcomes met"
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="summary {"fail" if failed else "pass"}">{escape(summary)}; '
        f"{len(run.scenarios)} scenario(s)</p>",
        _toc(run),
    ]
    for index, scenario in enumerate(run.scenarios):
        body.append(_scenario(scenario, index))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>"
        + "".join(body)
        + f"<script>{_JS}</script></body></html>"
    )


def _toc(run: Run) -> str:
    items = "".join(
        f'<li><a href="#s{i}">{escape(s.name)}</a> <span class="muted">{escape(s.title)}</span></li>'
        for i, s in enumerate(run.scenarios)
    )
    return f"<ul>{items}</ul>"


def _scenario(s: ScenarioRun, index: int) -> str:
    parts = [f'<section class="scenario" id="s{index}"><h2>{escape(s.name)}</h2>']
    if s.title:
        parts.append(f"<p><b>{escape(s.title)}</b></p>")
    if s.shows:
        parts.append(f'<p class="muted">{escape(s.shows)}</p>')
    if s.cites:
        cites = "".join(f"<li><code>{escape(c)}</code></li>" for c in s.cites)
        parts.append(f'<details><summary class="muted">sources</summary><ul>{cites}</ul></details>')
    parts.append("<h3>Steps</h3>")
    parts.append(_steps(s))
    parts.append("<h3>Costs</h3>")
    parts.append(_costs(s))
    with_maps = [b for b in s.backends if b.maps and any(b.maps)]
    if with_maps:
        parts.append("<h3>Memory maps</h3>")
        parts.append(legend(LAYERS))
        for b_index, backend in enumerate(with_maps):
            parts.append(_maps(s, backend, f"s{index}b{b_index}"))
    parts.append("</section>")
    return "".join(parts)


def _cell(outcome: Outcome) -> str:
    status = "na" if outcome.status == "n/a" else outcome.status
    classes = [status] + (["fail"] if outcome.check == "fail" else [])
    mark = ""
    if outcome.check == "pass":
        mark = '<span class="mark-pass">✓</span> '
    elif outcome.check == "fail":
        mark = '<span class="mark-fail">✗</span> '
    failures = "".join(f'<div class="failures">{escape(f)}</div>' for f in outcome.failures)
    tip = f' title="{escape(outcome.detail)}"' if outcome.detail else ""
    return f'<td class="{" ".join(classes)}"{tip}>{mark}{escape(outcome.text)}{failures}</td>'


def _steps(s: ScenarioRun) -> str:
    head = "".join(
        f"<th>{escape(b.backend)}<br><span class='muted'>{escape(b.vm_type or 'not run')}</span></th>"
        for b in s.backends
    )
    rows = []
    for i, label in enumerate(s.rows):
        cells = []
        for b in s.backends:
            if b.ran:
                cells.append(_cell(b.outcomes[i]))
            elif i == 0:  # a backend that did not run: one cell for the whole column
                cells.append(f'<td class="na" rowspan="{len(s.rows)}">n/a: {escape(b.reason)}</td>')
        rows.append(f'<tr><td class="row">{i}</td><td>{escape(label)}</td>{"".join(cells)}</tr>')
    return f'<table class="steps"><tr><th>#</th><th>step</th>{head}</tr>{"".join(rows)}</table>'


def _costs(s: ScenarioRun) -> str:
    blocks = []
    for category, meaning in COST_CATEGORIES.items():
        values = [
            (b.backend, None if b.costs is None else b.costs.get(category, 0)) for b in s.backends if b.ran
        ]
        if not values:
            continue
        head = f"<h4>{escape(category)} <span>{escape(meaning)}</span></h4>"
        blocks.append(f"<div>{head}{cost_bars(category, values)}</div>")
    for name in detail_names(s):
        values = [(b.backend, b.details.get(name)) for b in s.backends if b.ran]
        head = f"<h4>{escape(name)} <span>this architecture's own operation</span></h4>"
        blocks.append(f"<div>{head}{cost_bars(name, values)}</div>")
    if not blocks:
        return '<p class="muted">no backend ran</p>'
    return f'<div class="costs">{"".join(blocks)}</div>'


def _maps(s: ScenarioRun, backend: BackendRun, key: str) -> str:
    frames, thumbs = [], []
    rows = [(i, shots) for i, shots in enumerate(backend.maps) if shots]
    for row, shots in rows:
        label = f"after step {row}: {s.rows[row]}"
        pictures = "".join(
            f'<div class="vm"><span class="muted">{escape(shot.vm)}</span>'
            f"{memory_map(shot, title=f'{backend.backend} {shot.vm} {label}')}</div>"
            for shot in shots
        )
        frames.append(f'<div class="frame" data-step="{escape(label)}" data-row="{row}">{pictures}</div>')
        thumb = memory_map(shots[0], thumbnail=True, title=label)
        thumbs.append(f'<button type="button" title="{escape(label)}">{thumb}<br>{row}</button>')
    last = max(0, len(rows) - 1)
    slider = (
        f'<div class="slider"><input type="range" min="0" max="{last}" value="{last}" '
        f'aria-label="step of {escape(backend.backend)}"><span class="step-label"></span></div>'
    )
    return (
        f'<div class="maps" id="{key}"><b>{escape(backend.backend)}</b> '
        f'<span class="muted">{escape(backend.vm_type)}</span>{slider}{"".join(frames)}'
        f'<div class="strip">{"".join(thumbs)}</div></div>'
    )
