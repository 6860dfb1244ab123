"""Every GPU check in one command: the GPU-marked tests and the GPU benchmarks, one JSON and one markdown table.

    .venv/bin/python benchmarks/gpu_check.py [--out runs/gpu_check]    # or: make gpu-check
    .venv/bin/python benchmarks/gpu_check.py --dry-run                 # what it would run, on any machine

Without a CUDA device it prints one line and exits 0. Checks, in order (budgets sum to under 8 minutes):

- gpu-tests: ``pytest -m gpu`` (the tests that are skipped on CPU);
- presets: images/s of the ``alexnet`` (uint8 256x256 in, 224 crops out) and ``cifar`` presets, batch 256;
- datamodule: images/s of a full ImageDataModule (in-memory uint8 CIFAR-sized images, loader workers, pinned
  memory, transfer, the ``cifar`` preset on the device, normalization) inside a Lightning fit of a module that
  does no work;
- augment-share: the share of an AlexNet training step (batch 256, the ``alexnet`` preset) spent in the
  DataModule's on-device transform (augmentation and normalization);
- fp16-guard: ``precision="16-mixed"`` with GradientClipping: non-finite batches leave weights, optimizer state
  and BatchNorm buffers bit-identical, and the step time with the callback against the step time without;
- ddp-bytes: NCCL DDP bytes and step time (``benchmarks/data_parallel.py --accelerator gpu``; 2 devices);
- column-parallel: the column-parallel step against DDP (``benchmarks/column_parallel.py --accelerator gpu
  --skip bytes``; 2 devices).

``--device cpu --tiny`` rehearses the in-process checks on the CPU at toy sizes (fp16 autocast with a CPU
GradScaler): that is how their code is tested on machines without a GPU. The figures come from one run; timings
synchronize the device around each measured interval.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _throughput(fn: Callable[[], object], batch: int, device: torch.device, repeats: int) -> float:
    for _ in range(2):  # warm-up: kernels compiled, allocator primed
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return batch * repeats / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- in-process checks
def check_presets(device: torch.device, tiny: bool) -> dict:
    from traincraft.augment import alexnet, cifar

    batch, repeats = (8, 3) if tiny else (256, 20)
    figures = {}
    for name, side, pipeline in (("cifar", 32, cifar()), ("alexnet", 256, alexnet())):
        pipeline = pipeline.to(device)
        if name == "alexnet":  # normally fitted from the training split by the DataModule
            basis = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))[0]
            pipeline[1].set_principal_components(torch.tensor([0.06, 0.006, 0.001]), basis)
            pipeline = pipeline.to(device)
        images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, device=device)
        with torch.no_grad():
            rate = _throughput(lambda p=pipeline, x=images: p(x.float().mul_(1 / 255)), batch, device, repeats)
        figures[f"{name} images/s (batch {batch}, {side}x{side} uint8 in)"] = rate
    return figures


def _synthetic_datamodule(side: int, samples: int, batch: int, augment, workers: int, classes: int = 10):
    from traincraft.data import ImageDataModule
    from traincraft.data._tensor_dataset import TensorImageDataset

    class Synthetic(ImageDataModule):
        """In-memory random uint8 images: the loader, transfer and device-side work of a real DataModule."""

        num_classes, in_channels, image_size = classes, 3, side

        def build_datasets(self):
            g = torch.Generator().manual_seed(0)
            images = torch.randint(0, 256, (samples, 3, side, side), dtype=torch.uint8, generator=g)
            return {"train": TensorImageDataset(images, torch.randint(0, classes, (samples,), generator=g))}

        def transform(self, images):  # times the on-device transform (training batches only)
            if self.trainer is None or not self.trainer.training:
                return super().transform(images)
            _sync(images.device)
            start = time.perf_counter()
            out = super().transform(images)
            _sync(images.device)
            self.transform_s.append(time.perf_counter() - start)
            return out

    dm = Synthetic(batch_size=batch, num_workers=workers, augment=augment, seed=0)
    dm.transform_s = []
    return dm


def _timed_fit(module, datamodule, device: torch.device, steps: int, precision: str = "32-true", callbacks=(),
               plugins=None) -> list[float]:
    """Intervals between consecutive training-batch ends (device synchronized), the first 3 dropped."""
    import lightning.pytorch as pl

    ends: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_end(self, *args) -> None:
            _sync(device)
            ends.append(time.perf_counter())

    trainer = pl.Trainer(accelerator=device.type, devices=1, max_steps=steps, max_epochs=-1, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Clock(), *callbacks],
                         **({"plugins": plugins} if plugins else {"precision": precision}))
    trainer.fit(module, datamodule=datamodule)
    return [b - a for a, b in zip(ends[3:], ends[4:], strict=False)]


def check_datamodule(device: torch.device, tiny: bool) -> dict:
    import lightning.pytorch as pl

    from traincraft.augment import cifar

    batch, steps, workers = (16, 10, 0) if tiny else (256, 120, 6)

    class Sink(pl.LightningModule):
        """Touches every image (a mean) and nothing else: the fit is as fast as the data arrive."""

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            return batch[0].mean() * self.w

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = _synthetic_datamodule(32, 8 * batch, batch, cifar(), workers)
    intervals = _timed_fit(Sink(), dm, device, steps)
    return {f"images/s (batch {batch}, {workers} workers, cifar preset)": batch / statistics.median(intervals),
            "transform ms/batch": 1e3 * statistics.median(dm.transform_s)}


def check_augment_share(device: torch.device, tiny: bool) -> dict:
    from traincraft.augment import alexnet
    from traincraft.modules import ImageClassifier

    if tiny:  # the same code at toy sizes: 40x40 in, 32 crops, a ConvNet
        batch, steps, side, pipeline, model, classes = 8, 8, 40, alexnet(40, 60, 32), "convnet", 10
    else:
        batch, steps, side, pipeline, model, classes = 256, 30, 256, alexnet(), "alexnet", 1000
    dm = _synthetic_datamodule(side, 4 * batch, batch, pipeline, 0 if tiny else 6, classes=classes)
    module = ImageClassifier(model, num_classes=classes, in_channels=3, input_size=dm.model_input_size,
                             optimizer=lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9))
    precision = "32-true" if tiny else "bf16-mixed"
    intervals = _timed_fit(module, dm, device, steps, precision=precision)
    step, transform = statistics.median(intervals), statistics.median(dm.transform_s[3:])
    return {"model": f"{model}, batch {batch}, {side}x{side} uint8 in, {precision}", "step ms": 1e3 * step,
            "transform ms": 1e3 * transform, "share of the step": transform / step}


def check_fp16_guard(device: torch.device, tiny: bool) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins import MixedPrecision
    from torch.utils.data import TensorDataset

    from traincraft.callbacks import GradientClipping

    batch, steps, width = (16, 12, 8) if tiny else (256, 60, 64)
    poisoned = {4, 9}

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            if batch_idx in poisoned:  # an overflow in the forward pass: non-finite loss and gradients
                x = x * float("inf")
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Witness(pl.Callback):
        """Copies weights, BatchNorm buffers and optimizer state around each poisoned batch (a benchmark may sync)."""

        def __init__(self) -> None:
            self.same: list[bool] = []

        def _state(self, trainer, module):
            opt = trainer.optimizers[0].state_dict()["state"]
            return [t.detach().clone() for t in module.state_dict().values()] + [
                v.clone() for s in opt.values() for v in s.values() if torch.is_tensor(v)]

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self._before = self._state(trainer, module) if batch_idx in poisoned else None

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if self._before is not None:
                after = self._state(trainer, module)
                self.same.append(len(after) == len(self._before) and all(
                    torch.equal(a, b) for a, b in zip(self._before, after, strict=True)))

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(steps * batch, 3, 32, 32, generator=g), torch.randint(0, 10, (steps * batch,)))

    def precision():  # fp16 autocast on the CPU too, with a CPU GradScaler (Lightning would switch to bf16)
        if device.type == "cuda":
            return None
        return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]

    def fit(callbacks):
        return _timed_fit(Net(), pl.LightningDataModule.from_datasets(data, batch_size=batch), device, steps,
                          precision="16-mixed", callbacks=callbacks, plugins=precision())

    witness, control = Witness(), Witness()
    guarded = fit([GradientClipping(threshold=1.0), witness])
    plain = fit([control])
    clean = [i for i in range(len(guarded)) if i + 4 not in poisoned and i + 3 not in poisoned]  # healthy intervals
    ratio = statistics.median(guarded[i] for i in clean) / statistics.median(plain[i] for i in clean)
    return {"poisoned batches": len(poisoned), "left bit-identical": sum(witness.same),
            "left bit-identical without GradientClipping (BatchNorm sees the overflow)": sum(control.same),
            "step time with GradientClipping / without": ratio}


# ---------------------------------------------------------------------------------------------- subprocess checks
def _run(command: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def _pytest_gpu(out: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"]


def _data_parallel(out: Path) -> list[str]:
    return [sys.executable, "benchmarks/data_parallel.py", "--accelerator", "gpu", "--repeats", "3", "--steps", "30",
            "--variants", "ddp", "traincraft_ddp", "traincraft_ddp_powersgd", "--out", str(out / "ddp_nccl.json")]


def _column_parallel(out: Path) -> list[str]:
    return [sys.executable, "benchmarks/column_parallel.py", "--accelerator", "gpu", "--rounds", "3", "--steps",
            "12", "--skip", "bytes", "--out", str(out / "column_parallel_gpu.json")]


def _figures_of(name: str, done: subprocess.CompletedProcess, out: Path) -> dict:
    if name == "gpu-tests":
        counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", done.stdout))
        return {"pytest exit code": done.returncode, **counts}
    if name == "ddp-bytes":
        figures = json.loads((out / "ddp_nccl.json").read_text())
        return {f"{k} all-reduce B/step": v.get("comm/data/all_reduce_bytes") for k, v in figures["metrics"].items()}
    summary = json.loads((out / "column_parallel_gpu.json").read_text())["speed"]
    return {"median step ms, column-parallel": 1e3 * summary["median_step_s"]["column_parallel"],
            "median step ms, DDP": 1e3 * summary["median_step_s"]["ddp"], "ratio": summary["ratio"]}


# name: (what it measures, budget in seconds, in-process function or command builder, devices needed)
CHECKS: dict[str, tuple[str, int, Callable, int]] = {
    "gpu-tests": ("pytest -m gpu: the GPU-marked tests", 150, _pytest_gpu, 1),
    "presets": ("images/s of the alexnet and cifar presets, batch 256, one device", 30, check_presets, 1),
    "datamodule": ("loader + augmentation images/s of a full ImageDataModule (cifar preset)", 45, check_datamodule, 1),
    "augment-share": ("share of an AlexNet step (batch 256) spent in the on-device transform", 60,
                      check_augment_share, 1),
    "fp16-guard": ("16-mixed AMP with GradientClipping: poisoned steps bit-identical, step-time ratio", 45,
                   check_fp16_guard, 1),
    "ddp-bytes": ("NCCL DDP: all-reduce bytes/step (plain, PowerSGD) and step time", 75, _data_parallel, 2),
    "column-parallel": ("column-parallel step vs DDP, small AlexNet, NCCL", 75, _column_parallel, 2),
}
SUBPROCESS = {"gpu-tests", "ddp-bytes", "column-parallel"}


def plan(out: Path) -> list[str]:
    lines = []
    for name, (what, budget, fn, devices) in CHECKS.items():
        how = " ".join(fn(out)) if name in SUBPROCESS else f"in process: {Path(__file__).name}:{fn.__name__}"
        lines.append(f"{name:<16} {budget:>4} s  {devices} device(s)  {what}\n{'':<16}        {how}")
    return lines


def run_checks(names: list[str], device: torch.device, tiny: bool, out: Path) -> list[dict]:
    rows = []
    for name in names:
        what, budget, fn, devices = CHECKS[name]
        start, row = time.perf_counter(), {"check": name, "what": what, "budget_s": budget}
        available = torch.cuda.device_count() if device.type == "cuda" else 0
        try:
            if name in SUBPROCESS:
                if device.type != "cuda" or available < devices:
                    row.update(status="skipped", reason=f"needs {devices} CUDA device(s); found {available}")
                else:
                    done = _run(fn(out), timeout=2 * budget)
                    row.update(status="ok" if done.returncode == 0 else "failed", figures=_figures_of(name, done, out))
                    if done.returncode != 0:
                        row["error"] = (done.stdout + done.stderr)[-2000:]
            else:
                row.update(status="ok", figures=fn(device, tiny))
        except Exception as error:  # one broken check must not hide the others' figures
            row.update(status="failed", error=f"{type(error).__name__}: {error}"[-2000:])
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(f"{name}: {row['status']} in {row['seconds']:.0f} s", flush=True)
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| check | status | figure | value | time (s) / budget |", "|---|---|---|---:|---:|"]
    for row in rows:
        figures = row.get("figures") or {"": row.get("reason") or row.get("error", "")[:200].replace("\n", " ")}
        for i, (key, value) in enumerate(figures.items()):
            shown = (f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}") if isinstance(value, float) else str(value)
            first = (row["check"], row["status"]) if i == 0 else ("", "")
            timing = f"{row['seconds']:.0f} / {row['budget_s']}" if i == 0 else ""
            lines.append(f"| {first[0]} | {first[1]} | {key} | {shown} | {timing} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="folder for gpu_check.json/.md")
    parser.add_argument("--dry-run", action="store_true", help="list the checks and their commands; run nothing")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), help="run these checks only")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a rehearsal")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a CPU rehearsal of the code paths)")
    args = parser.parse_args(argv)
    names = args.only or list(CHECKS)
    if args.dry_run:
        print(f"gpu_check would run {len(names)} checks (budget {sum(CHECKS[n][1] for n in names)} s of "
              f"{BUDGET_S} s), writing {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}:")
        print("\n".join(line for line in plan(args.out) if line.split()[0] in names))
        return 0
    device = torch.device(args.device)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # the table is the output, not Lightning's tips
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing measured (run it where `nvidia-smi` lists a GPU).")
        return 0
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU rehearsal ({os.cpu_count()} cores)"
    header = f"gpu_check on {name}, torch {torch.__version__}{', toy sizes' if args.tiny else ''}"
    print(header, flush=True)
    out = args.out.resolve()
    with tempfile.TemporaryDirectory() as work:  # Lightning's files of the in-process fits
        here = os.getcwd()
        os.chdir(work)
        try:
            rows = run_checks(names, device, args.tiny, out)
        finally:
            os.chdir(here)
    total = sum(row["seconds"] for row in rows)
    report = {"device": name, "torch": torch.__version__, "tiny": args.tiny, "total_s": total,
              "within_budget": total <= BUDGET_S, "checks": rows}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    table = markdown(rows, f"{header}: {total:.0f} s in all (budget {BUDGET_S} s)")
    (args.out / "gpu_check.md").write_text(table)
    print(table)
    return 1 if any(row["status"] == "failed" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
