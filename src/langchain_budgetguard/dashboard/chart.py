"""Spend over a window as inline SVG, drawn on the server (no JavaScript, nothing fetched).

Coordinates are computed with integers (seconds, nano-USD) and Decimal; the labels print the
exact amounts. A step line: spend only changes when a call settles.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from html import escape

from ..money import usd_to_nano
from .data import SpendPoint, exact

__all__ = ["spend_chart"]

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 70, 16, 16, 36
_Q = Decimal("0.1")


def _coord(value: Decimal) -> str:
    return str(value.quantize(_Q, rounding=ROUND_HALF_EVEN))


def spend_chart(points: Sequence[SpendPoint], since: datetime | None, until: datetime, limit: Decimal | None = None,
                title: str = "spend over the window") -> str:
    """An ``<svg>`` of cumulative spend from ``since`` (default: the first point) to ``until``.

    ``limit``, when given, is drawn as a dashed line (the y axis reaches it)."""
    start = since or (points[0].at if points else until)
    t0, t1 = int(start.timestamp()), max(int(until.timestamp()), int(start.timestamp()) + 1)
    top_nano = max([usd_to_nano(p.spent) for p in points] + [usd_to_nano(limit) if limit else 0, 1])
    plot_w, plot_h = Decimal(WIDTH - LEFT - RIGHT), Decimal(HEIGHT - TOP - BOTTOM)

    def x(when: datetime) -> Decimal:
        t = min(max(int(when.timestamp()), t0), t1)
        return LEFT + plot_w * (t - t0) / (t1 - t0)

    def y(usd: Decimal) -> Decimal:
        return TOP + plot_h - plot_h * usd_to_nano(usd) / top_nano

    path = [f"M{_coord(x(start))},{_coord(y(Decimal(0)))}"]
    last = Decimal(0)
    for p in points:
        path.append(f"H{_coord(x(p.at))}")
        path.append(f"V{_coord(y(p.spent))}")
        last = p.spent
    path.append(f"H{_coord(x(until))}")
    top_usd = Decimal(top_nano) / Decimal(1_000_000_000)
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="{escape(title)}: ${exact(last)} spent">',
        f"<title>{escape(title)}</title>",
        f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}"/>',
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}"/>',
        f'<text class="tick" x="{LEFT - 6}" y="{TOP + plot_h}" text-anchor="end">$0</text>',
        f'<text class="tick" x="{LEFT - 6}" y="{TOP + 10}" text-anchor="end">${exact(top_usd)}</text>',
        f'<text class="tick" x="{LEFT}" y="{HEIGHT - 10}">{escape(start.strftime("%Y-%m-%d %H:%M"))}</text>',
        f'<text class="tick" x="{WIDTH - RIGHT}" y="{HEIGHT - 10}" text-anchor="end">'
        f'{escape(until.strftime("%Y-%m-%d %H:%M"))}</text>',
    ]
    if limit:
        parts.append(f'<line class="limit" x1="{LEFT}" y1="{_coord(y(limit))}" x2="{WIDTH - RIGHT}" '
                     f'y2="{_coord(y(limit))}"><title>limit ${exact(limit)}</title></line>')
    parts.append(f'<path class="spend" d="{" ".join(path)}"/>')
    for p in points:
        parts.append(f'<circle class="call" cx="{_coord(x(p.at))}" cy="{_coord(y(p.spent))}" r="2.5">'
                     f"<title>{escape(p.at.isoformat())}: ${exact(p.spent)}</title></circle>")
    parts.append("</svg>")
    return "".join(parts)
