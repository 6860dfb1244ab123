"""One fit of a zoo model under one setting with the callbacks of the matrix, and the references recorded beside
them (plain data, so a DDP rank can save it and a test check it with the same code).

The references never call the code under test: gradient norms and update ratios are recomputed from the
parameters, layer statistics from the inputs a forward pre-hook of our own saw, the sharpness from a dense Hessian,
drift features by running the model again, KS statistics with scipy.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.compat.zoo import TinyLM, build, compile_inner
from tests.helpers import MemoryLogger
from traincraft.callbacks import (
    CovariateShiftMonitor,
    CurvatureMonitor,
    DataDriftMonitor,
    GradientClipping,
    HardExampleMining,
    LearningRateMonitor,
)

STEPPED_BATCHES = 4  # batches that end with optimizer step(s)
LOG_EVERY = 2  # even on purpose: a two-optimizer GAN moves global_step by 2 per batch
CLIP = 0.05
DRIFT_SAMPLES = 16
DRIFT_LAYER = "model.transformer.encoder"
SEQUENCE_NORMS = (nn.LayerNorm,)


def make_callback(name: str, model: str) -> Callback:
    """The matrix's configuration of each callback (small, so a fit takes a second or two)."""
    if name == "GradientClipping":
        return GradientClipping(mode="norm", threshold=CLIP)
    if name == "LearningRateMonitor":
        return LearningRateMonitor(logging_interval="step", log_update_ratio=True)
    if name == "CurvatureMonitor":
        return CurvatureMonitor(every_n_steps=2, first_iterations=16, iterations=8, directional=False,
                                probe_batch_size=4, optimizer_index=1 if model == "gan" else 0)
    if name == "CovariateShiftMonitor":
        return CovariateShiftMonitor(eval_batches=0, log_histograms=False)
    if name == "DataDriftMonitor":
        if model == "transformer":  # forward(inputs, target): the encoder's output, averaged over tokens
            return DataDriftMonitor(layer=DRIFT_LAYER, forward="unpack", max_samples=DRIFT_SAMPLES, mmd="never")
        return DataDriftMonitor(max_samples=DRIFT_SAMPLES, mmd="never")
    if name == "HardExampleMining":
        return HardExampleMining()
    raise ValueError(f"unknown callback {name!r}")


def trainer_kwargs(model: str, setting: str) -> dict[str, Any]:
    accumulate = 2 if setting == "accumulate" else 1
    per_batch = 2 if model == "gan" else 1  # optimizer steps per stepped batch
    batches = STEPPED_BATCHES * accumulate
    kwargs: dict[str, Any] = dict(
        accelerator="cpu", max_steps=STEPPED_BATCHES * per_batch, log_every_n_steps=LOG_EVERY, limit_val_batches=2,
        val_check_interval=batches, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accumulate_grad_batches=accumulate, precision="bf16-mixed" if setting == "bf16-mixed" else "32-true",
    )
    if setting == "ddp":
        # the discriminator's step leaves the generator without gradients: DDP must be told (Lightning's own name)
        kwargs.update(devices=2, strategy="ddp_find_unused_parameters_true" if model == "gan" else "ddp")
    else:
        kwargs.update(devices=1)
    return kwargs


def _flat_norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))) if tensors else 0.0


