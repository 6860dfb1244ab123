"""Target: `GradientClipping(mode="norm")`, logging included, costs at most 1.02x the step time of Lightning's
built-in `Trainer(gradient_clip_val=...)` on the same model, side by side in one run.

Each configuration trains the default recipe's ConvNet on digits (16 px, batch 64) for `--steps` optimizer steps
with a CSV logger (`log_every_n_steps=10`; GradientClipping logs its `grad/*` keys at those steps, Lightning's
clipping logs nothing). A callback times every training step (batch start to batch end: forward, backward, clipping,
optimizer step) in CPU time of the training thread (one torch thread) and in wall time; the first 5 steps of each
fit are dropped and the median of the fit is kept. Fits of all
configurations are interleaved round-robin for `--rounds` rounds, and each configuration reports the median over
its fits; the ratio compares it with Lightning's clipping with the same optimizer. On a shared machine the CPU-time
ratio is the one to read: wall time also counts the time other processes held the cores.

    .venv/bin/python benchmarks/gradient_clipping.py [--rounds 9] [--steps 40] [--threads 1] [--reps 300]
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from traincraft.callbacks.gradient_clipping import GradientClipping
from traincraft.data import DigitsDataModule
from traincraft.modules import ImageClassifier


class StepTimer(Callback):
    """Wall time and CPU time of this thread per training step (with one torch thread all compute runs here, and
    its CPU time is far less disturbed by other processes on a shared machine than wall time)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter(), time.thread_time()

    def on_train_batch_end(self, *args) -> None:
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.thread_time() - self._start[1])


CONFIGS = {
    # name: (optimizer, Trainer clip value, GradientClipping kwargs or None)
    "lightning gradient_clip_val, AdamW": ("adamw", 1.0, None),
    "GradientClipping norm, default (auto: sync guard on CPU), AdamW": ("adamw", None, {}),
    "GradientClipping norm, snapshot guard (the GPU default), AdamW": ("adamw", None, {"skip_method": "snapshot"}),
    "GradientClipping norm, snapshot guard, restore_buffers=False, AdamW": (
        "adamw", None, {"skip_method": "snapshot", "restore_buffers": False}),
    "lightning gradient_clip_val, AdamW fused": ("adamw_fused", 1.0, None),
    "GradientClipping norm, default (auto: found_inf guard), AdamW fused": ("adamw_fused", None, {}),
}
OPTIMIZERS = {"adamw": torch.optim.AdamW, "adamw_fused": functools.partial(torch.optim.AdamW, fused=True)}


def fit_once(name: str, steps: int, work: str) -> tuple[float, float]:
    optimizer, clip_val, kwargs = CONFIGS[name]
    pl.seed_everything(0, verbose=False)
    timer = StepTimer()
    callbacks = [timer] + ([GradientClipping(threshold=1.0, **kwargs)] if kwargs is not None else [])
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, max_epochs=-1, limit_val_batches=0, log_every_n_steps=10,
                         logger=CSVLogger(work, name="bench"), enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, gradient_clip_val=clip_val, callbacks=callbacks)
    model = ImageClassifier("convnet", num_classes=10, in_channels=1, input_size=16, optimizer=OPTIMIZERS[optimizer])
    trainer.fit(model, datamodule=DigitsDataModule(image_size=16, batch_size=64))
    return statistics.median(timer.wall[5:]), statistics.median(timer.cpu[5:])


def clip_cost(optimizer: str, kwargs: dict, reps: int) -> dict[str, float]:
    """CPU time of (clipping + optimizer step) alone, Lightning's clip_gradients vs the callback's hook, interleaved
    call by call on the same gradients of the same model: the step-time difference without the noise of a fit."""
    pl.seed_everything(0, verbose=False)
    clip = GradientClipping(threshold=1.0, **kwargs)
    model = ImageClassifier("convnet", num_classes=10, in_channels=1, input_size=16, optimizer=OPTIMIZERS[optimizer])
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, log_every_n_steps=1000, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[clip])
    trainer.fit(model, datamodule=DigitsDataModule(image_size=16, batch_size=64))
    opt = trainer.optimizers[0]
    clip.on_fit_start(trainer, model)  # re-attach the optimizer hook that teardown removed
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad.clone() for p in params]
    times: dict[str, list[float]] = {"lightning": [], "traincraft": []}
    for _ in range(reps):
        for name in times:
            for p, g in zip(params, grads, strict=True):
                p.grad.copy_(g)
            start = time.thread_time()
            if name == "lightning":
                model.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")  # what Lightning runs
            else:
                clip.on_before_optimizer_step(trainer, model, opt)
            opt.step()
            times[name].append(time.thread_time() - start)
    clip.teardown(trainer, model, "fit")
    return {name: statistics.median(t) for name, t in times.items()}


