import pytest
import torch
from torch import nn

from traincraft.models import AlexNet, TwoColumnAlexNet

from ._references import grouped_alexnet


def small_model(**kwargs) -> TwoColumnAlexNet:
    torch.manual_seed(0)
    return TwoColumnAlexNet(**{"num_classes": 7, "input_size": 32, "width": 0.25, **kwargs})


def test_parameter_count_is_the_papers_figure():
    with torch.device("meta"):
        model = TwoColumnAlexNet(num_classes=1000, in_channels=3, input_size=227)
    assert sum(p.numel() for p in model.parameters()) == 60_965_224
    assert model.column_classes == (500, 500)


def test_parameter_names_are_per_column():
    model = small_model()
    names = [name for name, _ in model.named_parameters()]
    layers = [f"conv{i}" for i in range(1, 6)] + ["fc6", "fc7", "fc8"]
    assert names == [
        f"columns.{c}.{layer}.{kind}" for c in (0, 1) for layer in layers for kind in ("weight", "bias")
    ]


def test_connectivity():
    model = small_model()  # per column: 12-32-48-48-32 filters, 512 hidden units, 4 + 3 classes
    col = model.columns["1"]
    assert col.conv1.in_channels == 3
    assert col.conv2.in_channels == 12  # own column only
    assert col.conv3.in_channels == 2 * 32  # both columns
    assert col.conv4.in_channels == 48 and col.conv5.in_channels == 48
    assert col.fc6.in_features == 2 * 32 * 3 * 3
    assert col.fc7.in_features == col.fc8.in_features == 2 * 512
    assert (model.columns["0"].fc8.out_features, col.fc8.out_features) == (4, 3)
    assert isinstance(col.drop6, nn.Dropout) and isinstance(col.drop7, nn.Dropout)


@pytest.mark.parametrize(
    ("input_size", "width", "stem"),
    [(32, 0.25, "small"), (67, 0.125, "imagenet"), (131, 0.125, "auto")],
)
def test_equals_the_grouped_convolution_network(input_size, width, stem, device):
    torch.manual_seed(0)
    model = TwoColumnAlexNet(num_classes=10, input_size=input_size, width=width, stem=stem)
    model = model.to(device=device, dtype=torch.float64).eval()
    assert model.stem == ("imagenet" if input_size > 64 else "small")
    x = torch.randn(3, 3, input_size, input_size, dtype=torch.float64, device=device)

    out = model(x)
    out.sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    expected = grouped_alexnet(model, x)
    expected.sum().backward()

    torch.testing.assert_close(out, expected)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=lambda m, name=name: f"{name}: {m}")


def test_same_layers_as_the_single_column_network():
    one, two = AlexNet(num_classes=10, input_size=32, width=0.25), small_model(num_classes=10)
    for layer in ("conv1", "conv2", "conv4", "conv5"):
        a, b = getattr(one.features, layer), getattr(two.columns["0"], layer)
        assert (a.kernel_size, a.stride, a.padding) == (b.kernel_size, b.stride, b.padding)
        assert a.out_channels == 2 * b.out_channels


def record_exchanges(model: TwoColumnAlexNet) -> list[tuple[str, list[torch.Tensor]]]:
    calls: list[tuple[str, list[torch.Tensor]]] = []
    default = model.exchange

    def recording(point: str, parts: list[torch.Tensor]) -> torch.Tensor:
        calls.append((point, [p.detach().clone() for p in parts]))
        return default(point, parts)

    model.exchange = recording
    return calls


def test_every_exchange_point_is_called_once_in_order():
    model = small_model()
    calls = record_exchanges(model)
    model(torch.randn(2, 3, 32, 32))
    assert [point for point, _ in calls] == list(TwoColumnAlexNet.EXCHANGE_POINTS)
    shapes = {point: [tuple(p.shape) for p in parts] for point, parts in calls}
    assert shapes == {
        "conv3": [(2, 32, 7, 7)] * 2,
        "fc6": [(2, 32 * 3 * 3)] * 2,
        "fc7": [(2, 512)] * 2,
        "fc8": [(2, 512)] * 2,
        "logits": [(2, 4), (2, 3)],
    }


