"""LightningModules to subclass."""

from traincraft.modules.classifier import ImageClassifier
from traincraft.modules.param_groups import apply_lr_multipliers, layerwise_param_groups

__all__ = ["ImageClassifier", "apply_lr_multipliers", "layerwise_param_groups"]
