"""The contract every public callback passes (auto-discovered from ``traincraft.callbacks.__all__``):
built with its defaults, it fits twice, with and without a logger, and its state survives a checkpoint."""

import inspect

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks import LearningRateMonitor as LightningLearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

import traincraft.callbacks as callbacks
from tests.helpers import tiny_trainer
from traincraft.data import DigitsDataModule
from traincraft.modules import ImageClassifier

CALLBACKS = [
    getattr(callbacks, name)
    for name in callbacks.__all__
    if inspect.isclass(getattr(callbacks, name)) and issubclass(getattr(callbacks, name), Callback)
]


def _fit(callback, logger, ckpt_path=None, max_steps=6):
    model = ImageClassifier("convnet", num_classes=10, in_channels=1, input_size=8,
                            model_kwargs={"channels": [8, 16], "hidden": 16})
    trainer = tiny_trainer(max_steps=max_steps, max_epochs=-1, log_every_n_steps=2, limit_val_batches=2, logger=logger,
                           callbacks=[callback], enable_checkpointing=False)
    trainer.fit(model, datamodule=DigitsDataModule(image_size=8, batch_size=32), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_callback_contract(cls, tmp_path):
    callback = cls()
    # Lightning's LearningRateMonitor (and so its drop-in superset) refuses to run without a logger, by design;
    # HealthReport reads the run back from its logger and refuses likewise.
    needs_logger = issubclass(cls, (LightningLearningRateMonitor, callbacks.HealthReport))
    _fit(callback, logger=CSVLogger(str(tmp_path), name="first") if needs_logger else False)
    trainer = _fit(callback, logger=CSVLogger(str(tmp_path), name="contract"))  # the same instance fits again
    path = tmp_path / "c.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # callback state must be plain data and tensors
    fresh = cls()
    resumed = _fit(fresh, logger=CSVLogger(str(tmp_path), name="resumed") if needs_logger else False, ckpt_path=path,
                   max_steps=8)
    assert resumed.global_step == 8
    state = callback.state_dict()
    if state:
        assert callback.state_key in checkpoint["callbacks"]
