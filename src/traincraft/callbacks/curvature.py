"""CurvatureMonitor: both ends of the loss's Hessian spectrum during training, against the stability threshold."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from traincraft._sharded import refuse_sharded
from traincraft._steps import batch_steps, batches_stepped, completed_step_is_logging
from traincraft.callbacks._curvature_probe import (
    detached_head,
    name_the_module,
    probe_loss,
    random_start,
    spectrum_keys,
)
from traincraft.metrics.hessian import (
    DoubleBackwardError,
    directional_curvature,
    effective_rate_diagonal,
    hessian_vector_operator,
    hutchinson_trace,
    is_preconditioned,
    lanczos,
    params_of,
    scaled_operator,
    stability_threshold,
)

_EXAMPLES = {"every_n_steps": 1200, "iterations": 12, "first_iterations": 20, "hutchinson_samples": 0,
             "optimizer_index": 0}


class CurvatureMonitor(Callback):
    """Every N stepped batches, both ends of the Hessian's spectrum on a fixed probe batch, and what they mean.

    Along a direction of curvature h the best rate is 1/h and gradient descent diverges above 2/h (the theory);
    Cohen et al. (2021) found that full-batch training drives the sharpness λ_max up to 2/η and keeps it there
    ("edge of stability"). λ_max here is the largest *algebraic* eigenvalue: off a minimum (early training,
    saddles, transformers) the eigenvalue of largest magnitude, which power iteration finds, is often a large
    negative one. The monitor runs Lanczos with full reorthogonalization on Hessian-vector products
    (:func:`~traincraft.metrics.hessian.lanczos`), warm-started from the previous probe's extreme eigenvectors, which
    gives λ_max and λ_min together. It compares the step's curvature η·λ with the optimizer's stability threshold
    (:func:`~traincraft.metrics.hessian.stability_threshold`): 2 for gradient descent, 2+2β for heavy-ball momentum,
    and for Adam/AdamW/RMSprop/Adagrad the preconditioned sharpness from their second-moment state against
    (2+2β₁)/(1-β₁) (Cohen et al. 2022). ``stability_ratio`` near 1 means training is at the edge. A large negative
    λ_min means the weights are not near a minimum: near a saddle point (if the gradient is small too) training
    slows, and it leaves the saddle along the negative direction only as fast as (1 + η|λ_min|) per step.

    The probe does not disturb training: it differentiates with ``torch.autograd.grad`` (nothing lands in
    ``.grad``), restores every buffer (BatchNorm running statistics), forks the RNG (dropout masks of training
    are unchanged), runs in fp32 outside autocast (also under ``bf16-mixed``), keeps the module's train/eval mode,
    and runs ``scaled_dot_product_attention`` with its math backend (the fused kernels have no double backward).
    The probe batch is the first training batch seen in this fit (after the DataModule's transfer), truncated to
    ``probe_batch_size``. The loss is ``pl_module.probe_loss(batch)`` if the module defines it, else
    ``pl_module.compute_loss(pl_module(x), y)`` on ``(x, y)`` (as :class:`~traincraft.modules.ImageClassifier`).
    Results stay on the device (nothing syncs with the host, also on probe steps) and are logged at the first
    logging step after each probe (averaged over ranks). Refusals come early: a module without ``probe_loss`` or
    ``compute_loss``, several optimizers without ``probe_loss``, and sharded (DTensor) parameters at fit start; a
    model that cannot be differentiated twice at the first probe (after the first stepped batch), with a
    :class:`~traincraft.metrics.hessian.DoubleBackwardError` that names the module (e.g. one using a custom autograd
    Function marked ``@once_differentiable``).

    ================================ ================================================================
    key                              meaning
    ================================ ================================================================
    ``curvature/lambda_max``         largest algebraic Hessian eigenvalue of the loss (the sharpness)
    ``curvature/lambda_min``         smallest algebraic Hessian eigenvalue (negative: negative curvature)
    ``curvature/eta_opt``            1/λ_max: the best rate along the sharpest direction (inf if λ_max ≤ 0)
    ``curvature/negative_ratio``     max(0, -λ_min) / λ_max: negative curvature relative to the sharpness
    ``curvature/saddle``             1 if negative_ratio > ``saddle_ratio``, else 0
    ``curvature/directional``        gᵀHg/‖g‖², curvature along the gradient (``directional=True``)
    ``curvature/trace``              Hutchinson estimate of tr(H) (``hutchinson_samples > 0``)
    ``curvature/eta_lambda``         η·λ_max of the step, preconditioned for adaptive optimizers
    ``curvature/threshold``          the optimizer's stability threshold on η·λ
    ``curvature/stability_ratio``    eta_lambda / threshold: 1 is the edge of stability
    ================================ ================================================================

    The last three are logged only for optimizers with a known threshold (SGD, Adam, AdamW, RMSprop, Adagrad),
    and for adaptive ones from their first step on. With several parameter groups at different rates or an adaptive
    optimizer, η·λ is the largest algebraic eigenvalue of D^½HD^½, D the per-weight step size (a second Lanczos run).
    Weight decay is not included (coupled decay adds it to λ).

    What is probed: with one optimizer, the Hessian over all trainable parameters. With several optimizers (manual
    optimization, e.g. a GAN), the module must define ``probe_loss(batch)``, and the Hessian of that loss is taken
    over the parameters of ``trainer.optimizers[optimizer_index]``, whose learning rates, preconditioner and
    threshold give eta_lambda (e.g. the discriminator's loss and optimizer).

    Cost: one gradient with its graph, plus ``iterations`` Hessian-vector products (each about 2-3 training steps),
    ``hutchinson_samples`` more, and as many again for adaptive optimizers; memory for ``iterations`` flat fp32
    copies of the probed parameters. A default probe costs about 20-35 training steps at equal batch, so the default
    interval of 1200 keeps the amortized cost under 3% of a fit (about 2.6% on the ConvNet, 2.1% on a transformer
    LM; ``docs/learning-rate.md`` has the measurements);
    ``probe_batch_size`` cuts it in proportion.

    Args:
        every_n_steps: probe after the training batches that stepped number 1, 1+N, 1+2N, ... (and after the
            first stepped batch of a resumed fit, so that a model the probe cannot handle fails early).
            It counts batches that ended with optimizer step(s), as Lightning's ``log_every_n_steps`` does: a batch
            of a two-optimizer GAN counts once (``trainer.global_step`` moves by 2), an accumulation window of
            ``accumulate_grad_batches`` micro-batches counts once.
        iterations: Lanczos iterations (Hessian-vector products) of a warm-started probe.
        first_iterations: Lanczos iterations of the first (cold) probe.
        directional: also compute the directional curvature gᵀHg/‖g‖² (free: the gradient is the last Lanczos
            vector, in place of a Krylov one).
        hutchinson_samples: Rademacher samples for the trace estimate (0: off; each costs one product).
        probe_batch_size: use only the first this many samples of the probe batch (``None``: all).
        saddle_ratio: ``curvature/saddle`` is 1 when λ_min < -saddle_ratio·λ_max. At the rate 1/λ_max a step
            then grows the component along the most negative direction by at least (1 + saddle_ratio): 0.1 means
            negative curvature that a gradient step feels within about ten steps.
        optimizer_index: with several optimizers, which one's parameters and preconditioner are probed.

    Example:
        >>> CurvatureMonitor(every_n_steps=25, iterations=5).state_key
        "CurvatureMonitor{'every_n_steps': 25, 'iterations': 5}"
    """

    def __init__(
        self,
        every_n_steps: int = 1200,
        iterations: int = 12,
        first_iterations: int = 20,
        directional: bool = True,
        hutchinson_samples: int = 0,
        probe_batch_size: Optional[int] = None,
        saddle_ratio: float = 0.1,
        optimizer_index: int = 0,
    ) -> None:
        for name, value, low in (("every_n_steps", every_n_steps, 1), ("iterations", iterations, 1),
                                 ("first_iterations", first_iterations, 1), ("hutchinson_samples", hutchinson_samples, 0),
                                 ("optimizer_index", optimizer_index, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}. Pass e.g. {_EXAMPLES[name]}.")
        if probe_batch_size is not None and (not isinstance(probe_batch_size, int) or probe_batch_size < 1):
            raise ValueError(f"probe_batch_size must be None (the whole first batch) or an integer >= 1; got "
                             f"{probe_batch_size!r}. Pass e.g. 32.")
        if not isinstance(saddle_ratio, (int, float)) or isinstance(saddle_ratio, bool) or not 0 <= saddle_ratio < 1e9:
            raise ValueError(f"saddle_ratio must be a number >= 0; got {saddle_ratio!r}. Pass e.g. 0.1 (the default).")
        if not isinstance(directional, bool):
            raise ValueError(f"directional must be True or False; got {directional!r}. Pass a bool.")
        # the cadence and size of a probe, then what it measures and on which optimizer
        self.every_n_steps, self.iterations, self.first_iterations = every_n_steps, iterations, first_iterations
        self.probe_batch_size, self.optimizer_index = probe_batch_size, optimizer_index
        self.directional, self.hutchinson_samples, self.saddle_ratio = directional, hutchinson_samples, float(saddle_ratio)
        # warm starts: the extreme eigenvectors of H, and of D^½HD^½ for adaptive optimizers
        self.eigenvector: Optional[Tensor] = None
        self.eigenvector_min: Optional[Tensor] = None
        self.scaled_eigenvector: Optional[Tensor] = None
        self.scaled_eigenvector_min: Optional[Tensor] = None
        self.last: dict[str, Tensor] = {}  # device scalars of the latest probe, read by LearningRateGovernor
        self.probes = 0
        self._probe_batch: Any = None
        self._fresh = False
        self._last_probe_batch = -1

    @property
    def state_key(self) -> str:
        extra = {"optimizer_index": self.optimizer_index} if self.optimizer_index else {}
        return self._generate_state_key(every_n_steps=self.every_n_steps, iterations=self.iterations, **extra)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded(pl_module, type(self).__name__, "Hessian-vector products")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_sharded(pl_module, type(self).__name__, "Hessian-vector products")  # strategies shard after setup
        name = type(pl_module).__name__
        count = len(trainer.optimizers)
        if self.optimizer_index >= max(count, 1):
            raise ValueError(
                f"CurvatureMonitor(optimizer_index={self.optimizer_index}) but {name} has {count} optimizer(s); "
                f"use an index below {count}."
            )
        if count > 1 and not hasattr(pl_module, "probe_loss"):
            raise TypeError(
                f"CurvatureMonitor: {name} has {count} optimizers, so which loss to probe is not defined (a GAN's "
                "generator and discriminator minimize different losses). Add `def probe_loss(self, batch): return "
                f"<the loss optimizer {self.optimizer_index} minimizes on batch>` to {name} (no logging, no metric "
                "updates); the Hessian is taken over that optimizer's parameters (choose it with optimizer_index)."
            )
        if not hasattr(pl_module, "probe_loss") and not hasattr(pl_module, "compute_loss"):
            raise TypeError(
                f"CurvatureMonitor needs the loss of a batch: {name} has neither "
                "probe_loss(batch) nor compute_loss(logits, targets). Add `def probe_loss(self, batch): return "
                "<the training loss of batch>` to it (no logging, no metric updates)."
            )
        self._probe_batch = None
        self._fresh = False
        self._last_probe_batch = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._probe_batch is None:
            self._probe_batch = detached_head(batch, self.probe_batch_size)
        stepped = batches_stepped(trainer)  # batches that stepped before this one: a host int, no sync
        # the first stepped batch of every fit (also a resumed one) is probed: a model the probe cannot handle
        # fails there, not after an epoch
        first = self._last_probe_batch < 0
        if batch_steps(trainer) and stepped != self._last_probe_batch and (first or stepped % self.every_n_steps == 0):
            self._last_probe_batch = stepped
            optimizers = trainer.optimizers
            self.last = self.probe(pl_module, optimizers[self.optimizer_index] if optimizers else None,
                                   several=len(optimizers) > 1)
            self.probes += 1
            self._fresh = True
        if self._fresh and completed_step_is_logging(trainer):
            self._fresh = False
            keys = list(self.last)
            values = trainer.strategy.reduce(torch.stack([self.last[k] for k in keys]), reduce_op="mean")
            host = values.tolist()  # sync point: logging step only
            pl_module.log_dict({f"curvature/{k}": v for k, v in zip(keys, host, strict=True)}, on_step=True,
                               on_epoch=False)

    def probe(self, pl_module: pl.LightningModule, optimizer: Optional[torch.optim.Optimizer],
              several: bool = False) -> dict[str, Tensor]:
        """Measure the curvature at the current weights on the probe batch; returns device scalars by key.

        ``several``: the module has several optimizers; then only ``optimizer``'s parameters are probed.
        """
        if self._probe_batch is None:
            raise RuntimeError("no probe batch yet: probe() runs after the first training batch; call it from a training "
                               "hook (or set monitor._probe_batch to a batch first).")
        optimizer = getattr(optimizer, "optimizer", optimizer)
        params = params_of(pl_module)
        if several and optimizer is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            params = [p for p in params if id(p) in held]
        if not params:
            raise ValueError(f"CurvatureMonitor: {type(pl_module).__name__} has no trainable parameters to probe (none with "
                             "requires_grad=True held by the probed optimizer). Unfreeze some, or remove the callback.")
        device = params[0].device
        buffers = [(b, b.detach().clone()) for b in pl_module.buffers()]
        fork = torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])
        try:
            with fork, torch.autocast(device.type, enabled=False), torch.enable_grad(), \
                    sdpa_kernel(SDPBackend.MATH):
                try:
                    loss = self._loss(pl_module, self._probe_batch).float()
                    hvp, gradient = hessian_vector_operator(loss, params)
                    results = self._measure(hvp, gradient, optimizer, params, device)
                except DoubleBackwardError as error:
                    raise self._name_the_module(pl_module, error) from error
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
        return results

    def _name_the_module(self, pl_module: pl.LightningModule, error: DoubleBackwardError) -> DoubleBackwardError:
        return name_the_module(pl_module, lambda: self._loss(pl_module, self._probe_batch), error)

    def _measure(self, hvp, gradient: Tensor, optimizer, params: list[nn.Parameter], device) -> dict[str, Tensor]:
        size = gradient.numel()
        generator = torch.Generator(device=device).manual_seed(self.probes)
        cold = self.eigenvector is None or self.eigenvector.numel() != size or self.eigenvector_min is None
        # one start vector holding both previous ends converged fastest (docs/learning-rate.md)
        start = random_start(size, device) if cold else self.eigenvector.to(device) + self.eigenvector_min.to(device)
        # the gradient enters the basis last: the directional curvature costs no product of its own
        pairs = lanczos(hvp, start, self.first_iterations if cold else self.iterations, generator,
                        also=gradient if self.directional and size > 1 else None)
        self.eigenvector, self.eigenvector_min = pairs.vector_max, pairs.vector_min
        results = spectrum_keys(pairs, self.saddle_ratio)
        if self.directional:
            results["directional"] = pairs.quotient if pairs.quotient is not None else \
                directional_curvature(hvp, gradient)
        if self.hutchinson_samples:
            results["trace"] = hutchinson_trace(hvp, size, self.hutchinson_samples, generator, device)
        threshold = stability_threshold(optimizer) if optimizer is not None else None
        if threshold is None:
            return results
        rates = {float(g["lr"]) * (1 - float(g.get("dampening", 0.0))) for g in optimizer.param_groups}
        if not is_preconditioned(optimizer) and len(rates) == 1:
            eta_lambda = rates.pop() * pairs.lambda_max  # one rate: η·λ_max needs no second run
        else:
            diagonal = effective_rate_diagonal(optimizer, params)
            if diagonal is None:  # adaptive optimizer before its first step: no preconditioner yet
                return results
            cold = self.scaled_eigenvector is None or self.scaled_eigenvector.numel() != size \
                or self.scaled_eigenvector_min is None
            start = random_start(size, device) if cold else \
                self.scaled_eigenvector.to(device) + self.scaled_eigenvector_min.to(device)
            scaled = lanczos(scaled_operator(hvp, diagonal), start, self.first_iterations if cold else self.iterations,
                             generator)
            self.scaled_eigenvector, self.scaled_eigenvector_min = scaled.vector_max, scaled.vector_min
            eta_lambda = scaled.lambda_max
        results["eta_lambda"] = eta_lambda
        results["threshold"] = torch.full((), threshold, device=device)
        results["stability_ratio"] = eta_lambda / threshold
        return results

    _loss = staticmethod(probe_loss)  # also LRSuggestion's way to the loss of a batch

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"probes": self.probes}
        for key in ("eigenvector", "eigenvector_min", "scaled_eigenvector", "scaled_eigenvector_min"):
            value = getattr(self, key)
            if value is not None:
                state[key] = value.detach().cpu()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probes = int(state_dict.get("probes", 0))
        for key in ("eigenvector", "eigenvector_min", "scaled_eigenvector", "scaled_eigenvector_min"):
            setattr(self, key, state_dict.get(key))

