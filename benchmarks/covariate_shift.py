"""Cost of CovariateShiftMonitor at its default settings: training time with and without it, side by side.

    .venv/bin/python benchmarks/covariate_shift.py --model convnet --image-size 16 --steps 200 --repeats 3

Each repetition trains the same model from the same seed twice, without and with the monitor (interleaved, the
order alternating), with Lightning's default ``log_every_n_steps=50`` and a CSV logger in both arms. Timed from
``on_train_start`` to ``on_train_end`` (data loading, forward, backward, optimizer and logging included; set-up
excluded). Reported: the median over repetitions of the with/without ratio of total times, and an estimate that a
busy machine disturbs much less: each logging step is timed against the 10 steps just before it in the same run,
and the monitor's extra cost (that excess with the monitor minus without) is spread over the 50 steps of a logging
interval. Non-logging steps run no monitor code (its hooks are attached on logging steps only).
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from traincraft.callbacks.covariate_shift import CovariateShiftMonitor
from traincraft.data import DigitsDataModule
from traincraft.modules import ImageClassifier


class Clock(Callback):
    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []
        self.total = 0.0

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((trainer.global_step, time.perf_counter() - self.step_start))

    def on_train_end(self, trainer, pl_module):
        self.total = time.perf_counter() - self.start


def run(args, monitored: bool, out: str) -> Clock:
    pl.seed_everything(0, verbose=False)
    kwargs = {"hidden": [256, 256, 256], "activation": "sigmoid"} if args.model == "mlp" else {}
    model = ImageClassifier(args.model, num_classes=10, in_channels=1, input_size=args.image_size, model_kwargs=kwargs)
    clock = Clock()
    # callbacks run in list order: the clock's batch-end hook comes after the monitor's, so a logging step's time
    # includes the statistics, the host copy and the logging
    callbacks = [CovariateShiftMonitor(), clock] if monitored else [clock]
    trainer = pl.Trainer(accelerator=args.device, devices=1, max_steps=args.steps, max_epochs=-1, limit_val_batches=0,
                         logger=CSVLogger(out, name="bench"), enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)
    trainer.fit(model, datamodule=DigitsDataModule(image_size=args.image_size, batch_size=args.batch_size))
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["convnet", "mlp"], default="convnet")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--out", default="runs/bench_covariate_shift")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ratios, plain_totals, monitored_totals = [], [], []
    steps: dict[tuple[bool, bool], list[float]] = {(m, log): [] for m in (False, True) for log in (False, True)}
    local: dict[bool, list[float]] = {False: [], True: []}  # logging step minus the median of the 10 steps before
    for rep in range(args.repeats):
        order = (False, True) if rep % 2 == 0 else (True, False)
        clocks = {monitored: run(args, monitored, args.out) for monitored in order}
        plain_totals.append(clocks[False].total)
        monitored_totals.append(clocks[True].total)
        ratios.append(clocks[True].total / clocks[False].total)
        for monitored, clock in clocks.items():
            for i, (step, seconds) in enumerate(clock.steps):
                steps[(monitored, step % 50 == 0)].append(seconds)
                if step % 50 == 0 and i >= 10:
                    before = statistics.median(t for _, t in clock.steps[i - 10 : i])
                    local[monitored].append((seconds - before) / before)
    print(f"CovariateShiftMonitor defaults, {args.model} on digits {args.image_size}px, batch {args.batch_size}, "
          f"{args.steps} steps, log_every_n_steps=50, {args.repeats} interleaved repeats, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    print("| arm | median train time (s) | all runs (s) | median step, non-logging (ms) | median logging step (ms) |")
    print("|---|---:|---|---:|---:|")
    for label, totals, monitored in (("without monitor", plain_totals, False), ("with monitor", monitored_totals, True)):
        print(f"| {label} | {statistics.median(totals):.2f} | {', '.join(f'{t:.2f}' for t in totals)} | "
              f"{1000 * statistics.median(steps[(monitored, False)]):.1f} | "
              f"{1000 * statistics.median(steps[(monitored, True)]):.1f} |")
    print(f"ratio of totals (median of per-repeat ratios): {100 * (statistics.median(ratios) - 1):+.1f}% "
          f"(ratios {', '.join(f'{r:.3f}' for r in ratios)})")
    # Robust to a busy machine: each logging step is compared with the 10 steps just before it in the same run
    # (same load); the monitor's extra cost is the difference between the arms, spread over a 50-step interval.
    # Non-logging steps run no monitor code at all (the hooks are removed).
    extra = statistics.median(local[True]) - statistics.median(local[False])
    print(f"logging step vs the 10 steps before it: {100 * statistics.median(local[False]):+.0f}% without, "
          f"{100 * statistics.median(local[True]):+.0f}% with the monitor; the monitor's cost amortized over 50 "
          f"steps: {100 * extra / 50:+.2f}% of step time")


if __name__ == "__main__":
    main()
