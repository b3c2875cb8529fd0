"""How long `fedlayer run bad.toml` takes to say what is wrong (goal: < 1.5 s).

Wall time of the whole subprocess (interpreter start, imports, validation, the one-line error), median of
``--repeat`` runs, beside `python -c pass` (the interpreter's own start) in the same invocation.
``--baseline DIR`` also times the same command with another checkout first on PYTHONPATH (e.g. the code
before a change), so the figures are side by side.

    .venv/bin/python bench/config_latency.py [--repeat 5] [--baseline /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BAD = "seed = 0\n\n[train]\nlr = -1.0\n"


def wall_seconds(args: list[str], pythonpath: Path, repeat: int, expect: int) -> float:
    """Median wall time of ``args`` run ``repeat`` times; each run must exit with ``expect``."""
    env = os.environ | {"PYTHONPATH": str(pythonpath), "FLWR_TELEMETRY_ENABLED": "0"}
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        proc = subprocess.run(args, env=env, cwd=pythonpath, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        if proc.returncode != expect:
            raise SystemExit(f"{' '.join(args)}: exit {proc.returncode}, expected {expect}\n{proc.stderr}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="another checkout to time the same command with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "bad.toml"
        bad.write_text(BAD)
        command = [sys.executable, "-m", "fedlayer.cli", "run", str(bad), "--out", str(Path(tmp) / "run")]
        rows = [("python -c pass", wall_seconds([sys.executable, "-c", "pass"], ROOT, args.repeat, 0))]
        if args.baseline is not None:
            rows.append(
                (
                    f"fedlayer run bad.toml ({args.baseline})",
                    wall_seconds(command, args.baseline, args.repeat, 2),
                )
            )
        rows.append((f"fedlayer run bad.toml ({ROOT})", wall_seconds(command, ROOT, args.repeat, 2)))
    reference = rows[0][1]
    print(f"median of {args.repeat} runs, wall clock")
    for name, seconds in rows:
        print(f"{name:<60} {seconds:6.2f} s  ({seconds / reference:5.1f} x python -c pass)")


if __name__ == "__main__":
    main()
