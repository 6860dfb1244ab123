"""The curvature side of the learning-rate suggestion: η·λ_max of one optimizer step by Lanczos on exact
Hessian-vector products, and the stability thresholds of the optimizer kinds :func:`lr_from_curvature` names."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.optim import Optimizer

from traincraft.callbacks.curvature import CurvatureMonitor
from traincraft.metrics.hessian import (
    DoubleBackwardError,
    effective_rate_diagonal,
    hessian_vector_operator,
    lanczos,
    params_of,
    scaled_operator,
    stability_threshold,
)

_KINDS = ("sgd", "adam", "adamw")


def _step_sharpness(module: pl.LightningModule, monitor: CurvatureMonitor, batch: Any, optimizer: Optimizer,
                    iterations: int, device: torch.device) -> float:
    """η·λ_max of one step of ``optimizer``: the largest eigenvalue of D^½HD^½, D its per-weight step size (the
    group rates for SGD, η/(√v̂+ε) for Adam), by Lanczos on exact Hessian-vector products, as CurvatureMonitor's
    second run does (one run here: the plain Hessian's is not needed)."""
    params = params_of(module)
    diagonal = effective_rate_diagonal(optimizer, params)
    generator = torch.Generator(device=device).manual_seed(0)
    start = torch.randn(diagonal.numel(), generator=generator, device=device)
    # fp32 outside autocast, and the math attention kernel: the fused ones have no double backward
    with torch.autocast(device.type, enabled=False), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        try:
            hvp, _ = hessian_vector_operator(monitor._loss(module, batch).float(), params)
            pairs = lanczos(scaled_operator(hvp, diagonal), start, iterations, generator)
        except DoubleBackwardError as error:
            monitor._probe_batch = batch  # the monitor names the module that cannot be differentiated twice
            raise monitor._name_the_module(module, error) from error
    return pairs.lambda_max.item()



def _threshold_of_kind(kind: str, momentum: float, nesterov: bool, beta1: float) -> float:
    if not isinstance(kind, str) or kind.lower() not in _KINDS:
        raise ValueError(f"optimizer must be a torch optimizer or one of {list(_KINDS)}; got {kind!r}.")
    if not 0 <= momentum < 1 or not 0 <= beta1 < 1:
        raise ValueError(f"momentum and beta1 must lie in [0, 1); got momentum={momentum!r}, beta1={beta1!r}.")
    if nesterov and (kind.lower() != "sgd" or momentum <= 0):
        raise ValueError("nesterov=True needs optimizer='sgd' and momentum > 0 (e.g. 0.9).")
    probe = [torch.nn.Parameter(torch.zeros(1))]
    # the formulas live in stability_threshold: ask it about a throwaway optimizer of this kind
    if kind.lower() == "sgd":
        built: Optimizer = torch.optim.SGD(probe, lr=1.0, momentum=momentum, nesterov=nesterov)
    else:
        built = (torch.optim.Adam if kind.lower() == "adam" else torch.optim.AdamW)(probe, betas=(beta1, 0.999))
    return float(stability_threshold(built))


def _unknown_optimizer(optimizer: Optimizer) -> str:
    return (f"{type(optimizer).__name__} has no known stability threshold; the curvature suggestion knows SGD (with "
            "momentum or Nesterov), Adam, AdamW, RMSprop and Adagrad. Use Lightning's Tuner.lr_find for this one.")


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number in (0, 1] (the share of the largest stable rate); got "
                         f"{fraction!r}. Pass e.g. 0.5.")


def _describe(optimizer: Optimizer) -> str:
    group = optimizer.param_groups[0]
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.SGD):
        beta = float(group.get("momentum", 0.0))
        if not beta:
            return name
        return f"{name}(momentum={beta:g}{', nesterov' if group.get('nesterov') else ''})"
    if "betas" in group:
        return f"{name}(beta1={float(group['betas'][0]):g})"
    return name

