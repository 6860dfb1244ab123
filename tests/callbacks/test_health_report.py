"""HealthReport: the report is written from what the logger wrote, at the end of fit or on demand; refusals at setup;
W&B receives it as an artifact; fail_on gates on the diagnoses; no per-step work."""

import json
import time
from pathlib import Path

import pytest
import torch
import wandb
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from tests.helpers import read_wandb_records, tiny_trainer, wandb_history
from traincraft.callbacks import GradientClipping, HealthReport, LearningRateMonitor
from traincraft.callbacks.health_report import UnhealthyRunError
from traincraft.data import DigitsDataModule
from traincraft.loggers import WandbLogger
from traincraft.modules import ImageClassifier


def _model(**kwargs):
    return ImageClassifier("convnet", num_classes=10, in_channels=1, input_size=8,
                           model_kwargs={"channels": [8, 16], "hidden": 16}, **kwargs)


def _fit(callbacks, logger, model=None, max_steps=12):
    trainer = tiny_trainer(max_steps=max_steps, max_epochs=-1, log_every_n_steps=2, limit_val_batches=2,
                           val_check_interval=6, logger=logger, callbacks=callbacks)
    trainer.fit(model or _model(), datamodule=DigitsDataModule(image_size=8, batch_size=32))
    return trainer


def test_bad_arguments_are_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"on='end'.*'fit_end'.*'demand'"):
        HealthReport(on="end")
    with pytest.raises(ValueError, match=r"fail_on='error'.*None, 'problem' or 'warning'"):
        HealthReport(fail_on="error")


def test_a_trainer_without_a_readable_logger_is_refused_at_setup():
    callback = HealthReport()
    with pytest.raises(ValueError, match=r"has no logger\. Add one it can read: .*CSVLogger"):
        _fit([callback], logger=False)
    assert callback.report is None
    # on demand only: nothing to refuse at setup (write() would say the same if called)
    _fit([HealthReport(on="demand")], logger=False, max_steps=2)


def test_report_at_fit_end_reads_the_csv_file_and_prints_the_diagnoses(tmp_path, capsys):
    callback = HealthReport()
    logger = CSVLogger(str(tmp_path), name="run")
    trainer = _fit([callback, GradientClipping()], logger=logger)
    html = Path(logger.log_dir) / "health_report" / "report.html"
    assert callback.html == html and html.is_file()
    assert (html.parent / "diagnoses.json").is_file() and list((html.parent / "panels").glob("*.png"))
    run = callback.report.run
    assert run.source == "csv" and run.path == Path(logger.log_dir) / "metrics.csv"
    # the report saw everything the logger received, up to the last step (the CSV buffer was flushed first)
    assert {"train/loss_step", "val/loss", "grad/norm_pre"} <= set(run.series)
    assert run.get("grad/norm_pre").steps[-1] == trainer.global_step - 1  # logged after the last step, 0-based
    written = json.loads((html.parent / "diagnoses.json").read_text())
    assert written["source"] == "csv" and len(written["diagnoses"]) == len(callback.report.diagnoses)
    printed = capsys.readouterr().out
    assert f"health report: {html}" in printed


def test_csv_is_preferred_then_tensorboard(tmp_path):
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb")
    both = HealthReport(out_dir=str(tmp_path / "both"), verbose=False)
    _fit([both], logger=[tensorboard, CSVLogger(str(tmp_path), name="csv")], max_steps=6)
    assert both.report.run.source == "csv"
    alone = HealthReport(verbose=False)
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb_alone")
    _fit([alone], logger=tensorboard, max_steps=6)
    assert alone.report.run.source == "tensorboard"
    assert alone.html == Path(tensorboard.log_dir) / "health_report" / "report.html" and alone.html.is_file()
    assert "train/loss_step" in alone.report.run.series


def test_on_demand_writes_only_when_asked(tmp_path):
    callback = HealthReport(on="demand", out_dir=str(tmp_path / "report"), verbose=False)
    trainer = _fit([callback], logger=CSVLogger(str(tmp_path), name="run"), max_steps=6)
    assert not (tmp_path / "report").exists()
    html = callback.write(trainer)
    assert html == tmp_path / "report" / "report.html" and html.is_file()


@pytest.fixture(autouse=True)
def _no_wandb_run_left_open():
    """A W&B run left open would be reused by the next test's WandbLogger (Lightning reuses ``wandb.run``)."""
    yield
    wandb.finish()


