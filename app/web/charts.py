"""Inline SVG for the stream page: the lineage graph and the per-version plots.

Drawn on the server from the versions the API shows (``VersionPublic``), so the page needs no
chart library: every point is a ``<circle class="point">`` a test can count, with a tooltip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from typing import Any

PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"]


@dataclass
class Series:
    label: str
    points: list[tuple[float, float, str]] = field(default_factory=list)  # x, y, tooltip


@dataclass
class Plot:
    key: str  # data-plot attribute: lambda, norms, removed, evaluations
    title: str
    x_label: str
    y_label: str
    series: list[Series]
    reference: str | None = None  # "sqrt": the λ_t = √t line, for the λ plot

    @property
    def point_count(self) -> int:
        return sum(len(s.points) for s in self.series)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _evaluations(version: Any) -> list[Any]:
    return list(getattr(version, "evaluations", None) or [])


def plots_for(versions: list[Any]) -> list[Plot]:
    """λ_t against √t, the task-vector norms, the projection's removed fraction, and any evaluation metrics."""
    folded = [v for v in versions if v.number > 0 and v.status == "succeeded" and v.metrics]
    lam = Series("λ_t")
    merged, expert = Series("merged ‖τ‖"), Series("expert ‖τ_t‖")
    removed = Series("removed fraction")
    for v in folded:
        m, t = v.metrics, v.number
        if (y := _num(m.get("lambda"))) is not None:
            lam.points.append((math.sqrt(t), y, f"v{t}: λ={y:.4g}, √t={math.sqrt(t):.3g}"))
        if (y := _num(m.get("merged_task_norm"))) is not None:
            merged.points.append((t, y, f"v{t}: merged ‖τ‖={y:.4g}"))
        if (y := _num(m.get("expert_task_norm"))) is not None:
            expert.points.append((t, y, f"v{t}: expert ‖τ‖={y:.4g}"))
        if (y := _num(m.get("removed_fraction"))) is not None:
            removed.points.append((t, y, f"v{t}: removed {y:.3%}"))
    plots = [
        Plot("lambda", "λ_t against √t", "√t", "λ_t", [lam], reference="sqrt"),
        Plot("norms", "task-vector norms", "version t", "‖τ‖", [merged, expert]),
        Plot("removed", "fraction of ‖τ_t‖² removed by the projection", "version t", "fraction", [removed]),
    ]
    by_metric: dict[str, Series] = {}
    for v in versions:
        for evaluation in _evaluations(v):
            get = evaluation.get if isinstance(evaluation, dict) else lambda k, e=evaluation: getattr(e, k, None)
            if get("status") not in (None, "succeeded"):
                continue
            for name, value in sorted((get("metrics") or {}).items()):
                if (y := _num(value)) is not None:
                    label = f"{get('evaluator')}: {name}"
                    by_metric.setdefault(label, Series(label)).points.append((v.number, y, f"v{v.number}: {label}={y:.4g}"))
    if by_metric:
        plots.append(Plot("evaluations", "evaluation metrics", "version t", "value", list(by_metric.values())))
    return plots


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    ticks, value = [], first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def plot_svg(plot: Plot, width: int = 400, height: int = 240) -> str:
    left, right, top, bottom = 56, 12, 12, 40
    points = [(x, y) for s in plot.series for x, y, _ in s.points]
    body: list[str] = []
    if not points:
        body.append(f'<text class="empty" x="{width / 2}" y="{height / 2}" text-anchor="middle">no data yet</text>')
        return _svg(plot, width, height, body)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_lo, x_hi = min(0.0, min(xs)), max(xs)
    y_lo, y_hi = min(0.0, min(ys)), max(ys)
    if plot.reference == "sqrt":
        y_hi = max(y_hi, x_hi)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    if y_hi == y_lo:
        y_hi = y_lo + 1
    y_hi += (y_hi - y_lo) * 0.05

    def sx(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)

    for tick in _ticks(y_lo, y_hi):
        body.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{sy(tick):.1f}" y2="{sy(tick):.1f}"/>')
        body.append(f'<text class="tick" x="{left - 6}" y="{sy(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    for tick in _ticks(x_lo, x_hi):
        body.append(f'<text class="tick" x="{sx(tick):.1f}" y="{height - bottom + 16}" text-anchor="middle">{tick:g}</text>')
    body.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}"/>')
    body.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}"/>')
    body.append(
        f'<text class="label" x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">'
        f"{escape(plot.x_label)}</text>"
    )
    body.append(
        f'<text class="label" transform="translate(14 {(top + height - bottom) / 2}) rotate(-90)" '
        f'text-anchor="middle">{escape(plot.y_label)}</text>'
    )
    if plot.reference == "sqrt":
        steps = [x_lo + (x_hi - x_lo) * i / 20 for i in range(21)]
        line = " ".join(f"{sx(x):.1f},{sy(x):.1f}" for x in steps if y_lo <= x <= y_hi)
        body.append(f'<polyline class="reference" points="{line}"><title>λ = √t</title></polyline>')
    for i, series in enumerate(plot.series):
        color = PALETTE[i % len(PALETTE)]
        ordered = sorted(series.points)
        if len(ordered) > 1:
            line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in ordered)
            body.append(f'<polyline class="series" stroke="{color}" points="{line}"/>')
        for x, y, tip in ordered:
            body.append(
                f'<circle class="point" data-series="{escape(series.label)}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" '
                f'fill="{color}"><title>{escape(tip)}</title></circle>'
            )
    return _svg(plot, width, height, body)


