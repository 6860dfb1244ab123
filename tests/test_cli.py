"""`traincraft` end to end: the default recipe, the example recipes, resume, the other subcommands, errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb
from lightning.fabric.utilities.exceptions import MisconfigurationException

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


ONE_SHORT_EPOCH = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]


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
        capture_output=True, text=True, timeout=600, cwd=tmp_path,  # the monitors and the report on a busy machine
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    bad = subprocess.run(
        [str(exe), "fit", "--model.init_args.model=resnet9000", "--trainer.logger=false"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
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


def test_a_checkpoint_of_another_model_is_refused_unless_its_model_is_asked_for(capsys):
    """Lightning's CLI silently rebuilds the checkpoint's model; traincraft refuses unless told to load it."""
    _fit(ONE_SHORT_EPOCH)  # an MLP
    base = ["--trainer.logger=false", "--data.init_args.image_size=8", *QUICK]
    for command, ckpt in (("test", "runs/checkpoints/last.ckpt"), ("fit", "last")):
        with pytest.raises(SystemExit) as raised:
            main([command, f"--ckpt_path={ckpt}", *base])
        assert raised.value.code == 2
        err = capsys.readouterr().err
        assert "holds another model: it was saved from ImageClassifier(model='mlp'" in err
        assert "the configuration builds ImageClassifier(model='convnet'" in err
        assert "--load_model_from_checkpoint=true" in err and "Traceback" not in err
    cli = TraincraftCLI(args=["test", "--ckpt_path=runs/checkpoints/last.ckpt", "--load_model_from_checkpoint=true",
                              "--trainer.limit_test_batches=1", *base])
    assert type(cli.model.model).__name__ == "MLP"
    assert "test/acc" in cli.trainer.callback_metrics


def test_a_checkpoint_of_the_same_model_may_change_training_settings():
    """Only what shapes the network must match: a resumed run may change label smoothing."""
    _fit(ONE_SHORT_EPOCH)
    cli = TraincraftCLI(args=["fit", "--ckpt_path=runs/checkpoints/last.ckpt", "--trainer.max_epochs=2",
                              *ONE_SHORT_EPOCH[1:], "--model.init_args.label_smoothing=0.2", "--trainer.logger=false", *SMALL])
    assert cli.model.hparams.label_smoothing == 0.2 and cli.trainer.current_epoch == 2


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("--model.init_args.num_classes=7", "model.init_args.num_classes=7 was set, but the data (DigitsDataModule) "
                                            "has 10 classes and links it"),
        ("--model.init_args.in_channels=3", "model.init_args.in_channels=3 was set, but the data (DigitsDataModule) "
                                            "has 1 input channels"),
        ("--model.init_args.input_size=16", "model.init_args.input_size=16 was set, but the data (DigitsDataModule) "
                                            "gives 8 as its model input size"),
    ],
)
def test_a_setting_the_data_links_cannot_be_contradicted(setting, message, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["fit", setting, "--trainer.logger=false", *SMALL])
    err = capsys.readouterr().err
    assert raised.value.code == 2 and message in err and "Remove the setting (the data decides)" in err


def test_a_linked_setting_that_agrees_with_the_data_is_accepted():
    cli = TraincraftCLI(args=["fit", "--model.init_args.num_classes=10", "--trainer.max_steps=1",
                              "--trainer.limit_val_batches=1", "--trainer.logger=false", *SMALL])
    assert cli.model.hparams.num_classes == 10 and cli.trainer.global_step == 1


def test_a_checkpoint_model_must_fit_the_data(capsys):
    _fit(ONE_SHORT_EPOCH)  # 8 px inputs
    with pytest.raises(SystemExit) as raised:
        main(["test", "--ckpt_path=runs/checkpoints/last.ckpt", "--load_model_from_checkpoint=true",
              "--trainer.logger=false", "--data.init_args.image_size=12", *QUICK])
    err = capsys.readouterr().err
    assert raised.value.code == 2
    assert "saved model.init_args.input_size=8, but the data (DigitsDataModule) gives 12" in err
    assert "Use the data the checkpoint was trained on (model_input_size=8)" in err


class ExplodingNet(torch.nn.Module):
    """A network with a bug: the CLI must keep its traceback."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 8) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(in_channels * input_size * input_size, num_classes)

    def forward(self, x):
        raise RuntimeError("boom in forward")


