"""Single-column AlexNet (Krizhevsky, Sutskever & Hinton 2012)."""

import torch
from torch import nn

from traincraft.models import _layers as L


class AlexNet(nn.Module):
    """AlexNet as one column: the paper's layers with the two GPUs' filters merged and no grouping.

    conv1-conv5 have 96-256-384-384-256 filters (kernels 11/5/3/3/3, conv1 with stride 4), each followed by a
    ReLU; local response normalization (k=2, n=5, alpha=1e-4, beta=0.75) follows the ReLUs of conv1 and conv2;
    overlapping 3x3 stride-2 max-pooling follows conv1, conv2 and conv5; then fc6 and fc7 (4096 units, ReLU,
    dropout on their outputs) and fc8 (the logits). At 227x227 RGB input and 1000 classes the model has
    62,378,344 parameters. The flattened feature size is computed from ``input_size``: there is no adaptive
    pooling, so the model rejects images of any other size.

    Small inputs keep the topology: ``stem="small"`` replaces only conv1's 11x11 stride-4 window by a 3x3
    stride-1 one (padding 1), so 32x32 images give 32 -> pool 15 -> pool 7 -> pool 3 maps.

    Parameter names are stable, so per-layer settings can match them with globs such as ``features.conv1.*``:

    ============================================  ==============================================
    module                                        role
    ============================================  ==============================================
    ``features.conv1`` ... ``features.conv5``     convolutions (``.weight``, ``.bias``)
    ``features.relu1`` ... ``features.relu5``     ReLU modules (hook points; not in-place)
    ``features.norm1``, ``features.norm2``        local response normalization (no parameters)
    ``features.pool1``, ``.pool2``, ``.pool5``    max-pooling
    ``classifier.fc6``, ``.fc7``, ``.fc8``        fully connected layers (``.weight``, ``.bias``)
    ``classifier.relu6``, ``.relu7``              ReLU modules
    ``classifier.drop6``, ``.drop7``              dropout (``nn.Identity`` when ``dropout=0``)
    ============================================  ==============================================

    Args:
        num_classes: number of output logits.
        in_channels: channels of the input images.
        input_size: side in pixels of the (square) input images.
        width: multiplier of every layer's size (filters and fc units), rounded half up, at least 1.
        dropout: drop probability applied to the outputs of fc6 and fc7 during training.
        stem: conv1's window: ``"imagenet"`` (11x11, stride 4, as in the paper), ``"small"`` (3x3, stride 1,
            padding 1, for 32x32-like images) or ``"auto"`` (``"imagenet"`` when ``input_size >= 128``).
        init: ``"paper"`` draws weights from N(0, 0.01^2) with biases 1 in conv2, conv4, conv5, fc6, fc7 and 0
            elsewhere; ``"kaiming"`` (default) uses He-normal weights for ReLU and zero biases. The paper's
            fixed standard deviation shrinks the signal at every layer of a narrow network (the variance gain
            per layer is fan_in * 1e-4 / 2, far below 1 unless fan_in is in the thousands), so small models
            barely move for many epochs; He init keeps the activations' scale at any width.

    Raises:
        ValueError: on a non-positive size, ``width <= 0``, ``dropout`` outside [0, 1), an unknown
            ``stem``/``init``, or an ``input_size`` too small for the stem.

    Example:
        >>> model = AlexNet(num_classes=10, input_size=32, width=0.25)
        >>> model.stem
        'small'
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> [name for name, _ in model.named_parameters()][:2]
        ['features.conv1.weight', 'features.conv1.bias']
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        input_size: int = 227,
        width: float = 1.0,
        dropout: float = 0.5,
        stem: L.Stem = "auto",
        init: L.Init = "kaiming",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        L.check_common(name, num_classes, in_channels, input_size)
        L.check_width(name, width)
        L.check_dropout(name, dropout)
        L.check_choice(name, "init", init, ("paper", "kaiming"))
        self.num_classes, self.in_channels, self.input_size = num_classes, in_channels, input_size
        self.stem = L.resolve_stem(name, stem, input_size)

        channels = [L.scaled(c, width) for c in (96, 256, 384, 384, 256)]
        hidden = L.scaled(4096, width)
        side = L.alexnet_feature_size(input_size, self.stem)
        self.feature_shape = (channels[-1], side, side)
        self.features = nn.Sequential(L.alexnet_conv_layers(in_channels, channels, channels[1], self.stem))
        self.classifier = nn.Sequential(
            L.alexnet_fc_layers(channels[-1] * side * side, hidden, hidden, hidden, num_classes, dropout)
        )
        L.init_alexnet_(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map float images (N, in_channels, input_size, input_size) to logits (N, num_classes)."""
        L.check_images(type(self).__name__, x, self.in_channels, self.input_size)
        return self.classifier(torch.flatten(self.features(x), 1))