def test_dropout_acts_per_column_before_the_exchange():
    model = small_model(dropout=0.5).train()
    recorded = record_exchanges(model)
    model(torch.randn(4, 3, 32, 32))
    calls = dict(recorded)
    for c, part in enumerate(calls["fc7"]):
        col = model.columns[str(c)]
        with torch.no_grad():
            kept = col.relu6(col.fc6(torch.cat(calls["fc6"], dim=1)))
        # Every unit is either dropped (0) or kept and scaled by 1 / (1 - p); both happen.
        dropped = (part == 0) & (kept > 0)
        torch.testing.assert_close(torch.where(dropped, 0.0, part), torch.where(dropped, 0.0, 2 * kept))
        assert 0.3 < dropped.float().sum() / (kept > 0).float().sum() < 0.7


def test_partial_model_builds_only_its_column():
    full, partial = small_model(), small_model(columns=[1])
    assert partial.local_columns == (1,) and partial.is_partial and not full.is_partial
    assert set(partial.columns) == {"1"}
    names = {name for name, _ in partial.named_parameters()}
    assert names == {name for name, _ in full.named_parameters() if name.startswith("columns.1.")}
    assert partial.columns["1"].fc8.out_features == 3


def test_partial_model_with_a_gathering_exchange_equals_the_full_model():
    full = small_model().eval()
    recorded = record_exchanges(full)
    x = torch.randn(2, 3, 32, 32)
    expected = full(x)
    calls = dict(recorded)

    partial = small_model(columns=[1]).eval()
    partial.load_state_dict({k: v for k, v in full.state_dict().items() if k.startswith("columns.1.")})

    def fake_gather(point: str, parts: list[torch.Tensor]) -> torch.Tensor:
        # Stands in for an all-gather across column ranks: column 0's activations come from the full model.
        (local,) = parts
        torch.testing.assert_close(local, calls[point][1])
        return torch.cat([calls[point][0], local], dim=1)

    partial.exchange = fake_gather
    torch.testing.assert_close(partial(x), expected)


def test_partial_model_with_the_default_exchange_raises():
    partial = small_model(columns=[0])
    with pytest.raises(RuntimeError, match=r"only column\(s\) \[0\].*'conv3'.*gathers the other columns"):
        partial(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize(
    ("num_classes", "split"), [(2, (1, 1)), (7, (4, 3)), (10, (5, 5)), (1001, (501, 500))]
)
def test_output_layer_split(num_classes, split):
    with torch.device("meta"):
        model = TwoColumnAlexNet(num_classes=num_classes, input_size=32, width=1 / 16)
    assert model.column_classes == split
    assert tuple(model.columns[str(c)].fc8.out_features for c in (0, 1)) == split


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1}, r"num_classes must be >= 2 .* got 1"),
        ({"columns": []}, r"`columns` must be a non-empty list .* got \[\]"),
        ({"columns": [2]}, r"got \[2\]"),
        ({"columns": [0, 0]}, r"distinct .* got \[0, 0\]"),
        ({"columns": [1.0]}, r"got \[1.0\]"),
        ({"width": -1.0}, r"`width`"),
        ({"dropout": 1.5}, r"`dropout`"),
        ({"stem": "big"}, r"unknown stem='big'"),
        ({"input_size": 10}, r"input_size=10 is too small"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TwoColumnAlexNet(**{"input_size": 32, **kwargs})


def test_forward_rejects_a_wrong_image_size():
    model = small_model()
    with pytest.raises(ValueError, match=r"TwoColumnAlexNet expected .*\(N, 3, 32, 32\).*input_size=28"):
        model(torch.zeros(2, 3, 28, 28))
