"""The two-column AlexNet of Krizhevsky et al. 2012, with its cross-column connections made explicit."""

from typing import Optional

import torch
from torch import nn

from traincraft.models import _layers as L

_NUM_COLUMNS = 2
_LOWER = ("conv1", "relu1", "norm1", "pool1", "conv2", "relu2", "norm2", "pool2")
_UPPER = ("conv3", "relu3", "conv4", "relu4", "conv5", "relu5", "pool5")


class _Column(nn.Module):
    """One GPU's half of the network; the layers that read both columns are sized for that."""

    def __init__(
        self,
        in_channels: int,
        channels: list[int],
        side: int,
        hidden: int,
        classes: int,
        dropout: float,
        stem: str,
    ) -> None:
        super().__init__()
        # Plain attributes rather than nested Sequentials, so parameters read `columns.0.conv1.weight`.
        layers = L.alexnet_conv_layers(in_channels, channels, _NUM_COLUMNS * channels[1], stem)
        fc_in = _NUM_COLUMNS * channels[-1] * side * side
        layers.update(
            L.alexnet_fc_layers(fc_in, hidden, _NUM_COLUMNS * hidden, _NUM_COLUMNS * hidden, classes, dropout)
        )
        for name, module in layers.items():
            self.add_module(name, module)

    def _run(self, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        for name in names:
            x = self._modules[name](x)
        return x

    def lower(self, x: torch.Tensor) -> torch.Tensor:
        """conv1..pool2 on the input images."""
        return self._run(_LOWER, x)

    def upper(self, x: torch.Tensor) -> torch.Tensor:
        """conv3..pool5 on both columns' pooled conv2 maps, flattened."""
        return torch.flatten(self._run(_UPPER, x), 1)

    def hidden6(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop6(self.relu6(self.fc6(x)))

    def hidden7(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop7(self.relu7(self.fc7(x)))


class TwoColumnAlexNet(nn.Module):
    """AlexNet as the paper trained it on two GPUs: two columns that talk only at a few layers.

    Each column has conv1-conv5 with 48-128-192-192-128 filters and fc6/fc7 with 2048 units (all times
    ``width``), and the same kernels, normalization, pooling and dropout as :class:`AlexNet`. conv1, conv2,
    conv4 and conv5 see only their own column's maps; conv3, fc6, fc7 and fc8 read both columns. The output
    layer is split by class: column 0 produces the first ``ceil(num_classes / 2)`` logits, column 1 the rest.
    At 227x227 RGB input and 1000 classes the model has 60,965,224 parameters, the paper's figure.

    Every cross-connection goes through :meth:`exchange`, called once per forward at each point of
    :attr:`EXCHANGE_POINTS`, in order: ``"conv3"`` (pooled conv2 maps), ``"fc6"`` (flattened pooled conv5 maps),
    ``"fc7"`` and ``"fc8"`` (the dropped-out fc6 and fc7 activations) and ``"logits"`` (each column's slice of
    the logits). In one process with both columns it concatenates; a model-parallel strategy replaces it with
    a gather across ranks and builds each rank's model with ``columns=[rank]``, so only that column exists.
    Concatenating the flattened conv5 maps equals concatenating them along channels and then flattening, so the
    model equals a grouped-convolution AlexNet (``groups=2`` in conv2, conv4, conv5, LRN within each half).

    Parameter names (absent columns are simply missing; the names do not change):

    ========================================================  ==============================================
    module                                                    role
    ========================================================  ==============================================
    ``columns.{c}.conv1`` ... ``columns.{c}.conv5``           convolutions of column ``c`` (0 or 1)
    ``columns.{c}.fc6``, ``.fc7``, ``.fc8``                   fully connected layers of column ``c``
    ``columns.{c}.relu1`` ... ``.relu7``                      ReLU modules
    ``columns.{c}.norm1``, ``.norm2``                         local response normalization
    ``columns.{c}.pool1``, ``.pool2``, ``.pool5``             max-pooling
    ``columns.{c}.drop6``, ``.drop7``                         dropout (``nn.Identity`` when ``dropout=0``)
    ========================================================  ==============================================

    Args:
        num_classes: number of output logits, at least 2 (the output layer is split between the columns).
        in_channels: channels of the input images.
        input_size: side in pixels of the (square) input images.
        width: multiplier of every layer's size, rounded half up, at least 1.
        dropout: drop probability applied, per column, to the outputs of fc6 and fc7 during training.
        stem: conv1's window, as in :class:`AlexNet`: ``"imagenet"``, ``"small"`` or ``"auto"``.
        init: ``"paper"`` or ``"kaiming"`` (default), as in :class:`AlexNet`.
        columns: the columns materialized in this module, a non-empty subset of ``[0, 1]``; ``None`` means
            both. A partial model needs an :meth:`exchange` that gathers the other column's activations.

    Raises:
        ValueError: on invalid arguments (see :class:`AlexNet`), ``num_classes < 2`` or bad ``columns``.

    Example:
        >>> model = TwoColumnAlexNet(num_classes=10, input_size=32, width=0.25)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> TwoColumnAlexNet.EXCHANGE_POINTS
        ('conv3', 'fc6', 'fc7', 'fc8', 'logits')
        >>> model.column_classes
        (5, 5)
        >>> partial = TwoColumnAlexNet(num_classes=10, input_size=32, width=0.25, columns=[1])
        >>> next(iter(partial.state_dict()))
        'columns.1.conv1.weight'
    """

    EXCHANGE_POINTS: tuple[str, ...] = ("conv3", "fc6", "fc7", "fc8", "logits")

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        input_size: int = 227,
        width: float = 1.0,
        dropout: float = 0.5,
        stem: L.Stem = "auto",
        init: L.Init = "kaiming",
        columns: Optional[list[int]] = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        L.check_common(name, num_classes, in_channels, input_size)
        if num_classes < _NUM_COLUMNS:
            raise ValueError(
                f"{name}: num_classes must be >= {_NUM_COLUMNS} because each column owns a slice of the output "
                f"layer, got {num_classes}. Use AlexNet for a single output."
            )
        L.check_width(name, width)
        L.check_dropout(name, dropout)
        L.check_choice(name, "init", init, ("paper", "kaiming"))
        self.local_columns = self._check_columns(name, columns)
        self.num_classes, self.in_channels, self.input_size = num_classes, in_channels, input_size
        self.stem = L.resolve_stem(name, stem, input_size)

        channels = [L.scaled(c, width) for c in (48, 128, 192, 192, 128)]
        hidden = L.scaled(2048, width)
        side = L.alexnet_feature_size(input_size, self.stem)
        first = -(-num_classes // _NUM_COLUMNS)  # ceiling: column 0 takes the odd class
        self.column_classes = (first, num_classes - first)
        self.columns = nn.ModuleDict(
            {
                str(c): _Column(
                    in_channels, channels, side, hidden, self.column_classes[c], dropout, self.stem
                )
                for c in self.local_columns
            }
        )
        L.init_alexnet_(self, init)

    @staticmethod
    def _check_columns(name: str, columns: Optional[list[int]]) -> tuple[int, ...]:
        if columns is None:
            return tuple(range(_NUM_COLUMNS))
        valid = (
            not isinstance(columns, (str, bytes))
            and len(columns) > 0
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < _NUM_COLUMNS for c in columns)
            and len(set(columns)) == len(columns)
        )
        if not valid:
            raise ValueError(
                f"{name}: `columns` must be a non-empty list of distinct column indices from [0, 1], got "
                f"{columns!r}. Use None for both columns or [rank] for the column this process owns."
            )
        return tuple(sorted(columns))

    @property
    def is_partial(self) -> bool:
        """Whether some column lives in another process."""
        return len(self.local_columns) < _NUM_COLUMNS

    def exchange(self, point: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """Return the concatenation along dim 1 of every column's activations at `point`, in column order.

        `parts` holds the activations of the columns that live in this process (both, in one process).
        """
        if len(parts) != _NUM_COLUMNS:
            raise RuntimeError(
                f"{type(self).__name__} holds only column(s) {list(self.local_columns)}, so at exchange point "
                f"{point!r} it has {len(parts)} of {_NUM_COLUMNS} columns' activations. A partial model needs an "
                "`exchange` that gathers the other columns' activations from the processes that own them (e.g. "
                "under the column-parallel strategy); in one process build the model with columns=None."
            )
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map float images (N, in_channels, input_size, input_size) to logits (N, num_classes)."""
        L.check_images(type(self).__name__, x, self.in_channels, self.input_size)
        cols: list[_Column] = list(self.columns.values())  # built in column order
        h = self.exchange("conv3", [col.lower(x) for col in cols])
        h = self.exchange("fc6", [col.upper(h) for col in cols])
        h = self.exchange("fc7", [col.hidden6(h) for col in cols])
        h = self.exchange("fc8", [col.hidden7(h) for col in cols])
        return self.exchange("logits", [col.fc8(h) for col in cols])
