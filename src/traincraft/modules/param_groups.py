"""Named parameter groups with per-layer learning-rate multipliers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any, Optional

from torch import nn
from torch.optim import Optimizer


def layerwise_param_groups(model: nn.Module, lr_multipliers: Optional[Mapping[str, float]] = None) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into named groups by glob patterns on parameter names.

    Each parameter joins the group of the first pattern (in the mapping's order) that matches its name; the rest
    form the group ``"default"`` with multiplier 1. Each group carries its ``"name"`` (Lightning's
    ``LearningRateMonitor`` logs ``lr-<Optimizer>/<name>``) and its ``"lr_multiplier"``, applied to the
    optimizer's learning rate by :func:`apply_lr_multipliers`.

    Args:
        model: the model whose parameters to group.
        lr_multipliers: ``{glob pattern: multiplier}``, e.g. ``{"features.conv1.*": 2.0, "classifier.*": 0.5}``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> groups = layerwise_param_groups(net, {"0.*": 10.0})
        >>> [(g["name"], g["lr_multiplier"], len(g["params"])) for g in groups]
        [('default', 1.0, 2), ('0.*', 10.0, 2)]
    """
    lr_multipliers = dict(lr_multipliers or {})
    for pattern, multiplier in lr_multipliers.items():
        if not isinstance(multiplier, (int, float)) or not math.isfinite(multiplier) or multiplier < 0:
            raise ValueError(f"lr_multipliers[{pattern!r}] must be a finite number >= 0; got {multiplier!r}.")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups: dict[str, list[nn.Parameter]] = {"default": [], **{pattern: [] for pattern in lr_multipliers}}
    for name, param in named:
        pattern = next((pat for pat in lr_multipliers if fnmatchcase(name, pat)), "default")
        groups[pattern].append(param)
    unmatched = [pat for pat in lr_multipliers if not groups[pat]]
    if unmatched:
        examples = ", ".join(name for name, _ in named[:8])
        raise ValueError(
            f"lr_multipliers patterns {unmatched} match no trainable parameter (or only parameters an earlier "
            f"pattern took). Patterns are globs on parameter names, such as: {examples}, ..."
        )
    return [
        {"params": params, "name": pattern, "lr_multiplier": float(lr_multipliers.get(pattern, 1.0))}
        for pattern, params in groups.items()
        if params
    ]


def apply_lr_multipliers(optimizer: Optimizer) -> Optimizer:
    """Scale each group's ``lr`` by its ``lr_multiplier``; call once, before creating a scheduler.

    Schedulers record each group's starting rate when they are created, so they then scale the multiplied rates.
    """
    for group in optimizer.param_groups:
        multiplier = group.get("lr_multiplier", 1.0)
        if multiplier != 1.0:
            group["lr"] = group["lr"] * multiplier
    return optimizer
