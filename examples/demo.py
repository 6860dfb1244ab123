"""`make demo`: train the default recipe (`traincraft fit`, with traincraft's monitors and guard on), test the best
checkpoint, say where everything is, and end with the training health report: its page and its diagnoses.

Extra arguments go to `traincraft fit`, e.g. `python examples/demo.py --seed_everything 1`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

START = time.perf_counter()

from traincraft.callbacks import HealthReport  # noqa: E402
from traincraft.cli import TraincraftCLI  # noqa: E402
from traincraft.loggers import WandbLogger  # noqa: E402


def main(argv: list[str]) -> dict[str, float]:
    cli = TraincraftCLI(args=["fit", *argv])
    trainer = cli.trainer
    fit_seconds = time.perf_counter() - START
    best = trainer.checkpoint_callback.best_model_path
    (results,) = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best, verbose=False)
    total_seconds = time.perf_counter() - START

    print("\n=== traincraft demo ===")
    print(f"best checkpoint : {best}")
    print(f"last checkpoint : {trainer.checkpoint_callback.last_model_path}")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            mode = "offline: upload with `wandb sync " + logger.run_dir + "`" if logger.offline_mode else "online"
            print(f"W&B run         : {logger.run_dir} ({mode})")
        elif getattr(logger, "log_dir", None):
            print(f"{type(logger).__name__:<16}: {Path(logger.log_dir) / 'metrics.csv'}")
    print(f"config          : {Path(trainer.log_dir) / 'config.yaml'}")
    print(f"fit wall time   : {fit_seconds:.1f} s (start-up included); with test: {total_seconds:.1f} s")
    print(f"test accuracy   : {100 * results['test/acc']:.2f}%  (top-5 {100 * results['test/acc_top5']:.2f}%)")
    health = next((c for c in trainer.callbacks if isinstance(c, HealthReport)), None)
    diagnoses = []
    if health is not None and health.html is not None:
        diagnoses = health.report.diagnoses
        print(f"\nhealth report   : {health.html}  (open it in a browser; panels in {health.html.parent / 'panels'})")
        print(f"diagnoses       : {len(diagnoses) or 'none: the run looks healthy'}")
        for d in diagnoses:
            print(f"  {d.severity.upper():8s} {d.title}: {d.action}")
    return {"test_acc": results["test/acc"], "fit_seconds": fit_seconds, "total_seconds": total_seconds,
            "diagnoses": len(diagnoses)}


if __name__ == "__main__":
    main(sys.argv[1:])
