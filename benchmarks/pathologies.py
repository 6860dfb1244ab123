"""The health report's pathology suite: induce each training problem on purpose, then check the report names it.

Each pathology is a small CPU fit (a real ``Trainer`` on the 8×8 digits, the traincraft callbacks that measure it,
a ``CSVLogger``); the run's ``metrics.csv`` is read back and diagnosed with
:func:`traincraft.report.diagnoses.diagnose`. A pathology is *detected* when the expected rule fires, with the
expected layer (or a step range covering the induced steps) where that applies. Healthy runs are the shipped
recipes with the monitors on, the pathologies' MLP at a sane rate with all their monitors, and the straggler's
two-process run without the slow rank; any diagnosis there is a *false alarm*.

    .venv/bin/python benchmarks/pathologies.py [--only NAME ...] [--quick] [--keep DIR]

``--quick`` shortens the healthy recipes to 2 epochs (the pathologies are already short). Prints one row per
run and the totals: detected/induced and false alarms/healthy runs.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from traincraft.callbacks import (  # noqa: E402
    CovariateShiftMonitor,
    CurvatureMonitor,
    DataDriftMonitor,
    GradientClipping,
    LearningRateMonitor,
)
from traincraft.data import DigitsDataModule  # noqa: E402
from traincraft.modules import ImageClassifier  # noqa: E402
from traincraft.report._data import Diagnosis, RunMetrics, Series  # noqa: E402
from traincraft.report.diagnoses import diagnose  # noqa: E402

NEVER_CLIPS = 1e9  # GradientClipping only to log the norms: a threshold no gradient reaches


def read_metrics(out: Path) -> RunMetrics:
    """The run under ``out``: helper B's reader when present, else the CSVLogger file read directly."""
    try:
        from traincraft.report.sources import read_run
    except ImportError:
        read_run = None
    if read_run is not None:
        return read_run(out)
    path = next(out.rglob("metrics.csv"))
    columns: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    columns.setdefault(key, []).append((int(row["step"]), float(value)))
    series = {}
    for key, pairs in columns.items():
        pairs.sort(key=lambda p: p[0])
        series[key] = Series(key, np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs]))
    return RunMetrics(series, "csv", path)


@dataclass
class Expect:
    """What the report must say: ``rule`` fires, on ``layer`` (a substring) and covering ``step`` if given."""

    rule: Optional[str]  # None: a healthy run, nothing may fire
    layer: Optional[str] = None
    step: Optional[int] = None

    def found(self, diagnoses: list[Diagnosis]) -> bool:
        if self.rule is None:
            return not diagnoses
        for d in diagnoses:
            if d.rule != self.rule or (self.layer and (d.layer is None or self.layer not in d.layer)):
                continue
            if self.step is not None and (d.steps is None or not d.steps[0] <= self.step <= d.steps[1]):
                continue
            return True
        return False


def trainer(out: Path, callbacks: list, max_steps: int, **kwargs: Any) -> pl.Trainer:
    options = dict(max_steps=max_steps, log_every_n_steps=1, limit_val_batches=0, num_sanity_val_steps=0,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   accelerator="cpu", devices=1, logger=CSVLogger(out, name="", version=""), callbacks=callbacks)
    return pl.Trainer(**{**options, **kwargs})


def mlp(hidden: list[int], activation: str = "relu", lr: float = 0.1, **kwargs: Any) -> ImageClassifier:
    """A plain MLP on 8x8 digits (no normalization layers: they would hide what is induced), SGD."""
    return ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8,
                           model_kwargs={"hidden": hidden, "activation": activation, "norm": "none"},
                           optimizer=lambda p: torch.optim.SGD(p, lr=lr, **kwargs), on_nonfinite="warn")


def digits(**kwargs: Any) -> DigitsDataModule:
    return DigitsDataModule(**{"image_size": 8, "batch_size": 32, "augment": None, **kwargs})


# --- the pathologies --------------------------------------------------------------------------------------------


