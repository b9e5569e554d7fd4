"""What every benchmark shares: the machine's description, medians, timed subprocesses.

Timings on a shared machine are noisy, so the benchmarks interleave the variants they compare
(A, B, A, B, ...) and report medians and ratios measured in the same run, never absolute targets.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository
BENCHMARKS = ROOT / "benchmarks"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def describe_machine() -> str:
    """One line: CPU, cores, vector extensions, torch, threads, load average now."""
    import torch

    from cerberus.device import cpu_flags

    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
    flags = [f for f in wanted if f in cpu_flags()]
    return (
        f"{cpu_model()}, {os.cpu_count()} cores ({', '.join(flags) or 'no AVX flags'}), "
        f"torch {torch.__version__} (capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads), Python {platform.python_version()}, "
        f"load average {load_average()}"
    )


def gemm_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Median fp32 GEMM rate of this machine now (MKL via torch.mm): the practical FLOP ceiling."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def median(values) -> float:
    return statistics.median(values)


def timed_command(args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> tuple[float, str]:
    """Wall seconds of a subprocess from start to exit, and its stdout; raises on failure."""
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def last_json(stdout: str, key: str | None = None) -> dict:
    """The last JSON object printed (with ``key`` when given)."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            data = json.loads(line)
            if key is None or key in data:
                return data
    raise ValueError("no JSON line in the output")


def cerberus_command() -> list[str]:
    """The installed console script, as a user runs it (start-up costs included)."""
    script = Path(sys.executable).with_name("cerberus")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cerberus"]


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that timings cover it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_steps_seconds(model, optimizer, x, y, placement, steps: int) -> float:
    """Seconds for ``steps`` bare forward + backward + optimizer steps on one fixed batch.

    The reference a training loop is compared with: no data, augmentation or bookkeeping, the same
    model, precision (``placement.autocast``) and layout (``x``'s memory format).
    """
    import torch.nn.functional as F

    model.train()
    synchronize(x.device)
    start = time.perf_counter()
    for _ in range(steps):
        with placement.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(x.device)
    return time.perf_counter() - start
