"""`traincraft` end to end: the default recipe, the example recipes, resume, the other subcommands, errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb

from tests.helpers import read_wandb_records, wandb_history
from traincraft.cli import TraincraftCLI, main

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
SMALL = [
    "--model.init_args.model=mlp",
    "--model.init_args.model_kwargs={hidden: [64], dropout: 0.2}",
    "--data.init_args.image_size=8",
    *QUICK,
]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_default_fit_trains_logs_to_wandb_offline_and_csv_and_checkpoints():
    cli = TraincraftCLI(args=["fit", "--trainer.max_epochs=2", "--trainer.limit_train_batches=6", *QUICK])
    wandb.finish()
    assert type(cli.model.model).__name__ == "ConvNet" and type(cli.datamodule).__name__ == "DigitsDataModule"
    ckpts = Path("runs/checkpoints")
    assert (ckpts / "last.ckpt").is_file() and len(list(ckpts.glob("best-epoch*.ckpt"))) == 1
    best = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)
    assert "DigitsDataModule" in best and "mean" in best["DigitsDataModule"]  # training statistics travel

    rows = _csv_rows(Path("runs/csv/version_0/metrics.csv"))
    val_acc = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert len(val_acc) == 2 and Path("runs/csv/version_0/config.yaml").is_file()

    (run_dir,) = Path("runs/wandb").glob("offline-run-*")  # offline: no credentials were configured
    history = wandb_history(run_dir)
    wandb_val = [float(r["val/acc"]) for r in history if "val/acc" in r]
    assert wandb_val == pytest.approx(val_acc)  # the same numbers reach both loggers
    assert any("train/loss_step" in r for r in history)
    config_keys = {
        item.key
        for record in read_wandb_records(run_dir)
        if record.WhichOneof("record_type") == "config"
        for item in record.config.update
    }
    assert {"cli_config", "model", "num_classes", "image_size"} <= config_keys


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "examples" / "configs").glob("*.yaml")))
def test_every_example_recipe_runs(recipe):
    cli = TraincraftCLI(
        args=[
            "fit",
            f"--config={ROOT / 'examples' / 'configs' / recipe}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1",
            "--trainer.logger=false",
            *QUICK,
        ]
    )
    assert cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])


def _fit(args):
    TraincraftCLI(args=["fit", "--trainer.logger=false", "--trainer.deterministic=true", *SMALL, *args])
    return torch.load("runs/checkpoints/last.ckpt", weights_only=True)


def test_resume_from_last_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """Dropout, augmentation and shuffling all continue their streams across the restart."""
    monkeypatch.chdir(tmp_path / "..")
    (tmp_path / "straight").mkdir()
    (tmp_path / "resumed").mkdir()
    monkeypatch.chdir(tmp_path / "straight")
    straight = _fit(["--trainer.max_epochs=4"])
    monkeypatch.chdir(tmp_path / "resumed")
    first = _fit(["--trainer.max_epochs=2"])
    resumed = _fit(["--trainer.max_epochs=4", "--ckpt_path=last"])
    assert first["global_step"] < resumed["global_step"] == straight["global_step"]
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for key in straight["state_dict"]:  # and the first half really differs
        if not torch.equal(straight["state_dict"][key], first["state_dict"][key]):
            break
    else:
        pytest.fail("the first two epochs already gave the final weights")


def test_validate_test_and_predict_from_a_checkpoint():
    _fit(["--trainer.max_epochs=1"])
    ckpt = "runs/checkpoints/last.ckpt"
    for command in ("validate", "test"):
        cli = TraincraftCLI(args=[command, f"--ckpt_path={ckpt}", "--trainer.logger=false", *SMALL])
        assert f"{'val' if command == 'validate' else 'test'}/acc" in cli.trainer.callback_metrics
    cli = TraincraftCLI(args=["predict", f"--ckpt_path={ckpt}", "--trainer.logger=false", *SMALL])
    probs = torch.cat(cli.trainer.predict_loop.predictions)
    assert probs.shape == (360, 10) and torch.allclose(probs.sum(1), torch.ones(360))


def test_console_script_runs_and_reports_bad_names(tmp_path):
    exe = Path(sys.executable).parent / "traincraft"
    done = subprocess.run(
        [str(exe), "fit", "--trainer.max_steps=2", "--trainer.limit_val_batches=1", *QUICK],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    bad = subprocess.run(
        [str(exe), "fit", "--model.init_args.model=resnet9000", "--trainer.logger=false"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert bad.returncode == 2
    assert "traincraft: error: unknown model 'resnet9000'; registered models are alexnet" in bad.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.init_args.optimizer=torch.optim.Nope"], "has no attribute 'Nope'"),
        (["--model.init_args.scheduler=torch.optim.lr_scheduler.Sometimes"], "has no attribute 'Sometimes'"),
        (["--data.init_args.image_size=-3"], "image_size must be a positive integer"),
        (["--model.init_args.model_kwargs={width: 0.5}"], "width"),
    ],
)
def test_bad_configuration_names_what_is_wrong(args, message, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["fit", "--trainer.logger=false", *args])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_a_checkpoint_brings_its_own_model_configuration():
    """LightningCLI reads the model's hyperparameters from the checkpoint: `test` rebuilds the trained model."""
    _fit(["--trainer.max_epochs=1"])
    cli = TraincraftCLI(args=["test", "--ckpt_path=runs/checkpoints/last.ckpt", "--trainer.logger=false",
                              "--data.init_args.image_size=8", *QUICK])
    assert type(cli.model.model).__name__ == "MLP"


def test_the_saved_config_reproduces_the_run():
    cli = TraincraftCLI(args=["fit", "--trainer.max_steps=1", "--trainer.limit_val_batches=1", *SMALL,
                              "--trainer.logger=[{class_path: CSVLogger, init_args: {save_dir: runs}}]"])
    saved = Path(cli.trainer.log_dir) / "config.yaml"
    again = TraincraftCLI(args=["fit", f"--config={saved}", "--trainer.max_steps=1", "--trainer.logger=false"])
    assert type(again.model.model).__name__ == "MLP"
    assert json.dumps(again.model.hparams["model_kwargs"]) == json.dumps({"hidden": [64], "dropout": 0.2})


def test_the_model_input_size_follows_a_crop_in_the_augmentation(tmp_path):
    """An image folder stored at 40 px and scale-jittered to 32 px crops: the model is built for 32 px."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for label in ("cat", "dog"):
        (tmp_path / "images" / "train" / label).mkdir(parents=True)
        for i in range(6):
            pixels = torch.randint(0, 256, (44, 50, 3), dtype=torch.uint8, generator=g).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / "train" / label / f"{i}.png")
    cli = TraincraftCLI(args=[
        "fit",
        "--data=traincraft.data.ImageFolderDataModule",
        f"--data.root={tmp_path / 'images'}",
        "--data.image_size=40",
        "--data.batch_size=4",
        "--data.val_fraction=0.2",
        "--data.augment={class_path: traincraft.augment.ScaleJitterCrop, init_args: {min_size: 40, max_size: 48, size: 32}}",
        "--model.init_args.model=alexnet",
        "--model.init_args.model_kwargs={width: 0.0625}",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        "--trainer.logger=false",
        *QUICK,
    ])
    assert cli.datamodule.model_input_size == 32 and cli.model.model.input_size == 32
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["val/loss"])
