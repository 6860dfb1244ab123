"""What the rules read from a run: finite series, the training loss, tails, runs of flags and loss falls."""

from __future__ import annotations

import numpy as np

from traincraft.report._data import RunMetrics, Series

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

