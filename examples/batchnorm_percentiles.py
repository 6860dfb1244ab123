"""Figure 1 of Ioffe & Szegedy (2015) on the digits: a sigmoid MLP trained with and without batch normalization.

    .venv/bin/python examples/batchnorm_percentiles.py --out runs/batchnorm_percentiles.png

(a) validation accuracy over training; (b, c) the 15th, 50th and 85th percentiles of the input of one sigmoid unit
of the last hidden layer, over training, without and with batch normalization. The percentiles come from
traincraft's CovariateShiftMonitor, which reads that layer's inputs only on logging steps. As in the paper: three
hidden layers of 100 sigmoid units, plain SGD, batches of 60; the digits replace MNIST (8x8 images).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from traincraft.callbacks.covariate_shift import CovariateShiftMonitor
from traincraft.data import DigitsDataModule
from traincraft.modules import ImageClassifier

LAYER = "model.blocks.2.act"  # the sigmoid of the last hidden layer; its input is what the paper plots


class Record(Callback):
    """Collects the monitor's percentiles of one unit after each log, and the validation accuracy."""

    def __init__(self, monitor: CovariateShiftMonitor, unit: int) -> None:
        self.monitor, self.unit = monitor, unit
        self.percentiles: list[tuple[int, float, float, float]] = []
        self.accuracy: list[tuple[int, float]] = []
        self._seen = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        latest = self.monitor.latest.get("train")
        if latest is not None and latest is not self._seen:  # a new log has just been published
            self._seen = latest
            stats = latest[LAYER]
            self.percentiles.append((trainer.global_step, *(float(stats[p][self.unit]) for p in ("p15", "p50", "p85"))))

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.accuracy.append((trainer.global_step, float(trainer.callback_metrics["val/acc"])))


def train(norm: str, args: argparse.Namespace) -> Record:
    pl.seed_everything(args.seed, verbose=False)
    model = ImageClassifier(
        "mlp", num_classes=10, in_channels=1, input_size=8,
        model_kwargs={"hidden": [100, 100, 100], "norm": norm, "activation": "sigmoid"},
        optimizer=functools.partial(torch.optim.SGD, lr=args.lr),
    )
    monitor = CovariateShiftMonitor(layers=[LAYER], eval_batches=0, log_histograms=False)
    record = Record(monitor, args.unit)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.steps, max_epochs=-1, log_every_n_steps=args.log_every,
        val_check_interval=args.val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[monitor, record],
    )
    trainer.fit(model, datamodule=DigitsDataModule(image_size=8, batch_size=60, augment=None, seed=args.seed))
    return record


def plot(runs: dict[str, Record], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, style in (("without BN", "--"), ("with BN", "-")):
        steps, acc = zip(*runs[label].accuracy, strict=True)
        axes[0].plot(steps, acc, style, color="k", label=label)
    axes[0].set(title="(a) validation accuracy", xlabel="training step", ylim=(0, 1))
    axes[0].legend(loc="lower right")
    for ax, label, title in ((axes[1], "without BN", "(b) without BN"), (axes[2], "with BN", "(c) with BN")):
        steps, p15, p50, p85 = zip(*runs[label].percentiles, strict=True)
        ax.fill_between(steps, p15, p85, color="tab:blue", alpha=0.25, label="15th-85th percentile")
        ax.plot(steps, p50, color="tab:blue", label="median")
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set(title=f"{title}: input of one sigmoid unit", xlabel="training step")
        ax.legend(loc="best", fontsize=8)
    lo = min(min(r.percentiles, key=lambda p: p[1])[1] for r in runs.values())
    hi = max(max(r.percentiles, key=lambda p: p[3])[3] for r in runs.values())
    for ax in axes[1:]:
        ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/batchnorm_percentiles.png"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--unit", type=int, default=0, help="which unit of the last hidden layer to follow")
    parser.add_argument("--log-every", type=int, default=20, help="monitor interval (training steps)")
    parser.add_argument("--val-every", type=int, default=50, help="validation interval (training steps)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a 100-unit MLP: more threads only add synchronization
    runs = {label: train(norm, args) for label, norm in (("without BN", "none"), ("with BN", "batch"))}
    for label, record in runs.items():
        print(f"{label}: final validation accuracy {record.accuracy[-1][1]:.3f}; accuracy after "
              f"{record.accuracy[len(record.accuracy) // 4][0]} steps {record.accuracy[len(record.accuracy) // 4][1]:.3f}")
    plot(runs, args.out)


if __name__ == "__main__":
    main()
