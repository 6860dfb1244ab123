"""Statistics and whitening against numpy; cached on disk by data; carried in checkpoints through a Trainer."""

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import traincraft.data._statistics_pass as statistics_pass
from tests.data._synthetic import SyntheticRGB, correlated_rgb
from tests.helpers import tiny_trainer
from traincraft.data.digits import DigitsDataModule
from traincraft.data.statistics import moment_sums, statistics_from_sums, whitening_matrix
from traincraft.modules.classifier import ImageClassifier


def _numpy_whitening(cov: np.ndarray, kind: str, eps: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(cov)
    values = np.clip(values, 0, None)
    scale = 1 / np.sqrt(values + eps * values.mean())
    pca = scale[:, None] * vectors.T
    return pca if kind == "pca" else vectors @ pca


def test_statistics_equal_numpy_whatever_the_batching():
    x = correlated_rgb(50, 6, seed=1)
    pixels = x.double().numpy().transpose(1, 0, 2, 3).reshape(3, -1) / 255
    flat = x.double().numpy().reshape(50, -1) / 255
    for chunks in (1, 7, 50):
        stats = statistics_from_sums(moment_sums(x.tensor_split(chunks), feature_covariance=True), "zca", 0.1)
        np.testing.assert_allclose(stats["mean"], pixels.mean(1), rtol=1e-6)
        np.testing.assert_allclose(stats["std"], pixels.std(1), rtol=1e-5)
        np.testing.assert_allclose(stats["pixel_covariance"], np.cov(pixels, bias=True), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(stats["whitening_mean"], flat.mean(0), rtol=1e-6)
        reference = _numpy_whitening(np.cov(flat.T, bias=True), "zca", 0.1)
        np.testing.assert_allclose(stats["whitening_matrix"], reference, rtol=1e-3, atol=1e-3)
    assert stats["count"].item() == 50


@pytest.mark.parametrize("kind", ["pca", "zca"])
def test_whitened_data_has_identity_covariance(kind):
    x = torch.randn(2000, 4, dtype=torch.float64) @ torch.tensor([[2.0, 0, 0, 0], [1, 1, 0, 0], [0, 0.5, 0.3, 0], [1, 0, 0, 0.1]], dtype=torch.float64)
    w = whitening_matrix(torch.cov(x.T, correction=0), kind, 0.0)
    white = (x - x.mean(0)) @ w.T
    torch.testing.assert_close(torch.cov(white.T, correction=0), torch.eye(4, dtype=torch.float64), atol=1e-8, rtol=0)
    if kind == "zca":
        torch.testing.assert_close(w, w.T)  # ZCA is symmetric: the whitening closest to the identity map
    with pytest.raises(ValueError, match="whitening must be 'pca' or 'zca'"):
        whitening_matrix(torch.eye(2), "pcb", 0.0)


def test_image_level_whitening_refuses_large_images():
    with pytest.raises(ValueError, match="use whitening_scope='channel'"):
        moment_sums([torch.zeros(2, 3, 64, 64)], feature_covariance=True)


@pytest.mark.parametrize("scope", ["channel", "image"])
def test_datamodule_whitens_validation_batches_like_numpy(scope):
    eps = 0.0 if scope == "channel" else 0.05  # 96 images of 192 features: the image covariance is singular
    dm = SyntheticRGB(whitening="zca", whitening_scope=scope, whitening_epsilon=eps, augment="none")
    dm.setup("fit")
    train = dm.datasets["train"].images.double().numpy() / 255
    x = dm.datasets["val"].images
    val = x.double().numpy() / 255
    if scope == "channel":
        pixels = train.transpose(1, 0, 2, 3).reshape(3, -1)
        w = _numpy_whitening(np.cov(pixels, bias=True), "zca", eps)
        expected = np.einsum("dc,nchw->ndhw", w, val - pixels.mean(1)[None, :, None, None])
    else:
        flat = train.reshape(len(train), -1)
        w = _numpy_whitening(np.cov(flat.T, bias=True), "zca", eps)
        expected = ((val.reshape(len(val), -1) - flat.mean(0)) @ w.T).reshape(val.shape)
    out = dm.normalize_batch(x.float() / 255)
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-3, atol=2e-3)
    if scope == "channel":  # the training pixels come out decorrelated with unit variance
        white = dm.normalize_batch(dm.datasets["train"].images.float() / 255).transpose(0, 1).reshape(3, -1)
        np.testing.assert_allclose(np.cov(white.double().numpy(), bias=True), np.eye(3), atol=1e-3)


def test_statistics_are_cached_on_disk_by_data(tmp_path, monkeypatch):
    first = DigitsDataModule(image_size=8, whitening="pca", statistics_cache=str(tmp_path))
    first.setup("fit")
    assert len(list(tmp_path.glob("statistics-*.pt"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("statistics recomputed although cached")

    monkeypatch.setattr(statistics_pass, "moment_sums", fail)
    again = DigitsDataModule(image_size=8, whitening="pca", statistics_cache=str(tmp_path))
    again.setup("fit")
    assert torch.equal(again.statistics["whitening_matrix"], first.statistics["whitening_matrix"])
    monkeypatch.undo()
    for other in (DigitsDataModule(image_size=8, whitening="pca", statistics_cache=str(tmp_path), val_fraction=0.2),
                  DigitsDataModule(image_size=8, whitening="zca", statistics_cache=str(tmp_path))):
        other.setup("fit")  # other data, other options: other keys
    assert len(list(tmp_path.glob("statistics-*.pt"))) == 3


def test_whitening_statistics_travel_in_checkpoints_through_a_trainer(tmp_path):
    dm = DigitsDataModule(image_size=8, batch_size=32, whitening="zca")
    model = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path)
    tiny_trainer(max_steps=2, limit_val_batches=1, enable_checkpointing=True, callbacks=[checkpoint]).fit(model, dm)
    other = DigitsDataModule(image_size=8, batch_size=32, whitening="zca", val_fraction=0.3)  # other training split
    tiny_trainer(limit_val_batches=1).validate(model, other, ckpt_path=checkpoint.best_model_path)
    assert torch.equal(other.mean, dm.mean)
    for key in ("whitening_matrix", "whitening_mean", "count"):
        assert torch.equal(other.statistics[key], dm.statistics[key])
    plain = DigitsDataModule(image_size=8, whitening="zca")
    plain.setup("fit")
    with pytest.raises(ValueError, match="has no whitening statistics"):
        plain.load_state_dict({"mean": [0.5], "std": [0.2]})


def test_fancy_pca_components_come_from_the_training_pixels():
    from traincraft.augment.presets import alexnet

    dm = SyntheticRGB(size=12, augment=alexnet(min_size=12, max_size=16, size=10))
    dm.setup("fit")
    pixels = dm.datasets["train"].images.double().numpy().transpose(1, 0, 2, 3).reshape(3, -1) / 255
    values, vectors = np.linalg.eigh(np.cov(pixels, bias=True))
    lighting = dm._augment_module[1]
    np.testing.assert_allclose(lighting.eigenvalues.numpy(), values, rtol=1e-4)
    np.testing.assert_allclose(np.abs(lighting.eigenvectors.numpy()), np.abs(vectors), atol=1e-4)
    with pytest.raises(ValueError, match="needs RGB training images"):
        DigitsDataModule(image_size=8, augment=alexnet(min_size=8, max_size=8, size=8)).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"whitening": "pcb"}, "whitening must be None, 'pca' or 'zca'"),
     ({"whitening": "zca", "normalize": False}, "set normalize=True"),
     ({"whitening_scope": "pixel"}, "whitening_scope must be"),
     ({"whitening_epsilon": -1.0}, "whitening_epsilon must be >= 0")],
)
def test_bad_whitening_configuration_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


def test_image_whitening_refuses_batches_of_another_size_and_eval_crop_is_checked():
    from traincraft.augment.presets import alexnet

    dm = SyntheticRGB(size=8, whitening="zca", augment=alexnet(min_size=8, max_size=12, size=6))
    dm.setup("fit")
    with pytest.raises(ValueError, match="augmentation and eval_crop must keep the stored size"):
        dm.normalize_batch(torch.rand(2, 3, 6, 6))
    with pytest.raises(ValueError, match="eval_crop must be 'auto', 'none' or a positive size"):
        SyntheticRGB(eval_crop=0)
    assert dm._eval_size == 6
    uncropped = SyntheticRGB(size=8, eval_crop="none", augment=alexnet(min_size=8, max_size=12, size=6))
    uncropped.setup("fit")
    assert uncropped._eval_size is None
