"""The constructor checks of ImageDataModule's options: each error says what is allowed."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from traincraft.augment import PRESETS
from traincraft.data._interleave import SPACINGS


def check_options(
    *, sampler: str, interleave_spacing: str, eval_crop: Any, whitening: Optional[str], whitening_scope: str,
    normalize: bool, whitening_epsilon: float, batch_size: Any, eval_batch_size: Any, num_workers: int, augment: Any,
) -> None:
    """Raise on an invalid ImageDataModule option, saying what is allowed."""
    if sampler not in ("shuffle", "class_interleaved"):
        raise ValueError(f"sampler must be 'shuffle' or 'class_interleaved'; got {sampler!r}.")
    if interleave_spacing not in SPACINGS:
        raise ValueError(f"interleave_spacing must be one of {SPACINGS}; got {interleave_spacing!r}.")
    if eval_crop not in ("auto", "none") and (not isinstance(eval_crop, int) or eval_crop <= 0):
        raise ValueError(f"eval_crop must be 'auto', 'none' or a positive size; got {eval_crop!r}.")
    if whitening not in (None, "pca", "zca"):
        raise ValueError(f"whitening must be None, 'pca' or 'zca'; got {whitening!r}.")
    if whitening_scope not in ("channel", "image"):
        raise ValueError(f"whitening_scope must be 'channel' or 'image'; got {whitening_scope!r}.")
    if whitening is not None and not normalize:
        raise ValueError("whitening is a kind of normalization; set normalize=True (or whitening=None).")
    if whitening_epsilon < 0:
        raise ValueError(f"whitening_epsilon must be >= 0; got {whitening_epsilon}.")
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0; got {num_workers}.")
    if isinstance(augment, str) and augment not in ("default", "none", *PRESETS):
        raise ValueError(
            f"unknown augment {augment!r}; choose 'default', 'none', one of the presets "
            f"{sorted(PRESETS)}, or pass an nn.Module (class_path in YAML)."
        )
    if augment is not None and not isinstance(augment, (str, nn.Module)):
        raise TypeError(f"augment must be a string or an nn.Module; got {type(augment).__name__}.")
