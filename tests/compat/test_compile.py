"""torch.compile: the graph breaks and extra graphs each callback adds, as docs/compatibility.md states them
(re-measured on the cheap zoo models; ``python -m tests.compat.graph_breaks`` measures all of them)."""

import pytest

from tests.compat.graph_breaks import measure
from tests.compat.matrix import GRAPH_BREAKS


@pytest.mark.parametrize("model", ["mlp", "gan"])
def test_graph_breaks_per_callback_are_those_documented(model):
    documented = {callback: counts[model] for callback, counts in GRAPH_BREAKS.items() if model in counts}
    assert measure(model) == documented
