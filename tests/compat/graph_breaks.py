"""Graph breaks and extra compiled graphs each callback adds to a compiled zoo model.

A fit of the ``compile`` setting (inner networks wrapped in ``torch.compile(backend="eager")``) with one callback,
against the same fit without it; dynamo's counters are reset before each. Print them with
``python -m tests.compat.graph_breaks`` and copy them into ``GRAPH_BREAKS`` of :mod:`tests.compat.matrix`.
"""

from __future__ import annotations

import sys

import torch._dynamo
from torch._dynamo.utils import counters

from tests.compat._cells import run
from tests.compat.matrix import CALLBACKS, MATRIX
from tests.compat.zoo import MODELS


def _count(model: str, callbacks: list[str]) -> tuple[int, int]:
    torch._dynamo.reset()
    counters.clear()
    run(model, "compile", callbacks, record=False)
    return sum(counters["graph_break"].values()), int(counters["stats"]["unique_graphs"])


def measure(model: str) -> dict[str, tuple[int, int]]:
    """``{callback: (graph breaks added, compiled graphs added)}`` for the callbacks that work on ``model``."""
    base = _count(model, [])
    added = {}
    for callback in CALLBACKS:
        if MATRIX[(callback, model, "compile")].status == "ok":
            breaks, graphs = _count(model, [callback])
            added[callback] = (breaks - base[0], graphs - base[1])
    return added


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    for name in sys.argv[1:] or MODELS:
        sys.stdout.write(f"{name}: {measure(name)}\n")
