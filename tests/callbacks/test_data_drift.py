"""DataDriftMonitor end to end: its samples and statistics equal a manual computation, it detects a documented
shift and stays quiet without one, and it rejects bad configuration."""

import csv
import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import tiny_trainer
from traincraft.callbacks.data_drift import DataDriftMonitor
from traincraft.data import DigitsDataModule
from traincraft.metrics.drift import ks_test, mmd_test
from traincraft.modules import ImageClassifier


def test_samples_and_statistics_equal_a_manual_computation():
    monitor = DataDriftMonitor(max_samples=100, mmd="always", num_permutations=200, seed=3)
    clf = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8, model_kwargs={"hidden": [16]})
    dm = DigitsDataModule(image_size=8, batch_size=32)
    trainer = tiny_trainer(max_steps=4, val_check_interval=4, limit_val_batches=2, num_sanity_val_steps=0,
                           callbacks=[monitor])
    trainer.fit(clf, datamodule=dm)
    clf.eval()
    with torch.no_grad():  # reference: 100 evenly spaced training images, normalized, not augmented
        train = dm.datasets["train"]
        picks = torch.linspace(0, len(train) - 1, 100).round().long().tolist()
        images = torch.stack([train[i][0] for i in picks])
        reference = clf(dm.transform(images))
        val_images = torch.stack([dm.datasets["val"][i][0] for i in range(64)])  # 2 validation batches of 32
        current = clf(dm.transform(val_images))
    torch.testing.assert_close(monitor.reference_sample, reference)
    torch.testing.assert_close(monitor.current_sample, current)
    ks, mmd = ks_test(reference, current), mmd_test(reference, current, 200, seed=3)
    metrics = trainer.callback_metrics
    assert metrics["drift/ks_stat_max"].item() == pytest.approx(ks.statistic.max(), rel=1e-6)
    assert metrics["drift/ks_pvalue_min"].item() == pytest.approx(ks.adjusted_pvalue.min(), rel=1e-5)
    assert metrics["drift/mmd2"].item() == pytest.approx(mmd.statistic.item(), rel=1e-4)
    assert metrics["drift/mmd_pvalue"].item() == pytest.approx(mmd.pvalue.item())
    assert metrics["drift/n_reference"].item() == 100 and metrics["drift/n_current"].item() == 64


class Identity(pl.LightningModule):
    """Features are the inputs themselves; nothing trains (lr = 0), so only the data can drift."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Identity()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.layer(x) + 0 * self.weight

    def training_step(self, batch, batch_idx):
        return self(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _drift_run(shift: float, mmd: str = "on_ks") -> DataDriftMonitor:
    g = torch.Generator().manual_seed(0)
    train, val = torch.randn(600, 4, generator=g), torch.randn(300, 4, generator=g)
    val[:, 1] += shift
    loader = functools.partial(DataLoader, batch_size=50)
    monitor = DataDriftMonitor(max_samples=300, mmd=mmd, num_permutations=500)
    trainer = tiny_trainer(max_steps=2, num_sanity_val_steps=0, callbacks=[monitor], val_check_interval=2)
    trainer.fit(Identity(), loader(TensorDataset(train)), loader(TensorDataset(val)))
    return monitor, trainer


def test_a_documented_shift_is_detected_and_no_shift_is_not():
    """Documented shift: one of 4 features moves by 0.5 standard deviations, 300 samples on each side."""
    quiet, trainer = _drift_run(0.0)
    assert not quiet.last["detected"] and quiet.last["mmd"] is None  # KS did not fire: MMD skipped
    assert "drift/mmd2" not in trainer.callback_metrics
    shifted, trainer = _drift_run(0.5)
    assert shifted.last["ks"].adjusted_pvalue.argmin() == 1
    assert shifted.last["detected"] and shifted.last["mmd"]["pvalue"] < 0.05
    assert trainer.callback_metrics["drift/detected"].item() == 1.0
    never, _ = _drift_run(0.5, mmd="never")
    assert never.last["detected"] and never.last["mmd"] is None


def test_a_fixed_reference_is_used_and_checkpointed():
    monitor = DataDriftMonitor(max_samples=50, mmd="never")
    reference = torch.randn(40, 4, generator=torch.Generator().manual_seed(1)) + 3.0
    monitor.set_reference(reference)
    loader = DataLoader(TensorDataset(torch.randn(100, 4)), batch_size=25)
    tiny_trainer(max_steps=2, val_check_interval=2, num_sanity_val_steps=0, callbacks=[monitor]).fit(
        Identity(), loader, loader)
    torch.testing.assert_close(monitor.reference_sample, reference)
    assert monitor.last["detected"]
    fresh = DataDriftMonitor(max_samples=50, mmd="never")
    fresh.load_state_dict(monitor.state_dict())
    torch.testing.assert_close(fresh.state_dict()["reference"], reference)


def test_bad_configuration_is_rejected_with_a_fix():
    with pytest.raises(ValueError, match="mmd must be 'on_ks', 'always' or 'never'; got 'sometimes'"):
        DataDriftMonitor(mmd="sometimes")
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\); got 5"):
        DataDriftMonitor(alpha=5)
    with pytest.raises(ValueError, match="at least 19"):
        DataDriftMonitor(num_permutations=10)
    with pytest.raises(ValueError, match=r"\(samples >= 2, features\) tensor; got \(3,\)"):
        DataDriftMonitor().set_reference(torch.zeros(3))
    clf = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8, model_kwargs={"hidden": [16]})
    trainer = tiny_trainer(max_steps=1, callbacks=[DataDriftMonitor(layer="model.blocks.9")])
    with pytest.raises(ValueError, match=r"layer='model.blocks.9' is not a module .* 'model.blocks.0'"):
        trainer.fit(clf, datamodule=DigitsDataModule(image_size=8, batch_size=32))


def test_prediction_data_are_tested_against_training_data_and_logged():
    g = torch.Generator().manual_seed(2)
    train, shifted = torch.randn(400, 3, generator=g), torch.randn(200, 3, generator=g) + torch.tensor([0, 0, 1.0])
    monitor = DataDriftMonitor(max_samples=200, num_permutations=200)
    trainer = tiny_trainer(max_steps=1, limit_val_batches=0, callbacks=[monitor], logger=CSVLogger(".", name="p"))
    model = Identity()
    trainer.fit(model, DataLoader(TensorDataset(train), batch_size=50))
    trainer.predict(model, DataLoader(TensorDataset(shifted), batch_size=50))  # reference: the fit's training data
    picks = torch.linspace(0, 399, 200).round().long()
    torch.testing.assert_close(monitor.reference_sample, train[picks])
    torch.testing.assert_close(monitor.current_sample, shifted)
    assert monitor.last["detected"] and monitor.last["ks"].adjusted_pvalue.argmin() == 2
    trainer.loggers[0].save()
    with open(Path(trainer.loggers[0].log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(row.get("drift/predict/detected") == "1.0" for row in rows)
