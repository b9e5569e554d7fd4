"""Would a Winograd 3x3 convolution written in PyTorch beat oneDNN's direct one on this CPU?

    python benchmarks/probe_winograd.py             # one line per layer shape, forward only

Winograd's F(m x m, 3 x 3) computes an m x m output tile from an (m+2) x (m+2) input tile with
(m+2)^2 multiplications per input and output channel pair instead of 9 m^2: 2.25 times fewer for
m = 2, 4 times fewer for m = 4. Written with PyTorch operations (tiles cut by ``unfold``, the
input and output transforms as products with Kronecker matrices, the channel mixing as one
batched matrix product per tile position), it is timed against ``F.conv2d`` on the same
channels_last input, for the 3x3 layers of ResNet-24 (batches of 64, as evaluation slices them)
and of ``configs/cpu-fast.toml``'s design (batches of 128, as it trains).

Columns: oneDNN's rate in GFLOP/s of direct convolution, then for each tile size the whole
Winograd forward's speed relative to oneDNN's, the batched matrix product's alone (the ceiling if
the transforms cost nothing), and the output's error relative to oneDNN's (norm of the difference
over the norm). Medians of ``--reps`` timings, the variants interleaved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from _common import describe_machine, gemm_gflops

# Lavin & Gray (2016): output = A^T [(G g G^T) * (B^T d B)] A.
TRANSFORMS = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}

# (label, batch, side, in channels, out channels)
LAYERS = [
    ("ResNet-24 stage 1", 64, 32, 64, 64),
    ("ResNet-24 stage 2", 64, 16, 128, 128),
    ("ResNet-24 stage 3", 64, 8, 256, 256),
    ("cpu-fast stage 2 entry", 128, 15, 32, 128),
    ("cpu-fast stage 2", 128, 7, 128, 128),
    ("cpu-fast stage 3", 128, 3, 128, 128),
]


def kronecker(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three transforms as Kronecker products, so each is one matrix product over a tile."""
    bt, g, at = (torch.tensor(t, dtype=torch.float64) for t in TRANSFORMS[m])
    return tuple(torch.kron(t, t).float() for t in (bt, g, at))


def filters(w: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """(K, C, 3, 3) filters -> (a*a, C, K): transformed once, as a trained model would keep them."""
    k, c = w.shape[:2]
    return (g2 @ w.reshape(k, c, 9).permute(2, 1, 0).reshape(9, c * k)).reshape(-1, c, k)


def winograd(x: torch.Tensor, u: torch.Tensor, bt2: torch.Tensor, at2: torch.Tensor, m: int) -> torch.Tensor:
    """3x3 convolution, stride 1, padding 1, of channels_last ``x`` (N, C, H, W) by filters ``u``."""
    n, c, h, w = x.shape
    a = m + 2
    th, tw = -(-h // m), -(-w // m)
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, tw * m - w + 1, 1, th * m - h + 1))  # (N, H', W', C)
    tiles = padded.unfold(1, a, m).unfold(2, a, m).reshape(n * th * tw, c, a * a)  # (T, C, a*a)
    v = torch.matmul(tiles, bt2.t()).permute(2, 0, 1)  # (a*a, T, C)
    mixed = torch.bmm(v, u)  # (a*a, T, K)
    k = u.shape[2]
    y = torch.matmul(at2, mixed.reshape(a * a, -1)).reshape(m, m, n, th, tw, k)
    y = y.permute(2, 3, 0, 4, 1, 5).reshape(n, th * m, tw * m, k)[:, :h, :w]
    return y.permute(0, 3, 1, 2)


def measure(batch: int, side: int, cin: int, cout: int, reps: int) -> dict:
    """One layer shape: oneDNN's rate, each Winograd variant's speed relative to it, its error."""
    x = torch.randn(batch, cin, side, side).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, 3, 3) / (3 * cin**0.5)
    variants = {"onednn": partial(F.conv2d, x, w, padding=1)}
    errors = {}
    with torch.no_grad():
        reference = F.conv2d(x, w, padding=1)
        for m in TRANSFORMS:
            bt2, g2, at2 = kronecker(m)
            u = filters(w, g2)
            errors[m] = ((winograd(x, u, bt2, at2, m) - reference).norm() / reference.norm()).item()
            v = torch.randn((m + 2) ** 2, batch * (-(-side // m)) ** 2, cin)  # the transformed tiles
            variants[f"F{m}"] = partial(winograd, x, u, bt2, at2, m)
            variants[f"F{m} product"] = partial(torch.bmm, v, u)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for run in variants.values():
            run()  # warm-up
        for _ in range(reps):  # interleaved
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    row = {"onednn_gflops": 2 * batch * side * side * cin * cout * 9 / med["onednn"] / 1e9}
    for m in TRANSFORMS:
        row[f"F{m}_speed"] = med["onednn"] / med[f"F{m}"]
        row[f"F{m}_product_speed"] = med["onednn"] / med[f"F{m} product"]
        row[f"F{m}_error"] = errors[m]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=7, help="timings per variant (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    machine, gemm = describe_machine(), gemm_gflops()
    rows = [
        {"layer": label, "shape": [b, cin, side, side, cout], **measure(b, side, cin, cout, args.reps)}
        for label, b, side, cin, cout in LAYERS
    ]
    if args.json:
        print(json.dumps({"machine": machine, "gemm_gflops": gemm, "layers": rows}, indent=2))
        return
    print(machine)
    print(f"fp32 GEMM probe: {gemm:.0f} GFLOP/s; forward only, medians of {args.reps}\n")
    print(
        "| layer (batch, side, in -> out) | oneDNN GFLOP/s | F(2,3) | its product | F(4,3) | its product ",
        end="",
    )
    print("| error F2 / F4 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        b, cin, side, _, cout = r["shape"]
        print(
            f"| {r['layer']} ({b}, {side}, {cin} -> {cout}) | {r['onednn_gflops']:.0f} "
            f"| {r['F2_speed']:.2f}x | {r['F2_product_speed']:.2f}x "
            f"| {r['F4_speed']:.2f}x | {r['F4_product_speed']:.2f}x "
            f"| {r['F2_error']:.0e} / {r['F4_error']:.0e} |"
        )


if __name__ == "__main__":
    main()
