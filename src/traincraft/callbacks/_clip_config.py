"""GradientClipping's refusals: bad arguments at construction, and optimizers it cannot clip at the fit's start."""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Optional

from traincraft.callbacks._clip_state import shard_groups
from traincraft.callbacks._step_skipping import SKIP_METHODS

MODES = ("norm", "value", "agc", "quantile", "zscore")
_FLOATS = ("threshold", "norm_type", "agc_clipping", "agc_eps", "quantile", "z_threshold", "ema_decay")
_INTS = ("history_size", "warmup_steps", "max_consecutive_skips")
_BOOLS = ("per_layer", "skip_spikes", "restore_buffers", "log_layer_norms", "log_depth_profile")


def _check_types(args: dict[str, Any]) -> None:
    """Wrong types (a YAML string, a bool for a number) named before any comparison fails obscurely."""
    for name in _FLOATS:
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}); write it without "
                            "quotes, e.g. 1.0 (inf for norm_type is float('inf') or .inf in YAML).")
    for name in _INTS:
        value = args[name]
        if (value is not None or name != "max_consecutive_skips") and (
                isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be a whole number, got {value!r} ({type(value).__name__}); "
                            f"e.g. {name}=10" + (" or None" if name == "max_consecutive_skips" else "") + ".")
    for name in _BOOLS:
        if not isinstance(args[name], bool):
            raise TypeError(f"{name} must be True or False, got {args[name]!r} ({type(args[name]).__name__}).")


def check_arguments(args: dict[str, Any]) -> None:
    """Every constructor argument of GradientClipping (``locals()`` of its ``__init__``), with a fix in each message."""
    _check_types(args)
    mode, threshold, norm_type = args["mode"], args["threshold"], args["norm_type"]
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of 'norm', 'value', 'agc', 'quantile', 'zscore'.")
    if not (threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a positive finite number, got {threshold!r}; e.g. 1.0 for "
                         "mode='norm' or 0.01 for mode='value'.")
    if not (norm_type == math.inf or norm_type > 0):
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type!r}; 2.0 is the usual L2 norm.")
    if args["per_layer"] and mode in ("value", "agc"):
        raise ValueError(f"per_layer=True has no meaning for mode={mode!r}, which already acts per entry/unit; "
                         "drop per_layer.")
    if args["skip_spikes"] and mode == "agc":
        raise ValueError("skip_spikes=True needs a norm threshold, and mode='agc' has none per step; use "
                         "mode='norm', 'quantile' or 'zscore', or set skip_spikes=False.")
    agc_clipping, agc_eps, agc_exclude = args["agc_clipping"], args["agc_eps"], args["agc_exclude"]
    if not (agc_clipping > 0 and agc_eps >= 0 and math.isfinite(agc_clipping) and math.isfinite(agc_eps)):
        raise ValueError(f"agc_clipping must be > 0 and agc_eps >= 0 (finite), got {agc_clipping}, {agc_eps}; "
                         "Brock et al. use 0.01 and 1e-3.")
    if isinstance(agc_exclude, str):
        raise ValueError(f"agc_exclude must be a list of glob patterns, got the string {agc_exclude!r}; write "
                         f"agc_exclude=[{agc_exclude!r}].")
    if not 0.0 <= args["quantile"] <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {args['quantile']}; AutoClip uses 0.1.")
    history_size, warmup_steps = args["history_size"], args["warmup_steps"]
    if history_size < 1 or warmup_steps < 0:
        raise ValueError(f"history_size must be >= 1 and warmup_steps >= 0, got {history_size}, {warmup_steps}; "
                         "AutoClip keeps 1000 norms and ZClip warms up for 25 steps.")
    z_threshold, ema_decay = args["z_threshold"], args["ema_decay"]
    if not (z_threshold > 0 and math.isfinite(z_threshold) and 0.0 <= ema_decay < 1.0):
        raise ValueError(f"need 0 < z_threshold < inf and 0 <= ema_decay < 1, got {z_threshold}, {ema_decay}; "
                         "ZClip uses 2.5 and 0.97.")
    max_consecutive_skips = args["max_consecutive_skips"]
    if max_consecutive_skips is not None and max_consecutive_skips < 1:
        raise ValueError(f"max_consecutive_skips must be >= 1 or None, got {max_consecutive_skips}; None never "
                         "stops training, 10 is the default.")
    if args["on_consecutive_skips"] not in ("raise", "restore"):
        raise ValueError(f"on_consecutive_skips={args['on_consecutive_skips']!r} is not 'raise' or 'restore'.")
    if args["skip_method"] not in SKIP_METHODS:
        raise ValueError(f"skip_method={args['skip_method']!r} is not one of {SKIP_METHODS}.")


def check_optimizers(optimizers: list[Any], mode: str, strategy: Any, owner: str) -> Optional[list]:
    """At the fit's start: each parameter in one optimizer, and no reduction GradientClipping cannot do. Returns
    the process groups that shard the parameters (None when nothing is sharded)."""
    seen: dict[int, int] = {}
    for i, optimizer in enumerate(optimizers):
        for g in optimizer.param_groups:
            for p in g["params"]:
                if seen.setdefault(id(p), i) != i:
                    raise ValueError(f"a parameter is in optimizers {seen[id(p)]} and {i}: GradientClipping "
                                     "clips each optimizer by the norm of its own parameters, so each must hold "
                                     "different ones. Give every parameter to one optimizer only.")
    groups = shard_groups([p for o in optimizers for g in o.param_groups for p in g["params"]], owner)
    if groups is not None and mode == "agc":
        raise ValueError("GradientClipping(mode='agc') cannot run on sharded parameters (DTensor): the norm of a "
                         "unit may be split over ranks. Use mode='norm', 'quantile' or 'zscore', which reduce "
                         "the norms over the shards, or train with an unsharded strategy.")
    if groups is not None and getattr(strategy, "gradient_norm_group", None) is not None:
        raise ValueError(f"{type(strategy).__name__} names a gradient_norm_group and the parameters are "
                         "sharded (DTensor): GradientClipping reduces norms over one of the two, not both. Use a "
                         "strategy that does only one of them.")
    return groups


def agc_excluded(names: list[str], patterns: Optional[list[str]]) -> set[int]:
    """Indices of the parameters AGC leaves alone: those matching ``patterns``, or the optimizer's last layer."""
    if patterns is None:  # this optimizer's last layer: the output layer (of each network of a GAN)
        last = names[-1:] or [""]
        prefix = last[0].rsplit(".", 1)[0] + "."
        return {i for i, n in enumerate(names) if n.startswith(prefix)}
    return {i for i, n in enumerate(names) if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
