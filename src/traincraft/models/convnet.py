"""A small VGG-style convolutional network for quick experiments."""

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from traincraft.models import _layers as L


class ConvNet(nn.Module):
    """Stages of two 3x3 convolutions and a 2x2 max-pool, global average pooling and a two-layer head.

    Each stage is ``conv -> norm -> activation -> conv -> norm -> activation -> max-pool``; the normalization
    sits between each layer and its nonlinearity (Ioffe & Szegedy 2015), so a monitor can hook the
    nonlinearity's input. After the stages: global average pooling -> dropout -> linear(``hidden``) ->
    activation -> dropout -> linear(``num_classes``). At the defaults (1 input channel, 10 classes) it has about
    0.30M parameters and reaches ~99% on sklearn's digits upscaled to 32x32 in ~15 epochs.

    Normalization choices: ``"batch"`` (BatchNorm2d after every conv), ``"layer"`` (``GroupNorm(1, C)`` after
    every conv, i.e. LayerNorm over (C, H, W)), ``"weight"`` (weight normalization of every conv and of the
    hidden linear layer, no norm layer) and ``"none"``. Convs followed by batch or layer norm have no bias.
    The fully connected part has no norm layer, so training works at any batch size; the output layer
    ``head`` is never normalized.

    Module names (``{i}`` is the stage index):

    ======================================================  ===============================================
    module                                                  role
    ======================================================  ===============================================
    ``blocks.{i}.conv1``, ``blocks.{i}.conv2``              3x3 convolutions, padding 1
    ``blocks.{i}.norm1``, ``blocks.{i}.norm2``              norm layers (``nn.Identity`` for weight/none)
    ``blocks.{i}.act1``, ``blocks.{i}.act2``                activation modules (ReLU/Tanh/Sigmoid)
    ``blocks.{i}.pool``                                     2x2 max-pooling
    ``gap``                                                 global average pooling
    ``fc.linear``, ``fc.act``                               hidden linear layer and its activation
    ``fc.drop_in``, ``fc.drop``                             dropout before and after it
    ``head``                                                output layer
    ======================================================  ===============================================

    With ``norm="weight"`` a layer's weight becomes ``<layer>.parametrizations.weight.original0`` (magnitude)
    and ``.original1`` (direction). Dropout modules are ``nn.Identity`` when ``dropout=0``.

    Args:
        num_classes: number of output logits.
        in_channels: channels of the input images.
        input_size: side in pixels of the (square) input images; at least ``2 ** len(channels)``.
        channels: filters of each stage; each stage halves the spatial size.
        hidden: units of the hidden fully connected layer.
        norm: ``"batch"``, ``"layer"``, ``"weight"`` or ``"none"``.
        activation: ``"relu"``, ``"tanh"`` or ``"sigmoid"``.
        dropout: drop probability before and after the hidden fully connected layer.

    Raises:
        ValueError: on a non-positive size, an empty ``channels``, an unknown ``norm``/``activation``,
            ``dropout`` outside [0, 1) or an ``input_size`` too small for the number of stages.

    Example:
        >>> model = ConvNet(num_classes=10, in_channels=1, input_size=32, channels=[8, 16], hidden=32)
        >>> model(torch.zeros(4, 1, 32, 32)).shape
        torch.Size([4, 10])
        >>> type(model.blocks[0].act1).__name__
        'ReLU'
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 32,
        channels: Sequence[int] = (32, 64, 128),
        hidden: int = 128,
        norm: L.Norm = "batch",
        activation: L.Activation = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        L.check_common(name, num_classes, in_channels, input_size)
        L.check_positive_int(name, "hidden", hidden)
        channels = L.check_positive_ints(name, "channels", channels)
        L.check_choice(name, "norm", norm, ("batch", "layer", "weight", "none"))
        L.check_choice(name, "activation", activation, ("relu", "tanh", "sigmoid"))
        L.check_dropout(name, dropout)
        if input_size < 2 ** len(channels):
            raise ValueError(
                f"{name}: input_size={input_size} is too small for {len(channels)} stages, each of which halves "
                f"the feature maps. Use input_size >= {2 ** len(channels)} or fewer entries in `channels`."
            )
        self.num_classes, self.in_channels, self.input_size = num_classes, in_channels, input_size

        def conv(c_in: int, c_out: int) -> nn.Module:
            return L.normalized(nn.Conv2d(c_in, c_out, 3, padding=1, bias=L.has_bias(norm)), norm)

        blocks = []
        for c_in, c_out in zip([in_channels, *channels[:-1]], channels, strict=True):
            blocks.append(
                nn.Sequential(
                    OrderedDict(
                        conv1=conv(c_in, c_out),
                        norm1=L.norm_layer(norm, c_out, spatial=True),
                        act1=L.make_activation(activation),
                        conv2=conv(c_out, c_out),
                        norm2=L.norm_layer(norm, c_out, spatial=True),
                        act2=L.make_activation(activation),
                        pool=nn.MaxPool2d(2),
                    )
                )
            )
        self.blocks = nn.Sequential(*blocks)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            OrderedDict(
                drop_in=L.make_dropout(dropout),
                linear=L.normalized(nn.Linear(channels[-1], hidden), norm),
                act=L.make_activation(activation),
                drop=L.make_dropout(dropout),
            )
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map float images (N, in_channels, input_size, input_size) to logits (N, num_classes)."""
        L.check_images(type(self).__name__, x, self.in_channels, self.input_size)
        return self.head(self.fc(torch.flatten(self.gap(self.blocks(x)), 1)))