def dense_spectrum(loss: torch.Tensor, params: list[nn.Parameter], modules: list[nn.Module]) -> torch.Tensor:
    """Eigenvalues of the exact Hessian (one batched double backward over all unit vectors: small models only)."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    eye = torch.eye(flat.numel())
    if any(isinstance(m, nn.modules.conv._ConvNd) for m in modules):  # batched double backward of conv is slow
        rows = [torch.cat([r.reshape(-1) for r in torch.autograd.grad(flat, params, e, retain_graph=True)])
                for e in eye]
        dense = torch.stack(rows).double()
    else:
        rows = torch.autograd.grad(flat, params, grad_outputs=eye, is_grads_batched=True)
        dense = torch.cat([r.reshape(flat.numel(), -1) for r in rows], dim=1).double()
    return torch.linalg.eigvalsh((dense + dense.T) / 2)


def feature_values(module: nn.Module, x: torch.Tensor, sequence: bool) -> torch.Tensor:
    """(features, values) of a layer input, as the docs promise: LayerNorm and 3-D inputs of a sequence model per
    last dimension, everything else per dimension 1."""
    x = x.detach().double()
    if x.ndim > 2 and (isinstance(module, SEQUENCE_NORMS) or (sequence and x.ndim == 3)):
        return x.reshape(-1, x.shape[-1]).T
    return x.movedim(1, 0).reshape(x.shape[1], -1)


class Recorder(Callback):
    """References, recorded with hooks of its own; placed first, so it sees gradients before any clipping."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.batches: list[dict[str, Any]] = []
        self.layer_inputs: dict[str, list[torch.Tensor]] = {}
        self._before: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        self.monitor: Optional[CovariateShiftMonitor] = None

    def on_train_start(self, trainer, pl_module):
        self.monitor = next((c for c in trainer.callbacks if isinstance(c, CovariateShiftMonitor)), None)
        if self.monitor is not None:
            for probe in self.monitor.probes:
                self._handles.append(probe.module.register_forward_pre_hook(self._hook(probe.name)))

    def _hook(self, name):
        def hook(module, args):
            if self._capture:
                self.layer_inputs.setdefault(name, []).append(args[0][:128].detach().clone())

        return hook

    _capture = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.batches or self.batches[-1]["stepped"]:  # a new accumulation window: pool its micro-batches
            self.layer_inputs = {}
        self._capture = True
        self._before = {id(p): p.detach().double().clone() for p in pl_module.parameters()}
        self.batches.append({"batch_idx": batch_idx, "grad_norms": [], "grad_norm_of": {}, "lrs": [], "ratios": []})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        index = next(i for i, o in enumerate(trainer.optimizers) if o is optimizer)
        self.batches[-1]["grad_norms"].append(_flat_norm(grads))
        self.batches[-1]["grad_norm_of"][index] = _flat_norm(grads)
        self.batches[-1]["lrs"].append([float(group["lr"]) for group in optimizer.param_groups])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._capture = False
        record = self.batches[-1]
        record["stepped"] = bool(record["grad_norms"])
        if record["stepped"]:
            for optimizer in trainer.optimizers:
                ratios = []
                for group in optimizer.param_groups:
                    after = [p.detach().double() for p in group["params"]]
                    delta = [a - self._before[id(p)] for a, p in zip(after, group["params"], strict=True)]
                    ratios.append(_flat_norm(delta) / _flat_norm(after))
                record["ratios"].append(ratios)
        if isinstance(outputs, dict) and "per_example_loss" in outputs:
            record["per_example_loss"] = outputs["per_example_loss"].detach().float().cpu()
        if self.monitor is not None and self.layer_inputs and record["stepped"]:
            sequence = any(isinstance(m, (nn.Embedding, nn.MultiheadAttention)) for m in pl_module.modules())
            stats = {}
            for probe in self.monitor.probes:
                parts = [feature_values(probe.module, x, sequence) for x in self.layer_inputs.get(probe.name, [])]
                if parts:
                    v = torch.cat(parts, dim=1)
                    stats[probe.name] = {"mean": v.mean(1), "std": v.std(1, correction=0)}
            record["layer_stats"] = stats

    def on_train_end(self, trainer, pl_module):
        for handle in self._handles:
            handle.remove()
        self._handles = []


class DenseAtProbe(Callback):
    """Placed after the CurvatureMonitor: at its last probe, the dense spectrum at the same weights and batch."""

    def __init__(self) -> None:
        self.dense: list[tuple[float, float, float, float]] = []
        self._probes = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        monitor = next((c for c in trainer.callbacks if isinstance(c, CurvatureMonitor)), None)
        if monitor is None or monitor.probes == self._probes:
            return
        self._probes = monitor.probes
        if monitor.probes < 2:  # the last probe of the fit (probes after stepped batches 1 and 3) is checked
            return
        state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        params = [p for p in pl_module.parameters() if p.requires_grad]
        if len(trainer.optimizers) > 1:
            held = {id(p) for g in trainer.optimizers[monitor.optimizer_index].param_groups for p in g["params"]}
            params = [p for p in params if id(p) in held]
        batch = monitor._probe_batch  # the batch the monitor probes (the first training batch of the fit)
        with torch.autocast("cpu", enabled=False), sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
            if hasattr(pl_module, "probe_loss"):
                loss = pl_module.probe_loss(batch).float()
            else:
                loss = pl_module.compute_loss(pl_module(batch[0]), batch[1]).float()
            spectrum = dense_spectrum(loss, params, list(pl_module.modules()))
        pl_module.load_state_dict(state)  # BatchNorm statistics
        self.dense.append((float(monitor.last["lambda_max"]), float(monitor.last["lambda_min"]),
                           float(spectrum[-1]), float(spectrum[0])))


