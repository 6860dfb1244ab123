"""The compatibility matrix, single-process cells (fp32, bf16-mixed, accumulation, torch.compile): every callback
on every zoo model asserts numbers against a reference, or the clear error of a refusal. One fit per model and
setting serves every callback that works there; the DDP cells are in test_matrix_ddp.py."""

from __future__ import annotations

import re

import pytest
from lightning.fabric.utilities.exceptions import MisconfigurationException

from tests.compat._cells import run
from tests.compat.checks import CHECKS
from tests.compat.matrix import CALLBACKS, MATRIX, SETTINGS
from tests.compat.zoo import MODELS

_ERRORS = {"TypeError": TypeError, "ValueError": ValueError, "MisconfigurationException": MisconfigurationException}
_FITS: dict[tuple[str, str], dict] = {}


def _shared_fit(model: str, setting: str) -> dict:
    """One fit with every callback whose cell is ``ok`` for this model and setting (cached for the module)."""
    if (model, setting) not in _FITS:
        names = [c for c in CALLBACKS if MATRIX[(c, model, setting)].status == "ok"]
        _FITS[(model, setting)] = run(model, setting, names)
    return _FITS[(model, setting)]


def _params():
    for setting in SETTINGS:
        if setting == "ddp":
            continue
        for model in MODELS:
            for callback in CALLBACKS:
                cell = MATRIX[(callback, model, setting)]
                marks = [pytest.mark.xfail(strict=True, reason=cell.reason)] if cell.status == "xfail" else []
                yield pytest.param(callback, model, setting, marks=marks, id=f"{callback}-{model}-{setting}")


@pytest.mark.parametrize(("callback", "model", "setting"), list(_params()))
def test_cell(callback, model, setting):
    cell = MATRIX[(callback, model, setting)]
    if cell.status == "refused":
        with pytest.raises(_ERRORS[cell.error], match=cell.match) as caught:
            run(model, setting, [callback])
        assert re.search(cell.match, str(caught.value))
        return
    result = _shared_fit(model, setting) if cell.status == "ok" else run(model, setting, [callback])
    CHECKS[callback](result)
