"""HardExampleSampler: the per-example loss EMA against hand computations, the draw (shared by the ranks, seeded by
epoch, frequencies converging to the probabilities) and the checkpoint round trip. The pure maths are tested in
tests/metrics/test_hard_examples.py."""

import numpy as np
import pytest
import torch

from tests.metrics.test_hard_examples import _reference_probabilities
from traincraft.data import DigitsDataModule, EpochShuffleSampler, HardExampleSampler
from traincraft.metrics.hard_examples import epoch_generator, sample_indices, update_loss_ema


def test_sampler_draws_follow_the_probabilities_across_epochs():
    sampler = HardExampleSampler(range(6), seed=5, warmup_epochs=0, cap=4.0, uniform_mix=0.1, epoch_size=5000)
    sampler.record(torch.arange(6), torch.tensor([1.0, 1.0, 2.0, 3.0, 5.0, 8.0]))
    sampler.refresh()
    counts = torch.zeros(6, dtype=torch.float64)
    for epoch in range(20):
        sampler.set_epoch(epoch)
        counts += torch.bincount(torch.tensor(list(sampler)), minlength=6)
    p, draws = sampler.probabilities, counts.sum()
    assert float(((counts / draws - p).abs() / (p * (1 - p) / draws).sqrt()).max()) < 5


def test_loss_ema_equals_a_hand_computation():
    sampler = HardExampleSampler(range(5), decay=0.5, warmup_epochs=0)
    # epoch 0: example 1 is drawn twice (in two batches): its epoch loss is the mean, 5
    sampler.record(torch.tensor([0, 1]), torch.tensor([2.0, 4.0]))
    sampler.record(torch.tensor([1, 3]), torch.tensor([6.0, 8.0]))
    assert sampler.refresh() == {"examples_drawn": 3, "nonfinite": 0}
    assert sampler.loss_ema.tolist() == [2.0, 5.0, 0.0, 8.0, 0.0]
    assert sampler.seen.tolist() == [True, True, False, True, False]
    # epoch 1: seen examples blend in (0.5 * 5 + 0.5 * 1), a first observation sets the value, a NaN is left out
    sampler.record(torch.tensor([1, 4, 4, 0]), torch.tensor([1.0, 3.0, 3.0, float("nan")]))
    assert sampler.refresh() == {"examples_drawn": 2, "nonfinite": 1}
    assert sampler.loss_ema.tolist() == [2.0, 3.0, 0.0, 8.0, 3.0]
    assert sampler.seen.tolist() == [True, True, False, True, True]
    # example 2 is still unseen: it counts as the mean of the others, (2 + 3 + 8 + 3) / 4 = 4
    expected = _reference_probabilities([2, 3, 4, 8, 3], [True] * 5, sampler.cap, sampler.uniform_mix, 1.0)
    np.testing.assert_allclose(sampler.probabilities.numpy(), expected, rtol=1e-12)
    # the pure update agrees
    ema, seen = update_loss_ema(torch.tensor([2.0]), torch.tensor([True]), torch.tensor([6.0]), torch.tensor([3.0]), 0.9)
    assert ema.tolist() == [pytest.approx(0.9 * 2 + 0.1 * 2)] and seen.tolist() == [True]


def test_ranks_share_one_seeded_draw():
    n, world = 10, 3
    samplers = [HardExampleSampler(range(n), num_replicas=world, rank=r, seed=7, warmup_epochs=1) for r in range(world)]
    for sampler in samplers:  # the same losses on every rank (after the all-reduce)
        sampler.record(torch.arange(n), torch.arange(n, dtype=torch.float32) + 1)
        sampler.refresh()
    for epoch in (0, 1, 2):
        slices = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            slices.append(list(sampler))
        assert [len(s) for s in slices] == [4, 4, 4] == [len(s) for s in samplers]  # ceil(10 / 3) each
        draw = samplers[0].epoch_draw()
        assert all(torch.equal(s.epoch_draw(), draw) for s in samplers)
        assert [draw[r::world].tolist() for r in range(world)] == slices
        if epoch == 0:  # warm-up: every example once, then padding
            assert sorted(draw[:n].tolist()) == list(range(n))
        else:  # the reference draw: inverse CDF with the (seed, epoch) generator
            assert torch.equal(draw, sample_indices(samplers[0].probabilities, 12, epoch_generator(7, epoch)))
    samplers[0].set_epoch(1)
    first = samplers[0].epoch_draw().clone()
    samplers[0].set_epoch(2)
    assert not torch.equal(samplers[0].epoch_draw(), first)  # a new draw every epoch


def test_state_dict_round_trip_reproduces_the_draws():
    sampler = HardExampleSampler(range(20), seed=3, warmup_epochs=1)
    sampler.record(torch.arange(20), torch.linspace(0.1, 4.0, 20))
    sampler.refresh()
    sampler.set_epoch(4)
    state = sampler.state_dict()
    restored = HardExampleSampler(range(20), seed=3, warmup_epochs=1)
    restored.load_state_dict(state)
    assert restored.epoch == 4
    assert torch.equal(restored.probabilities, sampler.probabilities)
    assert list(restored) == list(sampler)
    with pytest.raises(ValueError, match="covers 20 examples but this training set has 21"):
        HardExampleSampler(range(21)).load_state_dict(state)