def _recomputed_outputs(module: pl.LightningModule, datamodule, count: int) -> torch.Tensor:
    """The model's outputs on the first ``count`` validation samples, in evaluation mode, one process."""
    loader = datamodule.val_dataloader() if datamodule is not None else module.val_dataloader()
    rows = []
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for batch in loader:
            if datamodule is not None:
                batch = datamodule.on_after_batch_transfer(batch, 0)
            if isinstance(module, TinyLM):  # the encoder's output (N, T, E), averaged over the tokens
                seen: list[torch.Tensor] = []
                handle = module.get_submodule(DRIFT_LAYER).register_forward_hook(
                    lambda m, a, o, seen=seen: seen.append(o))
                module(*batch)
                handle.remove()
                out = seen[0].mean(1)
            else:
                out = module(batch[0] if isinstance(batch, (tuple, list)) else batch)
            rows.append(out.float().reshape(out.shape[0], -1))
            if sum(r.shape[0] for r in rows) >= count:
                break
    module.train(was_training)
    return torch.cat(rows)[:count]


def run(model: str, setting: str, callbacks: list[str], compile_backend: str = "eager",
        record: bool = True) -> dict[str, Any]:
    """Fit ``model`` under ``setting`` with ``callbacks`` (names); return plain data for the checks.

    One intra-op thread: these models are tiny, and on a shared machine more threads only oversubscribe the cores
    (a Hessian-vector product took 50x longer with the default thread count under load).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(model, setting, callbacks, compile_backend, record)
    finally:
        torch.set_num_threads(threads)


def _run(model: str, setting: str, callbacks: list[str], compile_backend: str, record: bool) -> dict[str, Any]:
    pl.seed_everything(0)
    module, datamodule = build(model)
    if setting == "compile":
        compile_inner(model, module, compile_backend)
    chosen = {name: make_callback(name, model) for name in callbacks}
    recorder, dense = Recorder(model), DenseAtProbe()
    logger = MemoryLogger()
    references = [recorder, *chosen.values(), dense] if record else list(chosen.values())
    trainer = pl.Trainer(logger=logger, callbacks=references, **trainer_kwargs(model, setting))
    trainer.fit(module, datamodule=datamodule)
    result: dict[str, Any] = {
        "model": model, "setting": setting, "rank": trainer.global_rank, "world": trainer.world_size,
        "global_step": trainer.global_step, "logged": logger.rows, "batches": recorder.batches,
        "callbacks": list(chosen), "dense": dense.dense,
    }
    if "CovariateShiftMonitor" in chosen:
        result["covshift"] = {layer: {k: v.double() for k, v in stats.items() if k in ("mean", "std")}
                              for layer, stats in chosen["CovariateShiftMonitor"].latest.get("train", {}).items()}
    if "CurvatureMonitor" in chosen:
        result["probes"] = chosen["CurvatureMonitor"].probes
    if not record:
        return result
    if "DataDriftMonitor" in chosen:
        drift = chosen["DataDriftMonitor"]
        result["drift"] = {
            "reference": None if drift.reference_sample is None else drift.reference_sample.double().cpu(),
            "current": None if drift.current_sample is None else drift.current_sample.double().cpu(),
            # as many as the monitor saw: limit_val_batches may hold fewer than max_samples
            "recomputed": _recomputed_outputs(module, datamodule, len(drift.current_sample)).double().cpu(),
        }
    if "HardExampleMining" in chosen:
        sampler = chosen["HardExampleMining"].sampler
        result["hard"] = {"seen": sampler.seen.cpu().clone(), "loss_ema": sampler.loss_ema.cpu().clone()}
    return result
