"""read_run: every reader gives back what a real Trainer sent its logger, at the steps it sent it."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import MemoryLogger, tiny_trainer
from traincraft.loggers import WandbLogger
from traincraft.report import RunMetrics, read_run
from traincraft.report.sources import find_run


def _by_key(rows: list[tuple[int, dict[str, float]]]) -> dict[str, list[tuple[int, float]]]:
    """The reference: every ``log_metrics`` call the trainer made, regrouped by key as ``(step, value)``."""
    out: dict[str, list[tuple[int, float]]] = {}
    for step, metrics in rows:
        for key, value in metrics.items():
            out.setdefault(key, []).append((step, value))
    return out


class Logs(LightningModule):
    """Logs known values: ``a`` = 0.25·batch + 1 per step, a NaN ``c`` once, ``val/b`` per epoch."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        self.log("a", 0.25 * self.calls + 1.0)
        self.log("grad/norm/model.layers.0.weight", 10.0 ** -self.calls)  # spans decades
        if self.calls == 3:
            self.log("c", math.nan)
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/b", 0.5 + self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(loggers: list[Logger], epochs: int = 2) -> None:
    data = TensorDataset(torch.randn(24, 4))
    trainer = tiny_trainer(max_epochs=epochs, logger=loggers, log_every_n_steps=1)
    trainer.fit(Logs(), DataLoader(data, batch_size=4), DataLoader(data, batch_size=12))


def _assert_matches(run: RunMetrics, reference: dict[str, list[tuple[int, float]]]) -> None:
    for key, pairs in reference.items():
        series = run.get(key)
        assert series is not None, f"{run.source}: {key} missing; has {sorted(run.series)}"
        steps, values = zip(*pairs, strict=True)
        assert series.steps.tolist() == list(steps), (run.source, key)
        np.testing.assert_allclose(series.values, values, rtol=1e-6, equal_nan=True, err_msg=f"{run.source} {key}")


def test_csv_tensorboard_and_wandb_readers_give_back_what_the_trainer_logged():
    import wandb

    wandb.teardown()  # a fresh W&B service: one an earlier test left behind may not write this run's file
    recorder = MemoryLogger()
    csv_logger = CSVLogger("runs", name="csv")
    tb_logger = TensorBoardLogger("runs", name="tb", default_hp_metric=False)
    wandb_logger = WandbLogger(save_dir="runs", project="test")
    _fit([recorder, csv_logger, tb_logger, wandb_logger])
    import wandb

    wandb.finish()
    wandb.teardown()  # the service has written the whole run file once it is gone
    reference = _by_key(recorder.rows)
    assert len(reference["a"]) == 12 and math.isnan(reference["c"][0][1]) and len(reference["val/b"]) == 2

    csv_run = read_run(Path(csv_logger.log_dir) / "metrics.csv")
    tb_run = read_run(tb_logger.log_dir)
    (wandb_dir,) = Path("runs/wandb").glob("offline-run-*")
    wandb_run = read_run(wandb_dir)
    assert (csv_run.source, tb_run.source, wandb_run.source) == ("csv", "tensorboard", "wandb")
    for run in (csv_run, tb_run, wandb_run):
        _assert_matches(run, reference)
    # the three agree on every key they share (W&B adds nothing; TensorBoard stores float32)
    for key in reference:
        for run in (tb_run, wandb_run):
            np.testing.assert_array_equal(run.series[key].steps, csv_run.series[key].steps)
    assert csv_run.max_step == tb_run.max_step == wandb_run.max_step == reference["a"][-1][0]


def test_a_run_directory_is_searched_and_the_newest_run_is_named():
    _fit([CSVLogger("runs", name="csv")], epochs=1)
    older = Path("runs/csv/version_0/metrics.csv")
    os.utime(older, (time.time() - 3600, time.time() - 3600))
    _fit([CSVLogger("runs", name="csv")], epochs=1)
    run = read_run("runs")
    assert run.path == Path("runs/csv/version_1/metrics.csv")
    # a fit writing CSV and TensorBoard at once: the CSV file is read (the fastest)
    _fit([TensorBoardLogger("runs", name="tb", default_hp_metric=False), CSVLogger("runs", name="both")], epochs=1)
    assert find_run("runs") == ("csv", Path("runs/both/version_0/metrics.csv"))
    assert find_run("runs/tb")[0] == "tensorboard"


def test_csv_with_a_long_header_and_crlf_line_ends():
    keys = [f"covshift/train/model.blocks.{i}.act/mean" for i in range(200)]  # a header of ~8 kB
    Path("metrics.csv").write_bytes(("epoch,step," + ",".join(keys) + "\r\n" + "0,5" + ",1.5" * 199 + ",\r\n"
                                     + "0,6" + "," * 200 + "2.5\r\n").encode())
    run = read_run("metrics.csv")
    assert run.series[keys[0]].steps.tolist() == [5] and run.series[keys[-1]].values.tolist() == [2.5]


