"""Does oneDNN's channels_last (NHWC) backward pass on this CPU agree with NCHW, design by design?

    python benchmarks/probe_nhwc_backward.py            # the default sweep, one line per design

For each design, in a subprocess of its own (a hang or a crash then costs only that design): one
forward + backward of the same model and batch in fp64 (the reference), in fp32 NCHW and in fp32
NHWC, and the error of each fp32 gradient against the reference (the norm of the difference of
all weight gradients, relative to the reference's norm). Rounding alone gives ~1e-6; a ReLU or
max-pool that decides differently in fp32 than in fp64 gives up to a few 1e-3, in either layout.
A design fails when the NHWC error exceeds ``--tolerance`` (default 0.01) or ``--timeout`` seconds
pass without an answer (a hang). The last column is what
:func:`cerberus.arch.nhwc_backward_hazard` predicts: the strided 1x1 convolution it expects
oneDNN to get wrong (oneDNN issue #6035: on x86 CPUs the 1x1 backward-weights kernel writes past
its workspace for NHWC inputs with fewer channels than its channel block, 8 with AVX2 and 16 with
AVX-512), or ``-`` for none.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys

CHILD = r"""
import json, sys, torch
from cerberus.arch import Architecture
from cerberus.model import build_model
spec = json.loads(sys.argv[1])
torch.manual_seed(0)
arch = Architecture(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
reference = build_model(arch).double()
x = torch.randn(16, 3, 32, 32)
y = torch.randint(0, 10, (16,))
grads = {}
for name in ("fp64", "nchw", "nhwc"):
    if name == "fp64":
        model, inp = reference, x.double()
    else:
        layout = torch.channels_last if name == "nhwc" else torch.contiguous_format
        model = build_model(arch).to(memory_format=layout)
        model.load_state_dict(reference.state_dict())
        inp = x.contiguous(memory_format=layout)
    torch.nn.functional.cross_entropy(model(inp), y).backward()
    grads[name] = torch.cat([p.grad.double().flatten() for p in model.parameters()])
exact = grads["fp64"]
print(json.dumps({k: ((grads[k] - exact).norm() / exact.norm()).item() for k in ("nchw", "nhwc")}))
"""


def sweep() -> list[dict]:
    designs = []
    for width, downsample, skip in itertools.product(
        (2, 4, 6, 8, 12, 16, 24, 32), ("stride", "pool"), (1, 3)
    ):
        designs.append(
            {
                "blocks": [1, 1, 1],
                "channels": [width, 2 * width, 4 * width],
                "downsample": downsample,
                "skip_kernel": skip,
            }
        )
    designs.append(
        {"blocks": [1, 1], "channels": [8, 16], "conv_kernel": 1, "skip_kernel": 3}
    )  # 1x1 block conv
    designs.append({"blocks": [1, 1, 1], "channels": [16, 8, 16]})  # the narrow input in a later stage
    designs.append({"blocks": [3, 5, 3], "channels": [64, 128, 256]})
    designs.append(
        {
            "blocks": [1, 1, 1],
            "channels": [32, 128, 128],
            "stem_channels": 24,
            "downsample": "pool",
            "stem_kernel": 2,
        }
    )
    return designs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a design counts as hung")
    parser.add_argument("--tolerance", type=float, default=0.01, help="largest relative gradient error")
    args = parser.parse_args()

    import torch

    from cerberus.arch import Architecture, nhwc_backward_hazard

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (each design's subprocess alike)")
    missed, cautious = 0, 0
    designs = sweep()
    for spec in designs:
        arch = Architecture(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
        predicted = nhwc_backward_hazard(arch) or "-"
        try:
            done = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(spec)],
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            if done.returncode != 0:
                outcome = f"crashed (exit {done.returncode})"
            else:
                errors = json.loads(done.stdout.strip().splitlines()[-1])
                verdict = "ok" if errors["nhwc"] <= args.tolerance else "WRONG"
                outcome = f"{verdict} (NHWC {errors['nhwc']:.1e}, NCHW {errors['nchw']:.1e})"
        except subprocess.TimeoutExpired:
            outcome = f"hung (> {args.timeout:g} s)"
        failed = not outcome.startswith("ok")
        missed += failed and predicted == "-"
        cautious += not failed and predicted != "-"
        print(f"{json.dumps(spec):110s} {outcome:38s} {predicted}", flush=True)
    print(
        f"{len(designs)} designs: {missed} failed without a predicted hazard; {cautious} passed this "
        "time despite one (the rule also covers AVX-512's 16-channel block, and a stray write's "
        "effect varies from run to run)"
    )


if __name__ == "__main__":
    main()
