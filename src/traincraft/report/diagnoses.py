"""The health report's verdicts: small pure rules over a run's logged scalars, each grounded in the theory.

:func:`diagnose` runs every rule in :data:`RULES` on a :class:`~traincraft.report._data.RunMetrics` and returns
the :class:`~traincraft.report._data.Diagnosis` list, problems first. Each rule reads only the exact keys a
traincraft callback logs; a rule whose keys the run did not log says nothing (the report's panels say which
callback adds them). Thresholds are the module constants below; ``docs/diagnoses.md`` gives, for each rule, the
slide of the lecture (``SLIDE n`` of /work/shared's "Optimization for Training Deep Models") or paper it comes
from, and how the thresholds were calibrated: a healthy run (the shipped recipes with the monitors on) gives an
empty list.

Example:
    >>> import numpy as np
    >>> from pathlib import Path
    >>> from traincraft.report._data import RunMetrics, Series
    >>> steps = np.arange(0, 100, 10)
    >>> spread = Series("ddp/step_time_spread", steps, np.full(10, 2.4))
    >>> [d.rule for d in diagnose(RunMetrics({"ddp/step_time_spread": spread}, "csv", Path(".")))]
    ['straggler']
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from traincraft.report._data import Diagnosis, RunMetrics, Series

__all__ = [
    "DEAD_FRACTION",
    "DEPTH_SLOPE_VANISHING",
    "DRIFT_CONSECUTIVE",
    "FLAT_LOSS",
    "LOSS_JUMP",
    "LOW_UPDATE_RATIO",
    "OSCILLATION_COSINE",
    "OSCILLATION_LOGS",
    "OVERFIT_RISE",
    "RULES",
    "SATURATED_FRACTION",
    "SPIKE_FACTOR",
    "STABILITY_MARGIN",
    "STRAGGLER_SPREAD",
    "STUCK_LOSS",
    "VANISHING_RATIO",
    "data_drift",
    "dead_units",
    "diagnose",
    "gradient_cliff",
    "lr_above_stability",
    "lr_too_low",
    "oscillation",
    "overfitting",
    "saddle",
    "saturated_units",
    "straggler",
    "vanishing_gradients",
]

#: ``curvature/stability_ratio`` (η·λ_max over the optimizer's threshold, 2 for SGD) above which a probe counts as
#: unstable. 1 is the edge of stability, where training hovers (Cohen et al. 2021); 1.5 is clearly past it.
STABILITY_MARGIN = 1.5
#: Relative fall of the training loss after an unstable probe below which training made no progress.
STUCK_LOSS = 0.1
#: EMA of cos(Δθₜ, Δθₜ₋₁) below which a group's weights go back and forth (SLIDE 23: "oscillates").
OSCILLATION_COSINE = -0.3
#: Consecutive logs the oscillation must last (the EMA already averages ~10 steps).
OSCILLATION_LOGS = 3
#: ‖Δθ‖/‖θ‖ per step below which weights barely move; ~1e-3 is the usual healthy order (Karpathy's rule of thumb).
LOW_UPDATE_RATIO = 1e-4
#: Relative fall of the training loss below which it counts as flat.
FLAT_LOSS = 0.05
#: A gradient norm this many times the median of the preceding logs is a spike (a cliff, SLIDE 29).
SPIKE_FACTOR = 10.0
#: A spike counts when the training loss within the next logs exceeds this many times its preceding median (and
#: by a tenth of the starting loss at least).
LOSS_JUMP = 1.5
#: Smallest over largest per-layer gradient norm (weights) below which gradients vanish through depth (SLIDE 32).
VANISHING_RATIO = 1e-3
#: ``grad/depth_slope`` below which each layer towards the input gets ≤ e^-1.0 ≈ 0.37 times the gradient.
DEPTH_SLOPE_VANISHING = -1.0
#: Fraction of a ReLU layer's inputs ≤ 0 above which most of its units are dead (0.5 is healthy).
DEAD_FRACTION = 0.95
#: Fraction of a tanh/sigmoid layer's inputs in the flat tails above which the layer is saturated.
SATURATED_FRACTION = 0.5
#: Consecutive validation checks that must declare drift.
DRIFT_CONSECUTIVE = 2
#: Median ``ddp/step_time_spread`` (slowest over median rank) above which one rank holds the others back. With
#: two ranks the median is their mean: 1.3 means the slow one takes 1.86× as long as the fast one.
STRAGGLER_SPREAD = 1.3
#: Relative rise of the validation loss above its minimum, while the training loss keeps falling.
OVERFIT_RISE = 0.1

_TRAIN_LOSS = ("train/loss_step", "train/loss", "train/loss_epoch")
_LAST_PART = 0.5  # rules on steady-state statistics read the last half of the logs


def _finite(run: RunMetrics, key: str) -> Series | None:
    series = run.get(key)
    if series is None:
        return None
    series = series.finite()
    return series if len(series) else None


def _train_loss(run: RunMetrics) -> Series | None:
    for key in _TRAIN_LOSS:
        series = _finite(run, key)
        if series is not None and len(series) >= 2:
            return series
    return None


def _tail(series: Series, part: float = _LAST_PART) -> Series:
    start = min(int(len(series) * (1.0 - part)), len(series) - 1)
    return Series(series.key, series.steps[start:], series.values[start:])


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Index ranges ``[i, j]`` (inclusive) of the consecutive True entries."""
    out, start = [], None
    for i, flag in enumerate(mask.tolist() + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            out.append((start, i - 1))
            start = None
    return out


def _loss_fall(run: RunMetrics, first: int | None = None, last: int | None = None) -> float | None:
    """Relative fall of the training loss between the start and the end of a step range (medians of a fifth)."""
    loss = _train_loss(run)
    if loss is None:
        return None
    keep = np.ones(len(loss), bool)
    if first is not None:
        keep &= loss.steps >= first
    if last is not None:
        keep &= loss.steps <= last
    values = loss.values[keep]
    if len(values) < 4:
        return None
    k = max(1, len(values) // 5)
    begin, end = float(np.median(values[:k])), float(np.median(values[-k:]))
    return (begin - end) / max(abs(begin), 1e-12)


def _probes(run: RunMetrics, key: str) -> Series | None:
    """One entry per curvature probe. The monitor logs its last values again at every logging step until the next
    probe, so a probe is a step where ``curvature/lambda_max`` (a continuous value) changed; without it, every
    entry counts."""
    series = _finite(run, key)
    if series is None:
        return None
    lam = _finite(run, "curvature/lambda_max")
    if lam is None:
        return series
    changed = np.ones(len(lam), bool)
    changed[1:] = lam.values[1:] != lam.values[:-1]
    keep = np.isin(series.steps, lam.steps[changed])
    return Series(key, series.steps[keep], series.values[keep])


def _progress(run: RunMetrics, since: int) -> float | None:
    """Relative fall of the training loss from its first logs at or after ``since`` to the end of the run."""
    loss = _train_loss(run)
    if loss is None:
        return None
    values = loss.values[loss.steps >= since]
    if len(values) < 6:
        return None
    begin, end = float(np.median(values[:3])), float(np.median(values[-max(1, len(values) // 5):]))
    return (begin - end) / max(abs(begin), 1e-12)


def _group(key: str, suffix: str) -> str:
    return key[: -len(suffix)]


def _layer(key: str, stat: str) -> str:
    return key[len("covshift/train/"): -len(f"/{stat}")]


def lr_above_stability(run: RunMetrics) -> list[Diagnosis]:
    """η·λ_max above the optimizer's stability threshold (2 for SGD): sustained, or with no progress after it."""
    ratio = _probes(run, "curvature/stability_ratio")
    if ratio is None:
        return []
    above = ratio.values > STABILITY_MARGIN
    if not above.any():
        return []
    # Sustained: most probes, and more than one. A single unstable probe at initialization is the catapult phase,
    # which training leaves by itself for a flatter region (Lewkowycz et al. 2020) -- unless the loss then never
    # falls below where it started, as when the step has wrecked the network.
    sustained = above.sum() >= max(2, math.ceil(len(ratio) / 2))
    progress = _progress(run, int(ratio.steps[above][0]))
    stuck = progress is not None and progress < STUCK_LOSS
    if not (sustained or stuck):
        return []
    eta_lambda, threshold = _finite(run, "curvature/eta_lambda"), _finite(run, "curvature/threshold")
    thr = float(threshold.values[-1]) if threshold is not None else 2.0
    worst = float(ratio.values[above].max())
    shown = f"η·λ_max up to {worst * thr:.3g}" if eta_lambda is not None else f"stability ratio up to {worst:.3g}"
    steps = ratio.steps[above]
    factor = 1.0 / float(np.median(ratio.values[above]))
    return [Diagnosis(
        rule="lr_above_stability", title="Learning rate above the stability threshold", severity="problem",
        confidence=min(1.0, 0.6 + 0.4 * float(above.mean()) + (0.2 if stuck else 0.0)),
        evidence=(f"{int(above.sum())} of {len(ratio)} curvature probes have η·λ_max/threshold > {STABILITY_MARGIN} "
                  f"({shown} against the threshold {thr:.3g}) at steps {int(steps[0])}–{int(steps[-1])}"
                  + (f"; the training loss then fell only {max(progress, 0.0):.1%} (< {STUCK_LOSS:.0%})."
                     if stuck else ".")),
        action=(f"Lower the learning rate about {1 / factor:.2g}× (to η ≈ 1/λ_max, below 2/λ_max for SGD), or add "
                "`LearningRateGovernor(sharpness_threshold=0.9)` to the callbacks to lower it when the probe says so."),
        theory="Cohen et al. 2021 (edge of stability: GD is stable along the sharpest direction only while "
               "η·λ_max < 2); SLIDE 9–10 (Hessian, step size against curvature).",
        steps=(int(steps[0]), int(steps[-1])), keys=tuple(k for k in ("curvature/stability_ratio",
                                                                        "curvature/eta_lambda") if k in run),
        value=worst, threshold=STABILITY_MARGIN)]


def oscillation(run: RunMetrics) -> list[Diagnosis]:
    """A group's consecutive updates point against each other: the weight vector oscillates (SLIDE 23)."""
    out = []
    for key in run.matching("*-update_cosine"):
        cosine = _finite(run, key)
        if cosine is None:
            continue
        spans = [(i, j) for i, j in _runs(cosine.values < OSCILLATION_COSINE) if j - i + 1 >= OSCILLATION_LOGS]
        if not spans:
            continue
        i, j = max(spans, key=lambda s: s[1] - s[0])
        group, worst = _group(key, "-update_cosine"), float(cosine.values[i: j + 1].min())
        covered = sum(b - a + 1 for a, b in spans) / len(cosine)
        out.append(Diagnosis(
            rule="oscillation", title=f"Weights oscillate ({group})", severity="problem",
            confidence=min(1.0, 0.5 + 0.5 * covered),
            evidence=(f"{key}: EMA of cos(Δθₜ, Δθₜ₋₁) below {OSCILLATION_COSINE} for {j - i + 1} consecutive logs, "
                      f"steps {int(cosine.steps[i])}–{int(cosine.steps[j])} (down to {worst:.2f}); "
                      f"{covered:.0%} of the logs oscillate."),
            action=("Lower this group's learning rate 2–10×, or add `LearningRateGovernor()` to the callbacks "
                    "(it lowers a group's rate while its cosine is below -0.2)."),
            theory="SLIDE 23 (decrease the learning rate when the weight vector oscillates); SLIDE 10 (gradient "
                   "descent bouncing across a narrow valley).",
            steps=(int(cosine.steps[i]), int(cosine.steps[j])), keys=(key,), layer=group, value=worst,
            threshold=OSCILLATION_COSINE))
    return out


def lr_too_low(run: RunMetrics) -> list[Diagnosis]:
    """Updates tiny against the weights while the loss is flat: the learning rate is too low to move."""
    fall = _loss_fall(run)
    if fall is None or fall > FLAT_LOSS:
        return []
    out = []
    for key in run.matching("*-update_ratio"):
        ratio = _finite(run, key)
        if ratio is None or len(ratio) < 2:
            continue
        median = float(np.median(ratio.values))
        if not 0 < median < LOW_UPDATE_RATIO:
            continue
        group = _group(key, "-update_ratio")
        out.append(Diagnosis(
            rule="lr_too_low", title=f"Learning rate too low ({group})", severity="problem",
            confidence=min(1.0, 0.6 + 0.1 * math.log10(LOW_UPDATE_RATIO / median)),
            evidence=(f"{key}: median ‖Δθ‖/‖θ‖ {median:.2g} per step, below {LOW_UPDATE_RATIO:g} (healthy ≈ 1e-3), "
                      f"over steps {int(ratio.steps[0])}–{int(ratio.steps[-1])}, while the training loss fell only "
                      f"{max(fall, 0.0):.1%} (flat: < {FLAT_LOSS:.0%})."),
            action=(f"Raise this group's learning rate about {min(1e4, 1e-3 / median):.2g}× (so that ‖Δθ‖/‖θ‖ ≈ 1e-3), "
                    "or take the curvature suggestion η ≈ 1/λ_max (CurvatureMonitor's `curvature/eta_opt`)."),
            theory="SLIDE 23–26 (learning rate: too small a step crawls); SLIDE 29 (plateaus are slow to cross).",
            steps=(int(ratio.steps[0]), int(ratio.steps[-1])), keys=(key, *(k for k in _TRAIN_LOSS if k in run)),
            layer=group, value=median, threshold=LOW_UPDATE_RATIO))
    return out


def gradient_cliff(run: RunMetrics) -> list[Diagnosis]:
    """Gradient-norm spikes that throw the loss up, or steps skipped as non-finite (a cliff, SLIDE 29–31)."""
    norm, loss = run.get("grad/norm_pre"), _train_loss(run)
    spikes: list[tuple[int, float, float]] = []  # (step, norm, ratio to the running median)
    if norm is not None and len(norm) >= 4:
        values = norm.values
        for i in range(3, len(values)):
            history = values[max(0, i - 20): i]
            history = history[np.isfinite(history)]
            if len(history) < 3:
                continue
            base = float(np.median(history))
            if not math.isfinite(values[i]):
                spikes.append((int(norm.steps[i]), float(values[i]), math.inf))
                continue
            if base > 0 and values[i] > SPIKE_FACTOR * base and _loss_jumps(loss, int(norm.steps[i])):
                spikes.append((int(norm.steps[i]), float(values[i]), float(values[i] / base)))
    skipped, skip_steps = 0.0, []
    for key in ("grad/skipped_steps", "train/nonfinite_steps"):
        series = _finite(run, key)
        if series is not None and float(series.values.max()) > 0:
            skipped = max(skipped, float(series.values.max()))
            skip_steps.append(int(series.steps[np.argmax(series.values > 0)]))
    if not spikes and skipped <= 0:
        return []
    parts, keys = [], [k for k in ("grad/norm_pre", "grad/skipped_steps", "train/nonfinite_steps") if k in run]
    if spikes:
        worst = max(spikes, key=lambda s: s[2])
        parts.append(f"{len(spikes)} gradient-norm spike(s) above {SPIKE_FACTOR:g}× the running median with the "
                     f"training loss jumping > {LOSS_JUMP}× within the next logs, at steps "
                     f"{', '.join(str(s[0]) for s in spikes[:5])}{' ...' if len(spikes) > 5 else ''} "
                     f"(worst: ‖g‖ = {worst[1]:.3g}, {worst[2]:.3g}× the median)")
    if skipped > 0:
        parts.append(f"{int(skipped)} optimizer step(s) skipped as non-finite")
    finite = norm.finite().values if norm is not None else np.array([])
    clip_at = float(np.quantile(finite, 0.9)) if len(finite) else 1.0
    steps = [s[0] for s in spikes] + skip_steps
    already = _finite(run, "grad/threshold")
    action = (f"Add `GradientClipping(mode=\"norm\", threshold={clip_at:.3g})` (the 90th percentile of the "
              "logged norms) to the callbacks; `skip_spikes=True` skips rather than clips a step above it.")
    if already is not None:
        action = (f"Lower GradientClipping's threshold from {float(already.values[-1]):.3g} to about {clip_at:.3g} "
                  "(the 90th percentile of the logged norms), or use `mode=\"zscore\"` to clip spikes against "
                  "the recent norms.")
    return [Diagnosis(
        rule="gradient_cliff", title="Gradient cliff / exploding gradients", severity="problem",
        confidence=1.0 if skipped > 0 or len(spikes) > 1 else 0.8,
        evidence="; ".join(parts) + ".", action=action,
        theory="SLIDE 29 (cliffs: a step near one ruins recent progress), SLIDE 31 (gradient clipping); "
               "Pascanu et al. 2013.",
        steps=(min(steps), max(steps)), keys=tuple(keys),
        value=max(s[2] for s in spikes) if spikes else skipped, threshold=SPIKE_FACTOR if spikes else 0.0)]


def _loss_jumps(loss: Series | None, step: int, after: int = 3) -> bool:
    """Whether the training loss within ``after`` logs from ``step`` exceeds LOSS_JUMP× its preceding median."""
    if loss is None:
        return True  # without a loss a spike of 10x still counts: the norm alone is the evidence
    before = loss.values[loss.steps < step][-20:]
    later = loss.values[loss.steps >= step][: after + 1]
    if len(before) < 3 or not len(later):
        return False
    base = float(np.median(before))
    # Late in a fit the loss is small and noisy, and one hard batch can double it: the jump must also be a
    # tenth of the loss the run started from to count as lost progress.
    return bool(later.max() > LOSS_JUMP * base and later.max() - base > 0.1 * float(np.median(loss.values[:3])))


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _module_glob(param: str | None) -> str:
    """``model.blocks.0.linear.weight`` -> ``blocks.0.linear.*``: ImageClassifier's lr_multipliers globs name
    parameters of its ``model``."""
    if param is None:
        return "blocks.0.*"
    module = param.rsplit(".", 1)[0]
    return f"{module.removeprefix('model.')}.*"


def vanishing_gradients(run: RunMetrics) -> list[Diagnosis]:
    """Early layers receive gradients orders of magnitude below the late ones (SLIDE 32–34)."""
    norms = {}
    for key in run.matching("grad/norm/*.weight"):
        series = _finite(run, key)
        if series is not None and len(series):
            norms[key[len("grad/norm/"):]] = float(np.median(_tail(series).values))
    slope = _finite(run, "grad/depth_slope")
    slope_value = float(np.median(_tail(slope).values)) if slope is not None else None
    ratio = None
    if len(norms) >= 2 and max(norms.values()) > 0:
        ratio = min(norms.values()) / max(norms.values())
    by_ratio = ratio is not None and ratio < VANISHING_RATIO
    by_slope = slope_value is not None and slope_value < DEPTH_SLOPE_VANISHING
    # Both signals must agree when both are logged: a slope alone on a two-layer net, or a small ratio from a
    # tiny bias-free layer, is not a depth profile.
    if not (by_ratio or by_slope) or (ratio is not None and slope_value is not None and not (by_ratio and by_slope)):
        return []
    parts, layer, keys = [], None, []
    if ratio is not None:
        layer = min(norms, key=norms.get)
        top = max(norms, key=norms.get)
        parts.append(f"median gradient norm of {layer} is {norms[layer]:.3g}, {ratio:.2g}× that of {top} "
                     f"({norms[top]:.3g}; threshold {VANISHING_RATIO:g})")
        keys += [f"grad/norm/{layer}", f"grad/norm/{top}"]
    if slope_value is not None:
        parts.append(f"grad/depth_slope {slope_value:.2f} per layer (threshold {DEPTH_SLOPE_VANISHING}: each layer "
                     f"towards the input gets e^{slope_value:.2f} ≈ {math.exp(slope_value):.2g}× the gradient)")
        keys.append("grad/depth_slope")
    source = run.get(keys[0])
    return [Diagnosis(
        rule="vanishing_gradients", title=f"Vanishing gradients{f' ({layer})' if layer else ''}", severity="problem",
        confidence=0.9 if ratio is not None and slope_value is not None else 0.7,
        evidence="; ".join(parts) + " over the last half of the run.",
        action=("Use ReLU instead of sigmoid/tanh (`model_kwargs: {activation: relu}`), add normalization "
                "(`model_kwargs: {norm: batch}`), or give the early layers a larger rate "
                f"(`lr_multipliers: {{\"{_module_glob(layer)}\": 10.0}}` on ImageClassifier)."),
        theory="SLIDE 32–34 (the Jacobian of a deep composition is a product of per-layer Jacobians); "
               "SLIDE 24 (lower layers need larger rates); Glorot & Bengio 2010.",
        steps=(int(_tail(source).steps[0]), int(source.steps[-1])) if source is not None else None,
        keys=tuple(keys),
        layer=layer, value=ratio if ratio is not None else slope_value,
        threshold=VANISHING_RATIO if ratio is not None else DEPTH_SLOPE_VANISHING)]


def _unit_rule(run: RunMetrics, stat: str, limit: float, rule: str, title: str, action: str,
               theory: str) -> list[Diagnosis]:
    worst: tuple[float, str, Series] | None = None
    for key in run.matching(f"covshift/train/*/{stat}"):
        series = _finite(run, key)
        if series is None:
            continue
        value = float(np.median(_tail(series).values))
        if value > limit and (worst is None or value > worst[0]):
            worst = (value, key, series)
    if worst is None:
        return []
    value, key, series = worst
    layer, tail = _layer(key, stat), _tail(series)
    return [Diagnosis(
        rule=rule, title=f"{title} ({layer})", severity="problem",
        confidence=min(1.0, 0.6 + 4 * (value - limit)),
        evidence=(f"{key}: median {value:.1%} over steps {int(tail.steps[0])}–{int(tail.steps[-1])} "
                  f"(the last half of the logs), above {limit:.0%}."),
        action=action, theory=theory, steps=(int(tail.steps[0]), int(tail.steps[-1])), keys=(key,), layer=layer,
        value=value, threshold=limit)]


def dead_units(run: RunMetrics) -> list[Diagnosis]:
    """A ReLU layer whose inputs are almost all ≤ 0: its units no longer pass gradient."""
    return _unit_rule(
        run, "dead_frac", DEAD_FRACTION, "dead_units", "Dead ReLU units",
        action=("Lower the learning rate (a large step pushes biases negative for good), add normalization before "
                "the activation (`model_kwargs: {norm: batch}`), and keep Kaiming initialization."),
        theory="SLIDE 35–37 (internal covariate shift; batch normalization keeps pre-activations centred); "
               "Glorot, Bordes & Bengio 2011 (rectifier units), Lu et al. 2020 (dying ReLU).")


def saturated_units(run: RunMetrics) -> list[Diagnosis]:
    """A tanh/sigmoid layer whose inputs sit mostly in the flat tails, where the derivative is ~0."""
    return _unit_rule(
        run, "sat_frac", SATURATED_FRACTION, "saturated_units", "Saturated units",
        action=("Normalize the inputs and pre-activations (`model_kwargs: {norm: batch}`), use Xavier "
                "initialization, lower the learning rate, or switch to ReLU (`model_kwargs: {activation: relu}`)."),
        theory="Glorot & Bengio 2010 (saturation of sigmoid/tanh units); SLIDE 19 (normalizing input), "
               "SLIDE 35–37 (internal covariate shift, batch normalization).")


def data_drift(run: RunMetrics) -> list[Diagnosis]:
    """The validation inputs differ from the training inputs on consecutive checks."""
    detected = _finite(run, "drift/detected")
    if detected is None:
        return []
    spans = [(i, j) for i, j in _runs(detected.values >= 0.5) if j - i + 1 >= DRIFT_CONSECUTIVE]
    if not spans:
        return []
    i, j = max(spans, key=lambda s: s[1] - s[0])
    lo, hi = int(detected.steps[i]), int(detected.steps[j])
    pieces, keys = [], ["drift/detected"]
    for key, label in (("drift/ks_pvalue_min", "smallest adjusted KS p-value"), ("drift/mmd_pvalue", "MMD p-value")):
        series = _finite(run, key)
        if series is not None:
            inside = series.values[(series.steps >= lo) & (series.steps <= hi)]
            if len(inside):
                pieces.append(f"{label} up to {float(inside.max()):.2g}")
                keys.append(key)
    covered = float((detected.values >= 0.5).mean())
    return [Diagnosis(
        rule="data_drift", title="Validation data drift from the training data", severity="problem",
        confidence=min(1.0, 0.6 + 0.4 * covered),
        evidence=(f"drift declared on {j - i + 1} consecutive validation checks, steps {lo}–{hi}"
                  f"{' (' + ', '.join(pieces) + ', alpha 0.05 by default)' if pieces else ''}; "
                  f"{covered:.0%} of all checks."),
        action=("Check the validation pipeline against the training one (normalization statistics, resizing, "
                "channel order, label mapping); compute statistics from the training data "
                "(`traincraft.data.statistics`), or train on data drawn like the validation set."),
        theory="SLIDE 19 (normalizing input: train and test must see the same transform); Rabanser et al. 2019 "
               "(failing loudly: KS and MMD two-sample tests for dataset shift).",
        steps=(lo, hi), keys=tuple(keys), value=covered, threshold=float(DRIFT_CONSECUTIVE))]


def straggler(run: RunMetrics) -> list[Diagnosis]:
    """One data-parallel rank is much slower than the median: every all-reduce waits for it."""
    spread = _finite(run, "ddp/step_time_spread")
    if spread is None:
        return []
    median = float(np.median(spread.values))
    if median <= STRAGGLER_SPREAD:
        return []
    slow = _finite(run, "ddp/step_time_max")
    extra = f"; slowest rank {float(np.median(slow.values)) * 1e3:.3g} ms per step" if slow is not None else ""
    return [Diagnosis(
        rule="straggler", title="Straggler rank in data-parallel training", severity="problem",
        confidence=min(1.0, 0.6 + (median - STRAGGLER_SPREAD)),
        evidence=(f"ddp/step_time_spread (slowest / median rank busy time) median {median:.2f} over "
                  f"{len(spread)} logs, steps {int(spread.steps[0])}–{int(spread.steps[-1])}, above "
                  f"{STRAGGLER_SPREAD}{extra}: every all-reduce waits for the slowest rank."),
        action=("Find the slow rank (a busier host, slower device, or a data loader starved of workers: raise "
                "`num_workers`); give ranks equal batch sizes; DataParallelStrategy(compression=\"fp16\") shortens "
                "only communication, not a slow rank."),
        theory="SLIDE 60–62 (cost of multi-GPU: synchronization; data parallelism waits at every update).",
        steps=(int(spread.steps[0]), int(spread.steps[-1])), keys=tuple(k for k in ("ddp/step_time_spread",
                                                                                    "ddp/step_time_max") if k in run),
        value=median, threshold=STRAGGLER_SPREAD)]


def saddle(run: RunMetrics) -> list[Diagnosis]:
    """Strong negative curvature on a loss plateau: the run sits near a saddle point."""
    flag = _probes(run, "curvature/saddle")
    if flag is None:
        return []
    at = flag.steps[flag.values >= 0.5]
    ratio = _finite(run, "curvature/stability_ratio")
    if ratio is not None:  # an unstable step explains a plateau better than a saddle does: that rule reports it
        stable = {int(s) for s, v in zip(ratio.steps, ratio.values, strict=True) if v <= 1.0}
        at = np.array([s for s in at if int(s) in stable], np.int64)
    if len(at) < 2:
        return []
    fall = _loss_fall(run, int(at[0]), int(at[-1]))
    if fall is None or fall > FLAT_LOSS:
        return []
    ratio = _finite(run, "curvature/negative_ratio")
    shown = f", λ_min/λ_max down to -{float(ratio.values.max()):.2g}" if ratio is not None else ""
    return [Diagnosis(
        rule="saddle", title="Negative curvature on a plateau (saddle point)", severity="warning", confidence=0.6,
        evidence=(f"curvature/saddle = 1 on {len(at)} probes, steps {int(at[0])}–{int(at[-1])}{shown}, while the "
                  f"training loss fell only {max(fall, 0.0):.1%} (flat: < {FLAT_LOSS:.0%})."),
        action=("Keep or raise momentum (`torch.optim.SGD(momentum=0.9)`) and a rate near 1/λ_max so the negative "
                "direction grows; noise from a smaller batch also escapes saddles."),
        theory="SLIDE 4–8 (saddle points, Hessian eigenvalues of both signs); SLIDE 27 (momentum across plateaus); "
               "Dauphin et al. 2014.",
        steps=(int(at[0]), int(at[-1])), keys=tuple(k for k in ("curvature/saddle", "curvature/negative_ratio")
                                                     if k in run), value=float(len(at)), threshold=2.0)]


def overfitting(run: RunMetrics) -> list[Diagnosis]:
    """The validation loss rises well above its minimum while the training loss keeps falling."""
    val, loss = _finite(run, "val/loss"), _train_loss(run)
    if val is None or loss is None or len(val) < 5:
        return []
    best = int(np.argmin(val.values))
    if len(val) - best - 1 < 3:
        return []
    low, last = float(val.values[best]), float(np.median(val.values[-2:]))
    rise = (last - low) / max(abs(low), 1e-12)
    step = int(val.steps[best])
    before, after = loss.values[loss.steps <= step], loss.values[loss.steps > step]
    if rise <= OVERFIT_RISE or not len(before) or not len(after):
        return []
    if float(np.median(after[-max(1, len(after) // 5):])) >= float(np.median(before[-max(1, len(before) // 5):])):
        return []
    return [Diagnosis(
        rule="overfitting", title="Overfitting: validation loss rising", severity="warning",
        confidence=min(1.0, 0.5 + rise),
        evidence=(f"val/loss rose {rise:.0%} from its minimum {low:.3g} at step {step} to {last:.3g} at step "
                  f"{int(val.steps[-1])} (threshold {OVERFIT_RISE:.0%}) while the training loss kept falling."),
        action=("Keep the checkpoint of the best val/loss (`ModelCheckpoint(monitor=\"val/loss\")`), stop early "
                "(`EarlyStopping(monitor=\"val/loss\")`), or regularize: stronger augmentation "
                "(`augment: alexnet`), weight decay, dropout."),
        theory="SLIDE 13–18 (data augmentation for small training sets), SLIDE 21 (dropout).",
        steps=(step, int(val.steps[-1])), keys=("val/loss", loss.key), value=rise, threshold=OVERFIT_RISE)]


#: Every rule :func:`diagnose` runs, in report order for equal severity and confidence.
RULES: Sequence[Callable[[RunMetrics], list[Diagnosis]]] = (
    gradient_cliff, lr_above_stability, oscillation, lr_too_low, vanishing_gradients, dead_units,
    saturated_units, data_drift, straggler, saddle, overfitting,
)

_SEVERITY = {"problem": 0, "warning": 1, "info": 2}


def diagnose(run: RunMetrics) -> list[Diagnosis]:
    """Every diagnosis of a run: problems first, then warnings, each by decreasing confidence.

    Args:
        run: the run's logged scalars (``traincraft.report.sources.read_run`` reads them from a run directory).

    Returns:
        The diagnoses; an empty list for a healthy run, or for one that logged none of the keys the rules read.

    Raises:
        TypeError: if ``run`` is not a :class:`~traincraft.report._data.RunMetrics`.
    """
    if not isinstance(run, RunMetrics):
        raise TypeError(f"diagnose() takes a RunMetrics, got {type(run).__name__}; read a run with "
                        "traincraft.report.sources.read_run(path) or traincraft.report.build_report(path).")
    found = [d for rule in RULES for d in rule(run)]
    order = {rule.__name__: i for i, rule in enumerate(RULES)}
    return sorted(found, key=lambda d: (_SEVERITY[d.severity], -d.confidence, order.get(d.rule, len(order))))
