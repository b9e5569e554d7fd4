"""Designs counted per second by ``cerberus search`` (enumeration), against counting one by one.

    python benchmarks/bench_search_count.py            # best of 3 runs per space

The issue asks for at least 100,000 designs per second. The vectorised count is exact (the tests
check it against cerberus.arch.count_params and against built models); the one-by-one baseline
is cerberus.arch.count_params + count_macs on each design of a sample.
"""

from __future__ import annotations

import argparse
import itertools
import time

from cerberus.arch import count_macs, count_params
from cerberus.search import SearchSpace, enumerate_designs, space_from_dict

SPACES = {
    "default (3-4 stages, 1-16 blocks, 6 widths)": {},
    "wide (3-5 stages, 1-16 blocks, 6 widths x 2 growths, F 3/5, K 1/3)": {
        "stages": [3, 4, 5],
        "growth": [1.5, 2.0],
        "conv_kernel": [3, 5],
        "skip_kernel": [1, 3],
    },
}


def best_of(runs: int, fn) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def one_by_one_rate(space: SearchSpace, sample: int = 20_000) -> float:
    """Designs per second when each is counted with cerberus.arch (the pre-vectorised way)."""
    result = enumerate_designs(space, top=1)
    arch = result.candidates[0].architecture
    designs = itertools.islice(itertools.product(range(1, 17), repeat=len(arch.blocks)), sample)
    start = time.perf_counter()
    for blocks in designs:
        a = type(arch)(blocks, arch.channels, arch.conv_kernel, arch.skip_kernel, arch.pool_size)
        count_params(a)
        count_macs(a)
    return sample / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions; the best is reported")
    args = parser.parse_args()
    for name, data in SPACES.items():
        space = space_from_dict(data)
        seconds, result = best_of(args.runs, lambda space=space: enumerate_designs(space, top=10))
        print(
            f"{name}: {result.total:,} designs, {result.within_budget:,} within "
            f"{space.max_params:,}, counted in {seconds:.3f}s = {result.total / seconds:,.0f} designs/s"
        )
    print(f"one by one with cerberus.arch: {one_by_one_rate(SearchSpace()):,.0f} designs/s")


if __name__ == "__main__":
    main()
