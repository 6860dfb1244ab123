"""ClassInterleavedSampler: a permutation per epoch meeting the stated bound (checked against a brute-force minimum
over every ordering of small label sets), DDP shards (in one process) that are disjoint and cover the data set,
mid-epoch resume through a Trainer, the hard-example composition, and YAML selection."""

import itertools
import math

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import Subset

from traincraft.callbacks import HardExampleMining
from traincraft.cli import TraincraftCLI
from traincraft.data import ClassInterleavedSampler, DigitsDataModule
from traincraft.data._interleave import interleave_bound, interleave_order, longest_run, same_class_neighbours
from traincraft.data.class_interleaved_sampler import dataset_labels
from traincraft.modules import ImageClassifier

SPACINGS = ("stratified", "random")


def _labels(counts):
    return torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])


def _brute_force_minimum(counts):
    """(least longest run, least same-class neighbours) over every distinct ordering of the multiset."""
    best_run, best_pairs = math.inf, math.inf
    for order in set(itertools.permutations(_labels(counts).tolist())):
        seq = torch.tensor(order)
        best_run, best_pairs = min(best_run, longest_run(seq)), min(best_pairs, same_class_neighbours(seq))
    return best_run, best_pairs


SMALL = [[1], [3], [2, 2], [3, 1], [4, 1], [2, 2, 2], [3, 2, 1], [4, 2, 1], [5, 1, 1], [3, 3, 1, 1], [2, 1, 1, 1, 1],
         [6, 2], [4, 4], [1, 1, 1, 1, 1, 1, 1]]


@pytest.mark.parametrize("counts", SMALL, ids=str)
def test_the_bound_is_the_brute_force_minimum_and_every_order_meets_it(counts):
    bound = interleave_bound(counts)
    assert bound == _brute_force_minimum(counts)
    labels = _labels(counts)[torch.randperm(sum(counts), generator=torch.Generator().manual_seed(1))]
    for spacing, seed in itertools.product(SPACINGS, range(25)):
        order = interleave_order(labels, spacing, torch.Generator().manual_seed(seed))
        assert sorted(order.tolist()) == list(range(len(labels)))
        assert (longest_run(labels[order]), same_class_neighbours(labels[order])) == bound


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize(
    "counts",
    [[126] * 10, [120, 130, 125, 127, 119, 131, 126, 124, 128, 127],  # balanced, digits-sized
     [100, 50, 25, 12, 6, 3, 2, 1, 1, 1],  # imbalanced but no majority: still no repeat
     [300, 20, 10, 5],  # a majority class: runs of ceil(300 / 36) = 9 at most
     [1000, 1]],
    ids=["balanced", "near-balanced", "long-tail", "majority", "extreme"],
)
def test_epochs_are_permutations_within_the_bound(counts, spacing):
    labels = _labels(counts)[torch.randperm(sum(counts), generator=torch.Generator().manual_seed(0))]
    sampler = ClassInterleavedSampler(labels, seed=3, spacing=spacing)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        assert torch.equal(order.sort().values, torch.arange(len(labels)))
        assert (longest_run(labels[order]), same_class_neighbours(labels[order])) == interleave_bound(counts)
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])  # a new order each epoch ...
    again = ClassInterleavedSampler(labels, seed=3, spacing=spacing)
    again.set_epoch(2)
    assert torch.equal(torch.tensor(list(again)), orders[2])  # ... reproducible from (seed, epoch)


def test_stratified_batches_hold_the_classes_in_proportion():
    labels = _labels([126] * 10)
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    spread = {}
    for spacing in SPACINGS:
        order = torch.tensor(list(ClassInterleavedSampler(labels, seed=0, spacing=spacing)))
        batches = labels[order][: 1260 // 30 * 30].view(-1, 30)
        per_class = torch.stack([(batches == k).sum(1) for k in range(10)], 1).float()  # (batches, classes)
        spread[spacing] = per_class.std(1).mean().item()
    # 30 of 10 equal classes: 3 each. Stratified spacing stays within one of it; random is multinomial-like
    assert spread["stratified"] < 0.8 < spread["random"]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("counts", [[126] * 10, [300, 20, 10, 5], [7, 5, 1]], ids=["balanced", "majority", "small"])
def test_ranks_get_disjoint_class_dealt_shards_that_each_meet_the_bound(counts, world):
    n = sum(counts)
    labels = _labels(counts)[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    samplers = [ClassInterleavedSampler(labels, num_replicas=world, rank=r, seed=5) for r in range(world)]
    for epoch in range(2):
        orders = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            orders.append(torch.tensor(list(sampler)))
        per_rank = math.ceil(n / world)
        assert all(len(o) == per_rank == len(s) for o, s in zip(orders, samplers, strict=True))
        union = torch.cat(orders)
        assert torch.equal(union.unique(), torch.arange(n))  # every example on some rank
        assert len(union) - n == per_rank * world - n  # repeats only the padding
        if per_rank * world == n:
            assert torch.equal(union.sort().values, torch.arange(n))  # disjoint
        for r, order in enumerate(orders):
            shard_counts = torch.bincount(labels[order], minlength=len(counts)).tolist()
            for c, share in zip(counts, shard_counts, strict=True):
                assert abs(share - c / world) <= 1 + (per_rank * world - n)  # classes dealt evenly
            seq = labels[order]
            assert (longest_run(seq), same_class_neighbours(seq)) == interleave_bound(shard_counts)
            # every rank computes the same plan: rank r's order seen from another rank's sampler
            assert torch.equal(samplers[(r + 1) % world].epoch_order(epoch, r), order)


def test_state_dict_resumes_the_same_order_by_hand():
    labels = _labels([40, 30, 20, 10])
    sampler = ClassInterleavedSampler(labels, seed=1)
    sampler.set_epoch(4)
    full = list(sampler)
    resumed = ClassInterleavedSampler(labels, seed=1)
    resumed.load_state_dict(sampler.state_dict(position=37))
    assert list(resumed) == full[37:]
    resumed.set_epoch(5)
    sampler.set_epoch(5)
    assert list(resumed) == list(sampler)  # the next epoch starts from its top
    done = ClassInterleavedSampler(labels, seed=1)
    done.load_state_dict({"epoch": 4, "position": 100})  # a complete epoch: continue with epoch 5
    assert done.epoch == 5 and list(done) == list(sampler)


class _Batches(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, batch_idx, batch[1].clone(), batch[0].sum((1, 2, 3)).clone()))


def _fit(tmp_path, max_epochs=None, max_steps=-1, ckpt_path=None, callbacks=()):
    seed_everything(0)
    model = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8, model_kwargs={"hidden": [16]},
                            optimizer=lambda params: torch.optim.SGD(params, lr=0.05))
    batches = _Batches()
    trainer = Trainer(max_epochs=max_epochs, max_steps=max_steps, accelerator="cpu", logger=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[batches, *callbacks], default_root_dir=tmp_path)
    data = DigitsDataModule(image_size=8, batch_size=64, augment="none", sampler="class_interleaved")
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return batches.seen, trainer, data