def lr_too_high(out: Path) -> Expect:
    """SGD at lr 3 on a ReLU MLP (a healthy rate is ~0.1): η·λ_max far above 2, updates bounce."""
    pl.seed_everything(0)
    callbacks = [LearningRateMonitor(logging_interval="step", log_update_ratio=True, log_oscillation=True),
                 CurvatureMonitor(every_n_steps=20, iterations=8, first_iterations=12)]
    trainer(out, callbacks, 120).fit(mlp([64], lr=3.0), datamodule=digits())
    return Expect("lr_above_stability")


def lr_too_low(out: Path) -> Expect:
    """SGD at lr 1e-5: the weights barely move and the loss stays flat."""
    pl.seed_everything(0)
    callbacks = [LearningRateMonitor(logging_interval="step", log_update_ratio=True)]
    trainer(out, callbacks, 120).fit(mlp([64], lr=1e-5), datamodule=digits())
    return Expect("lr_too_low")


class _Cliff(pl.Callback):
    """Scales the inputs of a few training batches by ``factor``: the loss surface's cliff, met on purpose."""

    def __init__(self, steps: range, factor: float) -> None:
        self.steps, self.factor = steps, factor

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            batch[0].mul_(self.factor)


CLIFF_STEP = 80


def gradient_cliff(out: Path) -> Expect:
    """Three batches at 300× input scale at step 80, no clipping: the gradient norm jumps, the loss with it."""
    pl.seed_everything(0)
    callbacks = [GradientClipping(mode="norm", threshold=NEVER_CLIPS), _Cliff(range(CLIFF_STEP, CLIFF_STEP + 3), 300.0)]
    trainer(out, callbacks, 140).fit(mlp([64], lr=0.1), datamodule=digits())
    return Expect("gradient_cliff", step=CLIFF_STEP)


def vanishing_gradients(out: Path) -> Expect:
    """A 10-layer sigmoid MLP: each layer multiplies the gradient by σ' ≤ 1/4 on the way back."""
    pl.seed_everything(0)
    callbacks = [GradientClipping(mode="norm", threshold=NEVER_CLIPS, log_layer_norms=True, log_depth_profile=True)]
    trainer(out, callbacks, 60).fit(mlp([32] * 10, activation="sigmoid", lr=0.1), datamodule=digits())
    return Expect("vanishing_gradients", layer="blocks.0.")


class _Init(pl.Callback):
    """Applies ``change`` to the module once, before training: a bad initialization on purpose."""

    def __init__(self, change: Callable[[ImageClassifier], None]) -> None:
        self.change = change

    def on_fit_start(self, trainer, pl_module):
        with torch.no_grad():
            self.change(pl_module)


def dead_relu(out: Path) -> Expect:
    """Biases of the second hidden layer at -8: its pre-activations are negative for almost every input."""
    pl.seed_everything(0)
    callbacks = [CovariateShiftMonitor(layers=["ReLU"], eval_batches=0, log_histograms=False),
                 _Init(lambda m: m.model.blocks[1].linear.bias.fill_(-8.0))]
    trainer(out, callbacks, 80).fit(mlp([64, 64, 64], lr=0.05), datamodule=digits())
    return Expect("dead_units", layer="blocks.1.act")


def saturated_tanh(out: Path) -> Expect:
    """First-layer weights ×12 (a bad initialization scale): tanh's inputs sit in its flat tails."""
    pl.seed_everything(0)
    callbacks = [CovariateShiftMonitor(layers=["Tanh"], eval_batches=0, log_histograms=False),
                 _Init(lambda m: m.model.blocks[0].linear.weight.mul_(12.0))]
    trainer(out, callbacks, 80).fit(mlp([64, 64], activation="tanh", lr=0.01), datamodule=digits())
    return Expect("saturated_units", layer="blocks.0.act")


class _ShiftedDigits(DigitsDataModule):
    """Validation images at half contrast and +110 brightness (uint8), as a camera or scanner that differs from
    the training one would give; training images unchanged."""

    def collate_fn(self, split: str) -> Any:
        base = super().collate_fn(split) or default_collate
        if split != "val":
            return base

        def shifted(items):
            x, y = base(items)
            return (x.float() * 0.5 + 110).clamp(0, 255).to(torch.uint8), y
        return shifted


