from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from traincraft.data import DigitsDataModule, EpochShuffleSampler, TensorImageDataset, augmentation_seed


def _fake_trainer(training: bool, rank: int = 0, step: int = 0):
    progress = SimpleNamespace(total=SimpleNamespace(ready=step))
    return SimpleNamespace(
        training=training, global_rank=rank, fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
    )


def test_split_is_fixed_stratified_and_independent_of_training_seed():
    a, b = DigitsDataModule(seed=1), DigitsDataModule(seed=2)
    a.setup("fit")
    b.setup("fit")
    sizes = [len(a.datasets[s]) for s in ("train", "val", "test")]
    assert sum(sizes) == 1797 and sizes == [1257, 180, 360]
    for split in ("train", "val", "test"):
        assert torch.equal(a.datasets[split].labels, b.datasets[split].labels)
        assert torch.equal(a.datasets[split].images, b.datasets[split].images)
        counts = torch.bincount(a.datasets[split].labels, minlength=10).float()
        share = counts / counts.sum()
        assert (share - 0.1).abs().max() < 0.02  # stratified: each class close to 10%
    c = DigitsDataModule(split_seed=5)
    c.setup("fit")
    assert not torch.equal(a.datasets["test"].labels, c.datasets["test"].labels)


def test_images_are_resized_uint8_of_the_original_digits():
    dm = DigitsDataModule(image_size=8)
    dm.setup("fit")
    digits = load_digits()
    # at the original size the pixels are the originals scaled from [0, 16] to [0, 255]
    reference = torch.from_numpy(np.round(digits.images * 255.0 / 16.0)).to(torch.uint8)
    images = dm.datasets["train"].images[:, 0]
    matches = [(reference == img).all(dim=(1, 2)).any() for img in images[:50]]
    assert all(matches)
    big = DigitsDataModule(image_size=24)
    big.setup("fit")
    assert big.datasets["train"].images.shape[1:] == (1, 24, 24)


def test_loaders_yield_uint8_images_and_int64_labels():
    dm = DigitsDataModule(batch_size=32, eval_batch_size=100)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (32, 1, 32, 32) and y.dtype == torch.int64
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape[0] == 100
    assert len(dm.train_dataloader()) == 1257 // 32  # drop_last


def test_normalization_uses_training_statistics():
    dm = DigitsDataModule(augment="none")
    dm.setup("fit")
    train = dm.datasets["train"].images.double().numpy() / 255.0
    assert dm.mean.item() == pytest.approx(train.mean(), rel=1e-6)
    assert dm.std.item() == pytest.approx(train.std(), rel=1e-6)
    x, _ = next(iter(dm.val_dataloader()))
    dm.trainer = _fake_trainer(training=False)
    out = dm.on_after_batch_transfer((x, None), 0)[0]
    expected = (x.double().numpy() / 255.0 - train.mean()) / train.std()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_augmentation_runs_only_while_training_and_is_reproducible_per_rank_and_step():
    dm = DigitsDataModule()
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))

    def run(training, rank=0, step=0):
        dm.trainer = _fake_trainer(training, rank, step)
        return dm.transform(x)

    plain = run(training=False)
    assert torch.equal(plain, run(training=False))
    first = run(training=True)
    assert not torch.allclose(first, plain)
    assert torch.equal(first, run(training=True))  # same seed, rank and step: same draws
    assert not torch.allclose(first, run(training=True, rank=1))  # every rank draws differently
    assert not torch.allclose(first, run(training=True, step=1))  # and every batch
    state = torch.get_rng_state()
    run(training=True)
    assert torch.equal(state, torch.get_rng_state())  # the global stream is untouched
    assert augmentation_seed(0, 0, 0) != augmentation_seed(1, 0, 0)


def test_statistics_travel_in_the_datamodule_state():
    dm = DigitsDataModule()
    dm.setup("fit")
    other = DigitsDataModule(val_fraction=0.3)  # different training split, different statistics
    other.setup("fit")
    assert other.mean.item() != pytest.approx(dm.mean.item(), rel=1e-9)
    other.load_state_dict(dm.state_dict())
    assert other.mean.item() == dm.mean.item() and other.std.item() == dm.std.item()


def test_epoch_shuffle_sampler_depends_only_on_seed_and_epoch():
    data = list(range(50))
    a, b = EpochShuffleSampler(data, seed=3), EpochShuffleSampler(data, seed=3)
    assert list(a) == list(b) and sorted(a) == data
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    torch.manual_seed(123)  # the global RNG plays no part
    b.set_epoch(1)
    assert list(a) == list(b)


def test_train_fraction_keeps_a_stratified_subset_and_the_same_val_and_test():
    full, small = DigitsDataModule(image_size=8), DigitsDataModule(image_size=8, train_fraction=0.1)
    full.setup("fit")
    small.setup("fit")
    train = small.datasets["train"]
    assert len(train) == round(0.1 * 1257)
    counts = torch.bincount(train.labels, minlength=10)
    assert int(counts.min()) >= 12 and int(counts.max()) <= 13  # stratified: ~10% of every class
    pool = {(bytes(x.numpy()), int(y)) for x, y in zip(full.datasets["train"].images, full.datasets["train"].labels, strict=True)}
    assert all((bytes(x.numpy()), int(y)) in pool for x, y in zip(train.images, train.labels, strict=True))
    for split in ("val", "test"):
        assert torch.equal(small.datasets[split].images, full.datasets[split].images)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 0}, "image_size must be a positive integer"),
        ({"batch_size": -1}, "batch_size must be a positive integer"),
        ({"val_fraction": 1.5}, "val_fraction must lie in"),
        ({"val_fraction": 0.5, "test_fraction": 0.45}, "leaves too little to train on"),
        ({"augment": "sparkle"}, "unknown augment 'sparkle'"),
        ({"train_fraction": 0.0}, r"train_fraction must lie in \(0, 1\]"),
        ({"train_fraction": 1.5}, r"train_fraction must lie in \(0, 1\]"),
    ],
)
def test_bad_configuration_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


def test_bad_batches_are_rejected_at_the_device_boundary():
    dm = DigitsDataModule()
    dm.setup("fit")
    dm.trainer = _fake_trainer(False)
    with pytest.raises(ValueError, match="expects uint8 image batches"):
        dm.transform(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="expected images with 1 channels; got 3"):
        dm.transform(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_tensor_dataset_validates_images_and_labels():
    with pytest.raises(ValueError, match="uint8 tensor of shape"):
        TensorImageDataset(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        TensorImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 3]), num_classes=3)
    with pytest.raises(ValueError, match="integer class indices"):
        TensorImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0.0, 1.0]))
