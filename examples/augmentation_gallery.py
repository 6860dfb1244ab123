"""A gallery per preset: real images on top, four augmented draws of each below.

digits: the scikit-learn digits at 32x32 with the `digits` preset; cifar and alexnet: crops of the two photographs
that scikit-learn ships (no download) at 32x32 and 256x256 with the `cifar` and `alexnet` presets (fancy-PCA
lighting fitted to those photographs' pixels, exaggerated 3x so it is visible).

    .venv/bin/python examples/augmentation_gallery.py --out runs/gallery
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_sample_images

from traincraft.augment.gallery import gallery_grid, save_png
from traincraft.augment.presets import alexnet, cifar, digits
from traincraft.data.digits import DigitsDataModule
from traincraft.data.statistics import moment_sums, statistics_from_sums


def photo_crops(size: int, count: int) -> torch.Tensor:
    photos = [torch.from_numpy(p.copy()).permute(2, 0, 1) for p in load_sample_images().images]  # uint8 (3, 427, 640)
    crops = []
    for i in range(count):
        photo = photos[i % 2].float()
        side = 200 + 40 * (i // 2)
        top, left = (17 * i) % (photo.shape[1] - side), (53 * i) % (photo.shape[2] - side)
        crop = photo[None, :, top : top + side, left : left + side]
        crops.append(F.interpolate(crop, size=size, mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(crops).round().clamp(0, 255).to(torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gallery", help="folder for gallery_<preset>.png")
    args = parser.parse_args()
    data = DigitsDataModule(image_size=32)
    data.setup("fit")
    print(save_png(gallery_grid(data.datasets["train"].images[:8], digits()), f"{args.out}/gallery_digits.png"))
    print(save_png(gallery_grid(photo_crops(32, 8), cifar()), f"{args.out}/gallery_cifar.png"))
    big = photo_crops(256, 4)
    stats = statistics_from_sums(moment_sums([big]))
    pipeline = alexnet(sigma=0.3)
    pipeline[1].set_principal_components(stats["pixel_eigenvalues"], stats["pixel_eigenvectors"])
    grid = gallery_grid(big, pipeline, rows=3)
    grid = F.interpolate(grid[None].float(), scale_factor=0.5, mode="bilinear", antialias=True)[0]  # keep it small
    print(save_png(grid.round().to(torch.uint8), f"{args.out}/gallery_alexnet.png"))


if __name__ == "__main__":
    main()
