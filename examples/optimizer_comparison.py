"""The theory's optimizer comparison on digits: SGD, momentum, Nesterov, Adagrad, Adadelta, RMSprop, Adam and
Jacobs' delta-bar-delta, each training the same MLP (traincraft's ImageClassifier) from the same initialization on
the same mini-batches; training loss against step.

A plain loop rather than a Trainer per optimizer keeps the eight runs within seconds; the module, its loss and the
optimizers are the ones `traincraft fit` uses (``optimizer: {class_path: traincraft.optim.DeltaBarDelta}``).

    python examples/optimizer_comparison.py --out runs/optimizer_comparison.png
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from traincraft.modules import ImageClassifier  # noqa: E402
from traincraft.optim import DeltaBarDelta  # noqa: E402

# Rates of the usual magnitude for each method on this problem (not tuned per method beyond that).
OPTIMIZERS = {
    "SGD": functools.partial(torch.optim.SGD, lr=0.05),
    "momentum": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    "Nesterov": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True),
    "Adagrad": functools.partial(torch.optim.Adagrad, lr=0.05),
    "Adadelta": functools.partial(torch.optim.Adadelta, lr=1.0),
    "RMSprop": functools.partial(torch.optim.RMSprop, lr=1e-3),
    "Adam": functools.partial(torch.optim.Adam, lr=1e-3),
    "delta-bar-delta": functools.partial(DeltaBarDelta, lr=0.05, kappa=0.2, phi=0.3, theta=0.9),
}


def run(name: str, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, seed: int) -> list[float]:
    torch.manual_seed(seed)  # same initialization and the same batch order for every optimizer
    model = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8,
                            model_kwargs={"hidden": [64], "norm": "none"})
    optimizer = OPTIMIZERS[name](model.parameters())
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for index in order[: len(x) // batch_size * batch_size].split(batch_size):  # full batches only
            loss = model.compute_loss(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
    return torch.stack(losses).tolist()


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/optimizer_comparison.png")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    curves = {name: run(name, x, y, args.epochs, args.batch_size, args.seed) for name in OPTIMIZERS}
    out = Path(args.out)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, losses in curves.items():
        smooth, ema = [], losses[0]
        for value in losses:  # light EMA so that curves of noisy mini-batch losses stay readable
            ema = 0.8 * ema + 0.2 * value
            smooth.append(ema)
        ax.plot(range(1, len(smooth) + 1), smooth, lw=1.5, label=name, ls="--" if name == "delta-bar-delta" else "-")
        print(f"{name:>16}: loss at step 20 {smooth[19]:.3f}, final {smooth[-1]:.3f}")
    ax.set(xlabel="optimizer step (batch 64, 1,797 digits)", ylabel="training loss (EMA 0.8)", yscale="log",
           title="digits 8×8, MLP 64-64-10, same initialization")
    ax.legend(ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return curves


if __name__ == "__main__":
    main()
