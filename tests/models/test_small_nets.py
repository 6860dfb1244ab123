import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from traincraft.models import MLP, ConvNet

NORMS = ("batch", "layer", "weight", "none")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
COMBINATIONS = list(itertools.product(NORMS, ACTIVATIONS))


def tiny_convnet(**kwargs) -> ConvNet:
    torch.manual_seed(0)
    return ConvNet(
        **{"num_classes": 5, "in_channels": 2, "input_size": 8, "channels": [4, 8], "hidden": 16, **kwargs}
    )


def tiny_mlp(**kwargs) -> MLP:
    torch.manual_seed(0)
    return MLP(**{"num_classes": 5, "in_channels": 2, "input_size": 4, "hidden": [16, 8], **kwargs})


def check_forward_backward(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    out = model(x)
    assert out.shape == (x.shape[0], num_classes)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def convs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_convnet_defaults():
    model = ConvNet()
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 320_000
    names = [name for name, _ in model.named_modules()]
    assert names[1:9] == [
        "blocks",
        "blocks.0",
        "blocks.0.conv1",
        "blocks.0.norm1",
        "blocks.0.act1",
        "blocks.0.conv2",
        "blocks.0.norm2",
        "blocks.0.act2",
    ]
    assert {"blocks.2.pool", "gap", "fc.linear", "fc.act", "head"} <= set(names)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(("norm", "activation"), COMBINATIONS)
def test_convnet_every_norm_and_activation(norm, activation, device):
    model = tiny_convnet(norm=norm, activation=activation, dropout=0.1).to(device)
    check_forward_backward(model, torch.randn(4, 2, 8, 8, device=device), 5)
    block = model.blocks[1]
    assert isinstance(block.act1, ACTIVATIONS[activation]) and isinstance(
        model.fc.act, ACTIVATIONS[activation]
    )
    norm_types = {"batch": nn.BatchNorm2d, "layer": nn.GroupNorm, "weight": nn.Identity, "none": nn.Identity}
    assert isinstance(block.norm1, norm_types[norm]) and isinstance(block.norm2, norm_types[norm])
    if norm == "layer":
        assert block.norm1.num_groups == 1
    for conv in (block.conv1, block.conv2):
        assert (conv.bias is None) == (norm in ("batch", "layer"))
    weight_normed = [m for m in convs(model) if parametrize.is_parametrized(m, "weight")]
    assert weight_normed == ([*convs(model.blocks), model.fc.linear] if norm == "weight" else [])
    assert not parametrize.is_parametrized(model.head)


@pytest.mark.parametrize(("norm", "activation"), COMBINATIONS)
def test_mlp_every_norm_and_activation(norm, activation, device):
    model = tiny_mlp(norm=norm, activation=activation, dropout=0.1).to(device)
    check_forward_backward(model, torch.randn(4, 2, 4, 4, device=device), 5)
    norm_types = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "weight": nn.Identity, "none": nn.Identity}
    for block in model.blocks:
        assert isinstance(block.norm, norm_types[norm])
        assert isinstance(block.act, ACTIVATIONS[activation])
        assert (block.linear.bias is None) == (norm in ("batch", "layer"))
        assert parametrize.is_parametrized(block.linear, "weight") == (norm == "weight")
    assert not parametrize.is_parametrized(model.head)


def test_weight_norm_reparametrizes_magnitude_and_direction():
    model = tiny_mlp(norm="weight")
    linear = model.blocks[0].linear
    names = {name for name, _ in linear.named_parameters()}
    assert names == {"bias", "parametrizations.weight.original0", "parametrizations.weight.original1"}
    g, v = linear.parametrizations.weight.original0, linear.parametrizations.weight.original1
    torch.testing.assert_close(linear.weight, g * v / v.norm(dim=1, keepdim=True))


def test_norm_sits_between_linear_and_activation():
    model = tiny_mlp(norm="batch").train()
    seen = {}
    model.blocks[0].act.register_forward_hook(lambda m, inputs, out: seen.update(pre=inputs[0]))
    model(torch.randn(16, 2, 4, 4))
    # The nonlinearity's input is batch-normalized: zero mean and unit variance per unit at initialisation.
    torch.testing.assert_close(seen["pre"].mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(seen["pre"].var(0, unbiased=False), torch.ones(16), atol=1e-3, rtol=0)


def test_mlp_module_names_and_empty_hidden():
    names = [name for name, _ in tiny_mlp().named_modules()]
    assert names[1:] == ["flatten", "blocks"] + [
        f"blocks.{i}{suffix}" for i in (0, 1) for suffix in ("", ".linear", ".norm", ".act", ".drop")
    ] + ["head"]
    logistic = tiny_mlp(hidden=[])
    assert len(logistic.blocks) == 0 and logistic.head.in_features == 32
    assert logistic(torch.zeros(3, 2, 4, 4)).shape == (3, 5)


def test_dropout_modules():
    assert isinstance(tiny_mlp().blocks[0].drop, nn.Identity)
    assert tiny_mlp(dropout=0.2).blocks[0].drop.p == 0.2
    model = tiny_convnet(dropout=0.3)
    assert model.fc.drop_in.p == model.fc.drop.p == 0.3


def test_convnet_learns():
    torch.manual_seed(0)
    model = tiny_convnet(input_size=16)
    x, y = torch.randn(64, 2, 16, 16), torch.randint(0, 5, (64,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    ("build", "kwargs", "match"),
    [
        (tiny_convnet, {"channels": []}, r"`channels` must list at least one size"),
        (tiny_convnet, {"channels": [8, 0]}, r"every entry of `channels` .* got \[8, 0\]"),
        (tiny_convnet, {"hidden": 0}, r"`hidden` must be a positive integer, got 0"),
        (tiny_convnet, {"input_size": 3}, r"input_size=3 is too small for 2 stages.*input_size >= 4"),
        (
            tiny_convnet,
            {"norm": "group"},
            r"unknown norm='group'; allowed values are 'batch', 'layer', 'weight'",
        ),
        (
            tiny_convnet,
            {"activation": "gelu"},
            r"unknown activation='gelu'; allowed .*'relu', 'tanh', 'sigmoid'",
        ),
        (tiny_convnet, {"dropout": 1}, r"`dropout` .* \[0, 1\), got 1"),
        (tiny_convnet, {"num_classes": True}, r"`num_classes` must be a positive integer, got True"),
        (tiny_mlp, {"hidden": [16, -2]}, r"every entry of `hidden` .* got \[16, -2\]"),
        (tiny_mlp, {"hidden": 16}, r"`hidden` must be a list of positive integers, got 16"),
        (tiny_mlp, {"norm": "batchnorm"}, r"unknown norm='batchnorm'"),
        (tiny_mlp, {"input_size": 0}, r"`input_size` must be a positive integer, got 0"),
    ],
)
def test_argument_validation(build, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(**kwargs)


@pytest.mark.parametrize("build", [tiny_convnet, tiny_mlp])
def test_forward_rejects_wrong_shapes(build):
    model = build()
    size = model.input_size
    with pytest.raises(ValueError, match=rf"expected .*\(N, 2, {size}, {size}\).*in_channels=3"):
        model(torch.zeros(2, 3, size, size))
    with pytest.raises(
        ValueError, match=rf"resize .* to {size}x{size} or build the model with input_size=12"
    ):
        model(torch.zeros(2, 2, 12, 12))
