"""Health report speed: build and write the report of a 100,000-step run from its Lightning ``metrics.csv``.

    .venv/bin/python benchmarks/report_speed.py --steps 100000 --log-every 10 --repeats 3
    .venv/bin/python benchmarks/report_speed.py --steps 100000 --log-every 1 --repeats 3   # every step logged

The run is synthetic but laid out as Lightning's ``CSVLogger`` writes it (with the ``csv`` module: ``\\r\\n`` line
ends): one column per key (sorted, ``epoch`` and ``step`` among them) and sparse rows, one per ``log_metrics`` call, each holding only the keys logged together
(training keys on logging steps, the curvature probe every 1200 steps, validation keys once an epoch). The keys
are those traincraft's callbacks log for the default recipe's model (``convnet`` with channels 32/64/128 and
BatchNorm, AdamW) with every monitor on: ``GradientClipping`` (per-tensor norms and the depth profile),
``LearningRateMonitor`` (effective rate, update ratio, oscillation), ``CovariateShiftMonitor`` (train and
validation), ``CurvatureMonitor``, ``DataDriftMonitor``, ``DataParallelStrategy``'s communication and straggler
keys, and ``ImageClassifier``'s loss and accuracy. Values follow plausible curves (decaying loss, cosine rate,
log-normal gradient norms with a depth slope) with noise, written as float32 values read back in Python, as
Lightning writes them.

Timed (wall clock, and the process's CPU time), median of ``--repeats`` (one untimed warm-up build first, so imports and matplotlib's font cache are not
counted): reading the file (``read_run``), the diagnoses (``diagnose``), the panels (``draw_panels``) and writing
``report.html``, the PNGs and ``diagnoses.json`` (``Report.write``): together, what ``traincraft report RUN`` does.
Target: under 10 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

_CURVATURE_EVERY = 1200  # CurvatureMonitor's default every_n_steps
_CURVATURE_KEYS = ("directional", "eta_lambda", "eta_opt", "lambda_max", "lambda_min", "negative_ratio", "saddle",
                   "stability_ratio", "threshold")
_DRIFT_KEYS = ("detected", "ks_features", "ks_pvalue_min", "ks_stat_max", "n_current", "n_reference")
_LR = "lr-AdamW/default"
_LR_EXTRAS = ("effective_lr_max", "effective_lr_mean", "effective_lr_min", "sign_flip", "update_cosine",
              "update_ratio")
_DDP_KEYS = ("comm/bytes", "comm/wire_bytes", "comm/data/all_reduce_bytes", "comm/data/all_reduce_wire_bytes",
             "ddp/step_time_median", "ddp/step_time_max", "ddp/step_time_spread", "ddp/grad_sq_norm",
             "ddp/grad_variance", "ddp/noise_scale")


def _model_names() -> tuple[list[str], list[tuple[str, str]]]:
    """Parameter names, and (layer, kind) of the layers CovariateShiftMonitor watches, of the default recipe."""
    from torch import nn

    from traincraft.modules import ImageClassifier

    module = ImageClassifier("convnet", num_classes=10, in_channels=1, input_size=32,
                             model_kwargs={"channels": [32, 64, 128], "norm": "batch", "activation": "relu"})
    params = [name for name, _ in module.named_parameters()]
    layers = [(name, "relu" if isinstance(m, nn.ReLU) else "bn") for name, m in module.named_modules()
              if isinstance(m, (nn.ReLU, nn.BatchNorm2d))]
    return params, layers


def _covshift(stage: str, layers: list[tuple[str, str]]) -> list[str]:
    keys = []
    for layer, kind in layers:
        extra = ("dead_frac",) if kind == "relu" else ("bn_mean_gap", "bn_var_ratio")
        keys += [f"covshift/{stage}/{layer}/{stat}" for stat in ("mean", "std", "p15", "p50", "p85", "w2_drift",
                                                                 *extra)]
    return keys


def _curve(key: str, steps: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """A plausible value of ``key`` at ``steps``: a trend from the key's meaning, times or plus noise."""
    t = steps / max(total, 1)
    noise = rng.standard_normal(steps.shape)
    if key.startswith("val/") or key.endswith("_epoch"):
        noise = noise / 10  # averaged over an epoch
    lr = 3e-3 * 0.5 * (1 + np.cos(np.pi * t))
    if key == _LR:
        return lr
    if key.startswith(_LR + "-"):
        base = {"effective_lr_max": 50 * lr, "effective_lr_mean": 3 * lr, "effective_lr_min": 0.01 * lr,
                "sign_flip": 0.45 + 0.02 * noise, "update_cosine": 0.05 + 0.05 * noise,
                "update_ratio": 1e-3 * (lr / 3e-3 + 0.02) * np.exp(0.1 * noise)}
        return base[key.rsplit("-", 1)[1]]
    if key == "train/nonfinite_steps":
        return np.zeros_like(t)
    if "loss" in key:
        return 0.1 + 2.2 * np.exp(-8 * t) + 0.05 * np.abs(noise) + (0.05 if key.startswith("val") else 0)
    if "acc" in key:
        return np.clip(0.99 - 0.89 * np.exp(-8 * t) + 0.01 * noise, 0, 1)
    if key.startswith("grad/norm/"):
        depth = zlib.crc32(key.encode()) % 7 / 7  # a fixed per-tensor scale
        return np.exp(-1.0 - depth + 0.3 * noise)
    if key in ("grad/norm_pre", "grad/norm_post"):
        pre = np.exp(0.4 * noise) * (1 + 2 * np.exp(-10 * t))
        return pre if key.endswith("pre") else np.minimum(pre, 1.0)
    if key.startswith("grad/"):
        return {"grad/clip_coef": np.minimum(1, 1 / np.exp(0.4 * noise)), "grad/clipped_frac": np.abs(0.1 * noise),
                "grad/threshold": np.ones_like(t), "grad/skipped_steps": np.zeros_like(t),
                "grad/depth_slope": -0.05 + 0.02 * noise}[key]
    if key.startswith("curvature/"):
        sharp = 200 + 400 * t + 20 * noise
        return {"lambda_max": sharp, "lambda_min": -0.02 * sharp, "eta_opt": 1 / sharp, "directional": 0.3 * sharp,
                "negative_ratio": 0.02 + 0 * t, "saddle": 0 * t, "eta_lambda": 0.8 + 0.1 * noise,
                "threshold": 38.0 + 0 * t, "stability_ratio": (0.8 + 0.1 * noise) / 38}[key.split("/")[1]]
    if key.startswith("drift/"):
        return {"detected": 0 * t, "ks_features": 0 * t, "ks_pvalue_min": np.clip(0.5 + 0.3 * noise, 0.01, 1),
                "ks_stat_max": 0.05 + 0.01 * np.abs(noise), "n_current": 2048 + 0 * t,
                "n_reference": 2048 + 0 * t}[key.split("/")[1]]
    if key.startswith(("comm/", "ddp/")):
        name = key.rsplit("/", 1)[1]
        if name.endswith("bytes"):
            return 4 * 617_802 + 0 * t  # fp32 gradients of the default model; 2 ranks: wire bytes = payload
        return {"step_time_median": 0.05 * np.exp(0.05 * noise), "step_time_max": 0.055 * np.exp(0.05 * noise),
                "step_time_spread": 1.1 + 0.03 * np.abs(noise), "grad_sq_norm": 0.5 * np.exp(-3 * t),
                "grad_variance": 40 + 5 * noise, "noise_scale": 80 * np.exp(3 * t)}[name]
    stat = key.rsplit("/", 1)[1]  # covshift/<stage>/<layer>/<stat>
    return {"mean": 0.3 + 0.05 * noise, "std": 0.8 + 0.05 * noise, "p15": -0.5 + 0.05 * noise, "p50": 0.1 * noise,
            "p85": 1.0 + 0.05 * noise, "w2_drift": 0.01 * np.abs(noise), "dead_frac": 0.5 + 0.05 * noise,
            "bn_mean_gap": 0.1 * np.abs(noise), "bn_var_ratio": 1 + 0.05 * noise}[stat]


