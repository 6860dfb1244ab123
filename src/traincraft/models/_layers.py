"""Helpers shared by the models: argument checks, the paper's LRN, AlexNet size arithmetic and layers."""

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

Activation = Literal["relu", "tanh", "sigmoid"]
Norm = Literal["batch", "layer", "weight", "none"]
Stem = Literal["auto", "imagenet", "small"]
Init = Literal["paper", "kaiming"]

# Krizhevsky et al. 2012, section 3.3.
LRN_K, LRN_N, LRN_ALPHA, LRN_BETA = 2.0, 5, 1e-4, 0.75

# conv1 (kernel, stride, padding) per stem; every other layer is the same for all stems.
STEMS: dict[str, tuple[int, int, int]] = {"imagenet": (11, 4, 0), "small": (3, 1, 1)}
AUTO_STEM_MIN_SIZE = 128

# Layers whose bias the paper initialises to 1 "to accelerate the early stages of learning" (section 5).
_PAPER_UNIT_BIAS = frozenset({"conv2", "conv4", "conv5", "fc6", "fc7"})


# --- argument validation -------------------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(model: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{model}: `{name}` must be a positive integer, got {value!r}. Pass e.g. {name}=10.")


def check_common(model: str, num_classes: object, in_channels: object, input_size: object) -> None:
    """Check the arguments every registered model takes."""
    for name, value in (
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("input_size", input_size),
    ):
        check_positive_int(model, name, value)


def check_positive_ints(model: str, name: str, values: object, allow_empty: bool = False) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{model}: `{name}` must be a list of positive integers, got {values!r}.")
    values = list(values)
    if not values and not allow_empty:
        raise ValueError(f"{model}: `{name}` must list at least one size, got an empty list.")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(
            f"{model}: every entry of `{name}` must be a positive integer, got {values!r}. Remove or fix the bad entries."
        )
    return values


def check_width(model: str, width: object) -> None:
    if not _is_number(width) or not math.isfinite(width) or width <= 0:
        raise ValueError(
            f"{model}: `width` multiplies every layer's size and must be a number > 0, got {width!r}. "
            "Use 1.0 for the paper's sizes or e.g. 0.25 for a network four times narrower."
        )


def check_dropout(model: str, p: object) -> None:
    if not _is_number(p) or not 0.0 <= p < 1.0:
        raise ValueError(
            f"{model}: `dropout` is a drop probability and must lie in [0, 1), got {p!r}. "
            "Use 0.0 to disable dropout or e.g. 0.5 as in the paper."
        )


