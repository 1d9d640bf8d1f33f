"""SVG pictures of a run: memory maps (gpa across, one band per layer) and cost bars.

Every drawn region of a memory map is a ``<rect class="region">`` carrying its layer, value
and gfn range as ``data-*`` attributes and a ``<title>`` tooltip, so a browser (or a test)
can count and inspect them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape

from guestmem.scenario.memmap import LAYERS, Band, MemoryMap

__all__ = ["COLORS", "cost_bars", "memory_map", "region_count"]

WIDTH = 880
LABEL = 90
BAND = 22
GAP = 6
AXIS = 26
#: Fill colour of each value of each layer (anything else is grey).
COLORS: dict[str, str] = {
    "private": "#7b3294",
    "shared": "#1b9e77",
    "hole": "#f0f0f0",
    "allocated": "#fdb863",
    "prepared": "#e66101",
    "poisoned": "#111111",
    "anonymous": "#c7c7c7",
    "released": "#9e9e9e",
    "private 4K": "#8c6bb1",
    "private 2M": "#4d004b",
    "private 1G": "#2d0030",
    "shared 4K": "#66c2a5",
    "shared 2M": "#1b7837",
    "shared 1G": "#00441b",
    "host": "#dcdcdc",
    "guest": "#d7191c",
    "hypervisor": "#fdae61",
    "...": "#777777",
}
_LAYER_VALUES = {
    "attribute": ("private", "shared"),
    "gmem": ("hole", "allocated", "prepared", "poisoned", "anonymous", "released"),
    "stage2": ("private 4K", "private 2M", "shared 4K", "shared 2M"),
    "owner": ("host", "guest", "shared", "hypervisor"),
}
_OWNER_COLORS = {"shared": "#2c7bb6"}


def _color(layer: str, value: str) -> str:
    if layer == "owner" and value in _OWNER_COLORS:
        return _OWNER_COLORS[value]
    return COLORS.get(value, "#bbbbbb")


def _gpa(gfn: int) -> str:
    gpa = gfn << 12
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if gpa and gpa % size == 0:
            return f"{gpa // size}{unit}"
    return f"{gpa:#x}"


def _layers(shot: MemoryMap) -> list[str]:
    return [layer for layer in LAYERS if layer in shot.layers]


def region_count(shot: MemoryMap) -> int:
    """How many ``rect.region`` :func:`memory_map` draws for *shot*."""
    return sum(len(shot.layers[layer]) for layer in _layers(shot))


def memory_map(shot: MemoryMap, *, thumbnail: bool = False, title: str = "") -> str:
    """One VM's map as an SVG: a band per layer over the gpa range, an axis below."""
    layers = _layers(shot)
    span = max(1, shot.end - shot.start)
    left = 0 if thumbnail else LABEL
    width = 160 if thumbnail else WIDTH
    band = 6 if thumbnail else BAND
    gap = 1 if thumbnail else GAP
    inner = width - left
    height = len(layers) * (band + gap) + (0 if thumbnail else AXIS)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="memmap{" thumb" if thumbnail else ""}" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title or "memory map of " + shot.vm)}">'
    ]
    for i, layer in enumerate(layers):
        y = i * (band + gap)
        if not thumbnail:
            parts.append(f'<text class="layer" x="0" y="{y + band - 6}">{escape(layer)}</text>')
            parts.append(f'<rect class="lane" x="{left}" y="{y}" width="{inner}" height="{band}"/>')
        for b in shot.layers[layer]:
            parts.append(_rect(layer, b, shot.start, span, left, inner, y, band))
    if not thumbnail:
        axis_y = len(layers) * (band + gap) + 12
        parts.append(f'<line class="axis" x1="{left}" y1="{axis_y - 10}" x2="{width}" y2="{axis_y - 10}"/>')
        for k in range(5):
            gfn = shot.start + span * k // 4
            x = left + inner * k / 4
            anchor = "start" if k == 0 else "end" if k == 4 else "middle"
            parts.append(
                f'<text class="tick" x="{x:.1f}" y="{axis_y + 4}" text-anchor="{anchor}">{_gpa(gfn)}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _rect(layer: str, b: Band, start: int, span: int, left: int, inner: int, y: int, band: int) -> str:
    x = left + (b.start - start) * inner / span
    w = max(0.75, (b.end - b.start) * inner / span)
    tip = f"{layer}: {b.value}, gpa [{b.start << 12:#x}, {b.end << 12:#x}) ({b.end - b.start} page(s))"
    return (
        f'<rect class="region" data-layer="{layer}" data-value="{escape(b.value)}" '
        f'data-start="{b.start}" data-end="{b.end}" x="{x:.2f}" y="{y}" width="{w:.2f}" height="{band}" '
        f'fill="{_color(layer, b.value)}"><title>{escape(tip)}</title></rect>'
    )


def legend(layers: Iterable[str]) -> str:
    """The colours of every value the given layers can take, as HTML."""
    items = []
    for layer in layers:
        chips = "".join(
            f'<span class="chip"><i style="background:{_color(layer, v)}"></i>{escape(v)}</span>'
            for v in _LAYER_VALUES.get(layer, ())
        )
        items.append(f'<div class="legend-row"><b>{escape(layer)}</b> {chips}</div>')
    return '<div class="legend">' + "".join(items) + "</div>"


def cost_bars(category: str, values: Sequence[tuple[str, int | None]]) -> str:
    """One cost category across backends as horizontal bars (scaled to the largest)."""
    top = max([v for _, v in values if v] or [1])
    row = 18
    width = 520
    name_w = 110
    height = row * len(values) + 4
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="costbars" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(category)}">'
    ]
    for i, (backend, value) in enumerate(values):
        y = i * row + 2
        parts.append(f'<text class="bar-label" x="0" y="{y + 12}">{escape(backend)}</text>')
        if value is None:
            parts.append(f'<text class="bar-value na" x="{name_w}" y="{y + 12}">—</text>')
            continue
        w = (width - name_w - 90) * value / top
        parts.append(
            f'<rect class="bar" data-backend="{escape(backend)}" data-value="{value}" x="{name_w}" y="{y}" '
            f'width="{max(w, 0.5 if value else 0):.2f}" height="{row - 5}"><title>{value:,}</title></rect>'
        )
        parts.append(f'<text class="bar-value" x="{name_w + w + 4:.2f}" y="{y + 12}">{value:,}</text>')
    parts.append("</svg>")
    return "".join(parts)