@pytest.mark.filterwarnings("ignore:.*(not resumable|callbacks used to create)")
def test_a_mid_epoch_checkpoint_resumes_the_same_batches(tmp_path):
    straight, trainer, data = _fit(tmp_path / "a", max_epochs=2)
    per_epoch = len(straight) // 2  # 1257 // 64 = 19 batches
    sampler = trainer.train_dataloader.sampler
    assert isinstance(sampler, ClassInterleavedSampler)
    for _epoch, _, labels, _ in straight[:: per_epoch // 3]:
        assert same_class_neighbours(labels) == 0
    save = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=per_epoch + 7, save_top_k=-1)
    at_end = ModelCheckpoint(dirpath=tmp_path / "end", every_n_epochs=1, save_top_k=-1)
    _fit(tmp_path / "b", max_steps=per_epoch + 7, callbacks=[save, at_end])
    checkpoint = tmp_path / "ckpt" / f"epoch=1-step={per_epoch + 7}.ckpt"
    state = torch.load(checkpoint, weights_only=True)["DigitsDataModule"]["class_interleaved"]
    assert state == {"epoch": 1, "position": 7 * 64}
    resumed, _, _ = _fit(tmp_path / "c", max_epochs=2, ckpt_path=checkpoint)
    rest = straight[per_epoch + 7 :]
    assert len(resumed) == len(rest) == per_epoch - 7
    for (e0, i0, y0, x0), (e1, i1, y1, x1) in zip(rest, resumed, strict=True):
        assert (e0, i0) == (e1, i1) and torch.equal(y0, y1) and torch.equal(x0, x1)
    # a checkpoint written at the end of epoch 0 resumes with the whole of epoch 1
    end = tmp_path / "end" / f"epoch=0-step={per_epoch}.ckpt"
    assert torch.load(end, weights_only=True)["DigitsDataModule"]["class_interleaved"] == {"epoch": 1, "position": 0}
    resumed, _, _ = _fit(tmp_path / "d", max_epochs=2, ckpt_path=end)
    assert len(resumed) == per_epoch
    for (e0, i0, y0, x0), (e1, i1, y1, x1) in zip(straight[per_epoch:], resumed, strict=True):
        assert (e0, i0) == (e1, i1) and torch.equal(y0, y1) and torch.equal(x0, x1)


def test_hard_example_draws_are_ordered_by_class(tmp_path):
    mining = HardExampleMining(warmup_epochs=1, cap=4.0)
    seen, trainer, data = _fit(tmp_path, max_epochs=2, callbacks=[mining])
    sampler = mining.sampler
    assert sampler.reorder is not None and trainer.train_dataloader.sampler is sampler
    drawn = data.datasets["train"].labels[sampler.indices]  # epoch 1: drawn with replacement by loss
    counts = torch.bincount(drawn, minlength=10).tolist()
    assert (longest_run(drawn), same_class_neighbours(drawn)) == interleave_bound(counts) == (1, 0)
    for epoch, batch_idx, labels, _ in seen:  # the loader yields the reordered draw (mining checks labels too)
        if epoch == 1:
            assert torch.equal(labels, drawn[batch_idx * 64 : (batch_idx + 1) * 64])


def test_dataset_labels_reads_labels_targets_samples_and_subsets():
    class Targets:
        targets = [2, 0, 1]

    class Samples:
        samples = [("a.png", 1), ("b.png", 0)]

    assert dataset_labels(Targets()).tolist() == [2, 0, 1]
    assert dataset_labels(Samples()).tolist() == [1, 0]
    assert dataset_labels(Subset(Targets(), [2, 0])).tolist() == [1, 2]


def test_selectable_from_yaml():
    cli = TraincraftCLI(args=["--data.init_args.sampler=class_interleaved", "--data.init_args.interleave_spacing=random",
                              "--data.init_args.image_size=8", "--trainer.logger=false"], run=False)
    assert (cli.datamodule.sampler, cli.datamodule.interleave_spacing) == ("class_interleaved", "random")
    cli.datamodule.setup("fit")
    sampler = cli.datamodule.train_dataloader().sampler
    assert isinstance(sampler, ClassInterleavedSampler) and sampler.spacing == "random"