def test_a_checkpoint_inside_an_epoch_keeps_its_loss_sums():
    losses = torch.linspace(0.1, 4.0, 20)
    straight = HardExampleSampler(range(20), seed=3, warmup_epochs=0, decay=0.5)
    straight.record(torch.arange(10), losses[:10])
    state = straight.state_dict()  # written between two batches of epoch 0
    assert state["epoch_sums"].shape == (20, 3)
    straight.record(torch.arange(10, 20), losses[10:])
    straight.refresh()
    resumed = HardExampleSampler(range(20), seed=3, warmup_epochs=0, decay=0.5)
    resumed.load_state_dict(state)
    assert resumed.finish_restored_epoch(current_epoch=0) is None  # the epoch goes on: its end folds the sums in
    resumed.record(torch.arange(10, 20), losses[10:])
    resumed.refresh()
    assert torch.equal(resumed.loss_ema, straight.loss_ema) and torch.equal(resumed.probabilities, straight.probabilities)
    # Lightning resumes a checkpoint after an epoch's last batch at the next epoch, without that epoch's end hook
    after_last_batch = HardExampleSampler(range(20), seed=3, warmup_epochs=0, decay=0.5)
    after_last_batch.load_state_dict({**state, "epoch_sums": straight_sums(losses)})
    assert after_last_batch.finish_restored_epoch(current_epoch=1) == {"examples_drawn": 20, "nonfinite": 0}
    assert torch.equal(after_last_batch.loss_ema, straight.loss_ema)
    # a state written at an epoch's end (or by 0.2.0) has no sums; several processes save none either
    legacy = {key: value for key, value in state.items() if key != "epoch_sums"}
    HardExampleSampler(range(20)).load_state_dict(legacy)
    assert "epoch_sums" not in HardExampleSampler(range(20), num_replicas=2, rank=0).state_dict()
    with pytest.raises(ValueError, match=r"epoch sums have shape \(20, 2\)"):
        HardExampleSampler(range(20)).load_state_dict({**state, "epoch_sums": torch.zeros(20, 2)})


def straight_sums(losses):
    return torch.stack([losses, torch.ones_like(losses), torch.zeros_like(losses)], dim=1)


def test_refresh_sums_over_ranks_with_the_given_reduction():
    sampler = HardExampleSampler(range(3), num_replicas=2, rank=0, decay=0.0, warmup_epochs=0)
    sampler.record(torch.tensor([0, 2]), torch.tensor([1.0, 3.0]))
    other_rank = torch.tensor([[5.0, 1.0, 0.0], [0.0, 0.0, 0.0], [5.0, 1.0, 0.0]])  # rank 1 saw 0 and 2 once each

    def reduce(tensor):
        assert tensor.shape == (3, 3)
        return tensor + other_rank

    sampler.refresh(reduce=reduce)
    assert sampler.loss_ema.tolist() == [3.0, 0.0, 4.0]  # means over both ranks: (1 + 5) / 2, (3 + 5) / 2


def test_datamodule_uses_the_sampler_it_is_given():
    dm = DigitsDataModule(image_size=8, batch_size=32)
    dm.setup("fit")
    assert isinstance(dm.train_dataloader().sampler, EpochShuffleSampler)
    sampler = HardExampleSampler(dm.datasets["train"])
    dm.set_train_sampler(sampler)
    assert dm.train_dataloader().sampler is sampler
    assert dm.val_dataloader().sampler is not sampler
    dm.set_train_sampler(None)
    assert isinstance(dm.train_dataloader().sampler, EpochShuffleSampler)


@pytest.mark.parametrize("kwargs,match", [
    ({"cap": 0.5}, "cap must be >= 1"),
    ({"cap": float("nan")}, "cap must be >= 1"),
    ({"decay": 1.0}, r"decay must lie in \[0, 1\)"),
    ({"decay": -0.1}, r"decay must lie in \[0, 1\)"),
    ({"uniform_mix": -0.1}, r"uniform_mix must lie in \[0, 1\]"),
    ({"uniform_mix": 1.5}, r"uniform_mix must lie in \[0, 1\]"),
    ({"temperature": 0.0}, "temperature must be a positive"),
    ({"warmup_epochs": -1}, "warmup_epochs must be an integer >= 0"),
    ({"epoch_size": 0}, "epoch_size must be a positive integer"),
])
def test_bad_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HardExampleSampler(range(4), **kwargs)


def test_bad_losses_are_rejected():
    sampler = HardExampleSampler(range(4))
    with pytest.raises(ValueError, match=r"one loss per index.*\(2,\) and losses \(3,\)"):
        sampler.record(torch.tensor([0, 1]), torch.ones(3))
    sampler.record(torch.tensor([0, 1]), torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError, match=r"finite and >= 0.*examples \[1\]"):
        sampler.refresh()