def _svg(plot: Plot, width: int, height: int, body: list[str]) -> str:
    legend = "".join(
        f'<span class="key"><i style="background:{PALETTE[i % len(PALETTE)]}"></i>{escape(s.label)}</span>'
        for i, s in enumerate(plot.series)
    )
    return (
        f'<figure class="plot" data-plot="{plot.key}" data-points="{plot.point_count}">'
        f"<figcaption>{escape(plot.title)}</figcaption>"
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(plot.title)}">{"".join(body)}</svg>'
        f'<div class="legend">{legend}</div></figure>'
    )


def lineage_svg(versions: list[Any]) -> str:
    """Versions left to right, each with an edge from its parent; each expert below the version it made."""
    if not versions:
        return '<p class="empty">no versions yet: push a base</p>'
    step, node_r, top = 96, 18, 40
    width = 40 + step * len(versions)
    height = 145
    x_of = {v.number: 40 + step * i for i, v in enumerate(versions)}
    edges: list[str] = []
    nodes: list[str] = []
    for i, v in enumerate(versions):
        x = x_of[v.number]
        if v.parent is not None and v.parent in x_of:
            px = x_of[v.parent]
            if i > 0 and v.parent == versions[i - 1].number:
                d = f"M{px + node_r},{top} L{x - node_r - 4},{top}"
            else:  # folded from an earlier version (the one before it was skipped): arc over
                d = f"M{px},{top - node_r} C{px},{top - 40} {x},{top - 40} {x},{top - node_r - 4}"
            edges.append(
                f'<path class="edge parent" data-from="{v.parent}" data-to="{v.number}" d="{d}" marker-end="url(#arrow)"/>'
            )
        nodes.append(
            f'<g class="node version status-{escape(v.status)}" data-number="{v.number}">'
            f'<circle cx="{x}" cy="{top}" r="{node_r}"/>'
            f'<text x="{x}" y="{top + 4}" text-anchor="middle">v{v.number}</text>'
            f"<title>version {v.number}: {escape(v.status)}</title></g>"
        )
        if v.expert is not None:
            name = v.expert.name or v.expert.sha256[:8]
            short = name if len(name) <= 12 else name[:11] + "…"
            ey = top + 80
            edges.append(
                f'<path class="edge expert" data-to="{v.number}" d="M{x},{ey - 12} L{x},{top + node_r + 4}" '
                'marker-end="url(#arrow)"/>'
            )
            nodes.append(
                f'<g class="node expert" data-version="{v.number}">'
                f'<rect x="{x - 42}" y="{ey - 12}" width="84" height="24" rx="5"/>'
                f'<text x="{x}" y="{ey + 4}" text-anchor="middle">{escape(short)}</text>'
                f"<title>expert {escape(name)} (sha256 {escape(v.expert.sha256[:16])}…)</title></g>"
            )
    marker = (
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto">'
        '<path d="M0,0 L10,5 L0,10 z"/></marker></defs>'
    )
    return (
        f'<svg class="lineage" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="lineage: version to parent, expert to version">{marker}{"".join(edges)}{"".join(nodes)}</svg>'
    )
