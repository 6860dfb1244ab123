"""CPU time of traincraft's `cifar` and `alexnet` presets against the same operations composed from stock kornia.

Both pipelines run side by side in one process, interleaved repetition by repetition, on the same batches; the
figure is the ratio of medians (traincraft / kornia; the target is at most 0.5).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/augmentation.py --repeats 41

Both arms allocate 38 MB batches (alexnet), which glibc maps afresh each time: page faults are part of what is
measured. Prefix ``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296`` to keep every allocation on
the heap and measure the compute alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import kornia.augmentation as K
import torch

from traincraft.augment import alexnet, cifar
from traincraft.augment.fancy_pca import FancyPCALighting


def kornia_cifar() -> torch.nn.Module:
    return K.AugmentationSequential(
        K.RandomCrop((32, 32), padding=4),
        K.RandomHorizontalFlip(p=0.5),
        K.ColorJiggle(brightness=0.2, contrast=0.2, saturation=0.2, p=0.5),
    )


def kornia_alexnet(lighting: FancyPCALighting) -> torch.nn.Module:
    # kornia has no per-sample short-side rescale: the closest stock op is a square RandomResizedCrop whose area
    # fraction spans the same zoom range, (224/480)² .. (224/256)²; kornia has no fancy-PCA lighting either, so both
    # pipelines share traincraft's (cheap: one colour offset per sample).
    return torch.nn.Sequential(
        K.AugmentationSequential(
            K.RandomResizedCrop((224, 224), scale=((224 / 480) ** 2, (224 / 256) ** 2), ratio=(1.0, 1.0)),
            K.RandomHorizontalFlip(p=0.5),
        ),
        lighting,
    )


def measure(ours: torch.nn.Module, theirs: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    for fn in (ours, theirs):  # warm-up
        fn(x)
    times: dict[str, list[float]] = {"ours": [], "kornia": []}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("kornia", theirs)):
            start = time.perf_counter()
            with torch.no_grad():
                fn(x)
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["ours"]), statistics.median(times["kornia"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    tuned = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    allocator = ", ".join(f"{k}={v}" for k, v in sorted(tuned.items())) or "default allocator settings"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"glibc malloc: {allocator}")
    print("| preset | batch | traincraft (ms, median) | kornia (ms, median) | ratio |")
    print("|---|---|---|---|---|")
    x = torch.rand(256, 3, 32, 32)
    ours, theirs = measure(cifar(), kornia_cifar(), x, args.repeats)
    print(f"| cifar | 256×3×32×32 | {ours * 1e3:.2f} | {theirs * 1e3:.2f} | {ours / theirs:.3f} |")
    x = torch.rand(64, 3, 224, 224)
    pipeline = alexnet()
    pipeline[1].set_principal_components(torch.tensor([0.06, 0.006, 0.001]), torch.linalg.qr(torch.randn(3, 3))[0])
    ours, theirs = measure(pipeline, kornia_alexnet(pipeline[1]), x, args.repeats)
    print(f"| alexnet | 64×3×224×224 | {ours * 1e3:.1f} | {theirs * 1e3:.1f} | {ours / theirs:.3f} |")


if __name__ == "__main__":
    main()
