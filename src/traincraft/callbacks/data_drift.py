"""DataDriftMonitor: has the validation data drifted away from the training data, as the model sees it?"""

from __future__ import annotations

from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from traincraft.callbacks._shift_samples import (
    FeatureBuffer,
    as_features,
    gather_in_order,
    model_inputs,
    resolve_layer,
    training_subset_loader,
)
from traincraft.metrics.drift import ks_test, mmd_test


class DataDriftMonitor(Callback):
    """Two-sample tests between model features of training data (the reference) and of validation data (the
    current sample), at the end of every validation epoch, and of prediction data at the end of ``predict``.

    First per-feature Kolmogorov–Smirnov tests with a Bonferroni correction (cheap); then, when KS fires (or
    always, or never: ``mmd``), a kernel MMD² test with a Gaussian kernel (median-heuristic bandwidth) and a
    permutation p-value. Features are the model's output (``layer=None``) or the output of one named module;
    spatial dimensions are averaged away (one feature per channel).

    The reference is recomputed at each validation from ``max_samples`` evenly spaced training samples, in
    evaluation mode and without augmentation, so it differs from the current sample only through the data (not
    through dropout, BatchNorm's batch statistics or augmentation). Choosing them draws nothing from any random
    stream, so training is unchanged. :meth:`set_reference` fixes a reference of your own instead. The current
    sample is the first ``max_samples`` validation samples. Under DDP each rank computes its share and the samples
    are gathered across ranks in the order a single process sees them, so every rank runs the same tests on the
    same data and reaches the same decision. The sanity check is skipped.

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
    """

    def __init__(
        self,
        layer: Optional[str] = None,
        max_samples: int = 500,
        alpha: float = 0.05,
        mmd: Literal["on_ks", "always", "never"] = "on_ks",
        num_permutations: int = 1000,
        ks_method: Literal["auto", "exact", "asymp"] = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(max_samples, int) or max_samples < 4:
            raise ValueError(f"max_samples must be an integer >= 4; got {max_samples!r}.")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1); got {alpha!r}. The usual choice is 0.05.")
        if mmd not in ("on_ks", "always", "never"):
            raise ValueError(f"mmd must be 'on_ks', 'always' or 'never'; got {mmd!r}.")
        if ks_method not in ("auto", "exact", "asymp"):
            raise ValueError(f"ks_method must be 'auto', 'exact' or 'asymp'; got {ks_method!r}.")
        if not isinstance(num_permutations, int) or num_permutations < 19:
            raise ValueError(
                f"num_permutations must be an integer >= 19 (a p-value below 0.05 needs at least 19); "
                f"got {num_permutations!r}."
            )
        self.layer, self.max_samples, self.alpha, self.mmd = layer, max_samples, alpha, mmd
        self.num_permutations, self.ks_method, self.seed = num_permutations, ks_method, seed
        self.last: dict[str, Any] = {}
        self.reference_sample: Optional[torch.Tensor] = None
        self.current_sample: Optional[torch.Tensor] = None
        self._fixed_reference: Optional[torch.Tensor] = None
        self._buffer: Optional[FeatureBuffer] = None
        self._handle: Optional[Any] = None
        self._train_loader: Optional[DataLoader] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(layer=self.layer)

    def set_reference(self, features: torch.Tensor) -> None:
        """Test every validation against these ``(n, d)`` features instead of training samples (kept in
        checkpoints)."""
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] < 2:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"the reference must be a (samples >= 2, features) tensor; got {got}.")
        self._fixed_reference = features.detach().float().cpu()

    # ------------------------------------------------------------------------------- capture
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        resolve_layer(pl_module, self.layer)  # fail before training on a misspelt layer

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unhook()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # kept in memory (not in checkpoints) so that a later predict() can still draw its reference from it
        loader = trainer.train_dataloader
        self._train_loader = loader if isinstance(loader, DataLoader) else None

    def _hook(self, module: Any, args: Any, output: Any) -> None:
        features = as_features(output)
        if self._buffer is not None and features is not None:
            self._buffer.add(features)

    def _unhook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._buffer = None

    def _per_rank(self, trainer: pl.Trainer) -> int:
        return -(-self.max_samples // trainer.world_size)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._begin(trainer, pl_module)

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin(trainer, pl_module)

    def _begin(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._handle = resolve_layer(pl_module, self.layer).register_forward_hook(self._hook)
        if self._fixed_reference is not None:
            self.reference_sample = self._fixed_reference.to(pl_module.device)
        else:
            self.reference_sample = self._reference(trainer, pl_module)
        self._buffer = FeatureBuffer(self._per_rank(trainer))

    def _reference(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[torch.Tensor]:
        loader = training_subset_loader(trainer, self.max_samples, self._train_loader)
        if loader is None:
            rank_zero_warn("DataDriftMonitor: no training data loader to draw the reference from (validate() or "
                           "predict() before any fit, without a datamodule?); call set_reference(features) first. "
                           "Skipping the drift test.")
            return None
        self._buffer = FeatureBuffer(self._per_rank(trainer))
        for batch in loader:
            pl_module(model_inputs(trainer.strategy.batch_to_device(batch, pl_module.device)))
        local = self._buffer.tensor()
        self._buffer = None
        if local is None:
            raise RuntimeError(self._no_features_message(pl_module))
        return gather_in_order(pl_module, local, self._per_rank(trainer))

    def _no_features_message(self, pl_module: pl.LightningModule) -> str:
        where = "the model" if self.layer is None else f"module {self.layer!r}"
        return (f"DataDriftMonitor: {where} produced no tensor output during validation. With layer=None the "
                f"LightningModule must be called (self(x)) in validation_step; otherwise set layer= to a module "
                f"that runs, e.g. one of {[n for n, _ in pl_module.named_modules() if n][:8]}.")

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
                logger.log_metrics(renamed, step=trainer.global_step)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        if self._buffer is None:
            return {}
        local = self._buffer.tensor()
        self._unhook()
        if local is None:
            raise RuntimeError(self._no_features_message(pl_module))
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
