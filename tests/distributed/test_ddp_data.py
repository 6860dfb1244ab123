"""Two real processes (DDP, gloo, CPU): augmentation differs between ranks and is reproducible from the seed,
the sampler splits the data, and both ranks normalize with the same training statistics."""

from pathlib import Path

import torch

from tests.distributed._launch import run_script
from traincraft.data import DigitsDataModule

SCRIPT = Path(__file__).with_name("_ddp_augment_script.py")


def _run(out: Path, seed: int, split: bool) -> list[dict]:
    out.mkdir()
    run_script(SCRIPT.name, out, seed, "split" if split else "same")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_ranks_augment_the_same_images_differently_and_reproducibly(tmp_path):
    # Without a distributed sampler both ranks read the same images in the same order ...
    r0, r1 = _run(tmp_path / "a", seed=7, split=False)
    assert all(torch.equal(a, b) for a, b in zip(r0["labels"], r1["labels"], strict=True))
    # ... and must still draw different augmentations (seed_everything gave them the same seed).
    assert all(not torch.allclose(a, b) for a, b in zip(r0["images"], r1["images"], strict=True))
    assert torch.equal(r0["mean"], r1["mean"])  # the same training statistics on both ranks
    again = _run(tmp_path / "b", seed=7, split=False)
    for rank, run in enumerate((r0, r1)):
        assert all(torch.equal(a, b) for a, b in zip(run["images"], again[rank]["images"], strict=True))  # reproducible


def test_the_distributed_sampler_splits_the_training_data(tmp_path):
    runs = _run(tmp_path / "a", seed=7, split=True)
    data = DigitsDataModule(image_size=16)
    data.setup("fit")
    labels = data.datasets["train"].labels
    # reference: DistributedSampler's epoch-0 order for seed 7 (padded to a multiple of 2), every 2nd index per rank
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(7)).tolist()
    order += order[: len(order) % 2]
    for rank, run in enumerate(runs):
        mine = order[rank::2]
        expected = [labels[mine[i * 32 : (i + 1) * 32]] for i in range(3)]
        assert all(torch.equal(a, b) for a, b in zip(run["labels"], expected, strict=True))
