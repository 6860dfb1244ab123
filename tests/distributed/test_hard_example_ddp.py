"""Two real processes (DDP, gloo, CPU) with HardExampleMining: both ranks hold the same probabilities, their
index slices together are the one shared draw, and the loss averages equal those one process computes from the
union of both ranks' losses."""

from pathlib import Path

import numpy as np
import torch

from tests.callbacks.test_hard_example_mining import _replay_ema
from tests.distributed._launch import run_script
from traincraft.metrics.hard_examples import epoch_generator, hard_example_probabilities, sample_indices

SCRIPT = Path(__file__).with_name("_hard_example_script.py")


def test_ranks_share_one_draw_and_one_loss_average(tmp_path):
    run_script(SCRIPT.name, tmp_path)
    r0, r1 = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert (r0["num_replicas"], r0["rank"], r1["num_replicas"], r1["rank"]) == (2, 0, 2, 1)
    n = len(r0["loss_ema"])  # 1257 training images
    for e0, e1 in zip(r0["epochs"], r1["epochs"], strict=True):
        assert torch.equal(e0["probabilities"], e1["probabilities"])
        assert torch.equal(e0["draw"], e1["draw"])
        draw = e0["draw"]
        assert len(draw) == 2 * 629  # ceil(1257 / 2) per rank
        assert torch.equal(draw[0::2], e0["rank_indices"]) and torch.equal(draw[1::2], e1["rank_indices"])
    # the warm-up epoch visits every example once over both ranks; later epochs are the seeded shared draw
    first = r0["epochs"][0]["draw"]
    assert sorted(first[:n].tolist()) == list(range(n))
    for epoch in (1, 2):
        record = r0["epochs"][epoch]
        assert torch.equal(record["draw"], sample_indices(record["probabilities"], 2 * 629, epoch_generator(0, epoch)))
    # identical averages on both ranks, equal to one process's replay of the union of both ranks' losses
    assert torch.equal(r0["loss_ema"], r1["loss_ema"]) and torch.equal(r0["probabilities"], r1["probabilities"])
    union = [{"indices": a["indices"] + b["indices"], "losses": a["losses"] + b["losses"]}
             for a, b in zip(r0["epochs"], r1["epochs"], strict=True)]
    ema, seen = _replay_ema(union, n, decay=0.5)
    np.testing.assert_allclose(r0["loss_ema"].double().numpy(), ema, rtol=1e-5, atol=1e-7)
    assert torch.equal(r0["seen"], torch.from_numpy(seen))
    expected = hard_example_probabilities(torch.from_numpy(ema), 4.0, 0.2, seen=torch.from_numpy(seen))
    torch.testing.assert_close(r0["probabilities"], expected, rtol=1e-5, atol=1e-12)
    # each rank alone saw only part of the examples in an epoch: the average needed the other rank's losses
    own = set(torch.cat(r0["epochs"][2]["indices"]).tolist())
    both = own | set(torch.cat(r1["epochs"][2]["indices"]).tolist())
    assert len(both) > len(own) + 100
    logged = [{k: v for k, v in r["metrics"].items() if k.startswith("hard_examples/")} for r in (r0, r1)]
    assert len(logged[0]) == 8 and logged[0] == logged[1]  # every rank logs the same numbers
    assert logged[0]["hard_examples/max_ratio"] <= 4.0 + 1e-6
