"""The edge of stability (Cohen et al. 2021): under full-batch gradient descent the sharpness λ_max rises to 2/η.

A small tanh network on 1,000 scikit-learn digits (8×8), mean-squared error on one-hot targets (the setting where
the paper's effect is cleanest), trained by full-batch gradient descent at several learning rates. Every few steps
the top Hessian eigenvalue is measured with traincraft's warm-started power iteration. Gradient descent on a
quadratic diverges above 2/η; on the network, λ_max first grows ("progressive sharpening"), reaches 2/η, and then
hovers there while the loss keeps decreasing, non-monotonically.

    python examples/edge_of_stability.py --out runs/edge_of_stability.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

from traincraft.metrics.hessian import hessian_vector_operator, power_iteration  # noqa: E402


def run(lr: float, x: torch.Tensor, targets: torch.Tensor, steps: int, every: int, seed: int) -> dict[str, list]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    vector = None
    history: dict[str, list] = {"step": [], "sharpness": [], "loss_step": [], "loss": []}
    for step in range(steps + 1):
        loss = 0.5 * F.mse_loss(net(x), targets, reduction="sum") / len(x)
        if step % every == 0:
            hvp, grad = hessian_vector_operator(loss, params)
            init = vector if vector is not None else torch.randn(grad.numel())
            value, vector = power_iteration(hvp, init, 20 if step == 0 else 6)
            history["step"].append(step)
            history["sharpness"].append(value.item())
        history["loss_step"].append(step)
        history["loss"].append(loss.item())
        if step == steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return history


def main(argv: list[str] | None = None) -> dict[float, dict[str, list]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/edge_of_stability.png")
    parser.add_argument("--lrs", default="0.3,0.6,1.2", help="comma-separated learning rates")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=25, help="measure the sharpness every this many steps")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    digits = load_digits()
    x = torch.tensor(digits.data[: args.samples], dtype=torch.float32) / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    targets = F.one_hot(torch.tensor(digits.target[: args.samples]), 10).float()
    lrs = [float(v) for v in args.lrs.split(",")]
    results = {lr: run(lr, x, targets, args.steps, args.every, args.seed) for lr in lrs}

    fig, (ax_loss, ax_sharp) = plt.subplots(1, 2, figsize=(11, 4))
    for (lr, h), color in zip(results.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False):
        ax_loss.plot(h["loss_step"], h["loss"], color=color, lw=1, label=f"η = {lr}")
        ax_sharp.plot(h["step"], h["sharpness"], color=color, lw=1.5, label=f"η = {lr}")
        ax_sharp.axhline(2 / lr, color=color, ls="--", lw=1)
        tail = h["sharpness"][len(h["sharpness"]) // 2:]
        print(f"η={lr}: 2/η = {2 / lr:.2f}, sharpness over the second half: median {sorted(tail)[len(tail) // 2]:.2f}, "
              f"max {max(tail):.2f}; final loss {h['loss'][-1]:.4f}")
    ax_loss.set(xlabel="step", ylabel="training loss (MSE)", yscale="log", title="full-batch gradient descent")
    ax_sharp.set(xlabel="step", ylabel="λ_max (power iteration)", title="sharpness; dashed: 2/η")
    ax_loss.legend()
    ax_sharp.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return results


if __name__ == "__main__":
    main()
