"""CovariateShiftMonitor: how the inputs of each nonlinearity and normalization layer move during training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from traincraft._steps import completed_step_is_logging, is_logging_step
from traincraft.callbacks._covariate_histograms import HistogramHistory
from traincraft.callbacks._covariate_probe import (
    FeatureAxis,
    LayerProbe,
    is_compiled,
    is_sequence_model,
    select_layers,
)
from traincraft.loggers import log_histogram, log_image, shows_media
from traincraft.metrics.moments import gaussian_w2

_STAGES = ("train", "val")


class CovariateShiftMonitor(Callback):
    """Watches internal covariate shift (Ioffe & Szegedy 2015): per layer and channel, the mean, standard
    deviation and 15th/50th/85th percentiles of a layer's *input*, the fraction of dead ReLU inputs and of inputs
    that saturate tanh/sigmoid units, a drift score between consecutive logs and, for BatchNorm layers, the gap
    between the batch statistics and the running estimates.

    Hooks are attached only on logging steps (``Trainer(log_every_n_steps=...)``, Lightning's rule: every N-th
    batch that stepped, also for a two-optimizer GAN) and removed right after, so other steps run the plain model.
    Under gradient accumulation the micro-batches of the logging window are pooled (the batch that steps). On a
    ``torch.compile``-d model (detected at ``setup``) the hooks stay registered from ``setup`` on and are switched
    on and off instead, and dynamo is made to guard on module hooks until ``teardown``
    (``torch._dynamo.config.skip_nnmodule_hook_guards = False``; graphs compiled earlier in the process are dropped
    with ``torch.compiler.reset()`` at ``setup``): by default dynamo reuses a graph traced without the hooks, even
    one of another instance of the same classes, and never calls them. It costs recompilations (a graph with the
    hooks on and one with them off per compiled module; docs/compatibility.md counts them), no graph break. At most ``max_rows`` samples of the batch are read; everything is computed on the
    device and copied to the host once per log. During validation the first ``eval_batches`` batches are pooled and
    logged once at the end of the validation epoch (never during the sanity check). Scalars go to every logger;
    histograms and an image of histograms over time go to W&B and TensorBoard loggers (``log_histograms``). Under
    DDP each rank measures its own batch and rank 0 logs.

    Which axes are reduced: statistics are per *feature* of a layer's input, over the batch and every other axis
    (positions of an image, tokens of a sequence). The feature axis (``feature_axis="auto"``) is dimension 1 for
    ``(N, C)``, for images ``(N, C, H, W)`` and for BatchNorm/GroupNorm/InstanceNorm; the last dimension for
    LayerNorm and for 3-D activations ``(N, T, E)`` of sequence models (a model with embeddings, attention or
    recurrent layers: transformers use ``batch_first`` layouts), so a transformer's statistics are per embedding
    feature over batch and tokens; and dimension 1 for 3-D activations ``(N, C, L)`` of other models (Conv1d).
    ``"channels"`` or ``"last"`` forces one of them for every layer. BatchNorm comparisons always use its channels.

    Logged keys (``stage`` is ``train`` or ``val``, ``layer`` a module name such as ``model.blocks.0.act``; every
    value is averaged over the layer's features):

    ====================================== =============================================================
    key                                    meaning
    ====================================== =============================================================
    ``covshift/stage/layer/mean``          per-channel mean of the input
    ``covshift/stage/layer/std``           per-channel standard deviation
    ``covshift/stage/layer/p15|p50|p85``   per-channel 15th/50th/85th percentiles (on a strided subsample)
    ``covshift/stage/layer/dead_frac``     ReLU layers: fraction of inputs ``<= 0``
    ``covshift/stage/layer/sat_frac``      tanh/sigmoid: fraction of inputs with ``|tanh| > 0.97`` or
                                           ``sigmoid`` outside ``[0.03, 0.97]``
    ``covshift/stage/layer/w2_drift``      2-Wasserstein distance between this log's and the previous log's
                                           per-channel Gaussians, in units of their standard deviation
                                           (from the second log on)
    ``covshift/stage/layer/bn_mean_gap``   BatchNorm: ``|μ_batch − μ_running| / σ_running``
    ``covshift/stage/layer/bn_var_ratio``  BatchNorm: ``σ²_batch / σ²_running`` (1 when they agree)
    ``covshift/stage/layer/hist``          histogram of the sampled inputs (W&B/TensorBoard only)
    ``covshift/train/layer/hist_over_time`` image: one histogram column per log (W&B/TensorBoard only)
    ====================================== =============================================================

    The per-channel host tensors of the last log are kept in :attr:`latest` (``latest[stage][layer][stat]``).

    Args:
        layers: module type names (``"ReLU"``, ``"BatchNorm2d"``) or globs on module names
            (``"model.blocks.*.act"``); ``None`` monitors the inputs of every activation and normalization module.
        max_rows: samples of each batch that are read (the first ones).
        percentile_samples: values per channel kept for percentiles and histograms (an even stride).
        eval_batches: validation batches pooled per validation epoch; 0 monitors training only.
        log_histograms: send histograms and the histograms-over-time image to W&B/TensorBoard loggers.
        image_every_n_logs: how often (in logs) the histograms-over-time image is sent.
        feature_axis: ``"auto"``, ``"channels"`` (dimension 1) or ``"last"``: which input dimension holds the
            features (see above); the others are reduced.

    Example:
        >>> from traincraft.modules import ImageClassifier
        >>> from traincraft.data import DigitsDataModule
        >>> monitor = CovariateShiftMonitor(layers=["Sigmoid"])
        >>> model = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8,
        ...                         model_kwargs={"hidden": [16], "activation": "sigmoid"})
        >>> trainer = pl.Trainer(max_steps=2, log_every_n_steps=1, logger=False, limit_val_batches=0,
        ...                      callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False,
        ...                      enable_checkpointing=False)
        >>> trainer.fit(model, datamodule=DigitsDataModule(image_size=8, batch_size=16))
        >>> sorted(monitor.latest["train"]["model.blocks.0.act"])
        ['mean', 'p15', 'p50', 'p85', 'sat_frac', 'std', 'w2_drift']
    """

    def __init__(
        self,
        layers: Optional[Sequence[str]] = None,
        max_rows: int = 128,
        percentile_samples: int = 256,
        eval_batches: int = 4,
        log_histograms: bool = True,
        image_every_n_logs: int = 10,
        feature_axis: FeatureAxis = "auto",
    ) -> None:
        super().__init__()
        if layers is not None and (
            isinstance(layers, str) or not layers or not all(isinstance(p, str) and p for p in layers)
        ):
            raise ValueError(
                f"layers must be None or a non-empty list of type names or name globs; got {layers!r}. "
                'Example: layers=["ReLU", "model.blocks.*.norm*"].'
            )
        for name, value, low in (("max_rows", max_rows, 1), ("percentile_samples", percentile_samples, 2),
                                 ("eval_batches", eval_batches, 0), ("image_every_n_logs", image_every_n_logs, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}.")
        if feature_axis not in ("auto", "channels", "last"):
            raise ValueError(
                f"feature_axis must be 'auto', 'channels' (dimension 1: images, BatchNorm) or 'last' (sequences "
                f"(N, T, E), LayerNorm); got {feature_axis!r}. 'auto' decides per layer."
            )
        self.feature_axis = feature_axis
        self.layers = None if layers is None else list(layers)
        self.max_rows, self.percentile_samples = max_rows, percentile_samples
        self.eval_batches, self.log_histograms, self.image_every_n_logs = eval_batches, log_histograms, image_every_n_logs
        self.probes: list[LayerProbe] = []
        self.latest: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        self._previous: dict[str, dict[str, dict[str, torch.Tensor]]] = {stage: {} for stage in _STAGES}
        self._logs = 0
        self._history: dict[str, HistogramHistory] = {}
        self._attached_for: Optional[str] = None
        self._persistent = False
        self._hook_guards: Optional[bool] = None  # dynamo's setting before this monitor changed it

    @property
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.layers)

    # ------------------------------------------------------------------------------- hooks on and off
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()
        sequence = is_sequence_model(pl_module)
        self.probes = [LayerProbe(name, module, self.max_rows, self.percentile_samples, self.feature_axis, sequence)
                       for name, module in select_layers(pl_module, self.layers)]
        # Dynamo does not guard on module hooks by default: a graph traced without them (of this model, or of another
        # instance of the same classes) is reused and the hooks are never called. On a compiled model the hooks
        # therefore stay attached from now on, switched on and off (dynamo guards on the switch), dynamo guards on
        # hooks for the duration of the fit, and graphs cached without those guards are dropped.
        self._persistent = is_compiled(pl_module)
        if self._persistent and self._hook_guards is None:
            import torch._dynamo.config as dynamo_config

            self._hook_guards = dynamo_config.skip_nnmodule_hook_guards
            dynamo_config.skip_nnmodule_hook_guards = False
            torch.compiler.reset()
        for probe in self.probes:
            probe.active = not self._persistent
            if self._persistent:
                probe.attach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()
        for probe in self.probes:
            probe.detach()  # also the persistent hooks of a compiled model
        if self._hook_guards is not None:
            import torch._dynamo.config as dynamo_config

            dynamo_config.skip_nnmodule_hook_guards, self._hook_guards = self._hook_guards, None

    def _attach(self, stage: str) -> None:
        for probe in self.probes:
            probe.reset()
            probe.active = True
            probe.attach()
        self._attached_for = stage

    def _detach(self) -> None:
        for probe in self.probes:
            if self._persistent:
                probe.active = False
            else:
                probe.detach()
        self._attached_for = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Every micro-batch of a logging accumulation window is pooled: the statistics describe the batch that steps.
        if is_logging_step(trainer) and self._attached_for != "train":
            self._attach("train")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._attached_for == "train" and completed_step_is_logging(trainer):
            self._detach()
            self._publish(trainer, "train")

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.eval_batches > 0 and not trainer.sanity_checking:
            self._attach("val")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._attached_for == "val" and batch_idx + 1 >= self.eval_batches:
            self._detach()  # the pooled batches stay in the probes until the epoch ends
            self._attached_for = "val-done"

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._attached_for in ("val", "val-done"):
            self._detach()
            self._publish(trainer, "val")

    # ------------------------------------------------------------------------------- one copy per log
    def _publish(self, trainer: pl.Trainer, stage: str) -> None:
        results = {probe.name: r for probe in self.probes if (r := probe.result()) is not None}
        for probe in self.probes:
            probe.reset()
        if not results:
            return
        previous = self._previous[stage]
        for name, r in results.items():
            if name in previous and previous[name]["mean"].shape == r["mean"].shape:
                before = {k: v.to(r["mean"].device) for k, v in previous[name].items()}
                r["w2_drift"] = gaussian_w2(before["mean"], before["std"], r["mean"], r["std"])
            previous[name] = {"mean": r["mean"].detach().clone(), "std": r["std"].detach().clone()}
        rich = self.log_histograms and trainer.is_global_zero and shows_media(trainer)
        layout = [(name, key, value.shape) for name, r in results.items() for key, value in r.items()
                  if key != "samples" or rich]
        flat = torch.cat([results[name][key].reshape(-1).float() for name, key, _ in layout])
        host = flat.cpu().numpy()  # sync point: logging step only (a copy, then a zero-copy view)
        self.latest[stage] = {}
        metrics: dict[str, float] = {}
        offset = 0
        for name, key, shape in layout:
            size = shape.numel()
            value = host[offset : offset + size].reshape(tuple(shape))
            offset += size
            stats = self.latest[stage].setdefault(name, {})
            if key == "percentiles":
                for i, label in enumerate(("p15", "p50", "p85")):
                    stats[label] = torch.from_numpy(value[i])
                    metrics[f"covshift/{stage}/{name}/{label}"] = float(value[i].mean())
            elif key == "samples":
                self._send_histograms(trainer, stage, name, value)
            else:
                stats[key] = torch.from_numpy(value)
                metrics[f"covshift/{stage}/{name}/{key}"] = float(value.mean())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if stage == "train":
            self._logs += 1

    def _send_histograms(self, trainer: pl.Trainer, stage: str, name: str, samples: np.ndarray) -> None:
        values = samples.reshape(-1)
        log_histogram(trainer, f"covshift/{stage}/{name}/hist", values)
        if stage != "train":
            return
        history = self._history.setdefault(name, HistogramHistory())
        history.add(values)
        if self._logs % self.image_every_n_logs == 0 and (image := history.image()) is not None:
            log_image(trainer, f"covshift/train/{name}/hist_over_time", image,
                      caption="one column per log; values upwards")

    # ------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        previous = {stage: {name: {k: v.detach().cpu() for k, v in stats.items()} for name, stats in layers.items()}
                    for stage, layers in self._previous.items()}
        return {"previous": previous, "logs": self._logs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._previous = {stage: dict(state_dict.get("previous", {}).get(stage, {})) for stage in _STAGES}
        self._logs = int(state_dict.get("logs", 0))
