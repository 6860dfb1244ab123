"""CurvatureMonitor: accuracy of the eigensolver against dense Hessians, and the probe's cost.

1. Accuracy (Lightning's demo transformer LM on random tokens, small enough for a dense Hessian, at a point where
   |λ_min| > λ_max): Hessian-vector products until λ_max is within 2% of the dense value, cold and warm-started,
   for Lanczos (what the monitor runs), power iteration (converges to the largest *magnitude*: here λ_min), and
   power iteration shifted by a first estimate of the spectral radius (H + rI, the textbook fix).
2. Per-probe cost at equal batch, in training steps: a training step (forward, backward, optimizer step) and a
   default probe (``iterations`` warm Lanczos products + the directional curvature) timed alternately.
3. Amortized cost at the default interval inside a real Lightning fit: each probing step's extra time over the
   median plain step of the same fit, summed, as a fraction of the rest of the fit; and for the warm probes alone
   (the steady state), extra time / (N plain steps).

(2) and (3) run on two models: the default recipe's ConvNet on 16×16 digits (batch 64, SGD with momentum; the
earlier 17.8-step figure was measured on it) and a demo transformer LM (vocab 512, 2+2 layers of width 64, batch
16 × 32 tokens, SGD). One CPU thread; medians; only ratios from one run are meaningful.

    .venv/bin/python benchmarks/curvature.py [--repeats 15] [--fit-steps 3000] [--skip accuracy cost fit]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos import LightningTransformer, Transformer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from traincraft.callbacks.curvature import CurvatureMonitor
from traincraft.data import DigitsDataModule
from traincraft.metrics.hessian import hessian_vector_operator, lanczos, power_iteration
from traincraft.modules import ImageClassifier

# --- 1. accuracy --------------------------------------------------------------------------------------------


def _tiny_lm(seed: int = 0):
    torch.manual_seed(seed)
    model = Transformer(vocab_size=16, ninp=8, nhead=2, nhid=8, nlayers=1, dropout=0.0)
    tokens, targets = torch.randint(0, 16, (4, 6)), torch.randint(0, 16, (4, 6))
    return model, lambda: F.nll_loss(model(tokens, tokens), targets.view(-1))


def _operator_and_spectrum(model, loss_of):
    params = list(model.parameters())
    with sdpa_kernel(SDPBackend.MATH):
        hvp, grad = hessian_vector_operator(loss_of(), params)
        dense = torch.stack([hvp(e) for e in torch.eye(grad.numel())]).double()  # columns of H, one product each
    return hvp, grad, torch.linalg.eigvalsh((dense + dense.T) / 2)


def _products_to(target: float, estimate, limit: int = 200) -> int | None:
    """Smallest number of products k (k = 1..limit) with |estimate(k) - target| <= 2% |target|."""
    for k in range(1, limit + 1):
        if abs(estimate(k) - target) <= 0.02 * abs(target):
            return k
    return None


def accuracy() -> dict[str, object]:
    model, loss_of = _tiny_lm()
    hvp, grad, spectrum = _operator_and_spectrum(model, loss_of)
    low, high = spectrum[0].item(), spectrum[-1].item()
    start = torch.randn(grad.numel(), generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(0)

    def lanczos_max(k):
        return lanczos(hvp, start, k, generator).lambda_max.item()

    def lanczos_min(k):
        return lanczos(hvp, start, k, generator).lambda_min.item()

    def power(k):
        return power_iteration(hvp, start, k)[0].item()

    radius_products = 20  # the shift needs |λ| first: 20 power iterations (counted)

    def shifted(k):
        if k <= radius_products:
            return float("nan")
        radius = abs(power_iteration(hvp, start, radius_products)[0].item())
        value, _ = power_iteration(lambda v: hvp(v) + radius * v, start, k - radius_products)
        return value.item() - radius

    cold = {
        "lanczos λ_max": _products_to(high, lanczos_max),
        "lanczos λ_min": _products_to(low, lanczos_min),
        "power iteration λ_max": _products_to(high, power),
        "power iteration settles at": round(power(200), 3),
        "shifted power iteration λ_max": _products_to(high, shifted, limit=400),
    }
    # warm starts: 5 probes, each after 10 SGD steps; the monitor's start is v_max + v_min of the previous probe
    previous = lanczos(hvp, start, 40, generator)
    previous_power = power_iteration(hvp, start, 200)[1]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    warm: list[dict[str, object]] = []
    for _ in range(5):
        for _ in range(10):
            optimizer.zero_grad()
            with sdpa_kernel(SDPBackend.MATH):
                loss_of().backward()
            optimizer.step()
        hvp, grad, spectrum = _operator_and_spectrum(model, loss_of)
        low, high = spectrum[0].item(), spectrum[-1].item()
        radius = spectrum.abs().max().item()
        warm_start = previous.vector_max + previous.vector_min

        def warm_lanczos(k, operator=hvp, start=warm_start):
            return lanczos(operator, start, k, generator)

        def warm_power(k, operator=hvp, start=previous_power):
            return power_iteration(operator, start, k)[0].item()

        warm.append({
            "λ_min": round(low, 3), "λ_max": round(high, 3),
            "lanczos λ_max": _products_to(high, lambda k: warm_lanczos(k).lambda_max.item()),
            "lanczos λ_min (2% of radius)": next(
                (k for k in range(1, 201) if abs(warm_lanczos(k).lambda_min.item() - low) <= 0.02 * radius), None),
            "power iteration λ_max": _products_to(high, warm_power),
        })
        previous = lanczos(hvp, warm_start, 40, generator)
        previous_power = power_iteration(hvp, previous_power, 200)[1]
    return {"params": grad.numel(), "cold": cold, "warm": warm}


# --- 2, 3. cost ---------------------------------------------------------------------------------------------


def _convnet() -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier("convnet", num_classes=10, in_channels=1, input_size=16,
                           optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))


class _LM(LightningTransformer):
    def __init__(self) -> None:
        super().__init__(vocab_size=512)
        torch.manual_seed(0)
        self.model = Transformer(vocab_size=512, ninp=64, nhead=2, nhid=64, nlayers=2, dropout=0.1)

    def probe_loss(self, batch):
        inputs, target = batch
        return F.nll_loss(self(inputs, target), target.view(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def prepare_data(self) -> None:
        pass

    def train_dataloader(self) -> DataLoader:
        tokens = torch.randint(0, 512, (4096, 2, 32), generator=torch.Generator().manual_seed(0))
        return DataLoader([(t[0], t[1]) for t in tokens], batch_size=16, shuffle=True)


def _setup(kind: str):
    if kind == "convnet":
        dm = DigitsDataModule(image_size=16, batch_size=64, augment="none")
        dm.setup("fit")
        x, y = next(iter(dm.train_dataloader()))
        model = _convnet()
        return model, (((x.float() / 255.0 - 0.5) / 0.5), y), lambda m, b: m.compute_loss(m(b[0]), b[1]), \
            lambda: dict(datamodule=DigitsDataModule(image_size=16, batch_size=64, augment="none"))
    model = _LM()
    return model, next(iter(model.train_dataloader())), lambda m, b: m.probe_loss(b), lambda: {}


def probe_cost(kind: str, repeats: int) -> dict[str, float]:
    model, batch, loss_of, _ = _setup(kind)
    model.train()
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer

    def step():
        optimizer.zero_grad()
        loss_of(model, batch).backward()
        optimizer.step()

    monitor = CurvatureMonitor()
    monitor._probe_batch = batch  # as captured from the first training batch (equal batch)
    for _ in range(3):
        step()
    monitor.probe(model, optimizer)  # cold start; the probes below are warm, as in training
    steps, probes = [], []
    for _ in range(repeats):
        steps.append(_timed(step))
        probes.append(_timed(lambda: monitor.probe(model, optimizer)))
    step_s, probe_s = statistics.median(steps), statistics.median(probes)
    return {"step_ms": 1e3 * step_s, "probe_ms": 1e3 * probe_s, "steps": probe_s / step_s,
            "products": monitor.iterations}  # the directional curvature takes no product of its own


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class _StepTimes(Callback):
    """Wall time of every training batch, hooks included (placed after the monitor: its probes are inside)."""

    def __init__(self, monitor: CurvatureMonitor) -> None:
        self.monitor, self.plain, self.probed = monitor, [], []

    def on_train_batch_start(self, *args) -> None:
        self._probes, self._start = self.monitor.probes, time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        elapsed = time.perf_counter() - self._start
        (self.probed if self.monitor.probes > self._probes else self.plain).append(elapsed)


def amortized_cost(kind: str, steps: int) -> dict[str, float]:
    """One Lightning fit with the default monitor: each probing step's extra time over a median plain step, summed,
    as a fraction of the fit's time without it (all from the same fit, so a busy machine shifts both alike)."""
    model, _, _, data = _setup(kind)
    pl.seed_everything(0, verbose=False)
    monitor = CurvatureMonitor()
    timer = _StepTimes(monitor)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[monitor, timer], max_epochs=-1)
    start = time.perf_counter()
    trainer.fit(model, **data())
    total = time.perf_counter() - start
    step = statistics.median(timer.plain)
    extra = [t - step for t in timer.probed]
    return {"fit_s": total, "step_ms": 1e3 * step, "probes": len(extra), "overhead": sum(extra) / (total - sum(extra)),
            "cold_steps": extra[0] / step, "warm_steps": statistics.median(extra[1:]) / step if extra[1:] else None,
            "steady": statistics.median(extra[1:]) / (monitor.every_n_steps * step) if extra[1:] else None,
            "every_n_steps": monitor.every_n_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--fit-steps", type=int, default=None, help="steps of each fit (default: 3 probe intervals)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["accuracy", "cost", "fit"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    if "accuracy" not in args.skip:
        result = accuracy()
        print(f"accuracy, tiny demo transformer LM ({result['params']} parameters), products to 2% of the dense value")
        for key, value in result["cold"].items():
            print(f"  cold: {key}: {value}")
        for i, row in enumerate(result["warm"]):
            print(f"  warm probe {i + 1} (10 SGD steps later): {row}")
    steps = args.fit_steps or 3 * CurvatureMonitor().every_n_steps
    print("\n| model | step | default probe, warm | per-probe cost (equal batch) |")
    print("|---|---:|---:|---:|")
    for kind in () if "cost" in args.skip else ("convnet", "lm"):
        cost = probe_cost(kind, args.repeats)
        print(f"| {kind} | {cost['step_ms']:.1f} ms | {cost['probe_ms']:.1f} ms ({cost['products']} products) | "
              f"{cost['steps']:.1f} steps |")
    print(f"\n| model | fit ({steps} steps) | step | probes | cold probe | warm probe | amortized, this fit | "
          "amortized, warm probes every N |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind in () if "fit" in args.skip else ("convnet", "lm"):
        fit = amortized_cost(kind, steps)
        warm = f"{fit['warm_steps']:.1f} steps" if fit["warm_steps"] is not None else "-"
        steady = f"{100 * fit['steady']:.2f}% (N = {fit['every_n_steps']})" if fit["steady"] is not None else "-"
        print(f"| {kind} | {fit['fit_s']:.1f} s | {fit['step_ms']:.1f} ms | {fit['probes']} | "
              f"{fit['cold_steps']:.1f} steps | {warm} | {100 * fit['overhead']:.2f}% | {steady} |")

if __name__ == "__main__":
    main()
