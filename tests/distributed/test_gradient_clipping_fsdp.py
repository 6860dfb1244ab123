"""Sharded parameters (torch's ``fully_shard``, DTensor) over two gloo processes: GradientClipping clips by the norm
of the whole parameters, logs that norm, and skips a NaN step bit-identically, exactly as one process does."""

import math
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed._launch import run_script
from tests.helpers import tiny_trainer

SCRIPT = Path(__file__).with_name("_gradclip_fsdp_script.py")
CONFIGS = ("norm", "layer_inf")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("gradclip_fsdp")
    for config in CONFIGS:
        run_script(SCRIPT.name, out, config, cwd=out)
    return {c: [torch.load(out / f"rank{r}_{c}.pt", weights_only=False) for r in (0, 1)] for c in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS)
def test_sharded_gradients_are_clipped_by_the_norm_of_whole_parameters(runs, config):
    sys.path.insert(0, str(SCRIPT.parent))
    from _gradclip_fsdp_script import CONFIGS as KWARGS
    from _gradclip_fsdp_script import Net, Poison, Record

    from traincraft.callbacks.gradient_clipping import GradientClipping

    kwargs, bad = KWARGS[config]
    model, record = Net(), Record()
    tiny_trainer(max_steps=5, log_every_n_steps=1, callbacks=[Poison(bad), GradientClipping(**kwargs), record]
                 ).fit(model)
    for rank in runs[config]:
        assert set(rank["types"]) == {"DTensor"}  # the parameters really were sharded
        for step in range(5):
            for name, g in record.grads[step].items():  # post-clip gradients, gathered
                torch.testing.assert_close(rank["grads"][step][name], g, rtol=1e-4, atol=1e-5, equal_nan=True)
            assert rank["logged"][step].keys() == record.logged[step].keys()
            for key, value in record.logged[step].items():  # grad/norm_pre, per-tensor norms: global values
                assert rank["logged"][step][key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), (step, key)
            for name, p in record.params[step].items():
                torch.testing.assert_close(rank["params"][step][name], p, rtol=1e-4, atol=1e-6)
        # the NaN batch: parameters, momentum and BatchNorm statistics as before it, on every rank
        before, after = rank["params"][bad - 1], rank["params"][bad]
        assert all(torch.equal(before[n], after[n]) for n in before)
        assert all(torch.equal(rank["buffers"][bad - 1][n], rank["buffers"][bad][n]) for n in before
                   if n in rank["buffers"][bad])
        assert all(torch.isfinite(b).all() for b in rank["buffers"][-1].values())
    # the local shard's norm would differ: the comparison is not vacuous
    pre = record.logged[0].get("grad/norm_pre")
    assert pre is not None and pre > 0 and math.isfinite(pre)
    assert record.logged[0]["grad/clip_coef"] < 1
