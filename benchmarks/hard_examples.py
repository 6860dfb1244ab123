"""Hard-example sampling with mislabelled outliers: why the probabilities are capped.

The theory: presenting high-error examples more often can speed learning, but outliers then dominate. Here 10% of
the digits' training labels (``--noise``) are replaced by a wrong class (the outliers: their loss stays high however long the
model trains). Three arms train the default recipe's ConvNet (16x16, 15 epochs, seeds as given):

- uniform: the ordinary shuffled epochs;
- uncapped: `HardExampleMining(cap=inf, uniform_mix=0)`, sampling in proportion to the loss EMA;
- capped: `HardExampleMining()` at its defaults (cap 5x uniform, 20% uniform mix);
- cap 2: `HardExampleMining(cap=2)`.

Reported: the share of the last epoch's sampling probability that goes to the mislabelled examples (uniform: 10%),
and the test accuracy on the clean test split.

    .venv/bin/python benchmarks/hard_examples.py [--seeds 0 1 2] [--epochs 15]
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics

import lightning.pytorch as pl
import torch

from traincraft.callbacks import HardExampleMining
from traincraft.data import DigitsDataModule, TensorImageDataset
from traincraft.modules import ImageClassifier


class NoisyDigits(DigitsDataModule):
    """Digits whose training labels are wrong for a fixed ``noise`` fraction of the examples."""

    def __init__(self, noise: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.noise = noise
        self.noisy = torch.zeros(0, dtype=torch.bool)

    def build_datasets(self):
        splits = super().build_datasets()
        train = splits["train"]
        generator = torch.Generator().manual_seed(1234)
        n = len(train)
        chosen = torch.randperm(n, generator=generator)[: round(self.noise * n)]
        labels = train.labels.clone()
        labels[chosen] = (labels[chosen] + torch.randint(1, 10, (len(chosen),), generator=generator)) % 10
        self.noisy = torch.zeros(n, dtype=torch.bool)
        self.noisy[chosen] = True
        splits["train"] = TensorImageDataset(train.images, labels, num_classes=10)
        return splits


def run(seed: int, arm: str, epochs: int, noise: float) -> tuple[float, float]:
    pl.seed_everything(seed, verbose=False)
    data = NoisyDigits(noise, image_size=16, batch_size=64)
    model = ImageClassifier(
        "convnet", num_classes=10, in_channels=1, input_size=16,
        model_kwargs={"channels": [32, 64, 128], "norm": "batch", "activation": "relu"},
        optimizer=functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=5e-4),
        scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs),
    )
    mining = {"uniform": None, "uncapped": HardExampleMining(cap=math.inf, uniform_mix=0.0),
              "capped": HardExampleMining(), "cap 2": HardExampleMining(cap=2.0)}[arm]
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[mining] if mining is not None else [])
    trainer.fit(model, datamodule=data)
    accuracy = 100.0 * trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    if mining is None:
        return noise * 100.0, accuracy
    share = float(mining.sampler.probabilities.cpu()[data.noisy].sum())
    return 100.0 * share, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--noise", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    arms = ("uniform", "uncapped", "capped", "cap 2")
    rows: dict[str, list[tuple[float, float]]] = {arm: [] for arm in arms}
    for seed in args.seeds:
        for arm in arms:
            rows[arm].append(run(seed, arm, args.epochs, args.noise))
    print("| sampling | probability on the mislabelled examples (median) | test accuracy per seed | median |")
    print("|---|---:|---|---:|")
    for arm in arms:
        shares, accuracies = zip(*rows[arm], strict=True)
        print(f"| {arm} | {statistics.median(shares):.1f}% | " + ", ".join(f"{a:.2f}%" for a in accuracies)
              + f" | {statistics.median(accuracies):.2f}% |")


if __name__ == "__main__":
    main()
