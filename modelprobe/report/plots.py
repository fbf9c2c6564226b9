"""Draw the typed plots of the result record (record.Plot) as inline PNG data URIs.

matplotlib through `Figure` + the Agg canvas only, so pyplot's global state is never touched.
Each function takes one plot record and returns a data URI; tables are not drawn (html renders them).
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

from ._fmt import fmt_num
from .record import Bars, HeatMap, LinePlot, NullHistogram

FIGSIZE = (5.0, 2.6)
DPI = 90
EFFECT_COLOUR = "#0969da"


def figure(height: float = FIGSIZE[1]) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(FIGSIZE[0], height), dpi=DPI)
    ax = fig.add_subplot()
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout(pad=0.4)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _finite(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def _nan(values: list[float | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def line_plot(p: LinePlot) -> str | None:
    series = [s for s in p.series if _finite(s.y)]
    if not series:
        return None
    fig, ax = figure()
    right = [s for s in series if s.axis == "right"]
    twin = None
    if right and len(right) < len(series):
        twin = ax.twinx()
        twin.tick_params(labelsize=8)
        if all(y > 0 for s in right for y in _finite(s.y)):
            twin.set_yscale("log")
    handles = []
    for i, s in enumerate(series):
        axis = twin if (twin is not None and s.axis == "right") else ax
        xs = p.x if p.x is not None and len(p.x) == len(s.y) else list(range(len(s.y)))
        label = s.label + (" (right axis)" if axis is twin else "")
        handles += axis.plot(xs, _nan(s.y), marker="o" if len(s.y) <= 40 else None, markersize=2.5,
                             linewidth=1.4, label=label, color=f"C{i}")
        if s.lo is not None and s.hi is not None and len(s.lo) == len(s.hi) == len(xs):
            axis.fill_between(xs, _nan(s.lo), _nan(s.hi), color=f"C{i}", alpha=0.18, linewidth=0)
    if p.mark_x is not None and math.isfinite(p.mark_x):
        handles.append(ax.axvline(p.mark_x, color="#57606a", linestyle=":", linewidth=1,
                                  label=p.mark_label or f"{p.x_label} {fmt_num(p.mark_x)}"))
    ax.set_xlabel(p.x_label, fontsize=8)
    if p.y_label:
        ax.set_ylabel(p.y_label, fontsize=8)
    ax.set_title(p.title, fontsize=9)
    if len(handles) > 1:
        ax.legend(handles=handles, fontsize=7, frameon=False)
    return png(fig)


def heat_map(p: HeatMap) -> str | None:
    rows = [_nan(r) for r in p.values]
    if not rows or not any(_finite(r) for r in rows):
        return None
    fig, ax = figure(max(FIGSIZE[1], 0.25 * len(rows) + 1.2))
    ax.grid(False)
    low, high = p.value_range if p.value_range is not None else (None, None)
    im = ax.imshow(rows, aspect="auto", origin="lower", cmap="viridis", vmin=low, vmax=high)
    bar = fig.colorbar(im, ax=ax)
    bar.set_label(p.value_label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    n_cols = max(len(r) for r in rows)
    ax.set_xticks(range(n_cols), p.x_ticks or [str(i) for i in range(n_cols)], fontsize=7)
    ax.set_yticks(range(len(rows)), p.y_ticks or [str(i) for i in range(len(rows))], fontsize=7)
    if n_cols > 32:  # a label per column would overlap: keep every few
        ax.set_xticks(ax.get_xticks()[::max(1, n_cols // 16)])
    if len(rows) > 32:
        ax.set_yticks(ax.get_yticks()[::max(1, len(rows) // 16)])
    if p.mark is not None:
        ax.scatter([p.mark[1]], [p.mark[0]], marker="s", s=60, facecolors="none", edgecolors="#cf222e",
                   linewidths=1.5)
    ax.set_xlabel(p.x_label, fontsize=8)
    ax.set_ylabel(p.y_label, fontsize=8)
    ax.set_title(p.title, fontsize=9)
    return png(fig)


def null_histogram(p: NullHistogram, colour: str = EFFECT_COLOUR) -> str | None:
    null = _finite(p.values)
    if not null:
        return None
    fig, ax = figure()
    ax.hist(null, bins=min(40, max(8, int(math.sqrt(len(null))))), color="#8c959f", alpha=0.85,
            label=f"null (n={len(null)})")
    if p.effect is not None and math.isfinite(p.effect):
        ax.axvline(p.effect, color=colour, linewidth=2, label=f"{p.effect_label} {fmt_num(p.effect)}")
    if p.threshold is not None and math.isfinite(p.threshold):
        ax.axvline(p.threshold, color="#57606a", linestyle="--", linewidth=1,
                   label=f"threshold {fmt_num(p.threshold)}")
    ax.set_title(p.title, fontsize=9)
    ax.set_xlabel(p.x_label, fontsize=8)
    ax.set_ylabel("count", fontsize=8)
    ax.margins(x=0.06)
    ax.legend(fontsize=7, frameon=True, framealpha=0.9, edgecolor="none")
    return png(fig)


def bars(p: Bars, failing: list[bool] | None = None) -> str | None:
    """Horizontal before/after bars per label; `failing` colours an after bar red."""
    if not p.labels:
        return None
    n = min(len(p.labels), 60)
    fig, ax = figure(max(FIGSIZE[1], 0.9 + 0.42 * n))
    ys = list(range(n))[::-1]
    before = [0.0 if v is None or not math.isfinite(v) else v for v in p.before[:n]]
    after = [0.0 if v is None or not math.isfinite(v) else v for v in p.after[:n]]
    colours = ["#cf222e" if failing and failing[i] else EFFECT_COLOUR for i in range(n)]
    ax.barh([y + 0.2 for y in ys], before, height=0.38, color="#afb8c1", label=p.before_label)
    ax.barh([y - 0.2 for y in ys], after, height=0.38, color=colours, label=p.after_label)
    ax.set_yticks(ys, [_short(x, 40) for x in p.labels[:n]], fontsize=7, linespacing=1.1)
    ax.axvline(0, color="#57606a", linewidth=0.8)
    ax.grid(True, axis="x", alpha=0.3)
    ax.grid(False, axis="y")
    ax.set_xlabel(p.value_label, fontsize=8)
    ax.set_title(p.title, fontsize=9)
    ax.legend(fontsize=7, frameon=False, loc="best")
    return png(fig)


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"