def write_run(path: Path, steps: int, log_every: int, steps_per_epoch: int, seed: int = 0) -> tuple[int, int]:
    """Write a Lightning-CSVLogger-shaped ``metrics.csv`` of a ``steps``-step run; returns (rows, columns)."""
    rng = np.random.default_rng(seed)
    params, layers = _model_names()
    train_keys = (["train/loss_step", "train/acc_step", "train/acc_top5_step", "train/nonfinite_steps",
                   "grad/norm_pre", "grad/norm_post", "grad/clip_coef", "grad/clipped_frac", "grad/threshold",
                   "grad/skipped_steps", "grad/depth_slope", _LR, *[f"{_LR}-{x}" for x in _LR_EXTRAS],
                   *[f"grad/norm/{p}" for p in params], *_covshift("train", layers), *_DDP_KEYS])
    epoch_keys = ["val/loss", "val/acc", "val/acc_top5", "train/loss_epoch", "train/acc_epoch", "train/acc_top5_epoch",
                  *[f"drift/{k}" for k in _DRIFT_KEYS], *_covshift("val", layers)]
    curvature_keys = [f"curvature/{k}" for k in _CURVATURE_KEYS]
    # one block of rows per kind of log_metrics call; Lightning logs at global_step + 1 multiples, less one
    blocks = [(np.arange(log_every - 1, steps, log_every), train_keys),
              (np.arange(_CURVATURE_EVERY - 1, steps, _CURVATURE_EVERY), curvature_keys),
              (np.arange(steps_per_epoch - 1, steps, steps_per_epoch), epoch_keys)]
    columns = sorted({"epoch", "step", *train_keys, *epoch_keys, *curvature_keys})
    where = {key: i for i, key in enumerate(columns)}
    parts = []
    for at, keys in blocks:
        table = np.full((at.size, len(columns)), np.nan)
        for key in keys:  # float32 as logged, then float64 as Python writes it
            table[:, where[key]] = _curve(key, at, steps, rng).astype(np.float32)
        table[:, where["step"]] = at
        table[:, where["epoch"]] = at // steps_per_epoch
        parts.append(table)
    table = np.concatenate(parts)
    table = table[np.argsort(table[:, where["step"]], kind="stable")]  # rows in the order they were logged
    integer = {where["step"], where["epoch"]}
    text = [[("" if v != v else str(int(v)) if j in integer else repr(v)) for v in table[:, j].tolist()]
            for j in range(len(columns))]
    with path.open("w", encoding="utf-8", newline="") as out:  # csv's line ending, as CSVLogger writes it
        out.write(",".join(columns) + "\r\n")
        out.writelines(",".join(row) + "\r\n" for row in zip(*text, strict=True))
    return table.shape[0], len(columns)


