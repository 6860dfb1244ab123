"""Batched on-device augmentation built on kornia."""

from traincraft.augment.presets import digits

PRESETS = {"digits": digits}

__all__ = ["PRESETS", "digits"]
