"""Target of the foundation: the default `traincraft fit` reaches >= 98.5% test accuracy (median of 3 seeds)
within 60 s of wall time on a 2-core CPU machine, start-up included.

Each seed runs `examples/demo.py --seed_everything SEED` (= `traincraft fit` with the default recipe, then a test
of the best checkpoint) in a fresh process; wall time is measured around the whole process and, separately, up to
the end of `fit` (what the target counts), as the demo reports it.

    .venv/bin/python benchmarks/default_recipe.py [--seeds 0 1 2] [--config examples/configs/FILE.yaml]
    .venv/bin/python benchmarks/default_recipe.py --compare-plain [--max-epochs 2]

With --config the same measurement is made for another recipe (the 60 s target is the default recipe's).
With --compare-plain each seed also runs with ``--trainer.callbacks=[]`` (a plain Lightning fit: no monitors, no
guard, no health report), the two fits of a seed back to back in alternating order, and the cost of the monitors is
printed as ratios of fit wall time and of the process's CPU time (user + system, less sensitive than wall time to
other programs sharing the machine).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(seed: int, extra: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "demo.py"), f"--seed_everything={seed}",
             "--trainer.enable_progress_bar=false", *extra],
            cwd=work, env=env, capture_output=True, text=True,
        )
        if done.returncode != 0:
            sys.exit(f"seed {seed} {' '.join(extra)}: the demo failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        process = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    acc = float(re.search(r"test accuracy\s*:\s*([\d.]+)%", done.stdout).group(1))
    fit = float(re.search(r"fit wall time\s*:\s*([\d.]+) s", done.stdout).group(1))
    found = re.search(r"diagnoses\s*:\s*(\d+)", done.stdout)
    cpu_s = (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)
    return {"seed": seed, "test_acc": acc, "fit_s": fit, "process_s": process, "cpu_s": cpu_s,
            "diagnoses": int(found.group(1)) if found else 0}


def compare_plain(seeds: list[int], extra: list[str]) -> None:
    """Each seed with the recipe's callbacks and without any (a plain Lightning fit), alternating which goes first."""
    rows = []
    for index, seed in enumerate(seeds):
        pair = [("on", extra), ("off", [*extra, "--trainer.callbacks=[]"])]
        done = dict((name, run(seed, args)) for name, args in (pair if index % 2 == 0 else pair[::-1]))
        rows.append((seed, done["on"], done["off"]))
    print("| seed | test acc (monitors on) | test acc (plain) | fit wall on / plain (s) | process CPU on / plain (s) "
          "| diagnoses |")
    print("|---:|---:|---:|---:|---:|---:|")
    for seed, on, off in rows:
        print(f"| {seed} | {on['test_acc']:.2f}% | {off['test_acc']:.2f}% | {on['fit_s']:.1f} / {off['fit_s']:.1f} "
              f"| {on['cpu_s']:.1f} / {off['cpu_s']:.1f} | {on['diagnoses']} |")
    wall = statistics.median(on["fit_s"] / off["fit_s"] for _, on, off in rows)
    cpu = statistics.median(on["cpu_s"] / off["cpu_s"] for _, on, off in rows)
    print(f"\ncost of the monitors, median over seeds: fit wall time x{wall:.2f}, process CPU time x{cpu:.2f}; "
          f"median test accuracy {statistics.median(on['test_acc'] for _, on, _ in rows):.2f}% with them, "
          f"{statistics.median(off['test_acc'] for _, _, off in rows):.2f}% without; "
          f"diagnoses on the default recipe: {sum(on['diagnoses'] for _, on, _ in rows)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", help="a recipe other than the default")
    parser.add_argument("--max-epochs", type=int, help="shorter fits (a smoke test; the targets assume the recipe's)")
    parser.add_argument("--compare-plain", action="store_true",
                        help="also fit each seed without any callback and print the monitors' cost as ratios")
    args = parser.parse_args()
    # a path is resolved (the demo runs in a temporary directory); anything else is a shipped recipe's name
    config = str(Path(args.config).resolve()) if args.config and Path(args.config).exists() else args.config
    extra = [f"--config={config}"] if config else []
    extra += [f"--trainer.max_epochs={args.max_epochs}"] if args.max_epochs else []
    if args.compare_plain:
        compare_plain(args.seeds, extra)
        return
    rows = [run(seed, extra) for seed in args.seeds]
    print("| seed | test accuracy | fit wall (s) | whole process (s) |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seed']} | {r['test_acc']:.2f}% | {r['fit_s']:.1f} | {r['process_s']:.1f} |")
    med_acc = statistics.median(r["test_acc"] for r in rows)
    med_fit = statistics.median(r["fit_s"] for r in rows)
    print(f"| median | {med_acc:.2f}% | {med_fit:.1f} | {statistics.median(r['process_s'] for r in rows):.1f} |")
    print(f"\ntarget: median test accuracy >= 98.5% -> {'met' if med_acc >= 98.5 else 'NOT met'}; "
          f"every fit within 60 s -> {'met' if max(r['process_s'] for r in rows) <= 60 else 'NOT met'}")


if __name__ == "__main__":
    main()
