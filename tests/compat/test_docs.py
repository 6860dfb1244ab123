"""docs/compatibility.md shows the matrix the tests run: its generated block equals the rendered data."""

from tests.compat.matrix import CALLBACKS, MATRIX, SETTINGS, documented, render
from tests.compat.zoo import MODELS


def test_the_documented_table_is_the_tested_matrix():
    assert documented() == render(), "docs/compatibility.md is stale: run `python -m tests.compat.matrix`"


def test_the_matrix_covers_every_callback_model_and_setting():
    assert set(MATRIX) == {(c, m, s) for c in CALLBACKS for m in MODELS for s in SETTINGS}
    assert len(MATRIX) == 120
