"""What CurvatureMonitor needs around its Lanczos runs: the probe batch and its loss, the start vector, the keys
read off both ends of the spectrum, and the error that names a module without double backward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor

from traincraft.metrics.hessian import DoubleBackwardError, module_without_double_backward
from traincraft.metrics.spectrum import ExtremeEigenpairs


def probe_loss(pl_module: pl.LightningModule, batch: Any) -> Tensor:
    """The module's ``probe_loss(batch)``, else ``compute_loss(module(inputs), targets)`` of an (inputs, targets)."""
    if hasattr(pl_module, "probe_loss"):
        return pl_module.probe_loss(batch)
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(
            f"the probe batch is a {type(batch).__name__}, not (inputs, targets); define probe_loss(batch) on "
            f"{type(pl_module).__name__} to tell CurvatureMonitor how to compute the loss."
        )
    return pl_module.compute_loss(pl_module(batch[0]), batch[1])


def detached_head(batch: Any, size: Optional[int]) -> Any:
    """A detached copy of the first ``size`` samples of every tensor in ``batch`` (all of them for ``None``)."""
    if isinstance(batch, Tensor):
        return (batch if size is None else batch[:size]).detach().clone()
    if isinstance(batch, (tuple, list)):
        return type(batch)(detached_head(item, size) for item in batch)
    if isinstance(batch, dict):
        return {key: detached_head(value, size) for key, value in batch.items()}
    return batch


def random_start(size: int, device: torch.device) -> Tensor:
    """The cold start vector: seeded on the CPU, so every device and rank starts from the same one."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(size, generator=generator).to(device)


def spectrum_keys(pairs: ExtremeEigenpairs, saddle_ratio: float) -> dict[str, Tensor]:
    """The logged keys read off both ends of the spectrum, as device scalars (no branch on their values)."""
    lam, low = pairs.lambda_max, pairs.lambda_min
    positive = lam > 0
    negative = (-low).clamp_min(0)
    ratio = torch.where(positive, negative / torch.where(positive, lam, 1.0),
                        torch.where(negative > 0, torch.inf, 0.0))
    return {
        "lambda_max": lam,
        "lambda_min": low,
        "eta_opt": torch.where(positive, 1.0 / torch.where(positive, lam, 1.0), torch.inf),
        "negative_ratio": ratio,
        "saddle": (ratio > saddle_ratio).float(),
    }


def name_the_module(pl_module: pl.LightningModule, loss: Callable[[], Tensor],
                    error: DoubleBackwardError) -> DoubleBackwardError:
    """``error`` again, naming the innermost module whose forward cannot be differentiated twice (slow: a diagnosis
    after a product failed)."""
    culprit = module_without_double_backward(pl_module, loss)
    owner = type(pl_module).__name__
    if culprit is None:
        where = f"an operation in {owner}'s loss (not traced to one module)"
    elif culprit == "":
        where = f"the forward of {owner} itself (outside its submodules)"
    else:
        where = f"the module '{culprit}' ({type(pl_module.get_submodule(culprit)).__name__})"
    return DoubleBackwardError(
        f"CurvatureMonitor: {where} does not support double backward, which Hessian-vector products need "
        f"({error.reason}). Replace its operations marked @once_differentiable (custom autograd Functions, fused "
        "kernels) with differentiable ones, or remove CurvatureMonitor from the callbacks for this model."
    )