def test_csv_cells_empty_nan_quoted_and_runs_of_empty_cells():
    Path("metrics.csv").write_text(
        'epoch,step,"a,b",loss,x,y\r\n'
        "0,0,1.5,,,\r\n"
        "0,1,,nan,,2\r\n"
        ",,,,,\r\n"  # no step: dropped
        "0,2,,inf,,\r\n"
        "1,3,2.5,-1e-3,7,\r\n"
    )
    run = read_run("metrics.csv")
    assert sorted(run.series) == ["a,b", "epoch", "loss", "x", "y"]
    assert run.series["a,b"].steps.tolist() == [0, 3] and run.series["a,b"].values.tolist() == [1.5, 2.5]
    loss = run.series["loss"]
    assert loss.steps.tolist() == [1, 2, 3] and math.isnan(loss.values[0]) and loss.values[1] == math.inf
    assert run.series["x"].steps.tolist() == [3] and run.series["y"].steps.tolist() == [1]
    assert run.series["epoch"].values.tolist() == [0, 0, 0, 1]
    assert run.series["loss"].finite().values.tolist() == [-1e-3]


def test_csv_cells_the_fast_parser_cannot_read_are_read_cell_by_cell():
    Path("metrics.csv").write_text('epoch,step,loss,acc\n0,1," 2.5",\n0,2,,"0.75"\n')  # quoted values
    run = read_run("metrics.csv")
    assert run.series["loss"].steps.tolist() == [1] and run.series["loss"].values.tolist() == [2.5]
    assert run.series["acc"].steps.tolist() == [2] and run.series["acc"].values.tolist() == [0.75]


@pytest.mark.parametrize(("content", "error", "message"), [
    ("", ValueError, "is empty: the run logged nothing"),
    ("epoch,loss\n0,1\n", ValueError, "has no 'step' column"),
    ("epoch,step,loss\n0,1,2\n0,2\n", ValueError, "is garbled"),
    ("epoch,step,loss\r\n", ValueError, "has a header but no rows"),
    ("epoch,step,loss\n0,1,abc\n", ValueError, "is garbled"),
])
def test_bad_csv_files_are_named_with_what_is_wrong(content, error, message):
    Path("metrics.csv").write_text(content)
    with pytest.raises(error, match=message) as caught:
        read_run("metrics.csv")
    assert "metrics.csv" in str(caught.value)


def test_bad_sources_say_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'nowhere' does not exist.*metrics.csv"):
        read_run("nowhere")
    Path("empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No run found under 'empty': looked for a metrics.csv.*tfevents"):
        read_run("empty")
    Path("notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a .csv file"):
        read_run("notes.txt")
    Path("run-x.wandb").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="is not a W&B run file"):
        read_run("run-x.wandb")


def test_missing_tensorboard_says_how_to_install_it(monkeypatch):
    _fit([TensorBoardLogger("runs", name="tb", default_hp_metric=False)], epochs=1)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "tensorboard.backend.event_processing.event_accumulator", raising=False)
    monkeypatch.delitem(sys.modules, "tensorboard.backend.event_processing", raising=False)
    monkeypatch.delitem(sys.modules, "tensorboard.backend", raising=False)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        read_run("runs/tb")


def test_histograms_and_images_are_listed_apart_from_the_scalars():
    from types import SimpleNamespace

    import wandb

    from traincraft.loggers import log_histogram, log_image

    wandb_logger = WandbLogger(save_dir="runs", project="test")
    tb_logger = TensorBoardLogger("runs", name="tb", default_hp_metric=False)
    trainer = SimpleNamespace(global_step=5, loggers=[tb_logger, wandb_logger])
    log_image(trainer, "grid", torch.rand(3, 6, 7), caption="c")
    log_histogram(trainer, "hist", torch.randn(1000))
    tb_logger.log_metrics({"loss": 0.5}, step=5)
    wandb_logger.log_metrics({"loss": 0.5}, step=5)
    run_dir = Path(wandb_logger.experiment.dir).parent
    tb_logger.experiment.flush()
    wandb.finish()
    wandb.teardown()  # the service has written the whole run file once it is gone
    for run in (read_run(tb_logger.log_dir), read_run(run_dir)):
        assert set(run.series) == {"loss"} and run.series["loss"].steps.tolist() == [5], run.source
        assert {k.split("/")[0] for k in run.other} == {"grid", "hist"}, (run.source, run.other)
        assert "histogram" in run.other.values(), (run.source, run.other)
