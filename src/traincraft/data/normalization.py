"""Normalization with the training split's statistics: an nn.Module whose statistics are buffers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

# Kept beside mean and std: the whitening transform, and the pixel colours' principal components (fancy-PCA lighting)
STATISTIC_KEYS = ("count", "whitening_mean", "whitening_matrix", "pixel_eigenvalues", "pixel_eigenvectors")


class Normalization(nn.Module):
    """Standardizes float images ``(N, C, H, W)`` with per-channel mean and standard deviation, or whitens them.

    The statistics (those of :func:`~traincraft.data.statistics_from_sums`: ``mean`` and ``std`` per channel,
    ``count``, the whitening transform, the principal components of the pixel colours) are buffers: they move with
    ``.to(device)`` and are the module's ``state_dict``, which loads into a module that has none yet. Until
    :meth:`set_statistics` runs the buffers are ``None``. :class:`~traincraft.data.ImageDataModule` holds one and
    applies it to every batch on the device.

    Args:
        whitening: ``None`` (divide by the standard deviation), ``"pca"`` or ``"zca"``: apply the statistics'
            ``whitening_matrix`` to ``x - whitening_mean``.
        scope: with whitening, ``"image"`` (the transform acts on flattened images) or ``"channel"`` (on the colour
            channels of every pixel, a 1x1 convolution).

    Example:
        >>> norm = Normalization()
        >>> norm.set_statistics({"mean": torch.tensor([0.5]), "std": torch.tensor([0.25])})
        >>> norm(torch.full((1, 1, 2, 2), 0.75)).flatten().tolist()
        [1.0, 1.0, 1.0, 1.0]
        >>> sorted(norm.state_dict())
        ['mean', 'std']
    """

    mean: Optional[torch.Tensor]
    std: Optional[torch.Tensor]

    def __init__(
        self, whitening: Optional[Literal["pca", "zca"]] = None, scope: Literal["channel", "image"] = "image"
    ) -> None:
        super().__init__()
        if whitening not in (None, "pca", "zca"):
            raise ValueError(f"whitening must be None, 'pca' or 'zca'; got {whitening!r}.")
        if scope not in ("channel", "image"):
            raise ValueError(f"scope must be 'channel' or 'image'; got {scope!r}.")
        self.whitening, self.scope = whitening, scope
        for name in ("mean", "std", *STATISTIC_KEYS):
            self.register_buffer(name, None)
        # The whitening transform in the form forward applies: derived once here, not on every batch.
        self.register_buffer("weight", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    @property
    def statistics(self) -> dict[str, torch.Tensor]:
        """The statistics other than ``mean`` and ``std`` that are set (a new dict of the buffers)."""
        return {key: getattr(self, key) for key in STATISTIC_KEYS if getattr(self, key) is not None}

    def set_statistics(self, stats: Mapping[str, Any]) -> None:
        """Take ``mean`` and ``std`` (tensors or lists) and those of the other statistics that ``stats`` holds;
        the ones it lacks are cleared."""
        self.mean, self.std = torch.as_tensor(stats["mean"]), torch.as_tensor(stats["std"])
        for key in STATISTIC_KEYS:
            setattr(self, key, stats.get(key))
        self.weight = self.bias = None
        if self.whitening is not None and self.whitening_matrix is not None:
            matrix, centre = self.whitening_matrix, self.whitening_mean
            self.bias = -(matrix @ centre)
            self.weight = matrix[:, :, None, None] if self.scope == "channel" else matrix.T.contiguous()

    def checkpoint_state(self) -> dict[str, Any]:
        """The statistics in the format ImageDataModule checkpoints have always had: ``mean`` and ``std`` as lists,
        the others as CPU tensors; ``{}`` before :meth:`set_statistics`."""
        if not self.fitted:
            return {}
        state = {key: value.cpu() for key, value in self.state_dict().items()}
        state["mean"], state["std"] = state["mean"].tolist(), state["std"].tolist()
        return state

    def load_checkpoint_state(self, state: Mapping[str, Any], owner: str = "ImageDataModule") -> None:
        """Take the statistics of a :meth:`checkpoint_state` (or a ``state_dict``), refusing those of data with
        another channel count, or without the whitening transform this module applies."""
        mean, std = torch.as_tensor(state["mean"]), torch.as_tensor(state["std"])
        if self.mean is not None and mean.shape != self.mean.shape:
            raise ValueError(
                f"the checkpoint's normalization statistics have {mean.numel()} channels but this data has "
                f"{self.mean.numel()}; the checkpoint comes from a different data set."
            )
        if self.whitening is not None and "whitening_matrix" not in state:
            raise ValueError(
                f"this {owner} whitens its inputs (whitening={self.whitening!r}) but the checkpoint has "
                "no whitening statistics; it was trained without whitening. Set whitening=None to use it."
            )
        self.set_statistics({"mean": mean, "std": std, **{k: state[k] for k in STATISTIC_KEYS if k in state}})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None or self.std is None:
            raise RuntimeError("Normalization has no statistics yet: call set_statistics (or load a state) first.")
        if self.whitening is None:
            shape = (1, -1, 1, 1)
            return (x - self.mean.view(shape)) / self.std.view(shape)
        if self.weight is None or self.bias is None:
            raise RuntimeError(f"whitening={self.whitening!r} needs whitening statistics; set_statistics got none.")
        if self.scope == "channel":  # a 1x1 convolution: W (x - μ) for every pixel
            return F.conv2d(x, self.weight, self.bias)
        if x[0].numel() != self.bias.numel():
            raise ValueError(
                f"image-level whitening was computed for images of {self.bias.numel()} values but got "
                f"{tuple(x.shape[1:])}; augmentation and eval_crop must keep the stored size, or use "
                "whitening_scope='channel'."
            )
        return torch.addmm(self.bias, x.flatten(1), self.weight).view_as(x)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        # nn.Module loads only into buffers that exist, and these are None until fitted: take the statistics here.
        names = ("mean", "std", *STATISTIC_KEYS)
        found = {name: state_dict[prefix + name] for name in names if prefix + name in state_dict}
        if strict:
            unexpected_keys.extend(key for key in state_dict if key.startswith(prefix) and key[len(prefix):] not in names)
        if not found:
            return
        if "mean" not in found or "std" not in found:
            error_msgs.append(f"a Normalization state needs both 'mean' and 'std'; got {sorted(found)}.")
            return
        self.set_statistics(found)
