"""Bad arguments and bad batches for ImageClassifier: each message says what was received and what to do.

Batches go straight to ``training_step``/``validation_step`` (no Trainer): the checks sit at that public boundary.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from traincraft.modules import ImageClassifier


def _clf(**kwargs) -> ImageClassifier:
    kwargs = {"num_classes": 10, **kwargs}
    return ImageClassifier("mlp", in_channels=1, input_size=8, **kwargs)


ARGUMENTS = {
    "on_nonfinite unknown": ({"on_nonfinite": "ignore"}, ValueError,
                             r"on_nonfinite must be one of 'raise', 'warn', 'skip'; got 'ignore'"),
    "on_nonfinite None": ({"on_nonfinite": None}, ValueError, r"on_nonfinite must be one of .*got None"),
    "on_nonfinite bool": ({"on_nonfinite": True}, ValueError, r"on_nonfinite must be one of .*got True"),
    "num_classes float": ({"num_classes": 2.5}, ValueError, r"num_classes must be an integer >= 2; got 2\.5"),
    "num_classes string": ({"num_classes": "10"}, ValueError, r"num_classes must be an integer >= 2; got '10'"),
    "num_classes zero": ({"num_classes": 0}, ValueError, r"num_classes must be an integer >= 2; got 0"),
    "negative label smoothing": ({"label_smoothing": -0.1}, ValueError, r"label_smoothing must lie in \[0, 1\); got -0\.1"),
    "scheduler not callable": ({"scheduler": 3}, TypeError, r"scheduler must be a callable that takes the optimizer; got 3"),
    "optimizer instance": ({"optimizer": torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)}, TypeError,
                           r"optimizer must be a callable .*got SGD"),
    "tta of the wrong type": ({"test_time_augmentation": nn.Identity()}, TypeError,
                              r"MultiCropAveraging; got Identity"),
    "lr multiplier on nothing": ({"lr_multipliers": {"conv9.*": 2.0}}, ValueError, r"match no trainable parameter"),
}


@pytest.mark.parametrize("case", sorted(ARGUMENTS))
def test_bad_constructor_arguments(case):
    kwargs, error, message = ARGUMENTS[case]
    with pytest.raises(error, match=message):
        _clf(**kwargs)


def test_model_kwargs_with_a_module_object_is_refused():
    with pytest.raises(ValueError, match=r"model_kwargs apply only to a model built by name"):
        ImageClassifier(nn.Linear(64, 10), num_classes=10, model_kwargs={"width": 2})


X = torch.randn(4, 1, 8, 8)
LABELS = {
    # name: (labels, error, message)
    "float32 labels": (torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError,
                       r"integer class indices in \[0, 10\); got dtype torch\.float32\. Convert .*labels\.long\(\)"),
    "float16 labels": (torch.tensor([0, 1, 2, 3], dtype=torch.float16), TypeError, r"got dtype torch\.float16"),
    "float64 soft labels": (torch.full((4, 10), 0.1, dtype=torch.float64), TypeError,
                            r"got dtype torch\.float64.*soft labels pass labels\.argmax\(1\)"),
    "bool labels": (torch.tensor([True, False, True, False]), TypeError, r"got dtype torch\.bool"),
    "complex labels": (torch.zeros(4, dtype=torch.complex64), TypeError, r"got dtype torch\.complex64"),
    "one-hot labels": (nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 10), ValueError,
                       r"labels must have shape \(4,\).*got shape \(4, 10\) \(one-hot labels\? pass labels\.argmax\(1\)\)"),
    "column of labels": (torch.tensor([[0], [1], [2], [3]]), ValueError, r"got shape \(4, 1\)"),
    "a scalar label": (torch.tensor(3), ValueError, r"labels must have shape \(4,\), one class index per image; got shape \(\)"),
    "fewer labels than images": (torch.tensor([0, 1, 2]), ValueError, r"labels must have shape \(4,\).*got shape \(3,\)"),
    "a list of labels": ([0, 1, 2, 3], TypeError, r"labels must be a tensor of class indices; got list"),
    "negative label": (torch.tensor([0, -1, 2, 3]), ValueError,
                       r"labels must lie in \[0, 10\) for num_classes=10; found labels in \[-1, 3\] in this training batch"),
    "label equal to num_classes": (torch.tensor([0, 10, 2, 3]), ValueError,
                                   r"found labels in \[0, 10\] in this training batch\. Set num_classes to .*more than 10.*start at 0"),
    "ignore_index -100": (torch.tensor([-100, 1, 2, 3]), ValueError, r"found labels in \[-100, 3\]"),
    "huge label": (torch.tensor([0, 1, 2, 2**40]), ValueError, r"found labels in \[0, 1099511627776\]"),
}


@pytest.mark.parametrize("case", sorted(LABELS))
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_bad_training_labels(case):
    labels, error, message = LABELS[case]
    with pytest.raises(error, match=message):
        _clf().training_step((X, labels), 0)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_int32_and_uint8_labels_are_class_indices_too():
    clf = _clf()
    for dtype in (torch.int32, torch.uint8, torch.int16):
        out = clf.training_step((X, torch.tensor([0, 1, 2, 3], dtype=dtype)), 0)
        assert torch.isfinite(out["loss"])


def test_validation_labels_of_the_wrong_type_are_refused_at_once():
    with pytest.raises(TypeError, match=r"got dtype torch\.float32"):
        _clf().validation_step((X, torch.zeros(4)), 0)


def test_logits_of_the_wrong_width_name_num_classes():
    clf = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 7)), num_classes=10)
    with pytest.raises(ValueError, match=r"logits of shape \(4, 7\); expected \(batch, 10\)"):
        clf.training_step((X, torch.tensor([0, 1, 2, 3])), 0)
