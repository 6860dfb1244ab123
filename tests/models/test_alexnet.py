import pytest
import torch
from torch import nn

from traincraft.models import AlexNet

from ._references import paper_lrn


def test_parameter_count_matches_the_paper_network():
    with torch.device("meta"):  # no memory, no initialisation cost
        model = AlexNet(num_classes=1000, in_channels=3, input_size=227)
    assert model.stem == "imagenet"
    assert model.feature_shape == (256, 6, 6)
    assert sum(p.numel() for p in model.parameters()) == 62_378_344


def test_parameter_names_are_stable():
    model = AlexNet(num_classes=10, input_size=32, width=1 / 16)
    names = [name for name, _ in model.named_parameters()]
    expected = [f"features.conv{i}" for i in range(1, 6)] + [f"classifier.fc{i}" for i in (6, 7, 8)]
    assert names == [f"{layer}.{kind}" for layer in expected for kind in ("weight", "bias")]
    assert model.classifier.fc8.out_features == 10


def test_topology():
    model = AlexNet(num_classes=10, input_size=32, width=1 / 16, dropout=0.3)
    kinds = {name: type(module) for name, module in model.named_modules() if name}
    assert [n for n, k in kinds.items() if k is nn.LocalResponseNorm] == ["features.norm1", "features.norm2"]
    assert [n for n, k in kinds.items() if k is nn.MaxPool2d] == [
        "features.pool1",
        "features.pool2",
        "features.pool5",
    ]
    assert [n for n, k in kinds.items() if k is nn.Dropout] == ["classifier.drop6", "classifier.drop7"]
    assert model.classifier.drop6.p == 0.3
    pools = [model.features.pool1, model.features.pool2, model.features.pool5]
    assert all(p.kernel_size == 3 and p.stride == 2 for p in pools)  # overlapping pooling


def test_lrn_layers_use_the_papers_formula():
    torch.manual_seed(0)
    model = AlexNet(num_classes=10, input_size=32, width=1 / 16)
    a = torch.randn(2, 6, 5, 5) * 40
    torch.testing.assert_close(model.features.norm1(a), paper_lrn(a))


@pytest.mark.parametrize(
    ("input_size", "stem", "feature_shape"),
    [(32, "small", (16, 3, 3)), (64, "small", (16, 7, 7)), (227, "imagenet", (16, 6, 6))],
)
def test_auto_stem_forward_shapes(input_size, stem, feature_shape, device):
    torch.manual_seed(0)
    model = AlexNet(num_classes=10, input_size=input_size, width=1 / 16).to(device)
    assert model.stem == stem
    assert model.feature_shape == feature_shape
    assert model.classifier.fc6.in_features == 16 * feature_shape[1] ** 2
    out = model(torch.randn(2, 3, input_size, input_size, device=device))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert model.features.conv1.weight.grad is not None


def test_small_stem_changes_only_conv1():
    small = AlexNet(num_classes=10, input_size=67, width=1 / 16, stem="small")
    imagenet = AlexNet(num_classes=10, input_size=67, width=1 / 16, stem="imagenet")
    conv1 = small.features.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding) == ((3, 3), (1, 1), (1, 1))
    conv1 = imagenet.features.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding) == ((11, 11), (4, 4), (0, 0))
    for name in ("conv2", "conv3", "conv4", "conv5"):
        a, b = getattr(small.features, name), getattr(imagenet.features, name)
        assert (a.weight.shape, a.stride, a.padding) == (b.weight.shape, b.stride, b.padding)
    assert imagenet(torch.zeros(1, 3, 67, 67)).shape == (1, 10)


def test_input_too_small_for_the_stem():
    with pytest.raises(
        ValueError, match=r"input_size=66 is too small for stem='imagenet'.*>= 67 or stem='small'"
    ):
        AlexNet(input_size=66, stem="imagenet")
    with pytest.raises(ValueError, match=r"input_size=8 is too small for stem='small'.*>= 15"):
        AlexNet(input_size=8)


def test_paper_init():
    torch.manual_seed(0)
    model = AlexNet(num_classes=10, input_size=32, width=0.25, init="paper")
    f, c = model.features, model.classifier
    for layer in (f.conv2, f.conv4, f.conv5, c.fc6, c.fc7):
        assert torch.equal(layer.bias, torch.ones_like(layer.bias))
    for layer in (f.conv1, f.conv3, c.fc8):
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    assert c.fc7.weight.std().item() == pytest.approx(0.01, rel=0.02)


def test_kaiming_init_is_the_default():
    torch.manual_seed(0)
    model = AlexNet(num_classes=10, input_size=32, width=0.25)
    conv = model.features.conv4
    assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.05)


def test_width_scales_every_layer():
    model = AlexNet(num_classes=10, input_size=32, width=0.25)
    assert [getattr(model.features, f"conv{i}").out_channels for i in range(1, 6)] == [24, 64, 96, 96, 64]
    assert model.classifier.fc6.out_features == model.classifier.fc7.out_features == 1024


def test_grayscale_input():
    model = AlexNet(num_classes=4, in_channels=1, input_size=32, width=1 / 16)
    assert model(torch.zeros(3, 1, 32, 32)).shape == (3, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, r"`num_classes` must be a positive integer, got 0"),
        ({"in_channels": -1}, r"`in_channels` must be a positive integer, got -1"),
        ({"input_size": 32.0}, r"`input_size` must be a positive integer, got 32.0"),
        ({"width": 0}, r"`width` .* > 0, got 0"),
        ({"dropout": 1.0}, r"`dropout` .* \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"`dropout` .* \[0, 1\), got -0.1"),
        ({"stem": "tiny"}, r"unknown stem='tiny'; allowed values are 'auto', 'imagenet', 'small'"),
        ({"init": "xavier"}, r"unknown init='xavier'; allowed values are 'paper', 'kaiming'"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AlexNet(**{"input_size": 32, **kwargs})


def test_forward_rejects_a_wrong_image_size():
    model = AlexNet(num_classes=10, input_size=32, width=1 / 16)
    with pytest.raises(
        ValueError, match=r"AlexNet expected .*\(N, 3, 32, 32\).*resize .* to 32x32 .*input_size=64"
    ):
        model(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"in_channels=1"):
        model(torch.zeros(2, 1, 32, 32))
