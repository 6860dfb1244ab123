"""MMD permutation test: batched index matrices (traincraft.metrics.drift.mmd_test) against a per-permutation
Python loop over the kernel matrix, side by side, on the same data and the same permutations.

    .venv/bin/python benchmarks/mmd.py --n 1000 --dims 32 --permutations 1000 --repeats 5

Both arms compute the same kernel matrix once (included in the timings) and the same permutation p-value; the loop
arm permutes the kernel matrix and evaluates the unbiased MMD² once per permutation. Repetitions are interleaved
(loop, batched, loop, ...) and the median is reported, so the ratio holds on a shared, busy machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from traincraft.metrics.drift import gaussian_kernel, median_bandwidth, mmd2_unbiased, mmd_test, random_splits


def loop_test(x: torch.Tensor, y: torch.Tensor, permutations: int, seed: int) -> tuple[float, float]:
    z = torch.cat([x, y])
    n = x.shape[0]
    kernel = gaussian_kernel(z, median_bandwidth(z))
    observed = mmd2_unbiased(kernel, n)
    splits = random_splits(permutations, n, z.shape[0], seed, z.device)
    exceed = 0
    for row in splits:  # one permutation per iteration: what a straightforward implementation does
        order = torch.cat([row.nonzero().flatten(), (row == 0).nonzero().flatten()])
        exceed += int(mmd2_unbiased(kernel[order][:, order], n) >= observed)
    return observed.item(), (1 + exceed) / (1 + permutations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="samples on each side")
    parser.add_argument("--dims", type=int, default=32)
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.dims, generator=g).to(args.device)
    y = (torch.randn(args.n, args.dims, generator=g) + 0.05).to(args.device)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {"loop": [], "batched": []}
    results = {}
    for _ in range(args.repeats):
        for arm in ("loop", "batched"):
            sync()
            start = time.perf_counter()
            if arm == "loop":
                results[arm] = loop_test(x, y, args.permutations, seed=1)
            else:
                r = mmd_test(x, y, args.permutations, seed=1)
                results[arm] = (r.statistic.item(), r.pvalue.item())
            sync()
            times[arm].append(time.perf_counter() - start)
    loop, batched = statistics.median(times["loop"]), statistics.median(times["batched"])
    print(f"MMD permutation test, {args.n} vs {args.n} samples x {args.dims} dims, {args.permutations} permutations, "
          f"{args.repeats} interleaved repeats, device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"  results (MMD², p): loop {results['loop'][0]:.6g}, {results['loop'][1]:.4f}; "
          f"batched {results['batched'][0]:.6g}, {results['batched'][1]:.4f}")
    print("| implementation | median time (s) | all runs (s) |")
    print("|---|---:|---|")
    for arm, label in (("loop", "per-permutation Python loop"), ("batched", "batched index matrices (`mmd_test`)")):
        print(f"| {label} | {statistics.median(times[arm]):.3f} | {', '.join(f'{t:.2f}' for t in times[arm])} |")
    print(f"speed-up: {loop / batched:.1f}x")


if __name__ == "__main__":
    main()
