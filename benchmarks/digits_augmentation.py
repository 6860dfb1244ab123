"""Digits with the default on-device augmentation against digits without it: test accuracy at equal epochs,
median of the seeds.

The recipe is the default one of `traincraft fit` (a batch-normalized ConvNet at 32x32, AdamW 3e-3, cosine decay,
label smoothing 0.05); the only difference between the two arms is `augment="default"` vs `augment="none"`. With
the whole training split both arms sit at the ceiling of the 360-image test split, so the defaults here are the
small-data regime: 10% of the training split (126 images, stratified), batch 32, 60 epochs. One thread, so that
a seed gives one number.

    .venv/bin/python benchmarks/digits_augmentation.py [--seeds 0 1 2] [--epochs 60] [--train-fraction 0.1]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import lightning.pytorch as pl
import torch

from traincraft.data.digits import DigitsDataModule
from traincraft.modules.classifier import ImageClassifier


def run(seed: int, augment: str, epochs: int, train_fraction: float, batch_size: int) -> tuple[float, float]:
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(image_size=32, batch_size=batch_size, augment=augment, train_fraction=train_fraction)
    model = ImageClassifier(
        "convnet", num_classes=10, in_channels=1, input_size=32,
        model_kwargs={"channels": [32, 64, 128], "norm": "batch", "activation": "relu"},
        optimizer=functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=5e-4),
        scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs),
        label_smoothing=0.05,
    )
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    elapsed = time.perf_counter() - start
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    return 100.0 * result["test/acc"], elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--train-fraction", type=float, default=0.1,
                        help="keep this stratified fraction of the 1257 training images (the small-data regime)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same floating-point order on every run: a seed gives one number
    rows = {"default": [], "none": []}
    for seed in args.seeds:
        for augment in rows:  # interleaved, so machine load hits both arms alike
            rows[augment].append((seed, *run(seed, augment, args.epochs, args.train_fraction, args.batch_size)))
    print("| augment | " + " | ".join(f"seed {s}" for s in args.seeds) + " | median test acc (macro) | median fit (s) |")
    print("|---|" + "---:|" * (len(args.seeds) + 2))
    medians = {}
    for augment, runs in rows.items():
        medians[augment] = statistics.median(r[1] for r in runs)
        print(f"| {augment} | " + " | ".join(f"{r[1]:.2f}%" for r in runs)
              + f" | {medians[augment]:.2f}% | {statistics.median(r[2] for r in runs):.1f} |")
    verdict = "met" if medians["default"] > medians["none"] else "NOT met"
    print(f"\ntarget: augmentation beats no augmentation at {args.epochs} epochs (median), train_fraction="
          f"{args.train_fraction}, batch {args.batch_size} -> {verdict}")


if __name__ == "__main__":
    main()
