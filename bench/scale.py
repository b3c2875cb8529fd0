"""Many clients on one machine: 100, 1,000 and 10,000 virtual clients, 20 of them per round.

Fashion-MNIST, IID and Dirichlet(0.3), FedPer, the default CNN, 6 training-pool samples per client at every
size (``data.max_samples`` = 6 x clients), so that a round does the same work whatever the number of
clients. Every configuration runs in its own process (its own Ray, a fresh RSS); per configuration:

- start-up: process start to the first round's instructions (imports, partitioning, partition report, Ray),
  plus round 1's extra time over the median round (client actors start, import torch, load the data);
- median round time (rounds >= 2) and its ratio to the 100-client run of the same partitioner;
- server RSS (the process hosting the ServerApp and the Ray driver) after every round, its slope over
  rounds > 5, and the mean RSS after round 5 as a ratio to the 100-client run. RSS is read twice: as it is
  (``rss_raw``), and settled, after ``gc.collect()`` and glibc's ``malloc_trim(0)`` hand freed memory back to
  the OS. A round's replies are ~130 MiB of buffers that the allocator keeps or returns at will, so the raw
  series jumps by ±50 MiB between rounds and its slope carries MiB/round of noise; the settled series is
  what the process still holds, the quantity a leak would grow;
- disk used by the personal states (``clients/`` of the run directory) at the end.

The RSS series is also appended to ``OUT/<partitioner>-<clients>/rss.jsonl`` after every round, with the
settled RSS split into anonymous and file-backed memory (``/proc/self/status``), the Python heap's allocated
blocks and the number of objects the garbage collector tracks. ``--tracemalloc`` also traces the Python heap
(slower) and writes the allocation sites that grew most between round 6 and the last round to
``tracemalloc.txt`` beside it: whether a growing RSS is Python's or native memory's.

    python bench/scale.py [--sizes 100 1000 10000] [--partitioners iid dirichlet] [--rounds 50]
                          [--out /tmp/scale-bench] [--json FILE] [--tracemalloc]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()  # before the heavy imports: a user's run pays for them too

ROOT = Path(__file__).resolve().parents[1]
PER_ROUND = 20
SAMPLES_PER_CLIENT = 6  # 10,000 clients x 6 = the 60,000 training images
RSS_SERIES = "rss.jsonl"  # in each configuration's run directory: settled and raw RSS after every round


def overrides(clients: int, partitioner: str, rounds: int, fraction: float) -> list[str]:
    return [
        f"federation.clients={clients}",
        f"federation.rounds={rounds}",
        f"federation.fraction_train={fraction}",
        f"federation.fraction_evaluate={fraction}",
        f"data.partitioner='{partitioner}'",
        "data.alpha=0.3",
        "data.min_partition_size=0",  # Dirichlet: clients left without data are excluded (and counted)
        f"data.max_samples={SAMPLES_PER_CLIENT * clients}",
        "data.max_test_samples=2000",
        "strategy.name='fedper'",
        "train.device='cpu'",
    ]


def settled_rss(process: Any) -> float:
    """RSS in MiB after Python's garbage and the allocator's free pages are given back (glibc only)."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: the RSS as it is
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return float(process.memory_info().rss / 2**20)


def memory_split() -> dict[str, float]:
    """Where the settled RSS is: anonymous vs file-backed (MiB), Python heap blocks, GC-tracked objects."""
    import gc

    status = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    split: dict[str, float] = {"python_blocks": sys.getallocatedblocks(), "gc_objects": len(gc.get_objects())}
    for key in ("RssAnon", "RssFile", "RssShmem"):
        if key in status:  # Linux
            split[f"{key.lower()}_mib"] = int(status[key].split()[0]) / 1024
    return split


def traced(baseline: list[Any], rnd: int, path: Path) -> dict[str, float]:
    """Python memory allocated since round 5 and still held; writes the top growth since round 6 to ``path``.

    Tracing starts after round 5 (tracing the imports and the start-up would take longer than the rounds).
    """
    import tracemalloc

    if rnd == 5:
        tracemalloc.start(8)
    if not tracemalloc.is_tracing():
        return {}
    if rnd == 6:
        baseline.append(tracemalloc.take_snapshot())
    elif baseline and rnd % 25 == 0:
        top = tracemalloc.take_snapshot().compare_to(baseline[0], "traceback")[:15]
        lines = [f"round {rnd} vs round 6, top growth by allocation site:"]
        lines += [f"{stat}\n  " + "\n  ".join(stat.traceback.format()[-6:]) for stat in top]
        path.write_text("\n".join(lines) + "\n")
    return {"traced_mib": tracemalloc.get_traced_memory()[0] / 2**20}


