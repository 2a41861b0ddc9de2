"""Inline SVG plots for the HTML report, drawn in Python: no matplotlib, no JavaScript, no network."""
from __future__ import annotations

import math
from html import escape

# One colour per variant, in report order (Tableau 10). Tests find the plots by these colours.
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#7f7f7f")
FONT = 'font-family="system-ui, sans-serif" font-size="12"'


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 1e-3
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(v: float, span: float) -> str:
    digits = max(0, min(6, -math.floor(math.log10(span)) + 1)) if span > 0 else 2
    return f"{v:.{digits}f}"


def _padded(values: list[float], frac: float = 0.08) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * frac or (abs(hi) * 0.01 or 0.01)
    return lo - pad, hi + pad


def _place_label(cx: float, cy: float, name: str, placed: list, left_edge: float, right_edge: float):
    """First candidate position (right/left of the point, then above/below) whose box overlaps no point
    and no label placed so far; labels of close points would otherwise print over each other."""
    w, h = 6.6 * len(name), 13.0
    side = ("end", -12) if cx > right_edge - w - 20 else ("start", 12)
    for dy in (4, -12, 20, -26, 34, -40, 48):
        for anchor, dx in (side, ("end", -12) if side[0] == "start" else ("start", 12)):
            x0 = cx + dx - (w if anchor == "end" else 0)
            box = (x0, cy + dy - h + 3, x0 + w, cy + dy + 3)
            inside = box[0] >= left_edge and box[2] <= right_edge
            if inside and all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed):
                placed.append(box)
                return cx + dx, cy + dy, anchor
    placed.append((cx + side[1], cy - 10, cx + side[1] + w, cy))
    return cx + side[1], cy - 10, side[0]


def scatter(points: list[dict], x_label: str, y_label: str, title: str, width: int = 540, height: int = 360,
            log_x: bool | None = None, x_unit: str = "ms") -> str:
    """points: {"name", "x", "y", "colour"}; x is latency or size, in `x_unit` (log scale when it spans > 10x)."""
    points = [p for p in points if p["x"] is not None and p["y"] is not None and p["x"] > 0]
    left, right, top, bottom = 70, 20, 34, 46
    pw, ph = width - left - right, height - top - bottom
    parts = [f'<svg class="plot scatter" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
             f'<rect class="plot-area" x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#f7f8fa" stroke="#c8ccd2"/>',
             f'<text x="{left}" y="20" {FONT} font-weight="600">{escape(title)}</text>']
    if not points:
        parts.append(f'<text x="{left + 10}" y="{top + 24}" {FONT}>no data</text></svg>')
        return "".join(parts)
    xs, ys = [p["x"] for p in points], [p["y"] for p in points]
    log_x = (max(xs) / min(xs) > 10) if log_x is None else log_x
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    x0, x1 = _padded([fx(v) for v in xs])
    y0, y1 = _padded(ys)
    sx = lambda v: left + (fx(v) - x0) / (x1 - x0) * pw  # noqa: E731
    sy = lambda v: top + ph - (v - y0) / (y1 - y0) * ph  # noqa: E731
    for t in _ticks(y0, y1):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#e3e6ea"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" {FONT}>{_fmt(t, y1 - y0)}</text>')
    xticks = [10 ** t for t in _ticks(x0, x1)] if log_x else _ticks(x0, x1)
    for t in xticks:
        parts.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top}" y2="{top + ph}" stroke="#e3e6ea"/>'
                     f'<text x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle" {FONT}>{t:.3g}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle" {FONT}>{escape(x_label)}'
                 f'{" (log scale)" if log_x else ""}</text>'
                 f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" text-anchor="middle" {FONT}>'
                 f'{escape(y_label)}</text>')
    # boxes labels must not cover: every point, then each label as it is placed
    placed = [(sx(p["x"]) - 9, sy(p["y"]) - 9, sx(p["x"]) + 9, sy(p["y"]) + 9) for p in points]
    for p in points:
        cx, cy = sx(p["x"]), sy(p["y"])
        tx, ty, anchor = _place_label(cx, cy, p["name"], placed, left, left + pw)
        parts.append(f'<circle class="point" data-variant="{escape(p["name"])}" cx="{cx:.1f}" cy="{cy:.1f}" r="8" '
                     f'fill="{p["colour"]}"><title>{escape(p["name"])}: {p["x"]:.3g} {escape(x_unit)}, '
                     f'{p["y"]:.5f}</title></circle>'
                     f'<text x="{tx:.1f}" y="{ty:.1f}" text-anchor="{anchor}" {FONT}>{escape(p["name"])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def percentiles(rows: list[dict], title: str, width: int = 540, bar: int = 18) -> str:
    """rows: {"name", "p50", "p90", "p99", "colour"} (ms). Bar to p50, whisker to p99, ticks at p90/p99."""
    left, right, top = 190, 60, 34
    height = top + len(rows) * (bar + 10) + 50
    pw = width - left - right
    hi = max((r["p99"] for r in rows), default=1.0) * 1.05 or 1.0
    sx = lambda v: left + v / hi * pw  # noqa: E731
    parts = [f'<svg class="plot percentiles" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
             f'<text x="10" y="20" {FONT} font-weight="600">{escape(title)}</text>']
    for t in _ticks(0, hi):
        parts.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top}" y2="{height - 44}" stroke="#e3e6ea"/>'
                     f'<text x="{sx(t):.1f}" y="{height - 30}" text-anchor="middle" {FONT}>{t:.3g}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 10}" text-anchor="middle" {FONT}>'
                 'ms per call (bar: p50; ticks: p90, p99)</text>')
    for i, r in enumerate(rows):
        y = top + i * (bar + 10)
        mid = y + bar / 2
        parts.append(f'<text x="{left - 8}" y="{mid + 4:.1f}" text-anchor="end" {FONT}>{escape(r["name"][:28])}</text>'
                     f'<rect class="bar" data-variant="{escape(r["name"])}" x="{left}" y="{y}" '
                     f'width="{max(1.0, sx(r["p50"]) - left):.1f}" height="{bar}" fill="{r["colour"]}">'
                     f'<title>{escape(r["name"])}: p50 {r["p50"]:.3g} ms, p90 {r["p90"]:.3g}, p99 {r["p99"]:.3g}</title></rect>'
                     f'<line x1="{sx(r["p50"]):.1f}" x2="{sx(r["p99"]):.1f}" y1="{mid}" y2="{mid}" stroke="#333"/>'
                     f'<line x1="{sx(r["p90"]):.1f}" x2="{sx(r["p90"]):.1f}" y1="{y + 4}" y2="{y + bar - 4}" stroke="#333"/>'
                     f'<line x1="{sx(r["p99"]):.1f}" x2="{sx(r["p99"]):.1f}" y1="{y + 1}" y2="{y + bar - 1}" stroke="#333" '
                     f'stroke-width="2"/><text x="{sx(r["p99"]) + 6:.1f}" y="{mid + 4:.1f}" {FONT}>{r["p50"]:.3g}</text>')
    parts.append("</svg>")
    return "".join(parts)
