"""Dataset statistics computed from the data in one streaming pass."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch


def channel_moments(batches: Iterable[torch.Tensor], scale: float = 1.0 / 255.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of image batches, in one pass (:func:`moment_sums`, then
    :func:`statistics_from_sums`).

    Sums are kept in float64, so the result does not depend on how the data is split into batches (up to
    rounding) and does not lose precision on large data sets.

    Args:
        batches: tensors of shape ``(N, C, H, W)`` (uint8 or float); all must have the same channel count.
        scale: factor applied to the values first (``1/255`` maps uint8 to ``[0, 1]``).

    Returns:
        ``(mean, std)``, float32 tensors of shape ``(C,)``; the population standard deviation.

    Example:
        >>> x = torch.tensor([[[[0, 255]]], [[[255, 255]]]], dtype=torch.uint8)  # 2 images, 1 channel, 1x2
        >>> mean, std = channel_moments([x])
        >>> round(mean.item(), 4), round(std.item(), 4)
        (0.75, 0.433)
    """
    stats = statistics_from_sums(moment_sums(batches, scale=scale))
    return stats["mean"], stats["std"]


def moment_sums(
    batches: Iterable[torch.Tensor], feature_covariance: bool = False, scale: float = 1.0 / 255.0,
    max_features: int = 4096,
) -> dict[str, torch.Tensor]:
    """Float64 sufficient statistics of image batches, in one pass: the pieces that add across shards and ranks.

    Args:
        batches: tensors ``(N, C, H, W)`` (uint8 or float), all of one shape apart from ``N``.
        feature_covariance: also sum the outer products of whole flattened images (for image-level whitening).
        scale: factor applied to the values first (``1/255`` maps uint8 to ``[0, 1]``).
        max_features: refuse image-level sums beyond this many features per image (``C·H·W``).

    Returns:
        ``count`` (images), ``pixels`` (pixel positions), ``pixel_sum`` (C,), ``pixel_outer`` (C, C) summed over every pixel, and with
        ``feature_covariance`` also ``feature_sum`` (D,) and ``feature_outer`` (D, D).

    Example:
        >>> sums = moment_sums([torch.full((2, 1, 2, 2), 255, dtype=torch.uint8)])
        >>> sums["count"].item(), sums["pixel_sum"].tolist(), sums["pixel_outer"].tolist()
        (2.0, [8.0], [[8.0]])
    """
    sums: dict[str, torch.Tensor] = {}
    shape = None
    for x in batches:
        if x.ndim != 4:
            raise ValueError(f"expected image batches of shape (N, C, H, W); got shape {tuple(x.shape)}")
        if shape is None:
            shape = x.shape[1:]
            features = shape.numel()
            if feature_covariance and features > max_features:
                raise ValueError(
                    f"image-level whitening of {tuple(shape)} images needs a {features}x{features} covariance, "
                    f"above max_features={max_features}; use whitening_scope='channel', or smaller images."
                )
        elif x.shape[1] != shape[0]:
            raise ValueError(f"channel count changed between batches: {shape[0]} then {x.shape[1]}")
        elif x.shape[1:] != shape:
            raise ValueError(f"image shape changed between batches: {tuple(shape)} then {tuple(x.shape[1:])}")
        x = x.to(torch.float64) * scale
        pixels = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, N·H·W)
        update = {"count": torch.tensor(float(x.shape[0]), dtype=torch.float64),
                  "pixels": torch.tensor(float(pixels.shape[1]), dtype=torch.float64), "pixel_sum": pixels.sum(1),
                  "pixel_outer": pixels @ pixels.T}
        if feature_covariance:
            flat = x.reshape(x.shape[0], -1)
            update["feature_sum"], update["feature_outer"] = flat.sum(0), flat.T @ flat
        for key, value in update.items():
            sums[key] = sums[key] + value if key in sums else value
    if not sums or sums["count"].item() == 0:
        raise ValueError("cannot compute statistics of an empty data set; check the training split")
    return sums


def whitening_matrix(covariance: torch.Tensor, kind: str, epsilon: float) -> torch.Tensor:
    """The PCA (``diag(λ+ε)^-½ Uᵀ``) or ZCA (``U diag(λ+ε)^-½ Uᵀ``) whitening matrix of a covariance ``U diag(λ) Uᵀ``.

    ``epsilon`` is relative: ``ε = epsilon · mean(λ)``, so it does not depend on the scale of the data; it keeps
    directions of (near) zero variance from being amplified into noise.

    Example:
        >>> w = whitening_matrix(torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64), "zca", 0.0)
        >>> w.diagonal().tolist()
        [0.5, 1.0]
    """
    if kind not in ("pca", "zca"):
        raise ValueError(f"whitening must be 'pca' or 'zca'; got {kind!r}.")
    values, vectors = torch.linalg.eigh(covariance.to(torch.float64))
    values = values.clamp_min(0.0)
    scale = (values + epsilon * values.mean()).rsqrt()
    pca = scale[:, None] * vectors.T
    return pca if kind == "pca" else vectors @ pca


def statistics_from_sums(
    sums: dict[str, torch.Tensor], whitening: Optional[str] = None, epsilon: float = 1e-2
) -> dict[str, torch.Tensor]:
    """Mean, standard deviation and covariance per channel, principal components of the pixel colours (for
    fancy-PCA lighting) and, with ``whitening``, the whitening transform, from :func:`moment_sums`' sums.

    The returned ``whitening_mean`` and ``whitening_matrix`` act on flattened images when the sums hold image-level
    terms, else on the channels of each pixel.

    Example:
        >>> x = torch.tensor([[[[0, 255]]], [[[255, 255]]]], dtype=torch.uint8)
        >>> stats = statistics_from_sums(moment_sums([x]))
        >>> round(stats["mean"].item(), 4), round(stats["std"].item(), 4)
        (0.75, 0.433)
    """
    count = sums["count"]
    pixels = sums["pixels"]
    mean = sums["pixel_sum"] / pixels
    covariance = sums["pixel_outer"] / pixels - torch.outer(mean, mean)
    out = {"count": count.clone(), "mean": mean.float(), "std": covariance.diagonal().clamp_min(0.0).sqrt().float(),
           "pixel_covariance": covariance.float()}
    values, vectors = torch.linalg.eigh(covariance)
    out["pixel_eigenvalues"], out["pixel_eigenvectors"] = values.clamp_min(0.0).float(), vectors.float()
    if whitening is not None:
        if "feature_sum" in sums:
            centre = sums["feature_sum"] / count
            target = sums["feature_outer"] / count - torch.outer(centre, centre)
        else:
            centre, target = mean, covariance
        out["whitening_mean"] = centre.float()
        out["whitening_matrix"] = whitening_matrix(target, whitening, epsilon).float()
    return out
