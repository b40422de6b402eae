"""Training curves as SVG drawn on the server: no plotting library in the browser, nothing to fetch.

Series differ by line pattern and marker shape as well as colour (readable without colour), and the
figure carries a title and a text summary for screen readers. Styling is by class (console.css):
the strict Content-Security-Policy allows no inline style.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup, escape

Point = tuple[float, float]

_W, _H = 640, 280
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 16, 16, 40


@dataclass(frozen=True)
class Series:
    name: str
    css: str  # class: line pattern and colour in console.css
    marker: str  # "circle" | "square"
    points: Sequence[Point]


def curves_from_events(events: Sequence[dict[str, Any]]) -> tuple[Series, Series]:
    """Training loss and eval loss by step from a fine-tune's `metrics` events (one point per step)."""
    loss: dict[int, float] = {}
    evals: dict[int, float] = {}
    for event in events:
        if event.get("type") != "metrics":
            continue
        data = event.get("data") or {}
        step = data.get("step")
        if not isinstance(step, int):
            continue
        for target, key in ((loss, "loss"), (evals, "eval_loss")):
            value = data.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                target[step] = float(value)
    return (Series("training loss", "series-loss", "circle", sorted(loss.items())),
            Series("eval loss", "series-eval", "square", sorted(evals.items())))


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def _label(value: float) -> str:
    return f"{value:.4g}"


def line_chart(title: str, series: Sequence[Series], *, x_label: str = "step", y_label: str = "loss") -> Markup:
    drawn = [s for s in series if s.points]
    xs = [x for s in drawn for x, _ in s.points]
    ys = [y for s in drawn for _, y in s.points]
    summary = "; ".join(f"{s.name}: {len(s.points)} points, last {_label(s.points[-1][1])} at {x_label} "
                        f"{int(s.points[-1][0])}" for s in drawn) or "no points yet"
    parts = [f'<svg class="chart" viewBox="0 0 {_W} {_H}" role="img" aria-labelledby="chart-title chart-desc" '
             f'xmlns="http://www.w3.org/2000/svg" data-points="{len(xs)}">',
             f'<title id="chart-title">{escape(title)}</title>',
             f'<desc id="chart-desc">{escape(summary)}</desc>']
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def px(x: float) -> float:
        return _LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return _TOP + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts.append(f'<rect class="plot-area" x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}"/>')
    for y in _ticks(y0, y1):
        parts.append(f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{py(y):.1f}" y2="{py(y):.1f}"/>'
                     f'<text class="tick" x="{_LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{_label(y)}</text>')
    for x in _ticks(x0, x1):
        parts.append(f'<text class="tick" x="{px(x):.1f}" y="{_H - _BOTTOM + 16}" text-anchor="middle">'
                     f'{_label(x)}</text>')
    parts.append(f'<text class="axis-label" x="{_LEFT + plot_w / 2:.0f}" y="{_H - 4}" text-anchor="middle">'
                 f'{escape(x_label)}</text>')
    parts.append(f'<text class="axis-label" x="12" y="{_TOP + plot_h / 2:.0f}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {_TOP + plot_h / 2:.0f})">{escape(y_label)}</text>')
    if not xs:
        parts.append(f'<text class="empty" x="{_LEFT + plot_w / 2:.0f}" y="{_TOP + plot_h / 2:.0f}" '
                     'text-anchor="middle">no points yet</text>')
    for s in drawn:
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s.points)
        parts.append(f'<g class="{s.css}" data-series="{escape(s.name)}">'
                     f'<polyline class="line" fill="none" points="{coords}"/>')
        for x, y in s.points[-200:]:  # markers for the latest points only: a long run stays light
            if s.marker == "circle":
                parts.append(f'<circle class="marker" cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5"/>')
            else:
                parts.append(f'<rect class="marker" x="{px(x) - 2.5:.1f}" y="{py(y) - 2.5:.1f}" width="5" '
                             'height="5"/>')
        parts.append("</g>")
    legend_x = _LEFT + 8
    for i, s in enumerate(series):
        y = _TOP + 14 + i * 16
        shape = (f'<circle class="marker" cx="{legend_x + 12}" cy="{y - 4}" r="3"/>' if s.marker == "circle" else
                 f'<rect class="marker" x="{legend_x + 9}" y="{y - 7}" width="6" height="6"/>')
        parts.append(f'<g class="legend {s.css}"><line class="line" x1="{legend_x}" x2="{legend_x + 24}" '
                     f'y1="{y - 4}" y2="{y - 4}"/>{shape}<text x="{legend_x + 30}" y="{y}">{escape(s.name)} '
                     f'({len(s.points)})</text></g>')
    parts.append("</svg>")
    return Markup("".join(parts))
