"""Random affine warps and lens distortion, fused into one resample per batch."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from traincraft.augment._sample import apply_selected, check_images, check_probability, check_range, uniform


class RandomGeometry(nn.Module):
    """Per-sample translation, scaling, rotation, stretching, shearing and radial lens distortion, one resample.

    Every sample draws its own parameters; all the warps compose into one coordinate map, so the batch is
    resampled once (``grid_sample``) instead of once per op. Each component is off at its default; set only the
    ones you want (``RandomGeometry(degrees=15)`` is a plain random rotation).

    Args:
        degrees: rotation angle drawn from U(-degrees, degrees).
        translate: shift drawn from U(-t, t) times the width (x) and the height (y).
        scale: isotropic zoom factor range; values above 1 zoom in.
        stretch: independent x and y factor range (anisotropic scaling), applied on top of ``scale``.
        shear: shear angle in degrees drawn from U(-shear, shear), along x.
        distortion: radial lens-distortion coefficient k drawn from U(-d, d): the output point at normalized radius
            r samples the input at radius r·(1 + k·r²) (k > 0 barrel, k < 0 pincushion).
        padding_mode: what fills pixels mapped from outside the image: ``"zeros"``, ``"border"`` or ``"reflection"``.
        p: probability that a sample is warped; only the selected samples are computed.

    Example:
        >>> import torch
        >>> warp = RandomGeometry(degrees=10, translate=0.1, scale=(0.9, 1.1), shear=5, distortion=0.1)
        >>> warp(torch.rand(4, 3, 16, 16)).shape
        torch.Size([4, 3, 16, 16])
    """

    def __init__(
        self,
        degrees: float = 0.0,
        translate: float = 0.0,
        scale: tuple[float, float] = (1.0, 1.0),
        stretch: tuple[float, float] = (1.0, 1.0),
        shear: float = 0.0,
        distortion: float = 0.0,
        padding_mode: Literal["zeros", "border", "reflection"] = "zeros",
        p: float = 1.0,
    ) -> None:
        super().__init__()
        for name, value in (("degrees", degrees), ("translate", translate), ("shear", shear), ("distortion", distortion)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0 (the range is symmetric around 0); got {value}.")
        if shear >= 90:
            raise ValueError(f"shear must be below 90 degrees; got {shear}.")
        if padding_mode not in ("zeros", "border", "reflection"):
            raise ValueError(f"padding_mode must be 'zeros', 'border' or 'reflection'; got {padding_mode!r}.")
        check_probability("p", p)
        self.degrees, self.translate, self.shear, self.distortion = float(degrees), float(translate), float(shear), float(distortion)
        self.scale = check_range("scale", tuple(scale), low=1e-3)
        self.stretch = check_range("stretch", tuple(stretch), low=1e-3)
        self.padding_mode = padding_mode
        self.p = p

    def sample_parameters(self, n: int) -> dict[str, torch.Tensor]:
        """Host draws for ``n`` samples: ``angle`` and ``shear`` (radians), ``sx``, ``sy`` (total x/y scale),
        ``tx``, ``ty`` (shift as a fraction of width/height) and ``k`` (distortion)."""
        angle = uniform(n, -self.degrees, self.degrees).mul_(math.pi / 180.0)
        zoom = uniform(n, *self.scale)
        sx, sy = zoom * uniform(n, *self.stretch), zoom * uniform(n, *self.stretch)
        shear = uniform(n, -self.shear, self.shear).mul_(math.pi / 180.0)
        tx, ty = uniform(n, -self.translate, self.translate), uniform(n, -self.translate, self.translate)
        k = uniform(n, -self.distortion, self.distortion)
        return {"angle": angle, "sx": sx, "sy": sy, "shear": shear, "tx": tx, "ty": ty, "k": k}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(type(self).__name__, x)
        return apply_selected(x, self.p, lambda v: self.apply(v, self.sample_parameters(v.shape[0])))

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Warp every sample of ``x`` with the given (host) parameters."""
        n, _, height, width = x.shape
        theta = inverse_affine(params, height, width).to(x.device, x.dtype, non_blocking=True)
        grid = F.affine_grid(torch.eye(2, 3, dtype=x.dtype, device=x.device)[None], [1, 1, height, width],
                             align_corners=False)
        if self.distortion > 0:
            radius2 = grid.square().sum(-1, keepdim=True)  # (1, H, W, 1)
            grid = grid * (1.0 + params["k"].to(x.device, x.dtype, non_blocking=True).view(n, 1, 1, 1) * radius2)
        else:
            grid = grid.expand(n, -1, -1, -1)
        grid = grid @ theta[:, None, :, :2].transpose(-1, -2) + theta[:, None, None, :, 2]
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=self.padding_mode, align_corners=False)


def inverse_affine(params: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
    """The (n, 2, 3) map from output to input in ``affine_grid``'s normalized coordinates.

    The forward warp in pixel units about the image centre is ``R(angle) · Shear_x(shear) · diag(sx, sy)``
    followed by the shift; working in pixels keeps rotations rigid on non-square images.
    """
    angle, shear = params["angle"], params["shear"].tan()
    sx, sy = params["sx"], params["sy"]
    cos, sin = angle.cos(), angle.sin()
    a, b = cos * sx, (cos * shear - sin) * sy
    c, d = sin * sx, (sin * shear + cos) * sy
    inverse = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / (a * d - b * c)[:, None, None]
    aspect = torch.tensor([width / 2.0, height / 2.0])
    inverse = inverse * aspect[None, None, :] / aspect[None, :, None]  # D⁻¹ A D
    shift = -(inverse @ (2.0 * torch.stack([params["tx"], params["ty"]], -1))[:, :, None])
    return torch.cat([inverse, shift], dim=2)
