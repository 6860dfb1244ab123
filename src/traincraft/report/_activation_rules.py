"""Rules about what flows through the layers: gradients vanishing with depth, dead and saturated units."""

from __future__ import annotations

import math

import numpy as np

from traincraft.report._data import Diagnosis, RunMetrics, Series
from traincraft.report._rule_support import _finite, _layer, _tail
from traincraft.report._thresholds import (
    DEAD_FRACTION,
    DEPTH_SLOPE_VANISHING,
    SATURATED_FRACTION,
    VANISHING_RATIO,
)


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

