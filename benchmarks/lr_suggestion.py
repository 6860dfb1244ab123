"""The curvature learning-rate suggestion against Lightning's ``Tuner.lr_find`` and the recipe's own rate.

For each shipped recipe and seed: (a) the recipe's rate, (b) ``Tuner(trainer).lr_find`` (its ``suggestion()``, the
steepest descent of the smoothed loss over ``--lr-find-steps`` exponentially growing rates), (c)
:func:`traincraft.optim.suggest_learning_rate` (half the stability limit from λ_max of the step's curvature after
10 warm-up steps). Each rate then trains the recipe's model from the same initialization for a fixed budget of
``--epochs`` epochs (the cosine schedule's ``T_max`` set to that budget, so every run anneals fully) and the test
accuracy of the final weights is reported, with the seconds each suggestion took. The trainer runs without
logger and without the recipe's callbacks (the monitors do not change training; GradientClipping would, and is
off for all three), on the CPU.

    .venv/bin/python benchmarks/lr_suggestion.py [--recipes digits_convnet ...] [--seeds 0 1 2] [--epochs 3]
        [--lr-find-steps 100] [--batches 1] [--iterations 10]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import tempfile
import time
import warnings
from typing import Any, Optional

os.environ.setdefault("WANDB_MODE", "offline")

from lightning.pytorch.tuner import Tuner  # noqa: E402

from traincraft.cli import TraincraftCLI  # noqa: E402
from traincraft.optim import suggest_learning_rate  # noqa: E402

RECIPES = ["digits_convnet", "digits_alexnet_small", "digits_alexnet_two_column_small"]


def _build(recipe: str, seed: int, epochs: int, work: str, lr: Optional[float] = None) -> TraincraftCLI:
    args = [f"--config={recipe}", f"--seed_everything={seed}", "--trainer.logger=false", "--trainer.callbacks=[]",
            f"--trainer.max_epochs={epochs}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={work}",
            f"--checkpoint.dirpath={work}/checkpoints", f"--model.scheduler.init_args.T_max={epochs}"]
    if lr is not None:
        args.append(f"--model.optimizer.init_args.lr={lr!r}")
    with contextlib.redirect_stdout(io.StringIO()):
        return TraincraftCLI(args=args, run=False)


def _recipe_lr(cli: TraincraftCLI) -> float:
    return float(cli.model.configure_optimizers()["optimizer"].defaults["lr"])


def _accuracy(recipe: str, seed: int, epochs: int, work: str, lr: float) -> float:
    cli = _build(recipe, seed, epochs, work, lr)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (results,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return 100.0 * float(results["test/acc"])


def run(recipe: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as work:
        cli = _build(recipe, seed, args.epochs, work)
        own = _recipe_lr(cli)
        start = time.perf_counter()
        finder = Tuner(cli.trainer).lr_find(cli.model, datamodule=cli.datamodule, num_training=args.lr_find_steps,
                                            update_attr=False)
        found = finder.suggestion() if finder is not None else None
        lr_find_s = time.perf_counter() - start
        cli = _build(recipe, seed, args.epochs, work)
        curvature = suggest_learning_rate(cli.model, cli.datamodule, batches=args.batches,
                                          iterations=args.iterations, seed=seed)
        row: dict[str, Any] = {"recipe": recipe, "seed": seed, "own_lr": own, "lr_find_lr": found,
                               "lr_find_s": lr_find_s, "curv_lr": curvature.lr, "curv_threshold": curvature.threshold_lr,
                               "curv_s": curvature.seconds}
        row["own_acc"] = _accuracy(recipe, seed, args.epochs, work, own)
        row["lr_find_acc"] = _accuracy(recipe, seed, args.epochs, work, found) if found else float("nan")
        row["curv_acc"] = _accuracy(recipe, seed, args.epochs, work, curvature.lr)
    return row


def _table(rows: list[dict[str, Any]], epochs: int) -> str:
    lines = ["| recipe | seed | recipe lr: acc | lr_find: lr, acc, s | curvature: lr (limit), acc, s |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['seed']} | {r['own_lr']:.3g}: {r['own_acc']:.2f}% | "
                     f"{r['lr_find_lr'] or float('nan'):.3g}, {r['lr_find_acc']:.2f}%, {r['lr_find_s']:.0f} | "
                     f"{r['curv_lr']:.3g} ({r['curv_threshold']:.3g}), {r['curv_acc']:.2f}%, {r['curv_s']:.0f} |")
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        med = {k: statistics.median(r[k] for r in mine) for k in ("own_acc", "lr_find_acc", "curv_acc", "lr_find_s",
                                                                  "curv_s")}
        lines.append(f"| {recipe} | median | {med['own_acc']:.2f}% | {med['lr_find_acc']:.2f}%, "
                     f"{med['lr_find_s']:.0f} s | {med['curv_acc']:.2f}%, {med['curv_s']:.0f} s |")
    return "\n".join(lines) + f"\n\ntest accuracy of the final weights after {epochs} epoch(s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=RECIPES, help="shipped recipe names")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3, help="the fixed training budget of every rate")
    parser.add_argument("--lr-find-steps", type=int, default=100, help="lr_find's num_training (Lightning: 100)")
    parser.add_argument("--batches", type=int, default=1, help="suggest_learning_rate's batches")
    parser.add_argument("--iterations", type=int, default=10, help="suggest_learning_rate's Lanczos iterations")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    rows = []
    for recipe in args.recipes:
        for seed in args.seeds:
            rows.append(run(recipe, seed, args))
            print(f"done: {rows[-1]}", flush=True)
    print(_table(rows, args.epochs))


if __name__ == "__main__":
    main()