def check_choice(model: str, name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(
            f"{model}: unknown {name}={value!r}; allowed values are {', '.join(map(repr, allowed))}."
        )


def check_images(model: str, x: torch.Tensor, in_channels: int, input_size: int) -> None:
    """Raise if `x` is not a float (N, in_channels, input_size, input_size) batch; reads metadata only."""
    expected = f"(N, {in_channels}, {input_size}, {input_size})"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{model} expected a tensor of shape {expected}, got {type(x).__name__}.")
    shape = tuple(x.shape)
    if x.ndim != 4:
        hint = " Add the batch dimension with x.unsqueeze(0)." if x.ndim == 3 else ""
        raise ValueError(f"{model} expected a 4-D batch of images {expected}, got shape {shape}.{hint}")
    if shape[1] != in_channels:
        raise ValueError(
            f"{model} expected images of shape {expected}, got {shape} ({shape[1]} channels): build the model "
            f"with in_channels={shape[1]} or convert the images to {in_channels} channels."
        )
    if shape[2:] != (input_size, input_size):
        raise ValueError(
            f"{model} expected images of shape {expected}, got {shape}: resize (or crop) the images to "
            f"{input_size}x{input_size} or build the model with input_size={shape[2]}"
            + ("." if shape[2] == shape[3] else " (the model takes square images only).")
        )
    if not x.is_floating_point():
        raise ValueError(
            f"{model} expected float images, got dtype {x.dtype}: convert them first, e.g. x.float() / 255 "
            "followed by normalization."
        )


# --- size arithmetic -----------------------------------------------------------------------------------------


def scaled(size: int, width: float) -> int:
    """`size * width` rounded half up (not Python's round-half-to-even), at least 1."""
    return max(1, math.floor(size * width + 0.5))


def out_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output side of a convolution or pooling window (floor mode); <= 0 when the input is too small."""
    return (size + 2 * padding - kernel) // stride + 1


def alexnet_feature_size(input_size: int, stem: str) -> int:
    """Side of the pooled conv5 maps of AlexNet for a given input side and resolved stem."""
    kernel, stride, padding = STEMS[stem]
    size = out_size(input_size, kernel, stride, padding)  # conv1
    for _ in range(3):  # pool1, (conv2 keeps the size) pool2, (conv3-5 keep it) pool5
        if size < 3:
            return 0
        size = out_size(size, 3, 2)
    return size


def resolve_stem(model: str, stem: str, input_size: int) -> str:
    """Turn "auto" into a concrete stem and check that the input is large enough for it."""
    check_choice(model, "stem", stem, ("auto", *STEMS))
    if stem == "auto":
        stem = "imagenet" if input_size >= AUTO_STEM_MIN_SIZE else "small"
    if alexnet_feature_size(input_size, stem) < 1:
        minimum = next(s for s in range(1, 1024) if alexnet_feature_size(s, stem) >= 1)
        hint = " or stem='small'" if stem == "imagenet" else ""
        raise ValueError(
            f"{model}: input_size={input_size} is too small for stem={stem!r}: the feature maps shrink to 0 "
            f"before the last pooling. Use input_size >= {minimum}{hint}."
        )
    return stem


# --- layers --------------------------------------------------------------------------------------------------


def paper_lrn() -> nn.LocalResponseNorm:
    """Local response normalization b = a / (k + alpha * sum_{window of n} a^2)^beta with the paper's constants."""
    # torch's LocalResponseNorm computes alpha / n * sum(a^2), so alpha * n gives the paper's formula.
    return nn.LocalResponseNorm(size=LRN_N, alpha=LRN_ALPHA * LRN_N, beta=LRN_BETA, k=LRN_K)


def make_activation(name: str) -> nn.Module:
    # Separate, not in-place modules: monitors hook them, and an in-place ReLU would rewrite the
    # tensor that a hook on the previous layer kept.
    return {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[name]()


def make_dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def alexnet_conv_layers(
    in_channels: int, channels: Sequence[int], conv3_in: int, stem: str
) -> "OrderedDict[str, nn.Module]":
    """conv1..pool5 of AlexNet, named as in the paper; `conv3_in` lets a column take both columns' maps."""
    c1, c2, c3, c4, c5 = channels
    kernel, stride, padding = STEMS[stem]
    return OrderedDict(
        conv1=nn.Conv2d(in_channels, c1, kernel, stride, padding),
        relu1=nn.ReLU(),
        norm1=paper_lrn(),
        pool1=nn.MaxPool2d(3, 2),  # overlapping pooling (section 3.4)
        conv2=nn.Conv2d(c1, c2, 5, padding=2),
        relu2=nn.ReLU(),
        norm2=paper_lrn(),
        pool2=nn.MaxPool2d(3, 2),
        conv3=nn.Conv2d(conv3_in, c3, 3, padding=1),
        relu3=nn.ReLU(),
        conv4=nn.Conv2d(c3, c4, 3, padding=1),
        relu4=nn.ReLU(),
        conv5=nn.Conv2d(c4, c5, 3, padding=1),
        relu5=nn.ReLU(),
        pool5=nn.MaxPool2d(3, 2),
    )


def alexnet_fc_layers(
    in_features: int, hidden: int, fc7_in: int, fc8_in: int, out_features: int, dropout: float
) -> "OrderedDict[str, nn.Module]":
    """fc6..fc8 of AlexNet; dropout acts on the outputs of fc6 and fc7 (section 4.2)."""
    return OrderedDict(
        fc6=nn.Linear(in_features, hidden),
        relu6=nn.ReLU(),
        drop6=make_dropout(dropout),
        fc7=nn.Linear(fc7_in, hidden),
        relu7=nn.ReLU(),
        drop7=make_dropout(dropout),
        fc8=nn.Linear(fc8_in, out_features),
    )


def init_alexnet_(model: nn.Module, init: str) -> None:
    """Initialise every conv/linear layer of an AlexNet-like model in place; layers are recognised by name."""
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if init == "paper":
            nn.init.normal_(module.weight, mean=0.0, std=0.01)
            nn.init.constant_(module.bias, 1.0 if name.rsplit(".", 1)[-1] in _PAPER_UNIT_BIAS else 0.0)
        else:
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)


def norm_layer(norm: str, features: int, spatial: bool) -> nn.Module:
    """The normalization that sits between a conv/linear layer and its nonlinearity."""
    if norm == "batch":
        return nn.BatchNorm2d(features) if spatial else nn.BatchNorm1d(features)
    if norm == "layer":
        # GroupNorm with one group normalizes each sample over (C, H, W), i.e. LayerNorm for feature maps.
        return nn.GroupNorm(1, features) if spatial else nn.LayerNorm(features)
    return nn.Identity()  # "weight" reparametrizes the layer itself; "none" does nothing


def normalized(layer: nn.Module, norm: str) -> nn.Module:
    """Apply weight normalization (Salimans & Kingma 2016) to `layer` when `norm == "weight"`."""
    if norm == "weight":
        return nn.utils.parametrizations.weight_norm(layer)
    return layer


def has_bias(norm: str) -> bool:
    # Batch and layer norm subtract the mean and add their own shift, which would cancel a bias.
    return norm not in ("batch", "layer")
