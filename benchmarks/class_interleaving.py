"""Class-interleaved shuffling against a uniform shuffle: what it buys on small and on class-imbalanced data.

The theory (LeCun et al. 1998, *Efficient BackProp*): shuffle so that successive examples rarely belong to the same
class. Three arms train the same small ConvNet (16x16 digits, SGD with momentum, augmentation off so that the order
is the only difference) over the same seeds:

- uniform: `sampler="shuffle"`, the ordinary shuffled epochs;
- interleaved (stratified): `sampler="class_interleaved"`, classes spread evenly over every epoch;
- interleaved (random): `sampler="class_interleaved", interleave_spacing="random"`.

Two data sets: digits at `train_fraction=0.1` (126 training images, balanced), and a class-imbalanced variant (class
k keeps a fraction `0.1 ** (k / 9)` of its training images: ~126 down to 13, 514 in all; the test split stays
balanced). Reported per arm: test accuracy (mean ± std over seeds), loss-curve noise (the standard deviation of
the per-step training loss around its centred 9-step moving average, after the first epoch), the spread of the
class counts inside a batch (standard deviation over the batches and classes of `count - expected`), and the share
of same-class neighbours in the batches trained on (epoch boundaries included).

    .venv/bin/python benchmarks/class_interleaving.py [--seeds 0 1 2] [--epochs 30]
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from traincraft.data import DigitsDataModule, TensorImageDataset
from traincraft.modules import ImageClassifier

ARMS = {"uniform": {"sampler": "shuffle"},
        "interleaved (stratified)": {"sampler": "class_interleaved", "interleave_spacing": "stratified"},
        "interleaved (random)": {"sampler": "class_interleaved", "interleave_spacing": "random"}}


class ImbalancedDigits(DigitsDataModule):
    """Digits whose class ``k`` keeps a fraction ``ratio ** (k / 9)`` of its training images."""

    def __init__(self, ratio: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ratio = ratio

    def build_datasets(self):
        splits = super().build_datasets()
        train = splits["train"]
        generator = torch.Generator().manual_seed(4321)
        keep = []
        for k in range(10):
            members = torch.nonzero(train.labels == k).flatten()
            count = max(1, round(len(members) * self.ratio ** (k / 9)))
            keep.append(members[torch.randperm(len(members), generator=generator)[:count]])
        keep = torch.cat(keep).sort().values
        splits["train"] = TensorImageDataset(train.images[keep], train.labels[keep], num_classes=10)
        return splits


class Trace(Callback):
    """Per-step training loss and the labels of every batch (a host read per step: a benchmark, not a feature)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.labels: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.labels.append(batch[1].cpu())


def loss_noise(losses: list[float], skip: int, window: int = 9) -> float:
    x = torch.tensor(losses, dtype=torch.float64)
    smooth = torch.nn.functional.avg_pool1d(x.view(1, 1, -1), window, stride=1).flatten()
    residual = x[window // 2 : window // 2 + len(smooth)] - smooth
    return float(residual[max(0, skip - window // 2) :].std())


def batch_spread(labels: list[torch.Tensor], frequencies: torch.Tensor) -> float:
    counts = torch.stack([torch.bincount(y, minlength=10) for y in labels]).double()
    return float((counts - frequencies * counts.sum(1, keepdim=True)).std())


def run(data_name: str, arm: str, seed: int, epochs: int) -> dict[str, float]:
    pl.seed_everything(seed, verbose=False)
    kwargs = {"image_size": 16, "augment": "none", **ARMS[arm]}
    data = (DigitsDataModule(train_fraction=0.1, batch_size=16, **kwargs) if data_name == "digits 10%"
            else ImbalancedDigits(batch_size=32, **kwargs))
    model = ImageClassifier(
        "convnet", num_classes=10, in_channels=1, input_size=16,
        model_kwargs={"channels": [16, 32, 64], "norm": "batch", "activation": "relu"},
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4),
    )
    trace = Trace()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[trace])
    trainer.fit(model, datamodule=data)
    accuracy = 100.0 * trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    labels = data.datasets["train"].labels
    frequencies = torch.bincount(labels, minlength=10).double() / len(labels)
    order = torch.cat(trace.labels)
    return {"accuracy": accuracy, "noise": loss_noise(trace.losses, skip=len(trace.losses) // epochs),
            "spread": batch_spread(trace.labels, frequencies),
            "same": 100.0 * float((order[1:] == order[:-1]).double().mean()), "n": len(labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error(f"--epochs must be at least 2 (the loss-curve noise is measured after the first epoch); "
                     f"got {args.epochs}")
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    start = time.perf_counter()
    print("| data | order | test accuracy (mean ± std) | loss-curve noise | batch class spread | same-class neighbours |")
    print("|---|---|---:|---:|---:|---:|")
    for data_name in ("digits 10%", "imbalanced"):
        for arm in ARMS:
            rows = [run(data_name, arm, seed, args.epochs) for seed in args.seeds]
            mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
            std = statistics.stdev(r["accuracy"] for r in rows) if len(rows) > 1 else 0.0
            print(f"| {data_name} (n={rows[0]['n']}) | {arm} | {mean['accuracy']:.2f} ± {std:.2f}% "
                  f"| {mean['noise']:.4f} | {mean['spread']:.2f} | {mean['same']:.1f}% |", flush=True)
    print(f"seeds {args.seeds}, {args.epochs} epochs, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
