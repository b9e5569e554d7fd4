"""Start-up time of the command line: `cerberus --help` and `cerberus count-params`.

    python benchmarks/bench_startup.py            # median of 7 runs of each command

Each command runs in a fresh subprocess (the installed console script, as a user types it), the
commands alternating, and the median wall time is compared with the issue's limits: --help in
0.5 s, count-params in 3 s. ``python -c pass`` is timed alongside as the interpreter's own floor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cerberus_command, describe_machine, median, timed_command

LIMITS = {"--help": 0.5, "count-params --blocks 3 5 3": 3.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs of each command; the median is reported")
    args = parser.parse_args()
    print(describe_machine())
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        **{f"cerberus {name}": [*cerberus_command(), *name.split()] for name in LIMITS},
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, cmd in commands.items():
            times[name].append(timed_command(cmd)[0])
    for name, values in times.items():
        limit = LIMITS.get(name.removeprefix("cerberus "))
        verdict = f" (limit {limit} s: {'met' if median(values) <= limit else 'MISSED'})" if limit else ""
        print(
            f"{name:40s} median {median(values):.3f} s, min {min(values):.3f} s, "
            f"max {max(values):.3f} s{verdict}"
        )


if __name__ == "__main__":
    main()
