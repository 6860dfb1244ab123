"""Two real processes (gloo, CPU), each holding half of a model's parameters: with the strategy's
``gradient_norm_group`` every rank clips by the norm of the WHOLE model, exactly as one process does."""

import sys
from pathlib import Path

import pytest
import torch

from tests.distributed._launch import run_script
from tests.helpers import tiny_trainer

SCRIPT = Path(__file__).with_name("_gradclip_column_script.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-process launch per mode (norm, quantile); results by mode."""
    out = tmp_path_factory.mktemp("gradclip_ddp")
    for mode in ("norm", "quantile"):
        run_script(SCRIPT.name, out, mode, cwd=out)
    return {mode: [torch.load(out / f"rank{r}_{mode}.pt", weights_only=True) for r in (0, 1)]
            for mode in ("norm", "quantile")}


@pytest.mark.parametrize("mode", ["norm", "quantile"])
def test_ranks_with_different_parameters_clip_by_the_global_norm(runs, mode):
    sys.path.insert(0, str(SCRIPT.parent))
    from _gradclip_column_script import Net, Record

    from traincraft.callbacks.gradient_clipping import GradientClipping

    ranks = runs[mode]
    assert set(ranks[0]["trainable"]).isdisjoint(ranks[1]["trainable"])
    # the single-process reference: the same model, every parameter in one process
    model, record = Net(), Record()
    clip = GradientClipping(mode=mode, threshold=0.5, history_size=4, quantile=0.5)
    tiny_trainer(max_steps=6, max_epochs=10, callbacks=[clip, record]).fit(model)
    single = {n: p.detach() for n, p in model.named_parameters()}
    for rank in ranks:
        for name in rank["trainable"]:
            torch.testing.assert_close(rank["params"][name], single[name], rtol=1e-4, atol=1e-5)
        for step, grads in enumerate(rank["grads"]):  # post-clip gradients, step by step
            for name, g in grads.items():
                torch.testing.assert_close(g, record.grads[step][name], rtol=1e-4, atol=1e-5)
    # both ranks hold the same clipping state (the threshold history of global norms) as the single process
    for key in ("history", "clipped"):
        for rank in ranks:
            torch.testing.assert_close(rank["state"]["tensors"][key], clip.state_dict()["tensors"][key],
                                       equal_nan=True, rtol=1e-4, atol=0)
    assert int(clip.state_dict()["tensors"]["clipped"]) > 0  # clipping happened, so local norms would differ
