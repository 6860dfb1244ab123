"""The report's drawing kit: :class:`Panel`, :func:`reduce_for_plot` and the helpers every panel draws with.

Bare matplotlib ``Figure`` objects on the Agg canvas (no pyplot), series reduced to a min and a max per pixel
column, log y axes when positive values span more than two decades, fixed margins in inches.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from traincraft.report._data import RunMetrics

#: Points per series after reduction: about one min/max pair per pixel column of a panel.
_BINS = 800
_DPI = 100


@dataclass(frozen=True)
class Panel:
    """One picture of the report: ``name`` is its file stem (``panels/<name>.png``), ``keys`` the metric keys drawn."""

    name: str
    title: str
    png: bytes
    keys: tuple[str, ...]

    def __repr__(self) -> str:
        return f"Panel(name={self.name!r}, title={self.title!r}, {len(self.png)} PNG bytes, {len(self.keys)} keys)"


def reduce_for_plot(steps: np.ndarray, values: np.ndarray, bins: int = _BINS) -> tuple[np.ndarray, np.ndarray]:
    """Keep a series' shape with at most ``2 * bins`` points: the min and the max of each step bin, in step order.

    Non-finite values are dropped (the panels mark them apart). Example:

    >>> s, v = reduce_for_plot(np.arange(10_000), np.where(np.arange(10_000) == 4321, 50.0, 1.0), bins=10)
    >>> len(s) <= 20, float(v.max())
    (True, 50.0)
    """
    keep = np.isfinite(values)
    steps, values = steps[keep], values[keep]
    if len(steps) <= 2 * bins:
        return steps, values
    edges = np.linspace(steps[0], steps[-1] + 1, bins + 1)
    bin_of = np.searchsorted(edges, steps, side="right") - 1
    order = np.lexsort((values, bin_of))  # by bin, then by value: each bin's first is its min, its last its max
    starts = np.flatnonzero(np.diff(bin_of[order], prepend=-1))
    ends = np.append(starts[1:], len(order)) - 1
    low, high = order[starts], order[ends]
    # both extremes at the steps they were logged, in step order, so a line through them keeps the shape
    pairs = np.sort(np.stack([low, high], axis=1), axis=1).ravel()
    return steps[pairs], values[pairs]


def _natural(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def _wants_log(values: Sequence[np.ndarray]) -> bool:
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.empty(0)
    if finite.size == 0 or (finite <= 0).any():
        return False
    return float(finite.max()) / max(float(finite.min()), 1e-300) > 100.0


def _plot(ax, run: RunMetrics, keys: Sequence[str], label: Callable[[str], str] = str, log: bool | None = None,
          **style) -> list[str]:
    """Draw ``keys`` on ``ax`` (reduced), mark non-finite values at the top edge; returns the keys drawn."""
    drawn, arrays = [], []
    for key in keys:
        series = run.get(key)
        if series is None or not len(series):
            continue
        steps, values = reduce_for_plot(series.steps, series.values)
        marker = "o" if len(steps) <= 30 else None
        line = ax.plot(steps, values, label=label(key), marker=marker, markersize=3, linewidth=1, **style)[0]
        bad = ~np.isfinite(series.values)
        if bad.any():
            ax.plot(series.steps[bad], np.full(int(bad.sum()), 1.0), "x", color=line.get_color(),
                    transform=ax.get_xaxis_transform(), clip_on=False, label=f"{label(key)}: not finite")
        drawn.append(key)
        arrays.append(series.values)
    if drawn and (log if log is not None else _wants_log(arrays)):
        ax.set_yscale("log")
    if drawn:
        ax.legend(fontsize=7, loc="best")
        ax.grid(True, alpha=0.3)
    return drawn


def _figure(rows: int, cols: int = 1, height: float = 2.6):
    # A bare Figure on an Agg canvas, not pyplot: no display, no global backend switch in the user's process
    # (a notebook keeps its own), no figure manager to close.
    fig = Figure(figsize=(10, height * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=cols == 1)
    return fig, [ax for row in axes for ax in row]


def _finish(fig, axes, name: str, title: str, keys: Sequence[str], label_chars: int = 0,
            bottom_in: float = 0.5) -> Panel:
    """Title, margins and PNG bytes of a figure. ``label_chars``: the longest text tick label on a y axis (layer
    names); ``bottom_in``: inches below the lowest axes for its tick labels (rotated names need more)."""
    for ax in axes:
        if ax.has_data() and not ax.get_xlabel() and ax.get_subplotspec().is_last_row():
            ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=11)
    # Fixed margins in inches rather than tight_layout, which draws every figure once more to measure it (half
    # the time of a large report).
    width, height = fig.get_size_inches()
    left = min(0.4, (0.75 + 0.05 * label_chars) / width)
    fig.subplots_adjust(left=left, right=0.97, top=1 - 0.7 / height, bottom=bottom_in / height, hspace=0.45,
                        wspace=0.22)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return Panel(name, title, buffer.getvalue(), tuple(keys))


def _rows(run: RunMetrics, groups: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[str, list[str]]]:
    """The (subtitle, keys) groups that have at least one logged key."""
    return [(title, [k for k in keys if k in run]) for title, keys in groups if any(k in run for k in keys)]


def _stacked(run: RunMetrics, name: str, title: str, groups: Sequence[tuple[str, Sequence[str]]],
             hlines: dict[str, tuple[float, str]] | None = None, logs: dict[str, bool] | None = None) -> Panel | None:
    rows = _rows(run, groups)
    if not rows:
        return None
    fig, axes = _figure(len(rows))
    used: list[str] = []
    for ax, (subtitle, keys) in zip(axes, rows, strict=True):
        used += _plot(ax, run, keys, log=(logs or {}).get(subtitle))
        if hlines and subtitle in hlines:
            y, text = hlines[subtitle]
            ax.axhline(y, color="crimson", linestyle="--", linewidth=1, label=text)
            ax.legend(fontsize=7, loc="best")
        ax.set_title(subtitle, fontsize=9)
    return _finish(fig, axes, name, title, used)

