"""Bad input to class-interleaved sampling and the Newton/CG functions: each error names what was wrong and what to
do instead."""

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

from traincraft.data import ClassInterleavedSampler, DigitsDataModule, ImageDataModule, TensorImageDataset
from traincraft.data.class_interleaved_sampler import dataset_labels
from traincraft.metrics.newton import conjugate_gradient, dense_hessian, newton_step, saddle_free_step


class _Unlabelled(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.zeros(1, 8, 8, dtype=torch.uint8)


class _Stream(IterableDataset):
    labels = torch.zeros(4, dtype=torch.int64)

    def __iter__(self):
        yield from ()


class _Module(ImageDataModule):
    def __init__(self, train, **kwargs):
        super().__init__(normalize=False, augment="none", **kwargs)
        self._train = train

    num_classes, in_channels, image_size = 2, 1, 8

    def build_datasets(self):
        return {"train": self._train}


CASES = [
    # the sampler
    (lambda: ClassInterleavedSampler(torch.zeros(2, 3, dtype=torch.int64)), ValueError, r"1-D .*got shape \(2, 3\).*dataset.labels"),
    (lambda: ClassInterleavedSampler([]), ValueError, r"non-empty 1-D .*got shape \(0,\)"),
    (lambda: ClassInterleavedSampler(torch.tensor([0.0, 1.0])), ValueError, "integer class indices; got dtype torch.float32.*not one-hot"),
    (lambda: ClassInterleavedSampler(torch.tensor([True, False])), ValueError, "integer class indices; got dtype torch.bool"),
    (lambda: ClassInterleavedSampler(torch.tensor([[0.2, 0.8]])), ValueError, r"got shape \(1, 2\)"),
    (lambda: ClassInterleavedSampler([0, 1], spacing="even"), ValueError, r"spacing must be one of \('stratified', 'random'\); got 'even'"),
    (lambda: ClassInterleavedSampler([0, 1]).load_state_dict({"epoch": 0, "position": -3}), ValueError,
     "non-negative epoch and position; got .*-3.*state_dict\\(\\)"),
    (lambda: ClassInterleavedSampler([0, 1]).load_state_dict({"epoch": -1, "position": 0}), ValueError, "non-negative epoch"),
    (lambda: dataset_labels(_Unlabelled()), TypeError, "_Unlabelled training set has no `labels`, `targets` or `samples`.*sampler='shuffle'"),
    (lambda: dataset_labels(TensorImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))), TypeError,
     "TensorImageDataset training set has no `labels`.*give it a `labels` attribute"),
    # the DataModules
    (lambda: DigitsDataModule(sampler="balanced"), ValueError, "sampler must be 'shuffle' or 'class_interleaved'; got 'balanced'"),
    (lambda: DigitsDataModule(interleave_spacing="even"), ValueError, "interleave_spacing must be one of .*got 'even'"),
    (lambda: _Module(_Unlabelled(), sampler="class_interleaved").setup("fit"), TypeError, "has no `labels`.*sampler='shuffle'"),
    (lambda: _Module(_Stream(), sampler="class_interleaved").setup("fit"), ValueError, "streams an iterable one.*use sampler='shuffle'"),
    # Newton, saddle-free Newton, conjugate gradient
    (lambda: newton_step(torch.ones(3), torch.eye(2)), ValueError, r"square Hessian \(n, n\) and a gradient \(n,\); got \(2, 2\) and \(3,\).*Flatten"),
    (lambda: newton_step(torch.ones(2, 1), torch.eye(2)), ValueError, r"got \(2, 2\) and \(2, 1\)"),
    (lambda: saddle_free_step(torch.ones(2), torch.ones(2, 3)), ValueError, r"square Hessian.*got \(2, 3\)"),
    (lambda: saddle_free_step(torch.ones(2), torch.ones(2)), ValueError, r"square Hessian.*got \(2,\) and \(2,\)"),
    (lambda: saddle_free_step(torch.ones(2), torch.eye(2), damping=-1.0), ValueError, "damping must be >= 0; got -1.0"),
    (lambda: conjugate_gradient(lambda v: v, torch.ones(2, 2)), ValueError, r"flat vector \(n,\); got shape \(2, 2\)\. Flatten"),
    (lambda: conjugate_gradient(lambda v: v, torch.ones(2), max_iterations=0), ValueError, "max_iterations >= 1 .*got 0"),
    (lambda: conjugate_gradient(lambda v: v, torch.ones(2), tolerance=-1.0), ValueError, "tolerance >= 0; got .* and -1.0"),
    (lambda: dense_hessian(lambda v: v[:1], 3), ValueError, r"returned shape \(1,\) for a vector of shape \(3,\).*same size"),
]


@pytest.mark.parametrize(("call", "error", "match"), CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bad_input_is_refused_with_what_to_do(call, error, match):
    with pytest.raises(error, match=match):
        call()
