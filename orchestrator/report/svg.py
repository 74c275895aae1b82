"""Line charts as inline SVG: axes with round ticks, one path per series, a legend, values on hover.

Drawn here rather than by a JavaScript library so the report is one file that needs no network and
no script to show its data.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Callable

# Colour-blind-safe (Okabe-Ito), then darker variants for runs x ranks beyond eight.
PALETTE = [
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#F0E442",
    "#000000",
    "#004a75",
    "#9c6b00",
    "#00664b",
    "#8f3f00",
]
WIDTH, HEIGHT = 560, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 28, 40


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    dashed: bool = False
    color: str | None = None


@dataclass
class Chart:
    key: str  # the chart's id in the page (data-chart)
    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    y_format: Callable[[float], str] = lambda v: f"{v:g}"
    log_y: bool = False
    markers: bool = False  # a dot on every point (few points: workers, not steps)
    x_ticks: list[float] | None = None  # where to put the x ticks (worker counts); None: round numbers
    empty_note: str = "no data yet"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]: steps of 1, 2 or 5 times a power of ten."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def render(chart: Chart) -> str:
    """The chart as an ``<svg>`` element; a chart without data says so instead of drawing empty axes."""
    drawn = [s for s in chart.series if s.points]
    title = html.escape(chart.title)
    if not drawn:
        return (
            f'<svg class="chart empty" data-chart="{chart.key}" viewBox="0 0 {WIDTH} 60" role="img">'
            f'<text x="8" y="20" class="title">{title}</text>'
            f'<text x="8" y="44" class="note">{html.escape(chart.empty_note)}</text></svg>'
        )
    transform = (lambda v: math.log10(v)) if chart.log_y else (lambda v: v)
    xs = [x for s in drawn for x, _ in s.points]
    ys = [transform(y) for s in drawn for _, y in s.points if not chart.log_y or y > 0]
    x_ticks = sorted(chart.x_ticks) if chart.x_ticks and len(chart.x_ticks) > 1 else nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(min(ys), max(ys)) if ys else [0.0, 1.0]
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / ((x1 - x0) or 1) * plot_w

    def py(y: float) -> float:
        return TOP + plot_h - (transform(y) - y0) / ((y1 - y0) or 1) * plot_h

    parts = [
        f'<svg class="chart" data-chart="{chart.key}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{title}">',
        f'<text x="{LEFT}" y="18" class="title">{title}</text>',
    ]
    for tick in x_ticks:
        parts.append(
            f'<line class="grid" x1="{px(tick):.1f}" x2="{px(tick):.1f}" y1="{TOP}" y2="{TOP + plot_h}"/>'
            f'<text class="tick" x="{px(tick):.1f}" y="{TOP + plot_h + 14}" '
            f'text-anchor="middle">{tick:g}</text>'
        )
    for tick in y_ticks:
        y = TOP + plot_h - (tick - y0) / ((y1 - y0) or 1) * plot_h
        label = chart.y_format(10**tick if chart.log_y else tick)
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>'
        )
    parts.append(
        f'<text class="axis" x="{LEFT + plot_w / 2}" y="{HEIGHT - 6}" text-anchor="middle">'
        f"{html.escape(chart.x_label)}</text>"
    )
    parts.append(
        f'<text class="axis" transform="translate(14 {TOP + plot_h / 2}) rotate(-90)" '
        f'text-anchor="middle">{html.escape(chart.y_label)}</text>'
    )
    for index, series in enumerate(drawn):
        color = series.color or PALETTE[index % len(PALETTE)]
        points = [(x, y) for x, y in series.points if not chart.log_y or y > 0]
        path = " ".join(f"{'M' if i == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for i, (x, y) in enumerate(points))
        if len(points) == 1:  # one point: a dot, so a run with one record still shows
            path += " l0.01,0"
        name = html.escape(series.name)
        last_x, last_y = points[-1]
        parts.append(
            f'<path class="series{" dashed" if series.dashed else ""}" data-series="{name}" '
            f'data-points="{len(points)}" d="{path}" stroke="{color}">'
            f"<title>{name}: {chart.y_format(last_y)} at {last_x:g}</title></path>"
        )
        if chart.markers:
            parts.extend(
                f'<circle class="marker" cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}">'
                f"<title>{name}: {chart.y_format(y)} at {x:g}</title></circle>"
                for x, y in points
            )
    legend_y = TOP + 6
    for index, series in enumerate(drawn):
        color = series.color or PALETTE[index % len(PALETTE)]
        y = legend_y + 14 * index
        dash = ' stroke-dasharray="4 3"' if series.dashed else ""
        parts.append(
            f'<g class="legend"><line x1="{LEFT + plot_w - 150}" x2="{LEFT + plot_w - 134}" y1="{y}" '
            f'y2="{y}" stroke="{color}"{dash}/>'
            f'<text x="{LEFT + plot_w - 130}" y="{y + 4}">{html.escape(series.name)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


# What the report's stylesheet gives a chart, for an .svg file that stands alone.
STANDALONE_CSS = (
    "text{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif}.title{font-weight:600;font-size:13px}"
    ".tick,.legend text{font-size:10px;fill:#475467}.axis{font-size:11px;fill:#475467}.grid{stroke:#eef0f3}"
    ".note{font-size:12px;fill:#667085}.series{fill:none;stroke-width:1.6;stroke-linejoin:round}"
    ".series.dashed{stroke-dasharray:5 3}"
)


def standalone(chart: Chart) -> str:
    """The chart as an SVG document (its own namespace, style and white background)."""
    head, _, rest = render(chart).partition(">")
    size = f'width="{WIDTH}" height="{HEIGHT}"' if 'class="chart"' in head else ""
    head = head.replace("<svg ", f'<svg xmlns="http://www.w3.org/2000/svg" {size} ', 1)
    return f'{head}><style>{STANDALONE_CSS}</style><rect width="100%" height="100%" fill="#fff"/>{rest}\n'
