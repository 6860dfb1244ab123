"""Test-time averaging against a brute-force loop over views, and as an ImageClassifier option in a Trainer."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import tiny_trainer
from traincraft.augment.tta import MultiCropAveraging
from traincraft.data.digits import DigitsDataModule
from traincraft.modules.classifier import ImageClassifier


class Recording(torch.nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(3), torch.nn.Flatten(), torch.nn.LazyLinear(classes))
        self.batches = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.head(x)


def _brute_force(model, x, scales, crop, flip, per_image=True):
    probs = []
    for scale in scales:
        h, w = x.shape[-2:]
        size = (max(scale, round(h * scale / min(h, w))), max(scale, round(w * scale / min(h, w))))
        image = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", antialias=size[0] < h)
        hh, ww = image.shape[-2:]
        for t, s in [((hh - crop) // 2, (ww - crop) // 2), (0, 0), (0, ww - crop), (hh - crop, 0), (hh - crop, ww - crop)]:
            for mirrored in ([False, True] if flip else [False]):
                view = image[:, :, t : t + crop, s : s + crop]
                view = view.flip(-1) if mirrored else view
                if not per_image:
                    probs.extend(enumerate(model(view).softmax(-1)))
                    continue
                for i in range(len(x)):  # one image at a time: nothing shared between images
                    probs.append((i, model(view[i : i + 1]).softmax(-1)[0]))
    out = torch.zeros(len(x), probs[0][1].numel())
    for i, p in probs:
        out[i] += p
    return out / (len(probs) / len(x))


@pytest.mark.parametrize("chunk", [3, 7, 1000])
def test_multi_scale_ten_crop_equals_the_brute_force_average(chunk):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 12, 14)
    model = Recording()
    model(x)  # materialize the lazy layer
    tta = MultiCropAveraging(scales=[8, 10, 16], crop_size=8, chunk_size=chunk)
    model.batches.clear()
    with torch.no_grad():
        got = tta(model, x)
        seen = list(model.batches)
        expected = _brute_force(model, x, [8, 10, 16], 8, flip=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert tta.num_views == 30 and sum(seen) == 30 * 5  # every view of every image, once
    assert max(seen) <= chunk  # memory bounded by the chunk
    assert len(seen) <= -(-150 // min(chunk, 5)) + 3 * 10  # and views batched together, not one call per view


def test_flip_only_averages_the_image_and_its_mirror():
    torch.manual_seed(1)
    x = torch.randn(4, 1, 8, 8)
    model = Recording(3)
    with torch.no_grad():
        expected = (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2
        torch.testing.assert_close(MultiCropAveraging(crops="none")(model, x), expected)


def test_classifier_evaluates_with_averaged_views_and_trains_unchanged():
    def build(tta):
        torch.manual_seed(0)
        return ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=16, test_time_augmentation=tta)

    dm = DigitsDataModule(image_size=16, batch_size=32, eval_batch_size=90)
    tta = MultiCropAveraging(scales=[16, 20], crop_size=16, chunk_size=64)
    plain, averaged = build(None), build(tta)
    for model in (plain, averaged):
        torch.manual_seed(1)
        tiny_trainer(max_steps=20, limit_val_batches=0).fit(model, dm)
    for a, b in zip(plain.parameters(), averaged.parameters(), strict=True):
        assert torch.equal(a, b)  # training is untouched by the option
    result = tiny_trainer(limit_test_batches=2).test(averaged, dm, verbose=False)[0]
    assert result["test/acc"] > 0.3  # trained enough that the arg-max is not a near-tie
    loader = dm.test_dataloader()
    probs, labels = [], []
    averaged.eval()
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            if i == 2:
                break
            x = dm.normalize_batch(x.float() / 255)
            probs.append(_brute_force(averaged, x, [16, 20], 16, flip=True, per_image=False))
            labels.append(y)
    probs, labels = torch.cat(probs), torch.cat(labels)
    hits = (probs.argmax(1) == labels).float()
    per_class = torch.stack([hits[labels == c].mean() for c in range(10)])  # the classifier's metric is macro
    assert result["test/acc"] == pytest.approx(per_class.mean().item(), abs=1e-6)
    assert result["test/loss"] == pytest.approx(F.nll_loss(probs.log(), labels).item(), rel=1e-4)
    predicted = torch.cat(tiny_trainer(limit_predict_batches=2).predict(averaged, dm))
    torch.testing.assert_close(predicted, probs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"crops": "five"}, "needs a positive crop_size"), ({"crops": "seven", "crop_size": 4}, "crops must be"),
     ({"scales": [8, 32], "crop_size": 16}, "at least crop_size=16"), ({"crops": "none", "chunk_size": 0}, "chunk_size")],
)
def test_bad_configuration_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiCropAveraging(**kwargs)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="smaller than crop_size=16"):
        MultiCropAveraging(crop_size=16)(Recording(), torch.rand(2, 3, 12, 12))
    with pytest.raises(TypeError, match="must be a traincraft.augment.tta.MultiCropAveraging"):
        ImageClassifier("mlp", num_classes=3, input_size=4, test_time_augmentation=torch.nn.Identity())
