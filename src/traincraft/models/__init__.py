"""Plain ``nn.Module`` models (no Lightning): AlexNet in one and two columns, and small nets for experiments.

Every registered model takes ``num_classes``, ``in_channels`` and ``input_size`` (the side of square images)
and maps float images (N, C, H, W) to logits (N, num_classes); :func:`build_model` builds one by name.
"""

from traincraft.models.alexnet import AlexNet
from traincraft.models.convnet import ConvNet
from traincraft.models.mlp import MLP
from traincraft.models.registry import MODELS, available_models, build_model, model_accepts, register_model
from traincraft.models.two_column import TwoColumnAlexNet

__all__ = [
    "MLP",
    "MODELS",
    "AlexNet",
    "ConvNet",
    "TwoColumnAlexNet",
    "available_models",
    "build_model",
    "model_accepts",
    "register_model",
]
