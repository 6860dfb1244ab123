"""Panels of what flows through the layers: activation statistics and dead/saturated units, as heat maps."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from matplotlib.colors import LogNorm

from traincraft.report._data import RunMetrics
from traincraft.report._plotting import _BINS, Panel, _figure, _finish, _natural, _shorten


def _layer_matrix(run: RunMetrics, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, matrix)``: one row per key, one column per logged step (NaN where a key was not logged)."""
    steps = np.unique(np.concatenate([run.series[k].steps for k in keys]))
    if len(steps) > _BINS:  # a heat map shows at most a few hundred columns: sample the steps evenly
        steps = steps[np.linspace(0, len(steps) - 1, _BINS // 2).astype(int)]
    matrix = np.full((len(keys), len(steps)), np.nan)
    for row, key in enumerate(keys):
        series = run.series[key]
        at = np.clip(np.searchsorted(series.steps, steps, side="right") - 1, 0, len(series) - 1)
        known = series.steps[at] <= steps
        matrix[row, known] = series.values[at][known]  # the last value logged at or before each column
    return steps, matrix


def _heat(ax, fig, steps: np.ndarray, matrix: np.ndarray, rows: Sequence[str], title: str, **norm) -> None:
    extent = (float(steps[0]), float(steps[-1]) if len(steps) > 1 else float(steps[0]) + 1, len(rows) - 0.5, -0.5)
    image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", interpolation="nearest", extent=extent,
                      cmap="viridis", **norm)
    step = max(1, len(rows) // 16)
    ax.set_yticks(np.arange(len(rows))[::step], [_shorten(r, 40) for r in rows][::step], fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)


def _covshift_layers(run: RunMetrics, stat: str) -> tuple[list[str], list[str]]:
    stage = "train" if run.matching(f"covshift/train/*/{stat}") else "val"
    keys = sorted(run.matching(f"covshift/{stage}/*/{stat}"), key=_natural)
    return keys, [k[len(f"covshift/{stage}/"):-len(stat) - 1] for k in keys]


def _covshift_maps(run: RunMetrics, stats: Sequence[str]) -> list[tuple[str, list[str], list[str]]]:
    """``(stat, keys, layer names)`` for each statistic the run logged per layer."""
    maps = [(stat, *_covshift_layers(run, stat)) for stat in stats]
    return [m for m in maps if m[1]]


def _heat_figure(maps: list[tuple[str, list[str], list[str]]]):
    """One heat-map row per statistic, tall enough for the layer names of the longest."""
    return _figure(len(maps), height=max(2.6, 0.16 * max(len(m[1]) for m in maps) + 1.2))


def _heat_panel(run: RunMetrics, name: str, title: str, stats: Sequence[str],
                style: Callable[[str, np.ndarray], tuple[str, dict]]) -> Panel | None:
    """One heat map (layers × steps) per statistic of ``stats`` the run logged per layer; ``style(stat, matrix)``
    gives a map's title and its colour scale."""
    maps = _covshift_maps(run, stats)
    if not maps:
        return None
    fig, axes = _heat_figure(maps)
    used: list[str] = []
    for ax, (stat, keys, layers) in zip(axes, maps, strict=True):
        steps, matrix = _layer_matrix(run, keys)
        subtitle, norm = style(stat, matrix)
        _heat(ax, fig, steps, matrix, layers, subtitle, **norm)
        used += keys
    return _finish(fig, axes, name, title, used, label_chars=min(40, max(len(n) for m in maps for n in m[2])))


_ACTIVATION_TITLES = {"w2_drift": "W2 drift between logs (in standard deviations)",
                      "bn_var_ratio": "BatchNorm: batch variance / running variance (1 agrees)"}


def _activation_style(stat: str, matrix: np.ndarray) -> tuple[str, dict]:
    finite = matrix[np.isfinite(matrix)]
    norm = {}
    if stat != "mean" and finite.size and (finite > 0).all() and finite.max() / finite.min() > 100:
        norm = {"norm": LogNorm(vmin=float(finite.min()), vmax=float(finite.max()))}
    return _ACTIVATION_TITLES.get(stat, f"layer input {stat}"), norm


def activations(run: RunMetrics) -> Panel | None:
    """Per-layer input mean, standard deviation, drift between logs and BatchNorm's batch/running variance ratio as
    heat maps, layers × steps (``CovariateShiftMonitor``)."""
    return _heat_panel(run, "activations", "Per-layer activation statistics", ("mean", "std", "w2_drift", "bn_var_ratio"),
                       _activation_style)


def _fraction_style(stat: str, matrix: np.ndarray) -> tuple[str, dict]:
    what = "dead (≤ 0) fraction, ReLU layers" if stat == "dead_frac" else "saturated fraction, tanh/sigmoid"
    return what, {"vmin": 0.0, "vmax": 1.0}


def dead_saturated(run: RunMetrics) -> Panel | None:
    """Fraction of dead (ReLU ≤ 0) and saturated (tanh/sigmoid) inputs per layer over steps."""
    return _heat_panel(run, "dead_saturated", "Dead and saturated units", ("dead_frac", "sat_frac"), _fraction_style)
