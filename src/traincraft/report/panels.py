"""The report's pictures: one function per panel, each drawing what a run logged into a PNG (matplotlib, Agg).

A panel function takes a :class:`~traincraft.report._data.RunMetrics` and returns a :class:`Panel`, or ``None``
when the run logged none of its keys; :data:`PANELS` pairs each with the one line that says which callback adds
it. Long series are reduced to a min and a max per pixel column before drawing, so a one-step spike in a
100,000-step run still shows; y axes go logarithmic when positive values span more than two decades.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from traincraft.report._data import RunMetrics

#: Points per series after reduction: about one min/max pair per pixel column of a panel.
_BINS = 800
_DPI = 100
_LR_SUFFIXES = ("-momentum", "-weight_decay", "-effective_lr_mean", "-effective_lr_min", "-effective_lr_max",
                "-update_ratio", "-update_cosine", "-sign_flip")


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


def loss_accuracy(run: RunMetrics) -> Panel | None:
    """Training and validation loss and accuracy (``ImageClassifier``'s ``stage/loss``, ``stage/acc``)."""
    def of(metric: str) -> list[str]:
        return [k for k in run.series if re.fullmatch(rf"(train|val|test)/{metric}(_top5)?(_step|_epoch)?", k)]

    losses, accs = sorted(of("loss"), key=_natural), sorted(of("acc"), key=_natural)
    if not losses and not accs:
        return None
    plots = [(title, keys) for title, keys in (("loss", losses), ("accuracy", accs)) if keys]
    fig, axes = _figure(1, len(plots), height=3.4)
    used = []
    for ax, (subtitle, keys) in zip(axes, plots, strict=True):
        used += _plot(ax, run, keys)
        ax.set_title(subtitle, fontsize=9)
    return _finish(fig, axes, "loss_accuracy", "Loss and accuracy", used)


def lr_groups(run: RunMetrics) -> list[str]:
    """The learning-rate group keys (``lr-SGD``, ``lr-Adam/pg2``): ``lr-*`` keys that are not another's extra."""
    keys = [k for k in run.series if k.startswith("lr-")]

    def extra(key: str) -> bool:  # lr-Adam-momentum is lr-Adam's; lr-Adam-1 is the second Adam (Lightning's names)
        return any(key.startswith(g + "-") and re.fullmatch(r"[A-Za-z_]\w*", key[len(g) + 1:]) for g in keys)

    return sorted((k for k in keys if not extra(k)), key=_natural)


def learning_rate(run: RunMetrics) -> Panel | None:
    """Learning rate per group, the update/weight ratio and the oscillation index (``LearningRateMonitor``)."""
    groups = lr_groups(run)
    governor = run.matching("governor/*/lr")
    return _stacked(run, "learning_rate", "Learning rate, update/weight ratio, oscillation", [
        ("learning rate per group", groups + governor),
        ("update/weight ratio ‖Δθ‖/‖θ‖ (healthy near 1e-3)", [g + "-update_ratio" for g in groups]),
        ("oscillation index: EMA cos(Δθₜ, Δθₜ₋₁) (−1 oscillates, +1 steady)",
         [g + "-update_cosine" for g in groups] + [g + "-sign_flip" for g in groups]),
        ("effective Adam rate lr/(√v̂+ε)", [g + s for g in groups for s in _LR_SUFFIXES[2:5]]),
    ], hlines={"update/weight ratio ‖Δθ‖/‖θ‖ (healthy near 1e-3)": (1e-3, "1e-3"),
               "oscillation index: EMA cos(Δθₜ, Δθₜ₋₁) (−1 oscillates, +1 steady)": (0.0, "0")},
        logs={"update/weight ratio ‖Δθ‖/‖θ‖ (healthy near 1e-3)": True})


def gradients(run: RunMetrics) -> Panel | None:
    """Gradient norm before/after clipping, clip fraction and skipped steps (``GradientClipping``)."""
    tails = sorted({k[len("grad/norm_pre"):] for k in run.matching("grad/norm_pre*")}) or [""]

    def keys(*names: str) -> list[str]:
        return [f"grad/{n}{t}" for n in names for t in tails]

    return _stacked(run, "gradients", "Gradient norm, clipping and skipped steps", [
        ("global gradient norm", keys("norm_pre", "norm_post", "threshold")),
        ("fraction of steps clipped since the last log", keys("clipped_frac")),
        ("skipped (non-finite or spike) steps, cumulative", keys("skipped_steps") + ["train/nonfinite_steps"]),
    ], logs={"fraction of steps clipped since the last log": False})


def _weight_norm_keys(run: RunMetrics) -> list[str]:
    keys = sorted(run.matching("grad/norm/*"), key=_natural)
    weights = [k for k in keys if k.endswith("weight")]
    return weights or keys


def depth_profile(run: RunMetrics) -> Panel | None:
    """Per-layer gradient norm against depth, early against late in the run, and the depth slope over steps."""
    keys = _weight_norm_keys(run)
    slope = run.matching("grad/depth_slope*")
    if not keys and not slope:
        return None
    names = [_shorten(k[len("grad/norm/"):], 32) for k in keys]
    bottom_in = 0.6 + 0.04 * max((len(n) for n in names), default=0)  # room for the rotated names
    fig, axes = _figure(1, 2 if keys and slope else 1, height=3.0 + bottom_in)
    used: list[str] = []
    if keys:
        ax = axes[0]
        phases = {"first 10% of logs": [], "last 10% of logs": []}
        for key in keys:
            values = run.series[key].values
            values = values[np.isfinite(values)]
            k = max(1, len(values) // 10)
            phases["first 10% of logs"].append(np.median(values[:k]) if len(values) else np.nan)
            phases["last 10% of logs"].append(np.median(values[-k:]) if len(values) else np.nan)
        depth = np.arange(len(keys))
        for label, values in phases.items():
            ax.plot(depth, values, marker="o", markersize=3, label=label)
        if _wants_log([np.array(v) for v in phases.values()]):
            ax.set_yscale("log")
        step = max(1, len(names) // 12)
        ax.set_xticks(depth[::step], names[::step], rotation=60, ha="right", fontsize=6)
        ax.set_xlabel("parameter (input → output)", fontsize=8)
        ax.set_ylabel("gradient norm (median)", fontsize=8)
        ax.set_title("gradient norm by depth", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
        used += keys
    if slope:
        ax = axes[-1]
        used += _plot(ax, run, slope, log=False)
        ax.axhline(0.0, color="crimson", linestyle="--", linewidth=1)
        ax.set_title("depth slope of ln‖g‖ (< 0 vanishing, > 0 exploding)", fontsize=9)
    return _finish(fig, axes, "depth_profile", "Depth profile of the gradients", used, bottom_in=bottom_in)


def sharpness(run: RunMetrics) -> Panel | None:
    """η·λ_max against the stability threshold 2, and λ_max against negative curvature (``CurvatureMonitor``)."""
    rows = _rows(run, [
        ("η·λ_max against the stability threshold", ["curvature/eta_lambda", "curvature/threshold"]),
        ("Hessian extremes", ["curvature/lambda_max", "curvature/lambda_min", "curvature/directional"]),
        ("negative curvature / sharpness", ["curvature/negative_ratio", "curvature/saddle"]),
    ])
    if not rows:
        return None
    fig, axes = _figure(len(rows))
    used: list[str] = []
    for ax, (subtitle, keys) in zip(axes, rows, strict=True):
        # the monitor logs its last probe again at every logging step: steps, not slopes, between probes
        # η·λ_max spans decades (Adam's first probes sit thousands of times above its threshold): a log axis
        # when it does, so the threshold line stays visible; λ_min is signed, linear
        log = None if keys[0] == "curvature/eta_lambda" else False
        used += _plot(ax, run, keys, log=log, drawstyle="steps-post")
        if keys[0] == "curvature/eta_lambda" and "curvature/threshold" not in run:
            ax.axhline(2.0, color="crimson", linestyle="--", linewidth=1, label="2 (SGD)")
            ax.legend(fontsize=7)
        if subtitle == "Hessian extremes":
            ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(subtitle, fontsize=9)
    return _finish(fig, axes, "sharpness", "Sharpness and curvature", used)


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


def activations(run: RunMetrics) -> Panel | None:
    """Per-layer input mean, standard deviation, drift between logs and BatchNorm's batch/running variance ratio as
    heat maps, layers × steps (``CovariateShiftMonitor``)."""
    maps = _covshift_maps(run, ("mean", "std", "w2_drift", "bn_var_ratio"))
    if not maps:
        return None
    fig, axes = _heat_figure(maps)
    used: list[str] = []
    for ax, (stat, keys, layers) in zip(axes, maps, strict=True):
        steps, matrix = _layer_matrix(run, keys)
        finite = matrix[np.isfinite(matrix)]
        norm = {}
        if stat != "mean" and finite.size and (finite > 0).all() and finite.max() / finite.min() > 100:
            norm = {"norm": LogNorm(vmin=float(finite.min()), vmax=float(finite.max()))}
        titles = {"w2_drift": "W2 drift between logs (in standard deviations)",
                  "bn_var_ratio": "BatchNorm: batch variance / running variance (1 agrees)"}
        _heat(ax, fig, steps, matrix, layers, titles.get(stat, f"layer input {stat}"), **norm)
        used += keys
    return _finish(fig, axes, "activations", "Per-layer activation statistics", used,
                   label_chars=min(40, max(len(name) for m in maps for name in m[2])))


def dead_saturated(run: RunMetrics) -> Panel | None:
    """Fraction of dead (ReLU ≤ 0) and saturated (tanh/sigmoid) inputs per layer over steps."""
    maps = _covshift_maps(run, ("dead_frac", "sat_frac"))
    if not maps:
        return None
    fig, axes = _heat_figure(maps)
    used: list[str] = []
    for ax, (stat, keys, layers) in zip(axes, maps, strict=True):
        steps, matrix = _layer_matrix(run, keys)
        what = "dead (≤ 0) fraction, ReLU layers" if stat == "dead_frac" else "saturated fraction, tanh/sigmoid"
        _heat(ax, fig, steps, matrix, layers, what, vmin=0.0, vmax=1.0)
        used += keys
    return _finish(fig, axes, "dead_saturated", "Dead and saturated units", used,
                   label_chars=min(40, max(len(name) for m in maps for name in m[2])))


def drift(run: RunMetrics) -> Panel | None:
    """Drift test p-values against alpha, and the test statistics (``DataDriftMonitor``)."""
    return _stacked(run, "drift", "Train/validation input drift", [
        ("p-values (drift when below alpha)", ["drift/ks_pvalue_min", "drift/mmd_pvalue"]),
        ("statistics", ["drift/ks_stat_max", "drift/mmd2", "drift/ks_features", "drift/detected"]),
    ], hlines={"p-values (drift when below alpha)": (0.05, "alpha = 0.05 (the default)")},
        logs={"statistics": False})


def distributed(run: RunMetrics) -> Panel | None:
    """Bytes per step, straggler spread and gradient noise scale (``DataParallelStrategy``'s monitor)."""
    return _stacked(run, "distributed", "Distributed training: communication, stragglers, noise scale", [
        ("bytes per optimizer step", ["comm/bytes", "comm/wire_bytes", *run.matching("comm/data/*"),
                                      *run.matching("comm/batchnorm/*")]),
        ("step time over ranks (s)", ["ddp/step_time_median", "ddp/step_time_max"]),
        ("straggler spread: slowest / median rank (1 balanced)", ["ddp/step_time_spread"]),
        ("gradient noise scale B_simple (critical batch size)", ["ddp/noise_scale"]),
    ], hlines={"straggler spread: slowest / median rank (1 balanced)": (1.0, "balanced")},
        logs={"straggler spread: slowest / median rank (1 balanced)": False})


def _throughput_keys(run: RunMetrics) -> list[str]:
    return sorted((k for k in run.series if "per_sec" in k or "throughput" in k or re.search(r"(^|[/|])mfu$", k)),
                  key=_natural)


def throughput(run: RunMetrics) -> Panel | None:
    """Samples/batches per second, FLOP/s and MFU (Lightning's ``ThroughputMonitor``, or any ``*per_sec*`` key)."""
    keys = _throughput_keys(run)
    flops = [k for k in keys if "flop" in k]
    mfu = [k for k in keys if re.search(r"(^|[/|])mfu$", k)]
    rate = [k for k in keys if k not in flops and k not in mfu]
    return _stacked(run, "throughput", "Throughput", [("samples, batches or items per second", rate),
                                                      ("FLOP per second", flops), ("model FLOP utilisation", mfu)])


#: Every panel, in report order, with the line the report prints when the run logged none of its keys.
PANELS: tuple[tuple[Callable[[RunMetrics], Panel | None], str], ...] = (
    (loss_accuracy, "left out: loss and accuracy — train with traincraft.modules.ImageClassifier (or self.log "
                    "'train/loss', 'val/loss', 'train/acc', 'val/acc') to log them"),
    (learning_rate, "left out: learning rate — add LearningRateMonitor(log_update_ratio=True, log_oscillation=True) "
                    "to log lr-<group>, lr-<group>-update_ratio, lr-<group>-update_cosine"),
    (gradients, "left out: gradients — add GradientClipping(mode='norm', threshold=1.0) to log grad/norm_pre, "
                "grad/norm_post, grad/clipped_frac, grad/skipped_steps"),
    (depth_profile, "left out: depth profile — add GradientClipping(log_layer_norms=True, log_depth_profile=True) "
                    "to log grad/norm/<param> and grad/depth_slope"),
    (sharpness, "left out: sharpness — add CurvatureMonitor() to log curvature/eta_lambda, curvature/lambda_max, "
                "curvature/lambda_min"),
    (activations, "left out: activation statistics — add CovariateShiftMonitor() to log "
                  "covshift/<stage>/<layer>/mean and /std"),
    (dead_saturated, "left out: dead and saturated units — add CovariateShiftMonitor() to log "
                     "covshift/<stage>/<layer>/dead_frac and /sat_frac"),
    (drift, "left out: drift — add DataDriftMonitor() to log drift/ks_pvalue_min and drift/mmd_pvalue"),
    (distributed, "left out: distributed — train with strategy=DataParallelStrategy() to log comm/bytes, "
                  "ddp/step_time_spread, ddp/noise_scale"),
    (throughput, "left out: throughput — add lightning.pytorch.callbacks.ThroughputMonitor(batch_size_fn=...) to "
                 "log samples_per_sec"),
)


def draw_panels(run: RunMetrics) -> tuple[list[Panel], list[str]]:
    """Every panel the run has the keys for, and one line per panel left out saying which callback adds it."""
    panels, left_out = [], []
    for draw, missing in PANELS:
        panel = draw(run)
        if panel is None:
            left_out.append(missing)
        else:
            panels.append(panel)
    return panels, left_out
