"""A recurrent net meets a cliff: without clipping one huge gradient throws training away; clipped, it learns.

A vanilla tanh RNN reads a sequence of uniform numbers and must output their (centred) sum. Products of
recurrent Jacobians make the gradient norm jump by orders of magnitude from one step to the next (Pascanu et al.
2013): the error surface has cliffs. With SGD + momentum at lr 0.05 the unclipped run is thrown off them and its
loss rises above where it started; ``GradientClipping(mode="norm")`` keeps the direction, bounds the step, and the
same run learns. Writes a PNG of the loss and the pre-clip gradient norm of both runs.

    python examples/gradient_cliff.py --out runs/gradient_cliff.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from traincraft.callbacks.gradient_clipping import GradientClipping
from traincraft.metrics.grad_norms import norm_from_power, norm_power, tensor_norms


class SumRNN(pl.LightningModule):
    """Tanh RNN regressing the centred sum of its inputs."""

    def __init__(self, length: int = 15, hidden: int = 32, lr: float = 0.05, samples: int = 4096) -> None:
        super().__init__()
        self.length, self.lr, self.samples = length, lr, samples
        self.rnn = torch.nn.RNN(1, hidden, batch_first=True, nonlinearity="tanh")
        self.head = torch.nn.Linear(hidden, 1)
        with torch.no_grad():  # orthogonal recurrence: neither vanishing nor exploding at the start
            self.rnn.weight_hh_l0.copy_(torch.linalg.qr(torch.randn(hidden, hidden))[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.mse_loss(self(batch[0]), batch[1])
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        self.losses.append(loss.detach())
        return loss

    def on_train_start(self) -> None:
        self.losses = []

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x = torch.rand(self.samples, self.length, 1, generator=g)
        y = x.sum(1) - self.length / 2
        data = torch.utils.data.TensorDataset(x, y)
        return torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, generator=g)


class NormTrace(Callback):
    """Pre-clip global gradient norm of every step, kept on the device (placed before the clipper)."""

    def __init__(self) -> None:
        self.norms: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(norm_from_power(norm_power(tensor_norms(grads))))


def train(clip: bool, steps: int, lr: float, seed: int = 0) -> tuple[list[float], list[float]]:
    pl.seed_everything(seed, verbose=False)
    model, trace = SumRNN(lr=lr), NormTrace()
    callbacks = [trace] + ([GradientClipping(mode="norm", threshold=1.0, max_consecutive_skips=None)] if clip else [])
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(model)
    return torch.stack(model.losses).tolist(), torch.stack(trace.norms).tolist()


def plot(runs: dict[str, tuple[list[float], list[float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, (losses, norms) in runs.items():
        ax_loss.plot(losses, label=label, lw=0.8)
        ax_norm.plot(norms, label=label, lw=0.8)
    ax_loss.set(yscale="log", xlabel="optimizer step", ylabel="training MSE", title="loss")
    ax_norm.set(yscale="log", xlabel="optimizer step", ylabel="global L2 norm (before clipping)",
                title="gradient norm")
    ax_norm.axhline(1.0, color="grey", ls=":", lw=0.8, label="threshold 1.0")
    for ax in (ax_loss, ax_norm):
        ax.legend(fontsize=8)
    fig.suptitle("tanh RNN, centred sum of 15 inputs, SGD lr 0.05 momentum 0.9")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, tuple[list[float], list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gradient_cliff.png"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args(argv)
    runs = {"no clipping": train(False, args.steps, args.lr), "GradientClipping(norm, 1.0)": train(True, args.steps,
                                                                                                   args.lr)}
    plot(runs, args.out)
    for label, (losses, norms) in runs.items():
        tail = losses[-50:]
        print(f"{label:>28}: first loss {losses[0]:.3f}, mean loss of the last {len(tail)} steps "
              f"{sum(tail) / len(tail):.3f}, largest gradient norm {max(norms):.1f}")
    print(f"wrote {args.out}")
    return runs


if __name__ == "__main__":
    main()
