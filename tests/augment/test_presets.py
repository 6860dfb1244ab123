"""Presets end to end through a Trainer: right shapes, no host sync on non-logging steps, reproducible streams."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests.data._synthetic import SyntheticRGB
from tests.helpers import SyncWindow, count_host_syncs, tiny_trainer
from traincraft.augment import PRESETS
from traincraft.augment.presets import alexnet, cifar, digits
from traincraft.modules.classifier import ImageClassifier


class Shapes(Callback):
    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append(tuple(batch[0].shape))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(tuple(batch[0].shape))


@pytest.mark.parametrize(
    ("augment", "size", "model_size"),
    [(cifar(), 32, 32), (alexnet(min_size=40, max_size=60, size=32), 40, 32)],
)
def test_presets_train_without_host_syncs(augment, size, model_size):
    dm = SyntheticRGB(size=size, train=64, batch_size=16, augment=augment)
    window = SyncWindow(datamodule=dm)
    counts = window.counts
    shapes = Shapes()
    model = ImageClassifier("mlp", num_classes=3, in_channels=3, input_size=model_size)
    with count_host_syncs(window.current, window.enabled):
        tiny_trainer(max_steps=4, log_every_n_steps=2, limit_val_batches=1, callbacks=[window, shapes]).fit(model, dm)
    quiet = {step: c for step, c in counts.items() if step % 2}
    assert len(counts) == 4 and all(not c for c in quiet.values()), quiet
    assert set(shapes.train) == {(16, 3, model_size, model_size)}
    assert set(shapes.val) == {(16, 3, model_size, model_size)}  # centre crop at evaluation ("auto")


def test_same_seed_rank_and_step_give_the_same_augmentation():
    dm = SyntheticRGB(size=32, augment="cifar", seed=3)
    dm.setup("fit")
    x = dm.datasets["train"].images[:16]

    def run(rank, step):
        with dm._augmentation_stream(torch.device("cpu"), _Trainer(rank, step)):
            return dm._augment_module(x.float() / 255)

    assert torch.equal(run(0, 5), run(0, 5))
    assert not torch.equal(run(0, 5), run(1, 5)) and not torch.equal(run(0, 5), run(0, 6))


class _Trainer:
    def __init__(self, rank, step):
        from types import SimpleNamespace

        self.global_rank = rank
        progress = SimpleNamespace(total=SimpleNamespace(ready=step))
        self.fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))


def test_presets_are_registered_and_reject_grayscale_where_they_need_colour():
    assert set(PRESETS) == {"digits", "cifar", "alexnet"}
    assert digits()(torch.rand(2, 1, 16, 16)).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="needs 3-channel images; got 1"):
        cifar()(torch.rand(64, 1, 32, 32))
