"""CurvatureMonitor: the sharpness λ_max of the loss during training, against the optimizer's stability threshold."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from traincraft._steps import completed_step_is_logging
from traincraft.metrics.hessian import (
    directional_curvature,
    effective_rate_diagonal,
    hessian_vector_operator,
    hutchinson_trace,
    is_preconditioned,
    params_of,
    power_iteration,
    scaled_operator,
    stability_threshold,
)

_KEYS = ("lambda_max", "eta_opt", "directional", "trace", "eta_lambda", "threshold", "stability_ratio")


class CurvatureMonitor(Callback):
    """Every N steps, the top Hessian eigenvalue on a fixed probe batch, and what it means for the learning rate.

    Along a direction of curvature h the best rate is 1/h and gradient descent diverges above 2/h (the theory);
    Cohen et al. (2021) found that full-batch training drives λ_max up to 2/η and keeps it there ("edge of
    stability"). This callback measures λ_max by power iteration on Hessian-vector products, warm-started from the
    previous eigenvector (so a few iterations suffice), and compares the step's curvature η·λ with the optimizer's
    stability threshold (:func:`~traincraft.metrics.hessian.stability_threshold`): 2 for gradient descent, 2+2β for
    heavy-ball momentum, and for Adam/AdamW/RMSprop/Adagrad the preconditioned sharpness from their second-moment
    state against (2+2β₁)/(1-β₁) (Cohen et al. 2022). ``stability_ratio`` near 1 means training is at the edge.

    The probe does not disturb training: it differentiates with ``torch.autograd.grad`` (nothing lands in
    ``.grad``), restores every buffer (BatchNorm running statistics), forks the RNG (dropout masks of training
    are unchanged), runs in fp32 outside autocast, and keeps the module's train/eval mode. The probe batch is the
    first training batch seen in this fit (after the DataModule's transfer), truncated to ``probe_batch_size``.
    The loss is ``pl_module.probe_loss(batch)`` if the module defines it, else
    ``pl_module.compute_loss(pl_module(x), y)`` on ``(x, y)`` (as :class:`~traincraft.modules.ImageClassifier`).
    Results stay on the device and are logged at the first logging step after each probe (averaged over ranks).

    ================================ ================================================================
    key                              meaning
    ================================ ================================================================
    ``curvature/lambda_max``         top Hessian eigenvalue of the loss (largest in magnitude)
    ``curvature/eta_opt``            1/λ_max: the best rate along the sharpest direction
    ``curvature/directional``        gᵀHg/‖g‖², curvature along the gradient (``directional=True``)
    ``curvature/trace``              Hutchinson estimate of tr(H) (``hutchinson_samples > 0``)
    ``curvature/eta_lambda``         η·λ_max of the step, preconditioned for adaptive optimizers
    ``curvature/threshold``          the optimizer's stability threshold on η·λ
    ``curvature/stability_ratio``    eta_lambda / threshold: 1 is the edge of stability
    ================================ ================================================================

    The last three are logged only for optimizers with a known threshold (SGD, Adam, AdamW, RMSprop, Adagrad).
    With several parameter groups or adaptive optimizers η·λ is λ_max(D^½HD^½), D the per-weight step size; a
    second warm-started power iteration computes it. Only the first optimizer is probed. Weight decay is not
    included (coupled decay adds it to λ).

    Args:
        every_n_steps: probe after optimizer steps 1, 1+N, 1+2N, ...
        iterations: power iterations of a warm-started probe.
        first_iterations: power iterations of the first (cold) probe.
        directional: also compute the directional curvature (one more product).
        hutchinson_samples: Rademacher samples for the trace estimate (0: off; each costs one product).
        probe_batch_size: use only the first this many samples of the probe batch (``None``: all).

    Example:
        >>> CurvatureMonitor(every_n_steps=25, iterations=5).state_key
        "CurvatureMonitor{'every_n_steps': 25, 'iterations': 5}"
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        iterations: int = 5,
        first_iterations: int = 20,
        directional: bool = True,
        hutchinson_samples: int = 0,
        probe_batch_size: Optional[int] = None,
    ) -> None:
        for name, value, low in (("every_n_steps", every_n_steps, 1), ("iterations", iterations, 1),
                                 ("first_iterations", first_iterations, 1), ("hutchinson_samples", hutchinson_samples, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}.")
        if probe_batch_size is not None and (not isinstance(probe_batch_size, int) or probe_batch_size < 1):
            raise ValueError(f"probe_batch_size must be None or an integer >= 1; got {probe_batch_size!r}.")
        self.every_n_steps = every_n_steps
        self.iterations = iterations
        self.first_iterations = first_iterations
        self.directional = directional
        self.hutchinson_samples = hutchinson_samples
        self.probe_batch_size = probe_batch_size
        self.eigenvector: Optional[Tensor] = None
        self.scaled_eigenvector: Optional[Tensor] = None
        self.last: dict[str, Tensor] = {}  # device scalars of the latest probe, read by LearningRateGovernor
        self.probes = 0
        self._probe_batch: Any = None
        self._fresh = False
        self._last_probe_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, iterations=self.iterations)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not hasattr(pl_module, "probe_loss") and not hasattr(pl_module, "compute_loss"):
            raise TypeError(
                f"CurvatureMonitor needs the loss of a batch: {type(pl_module).__name__} has neither "
                "probe_loss(batch) nor compute_loss(logits, targets). Add `def probe_loss(self, batch): return "
                "<the training loss of batch>` to it (no logging, no metric updates)."
            )
        self._probe_batch = None
        self._fresh = False
        self._last_probe_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._probe_batch is None:
            self._probe_batch = _detached_head(batch, self.probe_batch_size)
        step = trainer.global_step
        if step > 0 and step != self._last_probe_step and (step - 1) % self.every_n_steps == 0:
            self._last_probe_step = step
            self.last = self.probe(pl_module, trainer.optimizers[0] if trainer.optimizers else None)
            self.probes += 1
            self._fresh = True
        if self._fresh and completed_step_is_logging(trainer):
            self._fresh = False
            keys = list(self.last)
            values = trainer.strategy.reduce(torch.stack([self.last[k] for k in keys]), reduce_op="mean")
            host = values.tolist()  # sync point: logging step only
            pl_module.log_dict({f"curvature/{k}": v for k, v in zip(keys, host, strict=False)}, on_step=True, on_epoch=False)

    def probe(self, pl_module: pl.LightningModule, optimizer: Optional[torch.optim.Optimizer]) -> dict[str, Tensor]:
        """Measure the curvature at the current weights on the probe batch; returns device scalars by key."""
        if self._probe_batch is None:
            raise RuntimeError("no probe batch yet: probe() runs after the first training batch.")
        optimizer = getattr(optimizer, "optimizer", optimizer)
        params = params_of(pl_module)
        device = params[0].device
        buffers = [(b, b.detach().clone()) for b in pl_module.buffers()]
        fork = torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])
        try:
            with fork, torch.autocast(device.type, enabled=False), torch.enable_grad():
                loss = self._loss(pl_module, self._probe_batch).float()
                hvp, gradient = hessian_vector_operator(loss, params)
                results = self._measure(hvp, gradient, optimizer, params, device)
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
        return results

    def _measure(self, hvp, gradient: Tensor, optimizer, params: list[nn.Parameter], device) -> dict[str, Tensor]:
        size = gradient.numel()
        cold = self.eigenvector is None or self.eigenvector.numel() != size
        init = self._random(size, device) if cold else self.eigenvector.to(device)
        lam, self.eigenvector = power_iteration(hvp, init, self.first_iterations if cold else self.iterations)
        results = {"lambda_max": lam, "eta_opt": 1.0 / lam}
        if self.directional:
            results["directional"] = directional_curvature(hvp, gradient)
        if self.hutchinson_samples:
            generator = torch.Generator(device=device).manual_seed(self.probes)
            results["trace"] = hutchinson_trace(hvp, size, self.hutchinson_samples, generator, device)
        threshold = stability_threshold(optimizer) if optimizer is not None else None
        if threshold is None:
            return results
        rates = {float(g["lr"]) * (1 - float(g.get("dampening", 0.0))) for g in optimizer.param_groups}
        if not is_preconditioned(optimizer) and len(rates) == 1:
            eta_lambda = rates.pop() * lam  # one rate: η·λ_max needs no second iteration
        else:
            diagonal = effective_rate_diagonal(optimizer, params)
            if diagonal is None:  # adaptive optimizer before its first step: no preconditioner yet
                return results
            cold = self.scaled_eigenvector is None or self.scaled_eigenvector.numel() != size
            init = self._random(size, device) if cold else self.scaled_eigenvector.to(device)
            eta_lambda, self.scaled_eigenvector = power_iteration(
                scaled_operator(hvp, diagonal), init, self.first_iterations if cold else self.iterations
            )
        results["eta_lambda"] = eta_lambda
        results["threshold"] = torch.full((), threshold, device=device)
        results["stability_ratio"] = eta_lambda / threshold
        return results

    @staticmethod
    def _random(size: int, device: torch.device) -> Tensor:
        generator = torch.Generator().manual_seed(0)
        return torch.randn(size, generator=generator).to(device)

    @staticmethod
    def _loss(pl_module: pl.LightningModule, batch: Any) -> Tensor:
        if hasattr(pl_module, "probe_loss"):
            return pl_module.probe_loss(batch)
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(
                f"the probe batch is a {type(batch).__name__}, not (inputs, targets); define probe_loss(batch) on "
                f"{type(pl_module).__name__} to tell CurvatureMonitor how to compute the loss."
            )
        return pl_module.compute_loss(pl_module(batch[0]), batch[1])

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"probes": self.probes}
        if self.eigenvector is not None:
            state["eigenvector"] = self.eigenvector.detach().cpu()
        if self.scaled_eigenvector is not None:
            state["scaled_eigenvector"] = self.scaled_eigenvector.detach().cpu()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probes = int(state_dict.get("probes", 0))
        self.eigenvector = state_dict.get("eigenvector")
        self.scaled_eigenvector = state_dict.get("scaled_eigenvector")


def _detached_head(batch: Any, size: Optional[int]) -> Any:
    if isinstance(batch, Tensor):
        return (batch if size is None else batch[:size]).detach().clone()
    if isinstance(batch, (tuple, list)):
        return type(batch)(_detached_head(item, size) for item in batch)
    if isinstance(batch, dict):
        return {key: _detached_head(value, size) for key, value in batch.items()}
    return batch

