"""Targets of the learning-rate issue, as ratios measured side by side in one process:

1. a warm-started curvature probe of 5 power iterations (plus the directional curvature, as by default) costs at
   most 8 training-step equivalents (measured with the full training batch as probe batch, and with a quarter);
2. LearningRateMonitor's per-step extras (update ratios, oscillation index; no curvature) cost at most 2% of the
   step time.

Model: the default recipe's ConvNet (``traincraft fit``) on 16×16 digits, batch 64, SGD with momentum. For (1) a
training step (forward, backward, optimizer step) and a probe are timed alternately; for (2) the same step is
timed alternately with and without the monitor's optimizer-step hooks (what the callback adds on a non-logging
step), and also through complete Lightning fits (Lightning's monitor vs ours with every extra on), interleaved.
Medians over many repetitions; the machine is shared, so only ratios from the same run are meaningful.

    .venv/bin/python benchmarks/lr_monitor.py [--repeats 60] [--fits 5]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks import LearningRateMonitor as LightningMonitor
from lightning.pytorch.loggers import CSVLogger

from traincraft.callbacks._lr_updates import UpdateTracker
from traincraft.callbacks.curvature import CurvatureMonitor
from traincraft.callbacks.lr_monitor import LearningRateMonitor
from traincraft.data import DigitsDataModule
from traincraft.metrics.hessian import hessian_vector_operator, params_of, power_iteration
from traincraft.modules import ImageClassifier


def _model() -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier("convnet", num_classes=10, in_channels=1, input_size=16,
                           optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))


def _batch(size: int = 64):
    dm = DigitsDataModule(image_size=16, batch_size=size, augment="none")
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    return ((x.float() / 255.0 - 0.5) / 0.5), y


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def probe_cost(repeats: int, probe_size: int = 64, reference_iterations: int = 200) -> dict[str, float]:
    model = _model()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batch = _batch()

    def step():
        loss = model.compute_loss(model(batch[0]), batch[1])
        opt.zero_grad()
        loss.backward()
        opt.step()

    monitor = CurvatureMonitor(iterations=5, first_iterations=30)
    monitor._probe_batch = (batch[0][:probe_size], batch[1][:probe_size])  # as captured with probe_batch_size
    for _ in range(5):
        step()
    monitor.probe(model, opt)  # cold start: the warm-started probes below continue from its eigenvector
    steps, probes = [], []
    for _ in range(repeats):
        steps.append(_timed(step))
        probes.append(_timed(lambda: monitor.probe(model, opt)))
    # accuracy of the 5-iteration warm start against a long cold power iteration at the same weights
    probe_batch = monitor._probe_batch
    loss = model.compute_loss(model(probe_batch[0]), probe_batch[1])
    hvp, grad = hessian_vector_operator(loss, params_of(model))
    reference, _ = power_iteration(hvp, torch.randn(grad.numel(), generator=torch.Generator().manual_seed(0)),
                                   reference_iterations)
    warm = monitor.probe(model, opt)["lambda_max"]
    return {"step_ms": 1e3 * statistics.median(steps), "probe_ms": 1e3 * statistics.median(probes),
            "ratio": statistics.median(probes) / statistics.median(steps),
            "warm_error": abs(warm.item() - reference.item()) / abs(reference.item())}


def extras_cost_hooks(repeats: int) -> dict[str, float]:
    """Step time with and without the tracker's optimizer hooks (a non-logging step of the monitor)."""
    model = _model()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batch = _batch()
    tracker = UpdateTracker(opt)
    oscillation = (tracker.follow(ema=0.9),)  # one reader, as the monitor alone

    def step(tracked: bool):
        loss = model.compute_loss(model(batch[0]), batch[1])
        opt.zero_grad()
        loss.backward()
        if tracked:
            tracker.before_step()
        opt.step()
        if tracked:
            tracker.after_step(compare=True, oscillations=oscillation)

    for _ in range(5):
        step(True)
    def hooks_only():
        tracker.before_step()
        tracker.after_step(compare=True, oscillations=oscillation)

    plain, tracked, alone = [], [], []
    for _ in range(repeats):
        plain.append(_timed(lambda: step(False)))
        tracked.append(_timed(lambda: step(True)))
        alone.append(statistics.median(_timed(hooks_only) for _ in range(10)))
    return {"plain_ms": 1e3 * statistics.median(plain), "tracked_ms": 1e3 * statistics.median(tracked),
            "overhead": statistics.median(tracked) / statistics.median(plain) - 1,
            "alone_ms": 1e3 * statistics.median(alone), "alone": statistics.median(alone) / statistics.median(plain)}


