"""Rules about the data and the machines: train/validation drift, a straggler rank, overfitting."""

from __future__ import annotations

import numpy as np

from traincraft.report._data import Diagnosis, RunMetrics
from traincraft.report._rule_support import _finite, _runs, _train_loss
from traincraft.report._thresholds import DRIFT_CONSECUTIVE, OVERFIT_RISE, STRAGGLER_SPREAD


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