def buffer_cost(reps: int) -> dict[str, float]:
    """CPU time of the buffer guard alone (snapshot at the window start, restore by a device flag at its end: what
    every stepped batch pays with restore_buffers=True), interleaved with a whole training step for the ratio."""
    pl.seed_everything(0, verbose=False)
    clip = GradientClipping(threshold=1.0, skip_method="snapshot")
    model = ImageClassifier("convnet", num_classes=10, in_channels=1, input_size=16, optimizer=torch.optim.AdamW)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, log_every_n_steps=1000, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[clip])
    datamodule = DigitsDataModule(image_size=16, batch_size=64)
    trainer.fit(model, datamodule=datamodule)
    guard = clip._skipping.buffers
    flag = torch.zeros((), dtype=torch.bool)  # a healthy step: the restore still runs its torch.where
    images, labels = next(iter(datamodule.train_dataloader()))
    images = datamodule.on_after_batch_transfer((images, labels), 0)[0]  # float and normalized, as in training
    opt = trainer.optimizers[0]
    times: dict[str, list[float]] = {"guard": [], "step": []}
    for _ in range(reps):
        start = time.thread_time()
        guard.snapshot()
        guard.restore({0: flag})
        times["guard"].append(time.thread_time() - start)
        start = time.thread_time()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
        times["step"].append(time.thread_time() - start)
    sizes = [t.numel() for group in guard.groups for t in group.tensors]
    return {"buffers": len(sizes), "elements": sum(sizes), **{k: statistics.median(v) for k, v in times.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--reps", type=int, default=300, help="interleaved calls in the clipping-alone measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: no OpenMP contention "
                        "with other processes on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.rounds):
            for name in CONFIGS:  # interleaved: load changes on a shared machine hit every configuration alike
                results[name].append(fit_once(name, args.steps, work))
    wall = {name: statistics.median(t[0] for t in times) for name, times in results.items()}
    cpu = {name: statistics.median(t[1] for t in times) for name, times in results.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps")
    print("| configuration | CPU time per step (ms) | ratio (CPU) | per-round ratio, median [quartiles] | "
          "wall per step (ms) | ratio (wall) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in CONFIGS:
        base = "lightning gradient_clip_val, " + name.rsplit(", ", 1)[1]  # same optimizer
        # ratios within a round (fits next to each other in time) cancel slow changes of the machine's load
        paired = [a[1] / b[1] for a, b in zip(results[name], results[base], strict=True)]
        q1, mid, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else (paired[0],) * 3
        print(f"| {name} | {cpu[name] * 1e3:.2f} | {cpu[name] / cpu[base]:.3f} | {mid:.3f} [{q1:.3f}, {q3:.3f}] | "
              f"{wall[name] * 1e3:.2f} | {wall[name] / wall[base]:.3f} |")
    print(f"\nclipping + optimizer step alone (CPU time, median of {args.reps} interleaved calls, non-logging steps):")
    print("| configuration | Lightning clip_gradients + step (us) | GradientClipping hook + step (us) | difference (us) "
          "| implied step-time ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, (optimizer, _, kwargs) in CONFIGS.items():
        if kwargs is None:
            continue
        cost = clip_cost(optimizer, kwargs, args.reps)
        base = "lightning gradient_clip_val, " + name.rsplit(", ", 1)[1]
        diff = cost["traincraft"] - cost["lightning"]
        print(f"| {name} | {cost['lightning'] * 1e6:.0f} | {cost['traincraft'] * 1e6:.0f} | {diff * 1e6:+.0f} | "
              f"{(cpu[base] + diff) / cpu[base]:.4f} |")
    guard = buffer_cost(args.reps)
    print(f"\nbuffer guard alone ({guard['buffers']} buffers, {guard['elements']} elements; snapshot + restore by a "
          f"device flag, median of {args.reps} calls interleaved with a plain forward/backward/AdamW step):")
    print("| buffer guard (us) | plain training step (us) | implied step-time ratio |")
    print("|---:|---:|---:|")
    print(f"| {guard['guard'] * 1e6:.1f} | {guard['step'] * 1e6:.0f} | {1 + guard['guard'] / guard['step']:.4f} |")

if __name__ == "__main__":
    main()
