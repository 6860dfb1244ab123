"""Two real processes (DDP, gloo, CPU) over the streaming DataModule: litdata shards every epoch into disjoint
per-rank sets of full batches (dropping exactly the remainder), a new order each epoch, and the all-reduced statistics
of the two shards equal one process's ImageFolderDataModule statistics of the whole folder."""

from pathlib import Path

import pytest
import torch

from tests.data.test_readers import _image_tree
from traincraft.data.image_folder import ImageFolderDataModule
from traincraft.data.streaming import optimize_image_folder

pytest.importorskip("litdata")

from tests.distributed._launch import run_script

SCRIPT = Path(__file__).with_name("_streaming_ddp_script.py")


def test_litdata_shards_each_epoch_between_the_ranks(tmp_path):
    _image_tree(tmp_path / "images", classes=("cat", "dog", "fox"), per_class=10)  # train 30, val 6 images
    dirs = optimize_image_folder(tmp_path / "images", tmp_path / "optimized", image_size=8, num_workers=1,
                                 chunk_bytes="2KB", start_method="fork", verbose=False)
    run_script(SCRIPT.name, tmp_path, dirs["train"], dirs["val"])
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    reference = ImageFolderDataModule(str(tmp_path / "images"), image_size=8)
    reference.setup("fit")
    label_of = {}
    for split in ("train", "val"):
        dataset = reference.datasets[split]
        label_of[split] = {image.numpy().tobytes(): label for image, label in (dataset[i] for i in range(len(dataset)))}
    assert len(label_of["train"]) == 30 and len(label_of["val"]) == 6

    def shard(rank, stage, epoch):
        pairs = [(image.numpy().tobytes(), int(label)) for e, images, labels in rank["seen"][stage] if e == epoch
                 for image, label in zip(images, labels, strict=True)]
        assert all(label_of[stage][image] == label for image, label in pairs)  # the file's image with its label
        return [image for image, _ in pairs]

    orders = []
    for epoch in (0, 1):
        # litdata under DDP: ⌊30 / (4·2)⌋ = 3 full batches per rank, distinct images; 30 − 24 = 6 dropped
        first, second = shard(ranks[0], "train", epoch), shard(ranks[1], "train", epoch)
        assert len(first) == len(second) == 12 and len(set(first + second)) == 24
        orders.append(first + second)
        # validation, sharded the same way: ⌊6 / (2·2)⌋ = 1 batch per rank, 2 of the 6 images dropped
        first, second = shard(ranks[0], "val", epoch), shard(ranks[1], "val", epoch)
        assert len(first) == len(second) == 2 and len(set(first + second)) == 4
    assert set(orders[0]) != set(orders[1])  # reshuffled for the second epoch: other images dropped
    for rank in ranks:  # no DistributedSampler from Lightning; statistics of all 30 images on both ranks
        assert (rank["loader"], rank["sampler"]) == ("ResumableStreamingDataLoader", "_InfiniteConstantSampler")
        assert rank["count"].item() == 30
        torch.testing.assert_close(rank["mean"], reference.mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(rank["std"], reference.std, rtol=1e-6, atol=0)
