"""DataDriftMonitor: has the validation data drifted away from the training data, as the model sees it?"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from traincraft._steps import batches_stepped
from traincraft.callbacks._drift_config import check_arguments
from traincraft.callbacks._drift_features import FeatureExtractor
from traincraft.callbacks._drift_samples import (
    FeatureBuffer,
    gather_in_order,
    prepare_batch,
    training_subset_loader,
)
from traincraft.metrics.drift import ks_test, mmd_test


class DataDriftMonitor(Callback):
    """Two-sample tests between model features of training data (the reference) and of validation data (the
    current sample), at the end of every validation epoch, and of prediction data at the end of ``predict``.

    First per-feature Kolmogorov–Smirnov tests with a Bonferroni correction (cheap); then, when KS fires (or
    always, or never: ``mmd``), a kernel MMD² test with a Gaussian kernel (median-heuristic bandwidth) and a
    permutation p-value.

    **Features** (one row per sample), chosen by the user:

    * the model's output (default): ``model(batch[input_key])``, with ``input_key`` element 0 of a tuple/list batch
      or a key of a dict batch; ``forward="unpack"`` calls ``model(*batch)`` / ``model(**batch)`` instead, for a
      ``forward(inputs, target)``;
    * ``layer="name"``: the output of that module while the model runs as above (its first call per forward: an
      embedding applied to the inputs and then to the targets gives the inputs');
    * ``features=fn``: ``fn(batch) -> Tensor`` on the whole batch, without the model; a dotted path
      ``"package.module.fn"`` for YAML.

    Outputs become ``(samples, features)`` float32: ``(B, T, D)`` is read as a batch-first sequence and reduced over
    time (``reduce="mean"`` by default, ``"last"``, or ``"flatten"`` for ``T·D`` features); ``(B, C, H, W)`` maps
    average their spatial dimensions (one feature per channel). Token ids are labels, not measurements: integer
    features are refused (test an embedding or a later layer). An output whose rows are not the batch's samples
    (a language model's ``(B·T, vocab)`` log-probabilities) is refused with the list of modules to pick from.

    Both samples are computed the same way: by the monitor itself, in evaluation mode, without gradients, in the
    trainer's precision context (under ``bf16-mixed`` both are bf16 outputs cast to float32, so rounding never
    looks like drift), with every random stream left as it was. Before the first epoch is spent the
    configuration is checked twice: at ``setup`` (the layer exists; ``forward``'s signature takes one argument
    when ``forward="input"``) and on the first training batch, whose features are computed once (evaluation mode,
    no gradient, the training mode restored after). A model call that fails, a missing dict key, a layer that does
    not run, non-floating features or rows that are not samples raise there, saying what to set.

    The reference is recomputed at each validation from ``max_samples`` evenly spaced training samples, without
    augmentation, so it differs from the current sample only through the data (not through dropout, BatchNorm's
    batch statistics or augmentation). Choosing them draws nothing from any random stream, so training is
    unchanged. :meth:`set_reference` fixes a reference of your own instead. The current sample is the first
    ``max_samples`` samples of the first validation loader (the extra forward pass costs at most ``max_samples``
    samples per validation). Under DDP each rank computes its share and the samples are gathered across ranks in
    the order a single process sees them, so every rank runs the same tests on the same data and reaches the same
    decision. The sanity check is skipped. The training step is never touched after the first batch's check
    (no host-device synchronization there), whatever the optimization: several optimizers, manual optimization
    and gradient accumulation change nothing. Values are logged at the end of each validation, at Lightning's
    step for validation metrics (batches that stepped, not ``global_step``).

    Logged keys (with ``pl_module.log``, so they also reach ``trainer.callback_metrics``):

    =========================== ==================================================================
    key                         meaning
    =========================== ==================================================================
    ``drift/ks_stat_max``       largest per-feature KS statistic
    ``drift/ks_pvalue_min``     smallest Bonferroni-adjusted KS p-value
    ``drift/ks_features``       number of features whose adjusted p-value is below ``alpha``
    ``drift/mmd2``              unbiased MMD² (only when the MMD test ran)
    ``drift/mmd_pvalue``        its permutation p-value (only when it ran)
    ``drift/mmd_bandwidth``     Gaussian kernel bandwidth (only when it ran)
    ``drift/detected``          1 when drift is declared: MMD p < alpha if MMD ran, else KS fired
    ``drift/n_reference``       reference samples (all ranks)
    ``drift/n_current``         current samples (all ranks)
    =========================== ==================================================================

    After ``trainer.predict`` the same values go to the loggers as ``drift/predict/...`` (Lightning allows no
    ``self.log`` while predicting). The full per-feature results of the last test are in :attr:`last` and the gathered samples in
    :attr:`reference_sample` and :attr:`current_sample`.

    Args:
        layer: module name whose output is tested (e.g. ``"model.fc"``); ``None`` tests the model's output.
        features: ``features(batch) -> Tensor`` (or its dotted import path) computing the features from the whole
            batch instead of the model; excludes ``layer``, ``input_key`` and ``forward``.
        input_key: the model's input in a tuple/list batch (an index; ``None``: 0) or a dict batch (a key).
        forward: ``"input"`` calls ``model(batch[input_key])``; ``"unpack"`` calls ``model(*batch)`` or
            ``model(**batch)``.
        reduce: how ``(batch, time, features)`` outputs become per-sample features: ``"mean"`` over time,
            ``"last"`` time step, or ``"flatten"``.
        max_samples: samples of each side (over all ranks).
        alpha: significance level of both tests.
        mmd: ``"on_ks"`` runs MMD only when KS fires, ``"always"`` every time, ``"never"`` not at all.
        num_permutations: permutations of the MMD test.
        ks_method: KS p-values: ``"exact"``, ``"asymp"`` or ``"auto"`` (exact while cheap).
        seed: seed of the permutations (the same on every rank).

    Example:
        >>> from traincraft.modules import ImageClassifier
        >>> from traincraft.data import DigitsDataModule
        >>> monitor = DataDriftMonitor(max_samples=100, mmd="always", num_permutations=200)
        >>> trainer = pl.Trainer(max_steps=4, val_check_interval=4, limit_val_batches=2, num_sanity_val_steps=0,
        ...                      callbacks=[monitor], logger=False, enable_progress_bar=False,
        ...                      enable_model_summary=False, enable_checkpointing=False)
        >>> model = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8, model_kwargs={"hidden": [16]})
        >>> trainer.fit(model, datamodule=DigitsDataModule(image_size=8, batch_size=32))
        >>> monitor.reference_sample.shape, monitor.current_sample.shape
        (torch.Size([100, 10]), torch.Size([64, 10]))
        >>> sorted(monitor.last)
        ['detected', 'ks', 'mmd', 'n_current', 'n_reference']

        A language model with ``forward(inputs, target)`` on ``(inputs, target)`` token batches: the encoder's
        output averaged over time, ``DataDriftMonitor(layer="model.transformer.encoder", forward="unpack")``.
    """

    def __init__(
        self,
        layer: Optional[str] = None,
        features: Union[str, Callable[[Any], torch.Tensor], None] = None,
        input_key: Union[int, str, None] = None,
        forward: Literal["input", "unpack"] = "input",
        reduce: Literal["mean", "last", "flatten"] = "mean",
        max_samples: int = 500,
        alpha: float = 0.05,
        mmd: Literal["on_ks", "always", "never"] = "on_ks",
        num_permutations: int = 1000,
        ks_method: Literal["auto", "exact", "asymp"] = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_arguments(layer, features, input_key, forward, reduce, max_samples, alpha, mmd, num_permutations,
                        ks_method, seed)
        self._extract = FeatureExtractor(layer, features, input_key, forward, reduce)
        self.layer, self.features, self.input_key, self.forward, self.reduce = layer, features, input_key, forward, reduce
        self.max_samples, self.alpha, self.mmd = max_samples, alpha, mmd
        self.num_permutations, self.ks_method, self.seed = num_permutations, ks_method, seed
        self.last: dict[str, Any] = {}
        self.reference_sample: Optional[torch.Tensor] = None
        self.current_sample: Optional[torch.Tensor] = None
        self._fixed_reference: Optional[torch.Tensor] = None
        self._buffer: Optional[FeatureBuffer] = None
        self._train_loader: Optional[DataLoader] = None
        self._checked = False

    @property
    def state_key(self) -> str:
        if self.features is None:  # the key of checkpoints written before features= existed
            return self._generate_state_key(layer=self.layer)
        return self._generate_state_key(layer=self.layer, features=self._extract.name)

    def set_reference(self, features: torch.Tensor) -> None:
        """Test every validation against these ``(n, d)`` features instead of training samples (kept in
        checkpoints)."""
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] < 2:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"the reference must be a (samples >= 2, features) tensor; got {got}.")
        self._fixed_reference = features.detach().float().cpu()

    # ------------------------------------------------------------------------------- features
    def features_of(self, trainer: pl.Trainer, pl_module: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The ``(samples, features)`` float32 features of one batch (already on the device) as the monitor
        computes them: without gradients, in the trainer's precision context (the same for reference and current
        samples), leaving every random stream as it was."""
        first = next(pl_module.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        devices = [device] if device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"), \
                torch.no_grad(), trainer.precision_plugin.forward_context():
            return self._extract(pl_module, batch)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._extract.check_module(pl_module)  # a misspelt layer or a forward(x, y) fails before training
        self._checked = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._checked:
            return
        # once per fit: compute the features of the first training batch (in evaluation mode, as at validation),
        # so that a model, layer or batch they do not fit fails now rather than after the first epoch
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        try:
            width = self.features_of(trainer, pl_module, batch).shape[1]
        finally:
            for module, mode in modes:
                module.training = mode
        self._checked = True
        if width > self.max_samples:
            rank_zero_warn(
                f"DataDriftMonitor: {self._extract.describe()} gives {width} features per sample, more than the "
                f"{self.max_samples} samples per side. KS with a Bonferroni correction over {width} features only "
                f"sees large shifts, and MMD's kernel distances concentrate. A narrower layer (layer=, e.g. a hidden "
                f"or embedding layer rather than vocabulary logits) or reduce='mean' keeps the test sensitive."
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._buffer = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # kept in memory (not in checkpoints) so that a later predict() can still draw its reference from it
        loader = trainer.train_dataloader
        self._train_loader = loader if isinstance(loader, DataLoader) else None

    def _per_rank(self, trainer: pl.Trainer) -> int:
        return -(-self.max_samples // trainer.world_size)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._begin(trainer, pl_module)

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin(trainer, pl_module)

    def _begin(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fixed_reference is not None:
            self.reference_sample = self._fixed_reference.to(pl_module.device)
        else:
            self.reference_sample = self._reference(trainer, pl_module)
        self._buffer = FeatureBuffer(self._per_rank(trainer))

    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, dataloader_idx: int) -> None:
        if self._buffer is not None and not self._buffer.full and dataloader_idx == 0:
            self._buffer.add(self.features_of(trainer, pl_module, batch))

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(trainer, pl_module, batch, dataloader_idx)

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(trainer, pl_module, batch, dataloader_idx)

    def _reference(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[torch.Tensor]:
        loader = training_subset_loader(trainer, self.max_samples, self._train_loader)
        if loader is None:
            rank_zero_warn("DataDriftMonitor: no training data loader to draw the reference from (validate() or "
                           "predict() before any fit, without a datamodule?); call set_reference(features) first. "
                           "Skipping the drift test.")
            return None
        buffer = FeatureBuffer(self._per_rank(trainer))
        for batch in loader:
            buffer.add(self.features_of(trainer, pl_module, prepare_batch(trainer, batch)))
        local = buffer.tensor()
        if local is None:
            raise RuntimeError("DataDriftMonitor: the training subset gave no samples to draw the reference from "
                               "(an empty training set?); call set_reference(features) first.")
        return gather_in_order(pl_module, local, self._per_rank(trainer))

    # ------------------------------------------------------------------------------- test
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = self._finish(trainer, pl_module)
        if metrics:
            # every rank computed the same numbers from the same gathered samples: no reduction needed
            pl_module.log_dict(metrics, sync_dist=False, rank_zero_only=False)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = self._finish(trainer, pl_module)
        if metrics:  # LightningModule.log is not available while predicting: straight to the loggers
            renamed = {key.replace("drift/", "drift/predict/", 1): value for key, value in metrics.items()}
            for logger in trainer.loggers:
                logger.log_metrics(renamed, step=batches_stepped(trainer))  # Lightning's step, as for validation

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        if self._buffer is None:
            return {}
        local = self._buffer.tensor()
        self._buffer = None
        if local is None:
            raise RuntimeError("DataDriftMonitor: the validation (or prediction) loader gave no batches; there is "
                               "no current sample to test. Check limit_val_batches and the loader's length.")
        if self.reference_sample is None:
            return {}
        current = gather_in_order(pl_module, local, self._per_rank(trainer))
        reference = self.reference_sample.to(current.device)
        if reference.shape[1] != current.shape[1] or min(len(reference), len(current)) < 2:
            raise ValueError(f"DataDriftMonitor: reference features {tuple(reference.shape)} and current features "
                             f"{tuple(current.shape)} cannot be compared; they need the same width and >= 2 rows.")
        self.current_sample = current
        ks = ks_test(reference, current, self.alpha, self.ks_method)
        result: dict[str, Any] = {"ks": ks, "mmd": None, "n_reference": len(reference), "n_current": len(current)}
        metrics = {
            "drift/ks_stat_max": float(ks.statistic.max()),
            "drift/ks_pvalue_min": float(ks.adjusted_pvalue.min()),
            "drift/ks_features": float((ks.adjusted_pvalue < self.alpha).sum()),
        }
        detected = ks.rejected
        if self.mmd == "always" or (self.mmd == "on_ks" and ks.rejected):
            mmd = mmd_test(reference, current, self.num_permutations, seed=self.seed)
            values = torch.stack([mmd.statistic, mmd.pvalue, mmd.bandwidth]).tolist()  # once per validation/prediction epoch
            result["mmd"] = dict(zip(("mmd2", "pvalue", "bandwidth"), values, strict=True))
            metrics.update({"drift/mmd2": values[0], "drift/mmd_pvalue": values[1], "drift/mmd_bandwidth": values[2]})
            detected = values[1] < self.alpha
        result["detected"] = detected
        metrics.update({"drift/detected": float(detected), "drift/n_reference": float(len(reference)),
                        "drift/n_current": float(len(current))})
        self.last = result
        return metrics

    # ------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {} if self._fixed_reference is None else {"reference": self._fixed_reference}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("reference") is not None:
            self._fixed_reference = state_dict["reference"]

