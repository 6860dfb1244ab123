"""Panels of the optimization: loss and accuracy, learning rate, gradients, depth profile, sharpness."""

from __future__ import annotations

import re

import numpy as np

from traincraft.report._data import RunMetrics
from traincraft.report._plotting import (
    Panel,
    _figure,
    _finish,
    _natural,
    _plot,
    _rows,
    _shorten,
    _stacked,
    _wants_log,
)

_LR_SUFFIXES = ("-momentum", "-weight_decay", "-effective_lr_mean", "-effective_lr_min", "-effective_lr_max",
                "-update_ratio", "-update_cosine", "-sign_flip")


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
