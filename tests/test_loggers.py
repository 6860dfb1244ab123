import socket
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import wandb
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from tests.helpers import wandb_history
from traincraft.cli import main
from traincraft.loggers import (
    DEFAULT_INIT_TIMEOUT,
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
    wandb.teardown()  # a fresh W&B service: one an earlier test left behind may not write this run's file
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


def test_wandb_start_is_bounded_by_init_timeout_unless_settings_say_otherwise():
    def settings(**kwargs):
        return WandbLogger(save_dir="runs", **kwargs)._wandb_init["settings"]

    assert settings() == {"init_timeout": DEFAULT_INIT_TIMEOUT} and DEFAULT_INIT_TIMEOUT == 15.0
    assert settings(init_timeout=4) == {"init_timeout": 4.0}
    assert settings(settings={"init_timeout": 40}) == {"init_timeout": 40}
    assert settings(settings=wandb.Settings(init_timeout=5)) == {"init_timeout": 5}
    assert settings(settings=wandb.Settings(console="off")) == {"init_timeout": 15.0, "console": "off"}


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), True, "10"])
def test_bad_init_timeouts_are_refused(timeout):
    with pytest.raises(ValueError, match=r"init_timeout must be a positive number of seconds; got .*default 15"):
        WandbLogger(save_dir="runs", init_timeout=timeout)


def test_log_model_without_credentials_warns_and_keeps_the_fit_going(tmp_path, monkeypatch):
    """Lightning refuses log_model offline; a missing login must not stop a fit."""
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    with pytest.warns(UserWarning, match=r"log_model=True is ignored: checkpoints stay in their directory"):
        logger = WandbLogger(save_dir=str(tmp_path), log_model=True)
    assert logger.offline_mode and logger._log_model is False
    with pytest.raises(ValueError, match=r"offline run \(offline=True\) cannot do"):
        WandbLogger(save_dir=str(tmp_path), offline=True, log_model=True)


@pytest.fixture
def refusing_wandb_server(monkeypatch):
    """Credentials, but the W&B server is a loopback port nobody listens on: never online from a test.

    wandb keeps the settings of its first start in the process (offline, from conftest): start it afresh."""
    wandb.teardown()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    yield
    wandb.finish()
    wandb.teardown()  # the next test starts wandb with its own environment


def _fallback_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "W&B could not start an online run" in str(w.message)]


def test_unreachable_server_falls_back_offline_within_init_timeout(tmp_path, refusing_wandb_server):
    logger = WandbLogger(save_dir=str(tmp_path), init_timeout=3)
    assert not logger.offline_mode  # credentials: it tries online first
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.monotonic()
        run = logger.experiment
        elapsed = time.monotonic() - start
    assert elapsed < 3 + 10, elapsed  # the timeout, plus wandb's grace and a loaded machine's start-up
    (message,) = _fallback_warnings(caught)
    assert "init_timeout=3 s (" in message and "wandb sync" in message  # the reason W&B gave, then the fix
    assert logger.offline_mode and Path(logger.run_dir).name.startswith("offline-run-")
    logger.log_metrics({"x": 1.5}, step=0)
    run_dir = logger.run_dir
    run.finish()
    wandb.teardown()
    rows = wandb_history(run_dir)
    assert [float(r["x"]) for r in rows if "x" in r] == [1.5], (run_dir, rows)


def test_a_fit_with_an_unreachable_wandb_server_trains_offline(refusing_wandb_server):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
              "--trainer.log_every_n_steps=1", "--model.init_args.model=mlp", "--data.init_args.image_size=8",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              "--trainer.logger=[{class_path: traincraft.loggers.WandbLogger, init_args: {save_dir: runs, init_timeout: 3}}]"])
    wandb.finish()
    wandb.teardown()  # the service has written everything once it is gone
    assert len(_fallback_warnings(caught)) == 1
    (run_dir,) = Path("runs/wandb").glob("offline-run-*")
    history = wandb_history(run_dir)
    files = sorted((p.name, p.stat().st_size) for p in Path("runs/wandb").rglob("*") if p.is_file())
    assert sum("train/loss_step" in r for r in history) == 3 and any("val/acc" in r for r in history), (files, history)
    assert Path("runs/checkpoints/last.ckpt").is_file()
