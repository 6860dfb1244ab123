import pytest
import torch
from torch import nn

from traincraft.models import _layers as L

from ._references import paper_lrn


def test_lrn_matches_the_papers_formula():
    torch.manual_seed(0)
    # Large activations so that the alpha term is comparable to k and a wrong alpha would show.
    a = torch.randn(2, 9, 4, 4, dtype=torch.float64) * 40
    expected = paper_lrn(a)
    torch.testing.assert_close(L.paper_lrn()(a), expected)
    # The trap: torch divides alpha by n, so passing the paper's alpha as is normalizes far too weakly.
    naive = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)(a)
    assert not torch.allclose(naive, expected, rtol=1e-3)


@pytest.mark.parametrize(
    ("stem", "input_size", "side"),
    [("small", 32, 3), ("small", 15, 1), ("small", 64, 7), ("imagenet", 227, 6), ("imagenet", 67, 1)],
)
def test_alexnet_feature_size(stem, input_size, side):
    assert L.alexnet_feature_size(input_size, stem) == side


@pytest.mark.parametrize(("stem", "too_small", "minimum"), [("small", 14, 15), ("imagenet", 66, 67)])
def test_resolve_stem_names_the_minimum_size(stem, too_small, minimum):
    assert L.resolve_stem("M", stem, minimum) == stem
    with pytest.raises(ValueError, match=rf"input_size={too_small} is too small.*input_size >= {minimum}"):
        L.resolve_stem("M", stem, too_small)


def test_auto_stem_switches_at_128():
    assert L.resolve_stem("M", "auto", 127) == "small"
    assert L.resolve_stem("M", "auto", 128) == "imagenet"


def test_scaled_rounds_half_up_and_keeps_one_unit():
    assert L.scaled(96, 1.0) == 96
    assert L.scaled(48, 0.0625) == 3
    assert L.scaled(5, 0.5) == 3  # round() would give 2
    assert L.scaled(48, 1e-6) == 1


def test_check_images_reads_only_metadata():
    # Meta tensors have no data: any value read (a host-device sync on a GPU) would raise here.
    L.check_images("M", torch.empty(2, 3, 8, 8, device="meta"), 3, 8)
    with pytest.raises(ValueError, match="input_size=9"):
        L.check_images("M", torch.empty(2, 3, 9, 9, device="meta"), 3, 8)


@pytest.mark.parametrize(
    ("shape", "dtype", "match"),
    [
        ((3, 8, 8), torch.float32, r"4-D batch.*\(N, 3, 8, 8\).*\(3, 8, 8\).*unsqueeze\(0\)"),
        ((2, 1, 8, 8), torch.float32, r"\(N, 3, 8, 8\), got \(2, 1, 8, 8\).*in_channels=1"),
        ((2, 3, 16, 16), torch.float32, r"got \(2, 3, 16, 16\): resize .* to 8x8 .*input_size=16\."),
        ((2, 3, 8, 9), torch.float32, r"square images only"),
        ((2, 3, 8, 8), torch.uint8, r"float images, got dtype torch.uint8"),
    ],
)
def test_check_images_messages(shape, dtype, match):
    with pytest.raises(ValueError, match=match):
        L.check_images("M", torch.zeros(shape, dtype=dtype), 3, 8)
