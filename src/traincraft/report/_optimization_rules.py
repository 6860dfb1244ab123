"""Rules about the optimizer's step: stability against curvature, oscillation, a rate too low, cliffs, saddles."""

from __future__ import annotations

import math

import numpy as np

from traincraft.report._data import Diagnosis, RunMetrics, Series
from traincraft.report._rule_support import (
    _TRAIN_LOSS,
    _finite,
    _group,
    _loss_fall,
    _probes,
    _progress,
    _runs,
    _train_loss,
)
from traincraft.report._thresholds import (
    FLAT_LOSS,
    LOSS_JUMP,
    LOW_UPDATE_RATIO,
    OSCILLATION_COSINE,
    OSCILLATION_LOGS,
    SPIKE_FACTOR,
    STABILITY_MARGIN,
    STUCK_LOSS,
)


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