def test_a_monitor_of_the_recipe_that_refuses_a_users_model_says_how_to_run_without_the_monitors(capsys):
    # ExplodingNet has no activation modules: the recipe's CovariateShiftMonitor refuses it before training
    args = ["fit", "--model.init_args.model=tests.test_cli.ExplodingNet", "--data.init_args.image_size=8",
            "--trainer.logger=false", "--trainer.max_steps=1", *QUICK]
    with pytest.raises(SystemExit) as raised:
        main(args)
    err = capsys.readouterr().err
    assert raised.value.code == 2 and "Traceback" not in err
    assert "CovariateShiftMonitor: ImageClassifier has no activation or normalization modules" in err
    assert "--trainer.callbacks=[] for a plain Lightning fit" in err


def test_an_internal_error_keeps_its_traceback_and_names_the_debug_switch(capsys, monkeypatch):
    # no monitors: DataDriftMonitor checks the model on the first batch and reports a failing forward as a
    # configuration error (exit 2); this test is about an error that reaches the CLI as it was raised
    args = ["fit", "--model.init_args.model=tests.test_cli.ExplodingNet", "--data.init_args.image_size=8",
            "--trainer.logger=false", "--trainer.max_steps=1", "--trainer.callbacks=[]", *QUICK]
    with pytest.raises(SystemExit) as raised:
        main(args)
    err = capsys.readouterr().err
    assert raised.value.code == 1
    assert "Traceback" in err and "RuntimeError: boom in forward" in err
    assert "traincraft: internal error: RuntimeError: boom in forward" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="boom in forward"):
        main([*args, "--debug"])
    monkeypatch.setenv("TRAINCRAFT_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom in forward"):
        main(args)


def test_debug_lets_user_errors_propagate_too(monkeypatch):
    with pytest.raises(ValueError, match="was set, but the data"):
        main(["fit", "--debug", "--model.init_args.num_classes=7", "--trainer.logger=false", *SMALL])
    # the console script: --debug is taken out of sys.argv before LightningCLI reads it
    monkeypatch.setattr(sys, "argv", ["traincraft", "fit", "--trainer.max_epochs=-5", "--debug", "--trainer.logger=false"])
    with pytest.raises(ValueError, match="the trainer refused its arguments: `max_epochs`") as raised:
        main()
    assert isinstance(raised.value.__cause__, MisconfigurationException)  # Lightning's error, chained
    assert sys.argv == ["traincraft", "fit", "--trainer.max_epochs=-5", "--trainer.logger=false"]


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


def test_a_shipped_recipe_runs_by_name_from_an_empty_directory(capsys):
    """`--config NAME` finds the recipe inside the package (the cwd is an empty tmp directory)."""
    cli = TraincraftCLI(args=["fit", "--config", "digits_alexnet_small", *ONE_SHORT_EPOCH, "--trainer.logger=false",
                              *QUICK])
    assert type(cli.model.model).__name__ == "AlexNet" and cli.trainer.global_step == 2
    main(["recipes"])
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed[:3]] == sorted(
        p.stem for p in (ROOT / "src" / "traincraft" / "recipes").glob("*.yaml")
    )


@pytest.mark.parametrize("name", ["digits_alexnet", "nope.yaml"])
def test_an_unknown_recipe_name_lists_the_shipped_ones(name, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", f"--config={name}"])
    assert stop.value.code == 2
    assert f"--config '{name}' is neither a file nor a shipped recipe; the shipped recipes are digits_alexnet_small" \
        in capsys.readouterr().err
