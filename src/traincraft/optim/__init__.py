"""Optimizers that ``torch.optim`` lacks, usable from YAML (``class_path: traincraft.optim.DeltaBarDelta``)."""

from traincraft.optim.delta_bar_delta import DeltaBarDelta

__all__ = ["DeltaBarDelta"]
