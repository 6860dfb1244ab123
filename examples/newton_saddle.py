"""Newton's method is attracted by saddle points; gradient descent and saddle-free Newton escape them.

Two problems, three methods (gradient descent, Newton ``-H⁻¹∇f``, saddle-free Newton ``-|H|⁻¹∇f``):

- the toy function ``f(x, y) = x²/2 + y⁴/4 - y²/2``: a saddle at the origin (curvatures 1 and -1), minima at
  ``(0, ±1)``. Started beside the saddle, Newton converges to it (cubically: ``y ← 2y³/(3y² - 1)``); gradient
  descent leaves it by a factor ``1 + η`` per step; saddle-free Newton doubles its distance per step.
- a small network ``y = w₂ᵀ tanh(W₁x)`` (4 inputs, 3 tanh units, 15 weights, weight decay 0.05) fitted to a tanh
  teacher. Zero weights are a stationary point (the gradient vanishes), and a saddle: the cross-terms between the
  layers give negative curvature. Newton's direction is solved by conjugate gradient over exact Hessian-vector
  products (never forming ``H``); saddle-free Newton takes ``|H|`` from the eigen-decomposition of the Hessian
  (15 × 15, built from 15 products).

Writes the figure (trajectories over the contour plot, the losses against the step) and prints a summary:

    python examples/newton_saddle.py --out docs/images/newton_saddle.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

from traincraft.metrics.hessian import hessian_vector_operator
from traincraft.metrics.newton import conjugate_gradient, dense_hessian, newton_step, saddle_free_step

METHODS = ("gradient descent", "Newton", "saddle-free Newton")
TOY_START = (0.8, 0.05)  # beside the saddle, in Newton's basin of it (|y| < 1/√3)


# ----------------------------------------------------------------------------------------------- the toy function
def toy_loss(p: Tensor) -> Tensor:
    x, y = p[..., 0], p[..., 1]
    return x**2 / 2 + y**4 / 4 - y**2 / 2


def toy_gradient(p: Tensor) -> Tensor:
    return torch.stack([p[0], p[1] ** 3 - p[1]])


def toy_hessian(p: Tensor) -> Tensor:
    return torch.diag(torch.stack([torch.ones_like(p[0]), 3 * p[1] ** 2 - 1]))


def run_toy(method: str, steps: int = 30, lr: float = 0.1, start: tuple[float, float] = TOY_START) -> Tensor:
    """The iterates ``(steps + 1, 2)`` of ``method`` on the toy function, in float64."""
    p = torch.tensor(start, dtype=torch.float64)
    path = [p]
    for _ in range(steps):
        g, h = toy_gradient(p), toy_hessian(p)
        if method == "gradient descent":
            p = p - lr * g
        elif method == "Newton":
            p = p + newton_step(g, h)
        else:
            p = p + saddle_free_step(g, h, damping=1e-3)
        path.append(p)
    return torch.stack(path)


# ----------------------------------------------------------------------------------------------- the network
class SmallNet(nn.Module):
    def __init__(self, inputs: int = 4, hidden: int = 3) -> None:
        super().__init__()
        self.hidden = nn.Linear(inputs, hidden, bias=False)
        self.out = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(x))).squeeze(-1)


def network_problem(seed: int = 0, samples: int = 64) -> tuple[SmallNet, Tensor, Tensor]:
    """The net with weights of size ~1e-2 around the saddle at zero, and a teacher's data."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 4, generator=generator)
    y = torch.tanh(x @ torch.tensor([1.5, -1.0, 0.5, 0.8]))
    net = SmallNet()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(1e-2 * torch.randn(p.shape, generator=generator))
    return net, x, y


WEIGHT_DECAY = 0.05
DAMPING = 0.2  # |λ| floor of saddle-free Newton on the network: full steps where |λ| ~ 0 would overshoot


def network_loss(net: SmallNet, x: Tensor, y: Tensor) -> Tensor:
    decay = sum((p**2).sum() for p in net.parameters())
    return 0.5 * ((net(x) - y) ** 2).mean() + 0.5 * WEIGHT_DECAY * decay


