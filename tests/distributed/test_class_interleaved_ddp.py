"""Two real processes (DDP, gloo, CPU) with DigitsDataModule(sampler="class_interleaved"): Lightning keeps the
sampler (no DistributedSampler wrapper), both ranks compute the same plan, their shards are disjoint and cover the
training set, and every rank's batches come in the interleaved order within the stated bound."""

from pathlib import Path

import torch

from tests.distributed._launch import run_script
from traincraft.data._interleave import interleave_bound, longest_run, same_class_neighbours

SCRIPT = Path(__file__).with_name("_class_interleaved_script.py")


def test_ranks_share_one_plan_of_disjoint_interleaved_shards(tmp_path):
    run_script(SCRIPT.name, tmp_path)
    r0, r1 = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert (r0["type"], r0["num_replicas"], r0["rank"], r1["rank"]) == ("ClassInterleavedSampler", 2, 0, 1)
    labels = r0["all_labels"]
    n = len(labels)  # 1257 training images: 629 per rank, one padded repeat
    for e0, e1 in zip(r0["epochs"], r1["epochs"], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(e0["plan"], e1["plan"], strict=True))  # one plan
        orders = e0["plan"]
        assert len(orders[0]) == len(orders[1]) == 629
        union = torch.cat(orders)
        assert torch.equal(union.unique(), torch.arange(n)) and len(union) == n + 1  # disjoint but one pad
        for order, record in zip(orders, (e0, e1), strict=True):
            seq = labels[order]
            assert (longest_run(seq), same_class_neighbours(seq)) == interleave_bound(torch.bincount(seq).tolist())
            assert same_class_neighbours(seq) == 0
            trained = torch.cat(record["labels"])  # drop_last: 19 batches of 32
            assert torch.equal(trained, seq[: len(trained)]) and len(trained) == 629 // 32 * 32
    assert not torch.equal(r0["epochs"][0]["plan"][0], r0["epochs"][1]["plan"][0])