def _timed(csv: Path, out: Path) -> dict[str, float]:
    from traincraft.report import Report, read_run
    from traincraft.report.diagnoses import diagnose
    from traincraft.report.panels import draw_panels

    times = {}
    cpu = time.process_time()
    start = time.perf_counter()
    run = read_run(csv)
    times["read"] = time.perf_counter() - start
    start = time.perf_counter()
    diagnoses = diagnose(run)
    times["diagnoses"] = time.perf_counter() - start
    start = time.perf_counter()
    panels, left_out = draw_panels(run)
    times["panels"] = time.perf_counter() - start
    start = time.perf_counter()
    Report(run, diagnoses, panels, left_out).write(out)
    times["write"] = time.perf_counter() - start
    times["total"] = sum(times.values())
    times["cpu"] = time.process_time() - cpu  # on a busy machine, closer than wall time to what an idle one takes
    times["n_panels"], times["n_diagnoses"], times["n_keys"] = len(panels), len(diagnoses), len(run.series)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000, help="training steps of the run")
    parser.add_argument("--log-every", type=int, default=10, help="the Trainer's log_every_n_steps")
    parser.add_argument("--steps-per-epoch", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="write the csv and the report here (else a tmp dir)")
    args = parser.parse_args()
    for name in ("steps", "log_every", "steps_per_epoch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        csv = root / "metrics.csv"
        start = time.perf_counter()
        rows, columns = write_run(csv, args.steps, args.log_every, args.steps_per_epoch)
        print(f"wrote {csv}: {args.steps:,} steps, log_every_n_steps={args.log_every}, {rows:,} rows x {columns} "
              f"columns, {csv.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s")
        _timed(csv, root / "warmup")  # imports, matplotlib's font cache: not what a report costs
        runs = [_timed(csv, root / f"report{i}") for i in range(args.repeats)]
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    print(f"{int(median['n_keys'])} keys, {int(median['n_panels'])} panels, {int(median['n_diagnoses'])} diagnoses")
    print("| steps | log every | rows | read (s) | diagnoses (s) | panels (s) | write (s) | total (s) | CPU (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.steps:,} | {args.log_every} | {rows:,} | {median['read']:.2f} | {median['diagnoses']:.2f} | "
          f"{median['panels']:.2f} | {median['write']:.2f} | {median['total']:.2f} | {median['cpu']:.2f} |")
    verdict = "under" if median["total"] < 10 else "OVER"
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs" if hasattr(os, "getloadavg") else ""
    print(f"report of a {args.steps:,}-step run: {median['total']:.2f} s wall (median of {args.repeats}{load}), "
          f"{verdict} the 10 s target")


if __name__ == "__main__":
    main()