def _finished_records(run_dir, timeout=60.0):
    """The records of a finished W&B run: its service may still be writing the file when finish() returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(run_dir)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def test_wandb_receives_the_report_as_an_artifact_and_html(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    callback = HealthReport(verbose=False)
    _fit([callback], logger=[CSVLogger(str(tmp_path), name="csv"), logger], max_steps=6)
    run_dir = Path(logger.run_dir)
    wandb.finish()
    records = _finished_records(run_dir)
    (artifact,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert artifact.type == "health-report"
    names = {entry.path for entry in artifact.manifest.contents}
    assert {"report.html", "diagnoses.json"} <= names and any(n.startswith("panels/") for n in names)
    assert any(row.get("health/report/_type") == '"html-file"' for row in wandb_history(run_dir))  # wandb.Html


def test_wandb_wait_is_checked():
    with pytest.raises(ValueError, match=r"wandb_wait=-1.*\[0, 3600\)"):
        HealthReport(wandb_wait=-1)


def test_wandb_alone_is_a_readable_source_read_to_the_end(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    callback = HealthReport(verbose=False)
    trainer = _fit([callback], logger=logger, max_steps=6)
    assert callback.report.run.source == "wandb"
    # W&B's service writes the run file late: the callback waited for the last logging window
    assert callback.report.run.max_step >= trainer.global_step - 2
    assert "train/loss_step" in callback.report.run.series and callback.html.is_file()


class _Diverges(Callback):
    """Raises at a given step, after some steps were logged: a fit that dies."""

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 8:
            raise FloatingPointError("diverged on purpose")


def test_a_fit_that_raises_still_gets_its_report_and_the_error_propagates(tmp_path):
    callback = HealthReport(verbose=False)
    logger = CSVLogger(str(tmp_path), name="run")
    with pytest.raises(FloatingPointError, match="on purpose"):
        _fit([callback, _Diverges()], logger=logger)
    assert (Path(logger.log_dir) / "health_report" / "report.html").is_file()
    assert callback.report.run.max_step >= 5


def test_fail_on_raises_when_a_diagnosis_is_that_severe(tmp_path):
    # a learning rate far too low: the weights barely move and the loss stays flat, a problem for the report
    model = _model(optimizer=lambda params: torch.optim.SGD(params, lr=1e-7))
    monitor = LearningRateMonitor(log_update_ratio=True)
    callback = HealthReport(fail_on="problem", verbose=False)
    with pytest.raises(UnhealthyRunError, match=r"severity 'problem' or worse \(.*lr_too_low.*\); see .*report\.html"):
        _fit([monitor, callback], logger=CSVLogger(str(tmp_path), name="run"), model=model, max_steps=20)
    assert "lr_too_low" in {d.rule for d in callback.report.diagnoses} and callback.html.is_file()
    # the same healthy-enough run passes with a bar it does not reach: nothing of severity "problem" on a normal fit
    healthy = HealthReport(fail_on="problem", verbose=False)
    _fit([LearningRateMonitor(log_update_ratio=True), healthy], logger=CSVLogger(str(tmp_path), name="ok"),
         max_steps=20)
    assert not [d for d in healthy.report.diagnoses if d.severity == "problem"]


def test_no_per_step_hooks():
    """The callback does nothing during training, so it cannot synchronize the host with the device there."""
    per_step = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
                "on_before_optimizer_step", "on_before_zero_grad", "on_validation_batch_end")
    assert all(getattr(HealthReport, hook) is getattr(Callback, hook) for hook in per_step)


def test_a_report_that_cannot_be_built_warns_and_the_fit_still_ends(tmp_path, monkeypatch):
    import traincraft.report

    def unreadable(source, out_dir=None):
        raise ValueError(f"{source} is garbled")

    monkeypatch.setattr(traincraft.report, "build_report", unreadable)
    callback = HealthReport(verbose=False)
    with pytest.warns(UserWarning, match=r"could not be written \(.*metrics\.csv is garbled\)\. The fit finished"):
        trainer = _fit([callback], logger=CSVLogger(str(tmp_path), name="run"), max_steps=4)
    assert trainer.global_step == 4 and callback.report is None
    with pytest.raises(ValueError, match="garbled"):  # with fail_on the verdict is needed: no report is an error
        _fit([HealthReport(fail_on="problem")], logger=CSVLogger(str(tmp_path), name="gate"), max_steps=4)