class _StepTimes(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step % trainer.log_every_n_steps:  # non-logging steps: what "per step" means
            self.times.append(time.perf_counter() - self._start)


def extras_cost_fits(fits: int, steps: int) -> dict[str, float]:
    def fit(monitor) -> float:
        timer = _StepTimes()
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=CSVLogger("/tmp/lr_monitor_bench"),
                             callbacks=[monitor, timer], enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, log_every_n_steps=10)
        trainer.fit(_model(), datamodule=DigitsDataModule(image_size=16, batch_size=64, augment="none"))
        return statistics.median(timer.times)

    arms = {
        "lightning": lambda: LightningMonitor(logging_interval="step"),
        "lightning_again": lambda: LightningMonitor(logging_interval="step"),  # A/A control: the noise floor
        "ours": lambda: LearningRateMonitor(logging_interval="step", log_hyperparameters=True,
                                            log_update_ratio=True, log_oscillation=True),
    }
    names = list(arms)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(fits):
        # rotate the order: in a fixed order the later fits of a round ran measurably slower, whatever they ran
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            times[name].append(fit(arms[name]()))
    theirs, again, ours = (statistics.median(times[name]) for name in names)
    return {"lightning_ms": 1e3 * theirs, "ours_ms": 1e3 * ours, "overhead": ours / theirs - 1,
            "control": again / theirs - 1}


class _ProbeStepTimes(Callback):
    """Times whole Lightning steps, split into steps whose end ran a curvature probe and the others."""

    def __init__(self, monitor: CurvatureMonitor) -> None:
        self.monitor = monitor
        self.probe_steps: list[float] = []
        self.other_steps: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._probes = self.monitor.probes
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:  # registered after the monitor: its probe is inside
        elapsed = time.perf_counter() - self._start
        if trainer.global_step % trainer.log_every_n_steps == 0:
            return  # logging steps copy to the host: not what a step costs
        (self.probe_steps if self.monitor.probes > self._probes > 0 else self.other_steps).append(elapsed)


def probe_cost_in_fit(fits: int, steps: int, probe_size: int | None) -> dict[str, float]:
    """The probe's cost as a user sees it: extra time of a probing Lightning step, in the fit's own steps."""
    probe, other = [], []
    for _ in range(fits):
        monitor = CurvatureMonitor(every_n_steps=3, iterations=5, first_iterations=20, probe_batch_size=probe_size)
        timer = _ProbeStepTimes(monitor)
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, callbacks=[monitor, timer],
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, log_every_n_steps=50)
        trainer.fit(_model(), datamodule=DigitsDataModule(image_size=16, batch_size=64, augment="none"))
        probe.append(statistics.median(timer.probe_steps))
        other.append(statistics.median(timer.other_steps))
    step, probed = statistics.median(other), statistics.median(probe)
    return {"step_ms": 1e3 * step, "probe_ms": 1e3 * (probed - step), "ratio": (probed - step) / step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--fits", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--reference-iterations", type=int, default=200,
                        help="cold power iterations of the reference λ_max the warm start is compared with")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the other cores are busy with other work: one thread gives steadier ratios
    probe = probe_cost(args.repeats, reference_iterations=args.reference_iterations)
    half = probe_cost(args.repeats, probe_size=32, reference_iterations=args.reference_iterations)
    small = probe_cost(args.repeats, probe_size=16, reference_iterations=args.reference_iterations)
    in_fit = probe_cost_in_fit(max(1, args.fits // 2), args.steps, None)
    hooks = extras_cost_hooks(args.repeats)
    fits = extras_cost_fits(args.fits, args.steps)
    print("| measurement | baseline | with | ratio | target |")
    print("|---|---:|---:|---:|---|")
    print(f"| curvature probe (5 warm iterations + directional) vs training step | {probe['step_ms']:.2f} ms | "
          f"{probe['probe_ms']:.2f} ms | {probe['ratio']:.2f} steps | ≤ 8 steps |")
    print(f"| the same probe in a Lightning fit: extra time of a probing step vs a plain step | "
          f"{in_fit['step_ms']:.2f} ms | {in_fit['probe_ms']:.2f} ms | {in_fit['ratio']:.2f} steps | ≤ 8 steps |")
    print(f"| the same probe on 32 of the 64 samples (probe_batch_size=32) | {half['step_ms']:.2f} ms | "
          f"{half['probe_ms']:.2f} ms | {half['ratio']:.2f} steps | ≤ 8 steps |")
    print(f"| the same probe on 16 of the 64 samples (probe_batch_size=16) | {small['step_ms']:.2f} ms | "
          f"{small['probe_ms']:.2f} ms | {small['ratio']:.2f} steps | ≤ 8 steps |")
    print(f"| per-step extras, optimizer hooks alone | {hooks['plain_ms']:.2f} ms | {hooks['tracked_ms']:.2f} ms | "
          f"{100 * hooks['overhead']:+.2f}% | ≤ 2% |")
    print(f"| per-step extras, the hooks' own work timed alone | {hooks['plain_ms']:.2f} ms | "
          f"{hooks['alone_ms']:.3f} ms | {100 * hooks['alone']:.2f}% | ≤ 2% |")
    print(f"| per-step extras, whole Lightning step (non-logging steps) | {fits['lightning_ms']:.2f} ms | "
          f"{fits['ours_ms']:.2f} ms | {100 * fits['overhead']:+.2f}% | ≤ 2% |")
    print(f"| control: Lightning's monitor against itself, the same fits (noise floor) | {fits['lightning_ms']:.2f} ms | "
          f"| {100 * fits['control']:+.2f}% | |")
    print(f"\nwarm-started λ_max (5 iterations) vs {args.reference_iterations} cold iterations: relative error "
          f"{probe['warm_error']:.2e} "
          f"(probe batch 64), {half['warm_error']:.2e} (32), {small['warm_error']:.2e} (16)")


if __name__ == "__main__":
    main()
