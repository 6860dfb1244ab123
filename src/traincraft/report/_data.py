"""The data a health report is built from and the verdicts it gives: plain containers, no I/O.

A run's logged scalars, whatever logger wrote them (a CSV file, TensorBoard events, a W&B offline run), become one
:class:`RunMetrics`: a :class:`Series` per metric key, indexed by the trainer's ``global_step``. The diagnoses
(:mod:`traincraft.report.diagnoses`) read only this; the readers (:mod:`traincraft.report.sources`) only write it.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

Severity = Literal["problem", "warning", "info"]


@dataclass(frozen=True)
class Series:
    """One metric key over a run: ``values[i]`` was logged at ``steps[i]`` (the trainer's ``global_step``).

    ``steps`` is sorted and int64; ``values`` is float64 and may hold NaN/Inf as logged (a diverged run logs them).
    """

    key: str
    steps: np.ndarray
    values: np.ndarray

    def __post_init__(self) -> None:
        if self.steps.shape != self.values.shape or self.steps.ndim != 1:
            raise ValueError(f"Series {self.key!r}: steps {tuple(self.steps.shape)} and values "
                             f"{tuple(self.values.shape)} must be 1-D and of the same length")

    def __len__(self) -> int:
        return int(self.steps.shape[0])

    def finite(self) -> Series:
        """The entries whose value is finite."""
        keep = np.isfinite(self.values)
        return Series(self.key, self.steps[keep], self.values[keep])

    def last(self) -> float:
        """The last logged value (NaN for an empty series)."""
        return float(self.values[-1]) if len(self) else math.nan


@dataclass
class RunMetrics:
    """Every scalar a run logged, by key; ``source`` says what was read (``"csv"``, ``"tensorboard"``, ``"wandb"``)."""

    series: dict[str, Series]
    source: str
    path: Path
    #: Non-scalar records the reader found (e.g. ``"histogram"``, ``"image"``), by key; the report lists them.
    other: dict[str, str] = field(default_factory=dict)

    def __contains__(self, key: str) -> bool:
        return key in self.series

    def get(self, key: str) -> Series | None:
        return self.series.get(key)

    def matching(self, pattern: str) -> list[str]:
        """The keys matching a shell-style pattern (``"shift/*/mean"``), sorted."""
        return sorted(k for k in self.series if fnmatch.fnmatchcase(k, pattern))

    @property
    def max_step(self) -> int:
        return max((int(s.steps[-1]) for s in self.series.values() if len(s)), default=0)


@dataclass(frozen=True)
class Diagnosis:
    """One verdict of the health report, with the evidence it rests on and what to change.

    ``rule`` is a stable identifier (``"lr_above_stability"``); ``theory`` names the slide or paper the rule comes
    from (docs/health-report.md lists them); ``confidence`` is in [0, 1]; ``steps`` is the step range the evidence
    covers; ``keys`` the metric keys it read; ``action`` the concrete change (a setting, or a traincraft part with
    the line to add).
    """

    rule: str
    title: str
    severity: Severity
    confidence: float
    evidence: str
    action: str
    theory: str
    steps: tuple[int, int] | None = None
    keys: tuple[str, ...] = ()
    layer: str | None = None
    value: float | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"Diagnosis {self.rule!r}: confidence {self.confidence} is outside [0, 1]")
        if self.severity not in ("problem", "warning", "info"):
            raise ValueError(f"Diagnosis {self.rule!r}: severity {self.severity!r} is not problem/warning/info")

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}
