"""Run by test_matrix_ddp.py: every DDP cell of the compatibility matrix in one 2-process run (gloo, CPU).

Each rank fits each zoo model once with the callbacks whose cell is ``ok``, then runs every other cell alone (a
refusal or a known bug), keeping the error; it saves plain data per model and rank for the test to check.
"""

import sys
import time
import warnings
from pathlib import Path

import torch

from tests.compat._cells import run
from tests.compat.matrix import CALLBACKS, MATRIX
from tests.compat.zoo import MODELS


def _attempt(model: str, callbacks: list[str]) -> dict:
    try:
        return run(model, "ddp", callbacks)
    except Exception as error:  # noqa: BLE001 - refusals are raised on every rank alike: the test checks them
        return {"error": type(error).__name__, "message": str(error)}


def main(out: Path) -> None:
    warnings.filterwarnings("ignore")
    rank = None
    start = time.perf_counter()
    for model in MODELS:
        ok = [c for c in CALLBACKS if MATRIX[(c, model, "ddp")].status == "ok"]
        results = {"ok": _attempt(model, ok) if ok else None}
        for callback in CALLBACKS:
            if MATRIX[(callback, model, "ddp")].status != "ok":
                results[callback] = _attempt(model, [callback])
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        torch.save(results, out / f"{model}-rank{rank}.pt")
        sys.stderr.write(f"rank {rank}: {model} done at {time.perf_counter() - start:.1f} s\n")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank done with its collectives before gloo is torn down
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
