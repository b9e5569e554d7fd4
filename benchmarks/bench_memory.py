"""Peak memory (RSS) of training and evaluation, and how it grows with the dataset.

    python benchmarks/bench_memory.py --data-dir /tmp/cifar10

Each command runs in its own subprocess; its peak resident set size is what the kernel reports
for that child (``os.wait4``), alongside the ``peak_rss_mb`` that ``cerberus train`` writes in
summary.json. The runs (1 epoch of a small ResNet, [1, 1, 1] x [16, 32, 64], batch 256):

* train on the first 5,000 training images, then on all 50,000 (``data.val_size=0``), then on all
  50,000 with ``data.val_size=5000`` (the split copies the images it keeps);
* ``cerberus eval`` of the full run's best.pt on the 10,000 test images;
* ``cerberus eval`` of a ResNet-24 state_dict (random weights) on the 10,000 test images.

Everything that scales with the data should be the uint8 images themselves: 3,072 bytes per
image, 153.6 MB for the 50,000 training images and 30.7 MB for the 10,000 test images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, cerberus_command, describe_machine

IMAGE_BYTES = 3 * 32 * 32

CONFIG = """\
name = "bench-memory"
seed = 0

[model]
blocks = [1, 1, 1]
channels = [16, 32, 64]

[data]
val_size = 0

[augment]
crop_padding = 4
flip = true

[train]
epochs = 1
batch_size = 256
lr = 0.2
"""


def peak_rss_of(args: list[str]) -> tuple[float, str]:
    """Peak RSS (megabytes, 10^6 bytes) of a child process and its stdout."""
    with tempfile.TemporaryFile(mode="w+") as out:
        child = subprocess.Popen(args, stdout=out, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        stderr = child.stderr.read()
        child.stderr.close()
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {child.returncode}:\n{stderr[-3000:]}")
        out.seek(0)
        return usage.ru_maxrss * 1024 / 1e6, out.read()  # ru_maxrss: KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    args = parser.parse_args()
    print(describe_machine())
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    config = work / "memory.toml"
    config.write_text(CONFIG)
    cerberus = cerberus_command()

    def train(name: str, *sets: str) -> float:
        out = work / name
        cmd = [*cerberus, "train", str(config), "--data-dir", args.data_dir, "--out", str(out), "--json"]
        rss, _ = peak_rss_of(cmd + (["--set", *sets] if sets else []))
        summary = json.loads((out / "summary.json").read_text())
        print(
            f"  train {name:28s} peak RSS {rss:7.1f} MB (summary.json: {summary['peak_rss_mb']:.1f} MB)",
            flush=True,
        )
        return rss

    print("training, 1 epoch of [1, 1, 1] x [16, 32, 64]:")
    small = train("train_subset=5000", "data.train_subset=5000")
    full = train("all 50,000")
    train("all, val_size=5000", "data.val_size=5000")
    extra_images = 50_000 - 5_000
    print(
        f"  full - subset = {full - small:.1f} MB; the {extra_images:,} extra images are "
        f"{extra_images * IMAGE_BYTES / 1e6:.1f} MB as uint8"
    )

    print("evaluation of the 10,000 test images:")
    rss, _ = peak_rss_of(
        [*cerberus, "eval", str(work / "all 50,000" / "best.pt"), "--data-dir", args.data_dir, "--json"]
    )
    print(f"  cerberus eval (small net best.pt)     peak RSS {rss:7.1f} MB", flush=True)
    weights = work / "resnet24.pt"
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, torch; from cerberus.model import resnet24; torch.manual_seed(0); "
            "torch.save(resnet24().state_dict(), sys.argv[1])",
            str(weights),
        ],
        check=True,
        cwd=ROOT,
    )
    rss, _ = peak_rss_of([*cerberus, "eval", str(weights), "--data-dir", args.data_dir, "--json"])
    print(f"  cerberus eval (ResNet-24 state_dict)  peak RSS {rss:7.1f} MB")


if __name__ == "__main__":
    main()
