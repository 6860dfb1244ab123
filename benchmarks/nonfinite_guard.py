"""Cost of ImageClassifier's non-finite guard: the median training-step time with the guard against the same module
with the guard detached, interleaved fit by fit in one process; the figure is the ratio of medians (guard / none).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/nonfinite_guard.py --repeats 5 --steps 60

The guard's per-step work: one ``torch._foreach_norm`` over the gradients, a copy of parameters and optimizer state
before ``step()`` and a ``torch.where`` after it (``fused=True``: the flag goes to the kernel instead), a copy of
the buffers per accumulation window, a handful of scalar ops. No host synchronization either way.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from traincraft.data import DigitsDataModule
from traincraft.modules import ImageClassifier

OPTIMIZERS = {
    "sgd-momentum": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    "adamw": functools.partial(torch.optim.AdamW, lr=1e-3),
    "adamw-fused": functools.partial(torch.optim.AdamW, lr=1e-3, fused=True),
}


class StepTimes(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


class Unguarded(ImageClassifier):
    def on_train_start(self) -> None:  # the guard stays detached: no flag, no copies, nothing recorded
        pass


def median_step(cls, optimizer, steps: int, model: str) -> float:
    pl.seed_everything(0, verbose=False)
    clf = cls(model, num_classes=10, in_channels=1, input_size=16, optimizer=optimizer)
    timer = StepTimes()
    trainer = pl.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                         log_every_n_steps=50)
    trainer.fit(clf, datamodule=DigitsDataModule(image_size=16, augment="none", batch_size=64))
    return statistics.median(timer.times[5:])  # the first steps allocate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--model", default="convnet")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, model {args.model}")
    for name, optimizer in OPTIMIZERS.items():
        guarded, plain = [], []
        for _ in range(args.repeats):
            guarded.append(median_step(ImageClassifier, optimizer, args.steps, args.model))
            plain.append(median_step(Unguarded, optimizer, args.steps, args.model))
        g, p = statistics.median(guarded), statistics.median(plain)
        print(f"{name:13s} guard {g * 1e3:7.2f} ms/step, none {p * 1e3:7.2f} ms/step, ratio {g / p:.3f}")


if __name__ == "__main__":
    main()
