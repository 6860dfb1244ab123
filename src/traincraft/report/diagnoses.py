"""The health report's verdicts: small pure rules over a run's logged scalars, each grounded in the theory.

:func:`diagnose` runs every rule in :data:`RULES` on a :class:`~traincraft.report._data.RunMetrics` and returns
the :class:`~traincraft.report._data.Diagnosis` list, problems first. Each rule reads only the exact keys a
traincraft callback logs; a rule whose keys the run did not log says nothing (the report's panels say which
callback adds them). The rules live by theme in private modules (``_optimization_rules.py``,
``_activation_rules.py``, ``_data_rules.py``) and are assembled here; their thresholds are module constants
(``_thresholds.py``), re-exported here. ``docs/diagnoses.md`` gives, for each rule, the
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

from collections.abc import Callable, Sequence

from traincraft.report._activation_rules import dead_units, saturated_units, vanishing_gradients
from traincraft.report._data import Diagnosis, RunMetrics
from traincraft.report._data_rules import data_drift, overfitting, straggler
from traincraft.report._optimization_rules import (
    gradient_cliff,
    lr_above_stability,
    lr_too_low,
    oscillation,
    saddle,
)
from traincraft.report._thresholds import (
    DEAD_FRACTION,
    DEPTH_SLOPE_VANISHING,
    DRIFT_CONSECUTIVE,
    FLAT_LOSS,
    LOSS_JUMP,
    LOW_UPDATE_RATIO,
    OSCILLATION_COSINE,
    OSCILLATION_LOGS,
    OVERFIT_RISE,
    SATURATED_FRACTION,
    SPIKE_FACTOR,
    STABILITY_MARGIN,
    STRAGGLER_SPREAD,
    STUCK_LOSS,
    VANISHING_RATIO,
)

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
