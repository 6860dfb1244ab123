"""Optimizers that ``torch.optim`` lacks, usable from YAML (``class_path: traincraft.optim.DeltaBarDelta``), and a
learning rate suggested from the loss's curvature (:func:`suggest_learning_rate`)."""

from traincraft.optim.delta_bar_delta import DeltaBarDelta
from traincraft.optim.lr_suggestion import LRSuggestion, lr_from_curvature, suggest_learning_rate

__all__ = ["DeltaBarDelta", "LRSuggestion", "lr_from_curvature", "suggest_learning_rate"]