def shifted_validation(out: Path) -> Expect:
    """Validation images washed out (half contrast, brighter): the model's outputs on them drift."""
    pl.seed_everything(0)
    callbacks = [DataDriftMonitor(max_samples=200, num_permutations=200)]
    data = _ShiftedDigits(image_size=8, batch_size=32, augment=None)
    trainer(out, callbacks, 160, limit_val_batches=4, val_check_interval=40, check_val_every_n_epoch=None,
            log_every_n_steps=10).fit(
        mlp([64], lr=0.1), datamodule=data)
    return Expect("data_drift")


def _two_processes(out: Path, sleep_s: float) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29500 + os.getpid() % 1000), __file__, "--ddp-worker", str(out), "--sleep", str(sleep_s)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"the 2-process run failed:\n{done.stderr[-3000:]}")


SLOW_RANK_SLEEP = 0.1


def straggler(out: Path) -> Expect:
    """Two gloo processes with DataParallelStrategy; rank 1 sleeps 100 ms in every training step."""
    _two_processes(out, SLOW_RANK_SLEEP)
    return Expect("straggler")


def healthy_ddp(out: Path) -> Expect:
    """The same two processes, no rank slower: nothing may fire."""
    _two_processes(out, 0.0)
    return Expect(None)


class _SlowRank(ImageClassifier):
    def __init__(self, *args: Any, sleep_s: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sleep_s = sleep_s

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.sleep_s:
            time.sleep(self.sleep_s)
        return super().training_step(batch, batch_idx)


def _ddp_worker(out: Path, sleep_s: float) -> None:
    from traincraft.strategies import DataParallelStrategy

    pl.seed_everything(0)
    model = _SlowRank("mlp", num_classes=10, in_channels=1, input_size=8, model_kwargs={"hidden": [64]},
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.1), sleep_s=sleep_s)
    trainer(out, [], 60, devices=2, strategy=DataParallelStrategy(), log_every_n_steps=5).fit(
        model, datamodule=digits(batch_size=16))


PATHOLOGIES: dict[str, Callable[[Path], Expect]] = {
    "lr_too_high": lr_too_high, "lr_too_low": lr_too_low, "gradient_cliff": gradient_cliff,
    "vanishing_gradients": vanishing_gradients, "dead_relu": dead_relu, "saturated_tanh": saturated_tanh,
    "shifted_validation": shifted_validation, "straggler": straggler,
}

def healthy_mlp(out: Path) -> Expect:
    """The pathologies' MLP at a sane rate (SGD 0.1) with every monitor they use on: nothing may fire."""
    pl.seed_everything(0)
    callbacks = [GradientClipping(mode="norm", threshold=NEVER_CLIPS, log_layer_norms=True, log_depth_profile=True),
                 LearningRateMonitor(logging_interval="step", log_update_ratio=True, log_oscillation=True),
                 CovariateShiftMonitor(eval_batches=0, log_histograms=False),
                 CurvatureMonitor(every_n_steps=40, iterations=8, first_iterations=12),
                 DataDriftMonitor(max_samples=200, num_permutations=200)]
    trainer(out, callbacks, 160, limit_val_batches=4, val_check_interval=40, check_val_every_n_epoch=None,
            log_every_n_steps=5).fit(mlp([64, 64], lr=0.1), datamodule=digits())
    return Expect(None)


# --- the healthy runs: the shipped recipes with the monitors on -------------------------------------------------

RECIPES = ("digits_convnet", "digits_alexnet_small", "digits_alexnet_two_column_small")
MONITORS = """trainer:
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: "{out}", name: "", version: ""}}
  enable_progress_bar: false
{callbacks}"""
CALLBACKS = """  callbacks:
    - class_path: traincraft.callbacks.GradientClipping
      init_args: {threshold: 10.0, log_layer_norms: true, log_depth_profile: true}
    - class_path: traincraft.callbacks.LearningRateMonitor
      init_args: {logging_interval: step, log_update_ratio: true, log_oscillation: true}
    - class_path: traincraft.callbacks.CovariateShiftMonitor
      init_args: {log_histograms: false}
    - class_path: traincraft.callbacks.DataDriftMonitor
    - class_path: traincraft.callbacks.CurvatureMonitor
      init_args: {every_n_steps: 100}
"""


def _recipe_has_callbacks(name: str) -> bool:
    from traincraft.cli import recipe_path

    return "callbacks:" in Path(recipe_path(name)).read_text()


