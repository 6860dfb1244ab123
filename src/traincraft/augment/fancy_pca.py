"""AlexNet's "fancy PCA" lighting: per-sample offsets along the principal components of the RGB pixel colours."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from traincraft.augment._sample import apply_selected, check_images, check_probability


class FancyPCALighting(nn.Module):
    """Add ``Σᵢ αᵢ λᵢ vᵢ`` to every pixel of a sample, with αᵢ ~ N(0, sigma²) drawn once per sample.

    ``λᵢ, vᵢ`` are the eigenvalues and eigenvectors of the 3×3 covariance of RGB pixel values over the training
    set (Krizhevsky et al., 2012, §4.1: σ = 0.1, "reduces the top-1 error rate by over 1%"). Pass them directly,
    or leave them out: an :class:`~traincraft.data.ImageDataModule` computes them from its training split in
    ``setup`` and hands them to every ``FancyPCALighting`` in its pipeline (:meth:`set_principal_components`).

    Args:
        sigma: standard deviation of the α coefficients.
        eigenvalues: the 3 eigenvalues of the pixel covariance (pixels in ``[0, 1]``).
        eigenvectors: 3×3 matrix whose columns are the matching eigenvectors.
        p: probability that a sample is relit.

    Example:
        >>> import torch
        >>> light = FancyPCALighting(sigma=0.1, eigenvalues=[0.05, 0.01, 0.002],
        ...                          eigenvectors=torch.eye(3).tolist())
        >>> y = light(torch.full((2, 3, 4, 4), 0.5))
        >>> bool((y[:, :, 0, 0, None, None] == y).all())  # one colour offset per sample
        True
    """

    def __init__(
        self,
        sigma: float = 0.1,
        eigenvalues: Optional[list[float]] = None,
        eigenvectors: Optional[list[list[float]]] = None,
        p: float = 1.0,
    ) -> None:
        super().__init__()
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0; got {sigma}.")
        check_probability("p", p)
        self.sigma, self.p = float(sigma), p
        # Host tensors, not buffers: the per-sample offsets are computed on the host with the other draws, and a
        # buffer moved to an accelerator would have to be read back on every step.
        self.eigenvalues, self.eigenvectors = torch.zeros(3), torch.eye(3)
        self.fitted = False
        if (eigenvalues is None) != (eigenvectors is None):
            raise ValueError("give both eigenvalues and eigenvectors, or neither (the DataModule then computes them).")
        if eigenvalues is not None:
            self.set_principal_components(torch.as_tensor(eigenvalues), torch.as_tensor(eigenvectors))

    def set_principal_components(self, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor) -> None:
        """Use these eigenvalues (3,) and eigenvectors (3, 3, one per column) of the RGB pixel covariance."""
        eigenvalues, eigenvectors = eigenvalues.float(), eigenvectors.float()
        if eigenvalues.shape != (3,) or eigenvectors.shape != (3, 3):
            raise ValueError(
                f"FancyPCALighting needs 3 eigenvalues and a 3x3 eigenvector matrix (RGB); got shapes "
                f"{tuple(eigenvalues.shape)} and {tuple(eigenvectors.shape)}."
            )
        if bool((eigenvalues < 0).any()):
            raise ValueError(f"eigenvalues of a covariance are >= 0; got {eigenvalues.tolist()}.")
        self.eigenvalues, self.eigenvectors = eigenvalues.detach().cpu().clone(), eigenvectors.detach().cpu().clone()
        self.fitted = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forward_check(x)
        return apply_selected(x, self.p, self._relight)

    def forward_(self, x: torch.Tensor) -> torch.Tensor:
        """In place on ``x`` (used by :class:`~traincraft.augment.compose.Compose` on batches it owns)."""
        if self.p < 1.0:
            return self(x)
        self.forward_check(x)
        return x.add_(self._offsets(x))

    def fusable_offsets(self, x: torch.Tensor) -> bool:
        """Whether :meth:`channel_offsets` can stand in for this op on ``x`` (every sample relit: ``p == 1``).

        Checks ``x`` as :meth:`forward` would, so a fused pipeline raises the same errors as an unfused one.
        """
        self.forward_check(x)
        return self.p == 1.0

    def channel_offsets(self, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Draw this op's (n, 3) per-sample RGB offsets, for an op that adds them while it writes its output."""
        alpha = torch.randn(n, 3).mul_(self.sigma)
        offset = (alpha * self.eigenvalues) @ self.eigenvectors.T  # (n, 3) in RGB
        return offset.to(device, dtype, non_blocking=True)

    def forward_check(self, x: torch.Tensor) -> None:
        check_images(type(self).__name__, x, channels=3)
        if not self.fitted:
            raise RuntimeError(
                "FancyPCALighting has no principal components: pass eigenvalues/eigenvectors, or use it inside an "
                "ImageDataModule, which computes them from the training split in setup()."
            )

    def _offsets(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_offsets(x.shape[0], x.device, x.dtype)[:, :, None, None]

    def _relight(self, x: torch.Tensor) -> torch.Tensor:
        # Not clipped to [0, 1], as in AlexNet: clipping would bias bright and dark pixels (and cost a pass).
        return x + self._offsets(x)