def one(clients: int, partitioner: str, rounds: int, out: Path, trace: bool = False) -> dict[str, Any]:
    """Run one configuration in this process and measure it."""
    import numpy as np
    import psutil

    from fedlayer.client.store import PersonalStore
    from fedlayer.config import load_config
    from fedlayer.data import empty_partitions
    from fedlayer.experiment import federated_data
    from fedlayer.run.rundir import RunDir
    from fedlayer.simulation import simulate

    default = ROOT / "experiments" / "default.toml"
    cfg = load_config(default, overrides(clients, partitioner, rounds, 1.0))
    partitioned = time.perf_counter()
    empty = len(empty_partitions(federated_data(cfg).splits))  # cached: the server reuses it
    partition_seconds = time.perf_counter() - partitioned
    usable = clients - empty
    # Flower samples int(nodes x fraction): a half client more keeps float rounding from giving 19.
    cfg = load_config(default, overrides(clients, partitioner, rounds, min(1.0, (PER_ROUND + 0.5) / usable)))
    process = psutil.Process()
    rss: list[float] = []  # settled
    raw: list[float] = []
    ends: list[tuple[float, dict[str, Any]]] = []

    run = RunDir.create(out / f"{partitioner}-{clients}", overwrite=True)
    baseline: list[Any] = []  # round 6's tracemalloc snapshot

    def on_round(row: dict[str, Any]) -> None:
        if row["round"] > 0:
            ends.append((time.perf_counter(), row))
            raw.append(process.memory_info().rss / 2**20)
            rss.append(settled_rss(process))
            # as it goes, so that a long run can be read (and plotted) before it ends
            probes = memory_split()
            if trace:
                probes |= traced(baseline, row["round"], run.file("tracemalloc.txt"))
            run.append_jsonl(
                RSS_SERIES, {"round": row["round"], "rss_mib": rss[-1], "rss_raw_mib": raw[-1]} | probes
            )

    simulate(cfg, run, on_round)
    seconds = [row["round_seconds"] for _, row in ends]
    median = statistics.median(seconds[1:])
    first_start = ends[0][0] - seconds[0] - STARTED
    rounds_after_5 = np.arange(1, len(rss) + 1)[5:]
    store = PersonalStore(run.file("clients"))
    return {
        "clients": clients,
        "partitioner": partitioner,
        "rounds": len(ends),
        "clients_excluded": empty,
        "clients_per_round": [row["clients_trained"] for _, row in ends][:3],
        "partition_seconds": round(partition_seconds, 2),
        "seconds_to_round_1": round(first_start, 1),
        "round_1_seconds": round(seconds[0], 2),
        "startup_seconds": round(first_start + seconds[0] - median, 1),
        "median_round_seconds": round(median, 3),
        "rss_mib": [round(v, 1) for v in rss],
        "rss_mean_after_5_mib": round(float(np.mean(rss[5:])), 1),
        "rss_slope_mib_per_round": round(float(np.polyfit(rounds_after_5, rss[5:], 1)[0]), 4),
        "rss_raw_mib": [round(v, 1) for v in raw],
        "rss_raw_slope_mib_per_round": round(float(np.polyfit(rounds_after_5, raw[5:], 1)[0]), 4),
        "state_files": sum(1 for _ in store.root.rglob("round-*.pt")),
        "state_disk_mib": round(store.disk_bytes() / 2**20, 2),
    }


def table(results: list[dict[str, Any]]) -> str:
    """Markdown rows with the ratios to the 100-client run of the same partitioner."""
    base = {r["partitioner"]: r for r in results if r["clients"] == min(x["clients"] for x in results)}
    lines = [
        "| partitioner | clients | excluded | start-up (s) | to round 1 (s) | median round (s) | round ratio "
        "| RSS after r5 (MiB) | RSS ratio | RSS slope (MiB/round) | raw RSS slope "
        "| personal state (files, MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b = base[r["partitioner"]]
        round_ratio = r["median_round_seconds"] / b["median_round_seconds"]
        rss_ratio = r["rss_mean_after_5_mib"] / b["rss_mean_after_5_mib"]
        lines.append(
            f"| {r['partitioner']} | {r['clients']:,} | {r['clients_excluded']} | {r['startup_seconds']} "
            f"| {r['seconds_to_round_1']} | {r['median_round_seconds']:.2f} | {round_ratio:.2f} "
            f"| {r['rss_mean_after_5_mib']:.0f} | {rss_ratio:.2f} | {r['rss_slope_mib_per_round']:.3f} "
            f"| {r['rss_raw_slope_mib_per_round']:.3f} "
            f"| {r['state_files']}, {r['state_disk_mib']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--partitioners", nargs="+", default=["iid", "dirichlet"])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("/tmp/scale-bench"))
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--tracemalloc", action="store_true", help="trace the Python heap (slower)")
    parser.add_argument("--one", nargs=2, metavar=("CLIENTS", "PARTITIONER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = one(int(args.one[0]), args.one[1], args.rounds, args.out, args.tracemalloc)
        print("RESULT " + json.dumps(result))
        return
    results = []
    for partitioner in args.partitioners:
        for clients in args.sizes:
            command = [sys.executable, __file__, "--one", str(clients), partitioner]
            command += ["--rounds", str(args.rounds), "--out", str(args.out)]
            command += ["--tracemalloc"] if args.tracemalloc else []
            proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"{partitioner} x {clients} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(lines[-1].removeprefix("RESULT ")))
            print(json.dumps({k: v for k, v in results[-1].items() if not isinstance(v, list)}), flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
