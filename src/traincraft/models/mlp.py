"""A multilayer perceptron on flattened images."""

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from traincraft.models import _layers as L


class MLP(nn.Module):
    """Fully connected network: flatten, then ``linear -> norm -> activation -> dropout`` per hidden layer.

    The normalization sits between the linear layer and the nonlinearity (Ioffe & Szegedy 2015), so a monitor
    hooking ``blocks.{i}.act`` sees the normalized pre-activations. Normalization choices: ``"batch"``
    (BatchNorm1d), ``"layer"`` (LayerNorm), ``"weight"`` (weight normalization of the hidden linear layers, no
    norm layer) and ``"none"``. Linear layers followed by batch or layer norm have no bias. The output layer
    ``head`` is never normalized. An empty ``hidden`` gives multinomial logistic regression.

    Module names (``{i}`` is the hidden layer index):

    ===========================  ======================================================================
    module                       role
    ===========================  ======================================================================
    ``flatten``                  (N, C, H, W) -> (N, C * H * W)
    ``blocks.{i}.linear``        hidden linear layer
    ``blocks.{i}.norm``          norm layer (``nn.Identity`` for ``"weight"`` and ``"none"``)
    ``blocks.{i}.act``           activation module (ReLU/Tanh/Sigmoid)
    ``blocks.{i}.drop``          dropout (``nn.Identity`` when ``dropout=0``)
    ``head``                     output layer
    ===========================  ======================================================================

    With ``norm="weight"`` a layer's weight becomes ``<layer>.parametrizations.weight.original0`` (magnitude)
    and ``.original1`` (direction).

    Args:
        num_classes: number of output logits.
        in_channels: channels of the input images.
        input_size: side in pixels of the (square) input images.
        hidden: units of each hidden layer, in order; may be empty.
        norm: ``"batch"``, ``"layer"``, ``"weight"`` or ``"none"``.
        activation: ``"relu"``, ``"tanh"`` or ``"sigmoid"``.
        dropout: drop probability after each hidden layer's activation.

    Raises:
        ValueError: on a non-positive size, an unknown ``norm``/``activation`` or ``dropout`` outside [0, 1).

    Example:
        >>> model = MLP(num_classes=10, in_channels=1, input_size=8, hidden=[32], norm="layer")
        >>> model(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
        >>> [name for name, _ in model.named_modules()][4:]
        ['blocks.0.linear', 'blocks.0.norm', 'blocks.0.act', 'blocks.0.drop', 'head']
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 32,
        hidden: Sequence[int] = (256, 128),
        norm: L.Norm = "batch",
        activation: L.Activation = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        L.check_common(name, num_classes, in_channels, input_size)
        hidden = L.check_positive_ints(name, "hidden", hidden, allow_empty=True)
        L.check_choice(name, "norm", norm, ("batch", "layer", "weight", "none"))
        L.check_choice(name, "activation", activation, ("relu", "tanh", "sigmoid"))
        L.check_dropout(name, dropout)
        self.num_classes, self.in_channels, self.input_size = num_classes, in_channels, input_size

        self.flatten = nn.Flatten()
        widths = [in_channels * input_size * input_size, *hidden]
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(
                    OrderedDict(
                        linear=L.normalized(nn.Linear(n_in, n_out, bias=L.has_bias(norm)), norm),
                        norm=L.norm_layer(norm, n_out, spatial=False),
                        act=L.make_activation(activation),
                        drop=L.make_dropout(dropout),
                    )
                )
                for n_in, n_out in zip(widths[:-1], widths[1:], strict=True)
            )
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map float images (N, in_channels, input_size, input_size) to logits (N, num_classes)."""
        L.check_images(type(self).__name__, x, self.in_channels, self.input_size)
        return self.head(self.blocks(self.flatten(x)))
