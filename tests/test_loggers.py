from types import SimpleNamespace

import numpy as np
import pytest
import torch
import wandb
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from tests.helpers import wandb_history
from traincraft.loggers import (
    WandbLogger,
    log_histogram,
    log_image,
    wandb_credentials_configured,
    wandb_should_be_offline,
)


def test_credentials_come_from_the_environment_or_netrc(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_credentials_configured()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / "netrc").chmod(0o600)
    assert wandb_credentials_configured()
    (tmp_path / "netrc").write_text("machine example.org\n  login user\n  password abc\n")
    assert not wandb_credentials_configured()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_credentials_configured()


def test_offline_unless_credentials_and_wandb_mode_always_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_should_be_offline() is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_should_be_offline() is False
    assert wandb_should_be_offline(offline=True) is True
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_should_be_offline(offline=False) is True


def test_images_and_histograms_reach_wandb_and_tensorboard_files(tmp_path):
    wb = WandbLogger(save_dir=str(tmp_path))
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = SimpleNamespace(global_step=5, loggers=[CSVLogger(str(tmp_path)), tb, wb])
    image = torch.rand(3, 6, 7)
    assert log_image(trainer, "grid", image, caption="c") == ["tensorboard", "wandb"]
    assert log_histogram(trainer, "hist", torch.randn(1000)) == ["tensorboard", "wandb"]
    run_dir = wb.run_dir
    tb.experiment.flush()
    wandb.finish()
    keys = {key for row in wandb_history(run_dir) for key in row}
    assert {"grid", "hist"} <= {k.split("/")[0] for k in keys}
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert log_image(SimpleNamespace(global_step=0, loggers=[]), "x", np.zeros((4, 4))) == []


def test_bad_image_shapes_are_refused():
    with pytest.raises(ValueError, match="2 or 3 dimensions"):
        log_image(SimpleNamespace(global_step=0, loggers=[]), "x", np.zeros((1, 2, 3, 4)))