def healthy(name: str, epochs: Optional[int]) -> Callable[[Path], Expect]:
    def run(out: Path) -> Expect:
        # The recipe's own monitors when it has them (helper D's defaults), else the ones above.
        extra = out / "monitors.yaml"
        extra.write_text(MONITORS.format(out=out, callbacks="" if _recipe_has_callbacks(name) else CALLBACKS))
        args = ["fit", "--config", name, "--config", str(extra)]
        if epochs:
            args.append(f"--trainer.max_epochs={epochs}")
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "offline"}
        done = subprocess.run([sys.executable, "-m", "traincraft.cli", *args], cwd=out, env=env,
                              capture_output=True, text=True, timeout=1800)
        if done.returncode:
            raise RuntimeError(f"traincraft fit --config {name} failed:\n{done.stderr[-3000:]}")
        return Expect(None)
    return run


def run_one(name: str, fit: Callable[[Path], Expect], keep: Optional[Path]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = (keep / name) if keep else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            expect = fit(out)
        except Exception as error:  # a failed run is reported in the table, not hidden by the others
            print(f"{name}: the run failed: {error}", file=sys.stderr)
            return {"name": name, "expect": Expect(name), "found": False, "diagnoses": [], "seconds": math.nan,
                    "error": True}
        seconds = time.perf_counter() - start
        diagnoses = diagnose(read_metrics(out))
    return {"name": name, "expect": expect, "found": expect.found(diagnoses), "diagnoses": diagnoses,
            "seconds": seconds, "error": False}


def describe(d: Diagnosis) -> str:
    where = f" {d.layer}" if d.layer else ""
    steps = f" steps {d.steps[0]}–{d.steps[1]}" if d.steps else ""
    return f"{d.rule}{where}{steps}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"runs to do: {', '.join(PATHOLOGIES)}, "
                        f"healthy_mlp, healthy_ddp, {', '.join(RECIPES)}")
    parser.add_argument("--quick", action="store_true", help="healthy recipes for 2 epochs only")
    parser.add_argument("--keep", type=Path, help="keep each run's files under this folder")
    parser.add_argument("--ddp-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sleep", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        _ddp_worker(args.ddp_worker, args.sleep)
        return
    runs: dict[str, Callable[[Path], Expect]] = dict(PATHOLOGIES)
    runs["healthy_mlp"], runs["healthy_ddp"] = healthy_mlp, healthy_ddp
    runs.update({name: healthy(name, 2 if args.quick else None) for name in RECIPES})
    names = args.only or list(runs)
    unknown = [n for n in names if n not in runs]
    if unknown:
        parser.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(runs)}")
    print("\n| run | expected | report says | verdict | fit s |\n|---|---|---|---|---|", flush=True)
    results = []
    for name in names:  # each row as soon as its run ends: a long suite shows what it has
        results.append(r := run_one(name, runs[name], args.keep))
        expected = r["expect"].rule or "nothing (healthy)"
        if r["expect"].layer:
            expected += f" on {r['expect'].layer}"
        if r["expect"].step is not None:
            expected += f" covering step {r['expect'].step}"
        said = "; ".join(describe(d) for d in r["diagnoses"]) or "nothing"
        verdict = ("detected" if r["found"] else "MISSED") if r["expect"].rule else (
            "clean" if r["found"] else "FALSE ALARM")
        if r["error"]:
            expected, verdict = "—", "RUN FAILED"
        print(f"| {r['name']} | {expected} | {said} | {verdict} | {r['seconds']:.1f} |", flush=True)
    sick = [r for r in results if r["name"] in PATHOLOGIES]
    well = [r for r in results if r["name"] not in PATHOLOGIES]
    print(f"\ndetected/induced: {sum(r['found'] for r in sick)}/{len(sick)}; "
          f"false alarms/healthy runs: {sum(not r['found'] and not r['error'] for r in well)}/{len(well)}"
          f"{'; runs failed: ' + str(sum(r['error'] for r in results)) if any(r['error'] for r in results) else ''}")
    for r in results:
        for d in r["diagnoses"]:
            print(f"  {r['name']}: [{d.severity} {d.confidence:.2f}] {d.title}: {d.evidence}")


if __name__ == "__main__":
    main()