def run_network(method: str, steps: int = 30, lr: float = 0.5, seed: int = 0) -> dict[str, list[float]]:
    """Loss and distance ``‖w‖`` from the saddle at zero along ``method``'s iterates; Newton solves by CG."""
    net, x, y = network_problem(seed)
    params = list(net.parameters())
    history: dict[str, list[float]] = {"loss": [], "distance": [], "cg_iterations": []}
    for step in range(steps + 1):
        loss = network_loss(net, x, y)
        history["loss"].append(float(loss.detach()))
        history["distance"].append(float(torch.cat([p.detach().flatten() for p in params]).norm()))
        if step == steps:
            break
        hvp, grad = hessian_vector_operator(loss, params)
        if method == "gradient descent":
            update = -lr * grad
        elif method == "Newton":
            solved = conjugate_gradient(hvp, grad, max_iterations=4 * grad.numel(), tolerance=1e-6)
            update = -solved.solution
            history["cg_iterations"].append(solved.iterations)
        else:
            update = saddle_free_step(grad.double(), dense_hessian(hvp, grad.numel()), damping=DAMPING).float()
        with torch.no_grad():
            offset = 0
            for p in params:
                p.add_(update[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
    return history


def network_saddle_spectrum(seed: int = 0) -> Tensor:
    """Eigenvalues of the network's Hessian at the saddle (all weights zero)."""
    net, x, y = network_problem(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    params = list(net.parameters())
    hvp, _ = hessian_vector_operator(network_loss(net, x, y), params)
    return torch.linalg.eigvalsh(dense_hessian(hvp, sum(p.numel() for p in params)))


# ----------------------------------------------------------------------------------------------- the figure
def main(out: Path, steps: int = 40) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(METHODS, ("tab:blue", "tab:red", "tab:green"), strict=True))
    toy = {m: run_toy(m, steps) for m in METHODS}
    net = {m: run_network(m, steps) for m in METHODS}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    grid = torch.linspace(-1.5, 1.5, 301, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    axes[0].contour(gx, gy, toy_loss(torch.stack([gx, gy], -1)), levels=30, cmap="Greys", linewidths=0.6)
    for method, path in toy.items():
        axes[0].plot(path[:, 0], path[:, 1], "o-", ms=2.5, lw=1, color=colours[method], label=method)
    axes[0].plot([0], [0], "kx", ms=9, label="saddle")
    axes[0].set(title="f(x, y) = x²/2 + y⁴/4 − y²/2", xlabel="x", ylabel="y", aspect="equal")
    axes[0].legend(loc="lower left", fontsize=8)
    for method, path in toy.items():
        axes[1].plot(toy_loss(path), color=colours[method], label=method)
    axes[1].axhline(0.0, color="k", lw=0.6, ls=":")
    axes[1].text(steps, 0.01, "saddle", ha="right", va="bottom", fontsize=8)
    axes[1].set(title="toy function: loss", xlabel="step", ylabel="f")
    for method, history in net.items():
        axes[2].plot(history["loss"], color=colours[method], label=method)
    saddle_loss = net["Newton"]["loss"][-1]
    axes[2].set(title="4-3-1 tanh network: loss (Newton by CG on Hv)", xlabel="step", ylabel="loss")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)

    spectrum = network_saddle_spectrum()
    print(f"network Hessian at the saddle: {int((spectrum < 0).sum())} negative eigenvalues of {spectrum.numel()}, "
          f"min {spectrum.min():.3f}, max {spectrum.max():.3f}")
    for method in METHODS:
        end = toy[method][-1]
        print(f"{method:>19}: toy ends at ({end[0]:+.2e}, {end[1]:+.2e}), f = {toy_loss(end):+.4f}; network loss "
              f"{net[method]['loss'][-1]:.4f}, distance from the saddle {net[method]['distance'][-1]:.2e}")
    print(f"Newton on the network stalls at the saddle's loss {saddle_loss:.4f}; CG iterations per step: "
          f"{net['Newton']['cg_iterations']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/newton_saddle.png"))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    main(args.out, args.steps)
