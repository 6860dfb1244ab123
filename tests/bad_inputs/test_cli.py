"""Bad `traincraft` command lines: exit status 2, one message naming what was wrong and what to do, no traceback."""

from __future__ import annotations

import io
import os
import re
import tempfile
import zipfile

import pytest
import torch

from traincraft.checkpoint import seal
from traincraft.cli import main

NO_LOGGER = "--trainer.logger=false"
HELP = r"See `traincraft <subcommand> --help`"
MLP_HPARAMS = {"_class_path": "traincraft.modules.ImageClassifier", "model": "mlp", "model_kwargs": {"hidden": [8]},
               "num_classes": 10, "in_channels": 1, "input_size": 32}


def _sys_is_read_only() -> bool:
    try:
        handle, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        return True
    os.close(handle)
    os.unlink(probe)
    return False


@pytest.fixture
def files(tmp_path):
    """Bad files in the working directory (each test runs in its own tmp_path)."""
    (tmp_path / "afile").write_text("not a directory")
    (tmp_path / "bad.yaml").write_text("trainer: {max_epochs: [1\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "typo.yaml").write_text("trainer:\n  max_epoch: 3\n")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "text.ckpt").write_text("hello\n")
    (tmp_path / "adir.ckpt").mkdir()
    buffer = io.BytesIO()
    torch.save({"state_dict": {}, "hyper_parameters": MLP_HPARAMS, "epoch": 0, "global_step": 0}, buffer)
    (tmp_path / "mlp.ckpt").write_bytes(b"".join(bytes(p) for p in seal(buffer.getvalue())))
    with zipfile.ZipFile(tmp_path / "foreign.ckpt", "w") as archive:
        archive.writestr("hello.txt", "hi")
    return tmp_path


CASES = {
    # parsing: files, keys, types
    "config file with broken YAML": (["--config=bad.yaml"], r"Problems parsing config.*" + HELP),
    "config file that does not exist": (["--config=missing.yaml"],
                                        r"'missing\.yaml' is neither a file nor a shipped recipe.*digits_convnet.*"
                                        r"traincraft recipes"),
    "config file that is a list": (["--config=list.yaml"], r"Unexpected config.*" + HELP),
    "misspelled key in a config file": (["--config=typo.yaml"], r"does not accept option 'trainer\.max_epoch'.*" + HELP),
    "misspelled option (no prefix matching)": (["--trainer.max_epoch=3"], r"unrecognized arguments: --trainer\.max_epoch=3.*" + HELP),
    "unknown option": (["--nope=1"], r"unrecognized arguments: --nope=1.*" + HELP),
    "unknown model argument": (["--model.init_args.nope=1"], r"Option 'nope' is not accepted.*" + HELP),
    "text for an integer": (["--trainer.max_epochs=abc"], r'Parser key "trainer\.max_epochs".*Given value: abc.*' + HELP),
    "text for a batch size": (["--data.init_args.batch_size=x"], r'Parser key "batch_size".*Got value: x.*' + HELP),
    "text for a learning rate": (["--model.init_args.optimizer.init_args.lr=fast"], r"lr.*fast.*" + HELP),
    "text for the seed": (["--seed_everything=abc"], r'Parser key "seed_everything".*' + HELP),
    "precision Lightning lacks": (["--trainer.precision=17"], r'Parser key "trainer\.precision".*' + HELP),
    "logger class that does not exist": (["--trainer.logger=NoSuchLogger"], r'Parser key "trainer\.logger".*' + HELP),
    "logger argument that does not exist": (["--trainer.logger=[{class_path: CSVLogger, init_args: {nope: 1}}]"],
                                            r"nope.*" + HELP),
    "callback class that does not exist": (["--trainer.callbacks=[{class_path: NoSuchCallback}]"],
                                           r"NoSuchCallback.*" + HELP),
    "optimizer class that does not exist": (["--model.init_args.optimizer=torch.optim.Nope"], r"Nope.*" + HELP),
    "data class that is no DataModule": (["--data=torch.nn.Linear"], r'Parser key "data".*' + HELP),
    # values the parts refuse
    "negative max_epochs": (["--trainer.max_epochs=-5"],
                            r"trainer refused its arguments: `max_epochs` must be a non-negative integer or -1\. "
                            r"You passed in -5\. Fix the trainer option"),
    "negative max_steps": (["--trainer.max_steps=-3"], r"`max_steps` must be a non-negative integer or -1.*-3"),
    "negative limit_train_batches": (["--trainer.limit_train_batches=-1"], r"invalid value -1\.0 for limit_train_batches"),
    "zero devices": (["--trainer.devices=0"], r"devices='0'.*not a valid input"),
    "accelerator whose package is missing": (["--trainer.accelerator=tpu"], r"torch_xla.*pip install"),
    "unknown model name": (["--model.init_args.model=resnet9000"], r"unknown model 'resnet9000'; registered models are"),
    "negative image size": (["--data.init_args.image_size=-3"], r"image_size must be a positive integer"),
    "label smoothing of 1.5": (["--model.init_args.label_smoothing=1.5"], r"label_smoothing must lie in \[0, 1\); got 1\.5"),
    # values the data links
    "num_classes the data contradicts": (["--model.init_args.num_classes=7"],
                                         r"model\.init_args\.num_classes=7 was set, but the data \(DigitsDataModule\) "
                                         r"has 10 classes.*Remove the setting"),
    "in_channels the data contradicts": (["--model.init_args.in_channels=3"], r"in_channels=3 was set.*has 1 input"),
    "input_size the data contradicts": (["--model.init_args.input_size=64"], r"input_size=64 was set.*gives 32"),
    # directories
    "run directory under a file": (["--trainer.default_root_dir=afile/runs"],
                                   r"cannot write to 'afile/runs' \(trainer\.default_root_dir\): .*afile is a file, "
                                   r"not a directory\. Set --trainer\.default_root_dir=<dir>"),
    "checkpoint directory under a file": (["--checkpoint.dirpath=afile/ckpts"],
                                          r"afile/ckpts' \(checkpoint\.dirpath\).*is a file.*--checkpoint\.dirpath=<dir>"),
    "CSV log directory under a file": (["--trainer.logger=[{class_path: CSVLogger, init_args: {save_dir: afile/logs}}]"],
                                       r"'afile/logs' \(save_dir of trainer\.logger\[0\] \(CSVLogger\)\).*is a file.*"
                                       r"that logger's init_args\.save_dir"),
    "W&B directory under a file": (["--trainer.logger=[{class_path: traincraft.loggers.WandbLogger, "
                                    "init_args: {save_dir: afile/wandb}}]"],
                                   r"'afile/wandb' \(save_dir of trainer\.logger\[0\] \(WandbLogger\)\).*is a file"),
    # checkpoints
    "checkpoint file that does not exist": (["--ckpt_path=missing.ckpt"], r"missing\.ckpt"),
    "empty checkpoint file": (["--ckpt_path=empty.ckpt"], r"empty\.ckpt"),
    "text file as checkpoint": (["--ckpt_path=text.ckpt"], r"text\.ckpt"),
    "foreign zip as checkpoint": (["--ckpt_path=foreign.ckpt"], r"foreign\.ckpt"),
    "directory as checkpoint": (["--ckpt_path=adir.ckpt"], r"adir\.ckpt"),
    "checkpoint of another model": (["--ckpt_path=mlp.ckpt"],
                                    r"mlp\.ckpt holds another model: it was saved from ImageClassifier\(model='mlp'.*"
                                    r"builds ImageClassifier\(model='convnet'.*--load_model_from_checkpoint=true"),
    "load_model_from_checkpoint without a checkpoint": (["--load_model_from_checkpoint=true"],
                                                        r"needs --ckpt_path to name a checkpoint file; got "
                                                        r"--ckpt_path=None"),
    "load_model_from_checkpoint with 'last'": (["--load_model_from_checkpoint=true", "--ckpt_path=last"],
                                               r"got --ckpt_path='last'\. Pass the file"),
    # W&B logger arguments
    "W&B init_timeout of 0": (["--trainer.logger=[{class_path: traincraft.loggers.WandbLogger, "
                               "init_args: {init_timeout: 0}}]"], r"init_timeout must be a positive number of seconds"),
    "W&B offline with log_model": (["--trainer.logger=[{class_path: traincraft.loggers.WandbLogger, "
                                    "init_args: {offline: true, log_model: true}}]"],
                                   r"log_model=True uploads checkpoints, which an offline run.*cannot do"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_command_line(case, files, capsys):
    args, message = CASES[case]
    if "--trainer.logger" not in " ".join(args):
        args = [*args, NO_LOGGER]
    with pytest.raises(SystemExit) as raised:
        main(["fit", "--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", *args])
    err = capsys.readouterr().err
    assert raised.value.code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.count("traincraft: error:") == 1
    assert re.search(message, err, re.DOTALL), err[-3000:]


@pytest.mark.skipif(not _sys_is_read_only(), reason="/sys is writable here")
def test_checkpoint_directory_without_write_permission(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["fit", NO_LOGGER, "--checkpoint.dirpath=/sys/traincraft-checkpoints"])
    err = capsys.readouterr().err
    assert raised.value.code == 2 and "Traceback" not in err
    assert "cannot write to '/sys/traincraft-checkpoints' (checkpoint.dirpath): /sys is not writable" in err
