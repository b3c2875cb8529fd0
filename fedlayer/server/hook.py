"""Per-round barrier analysis on a Ray actor that holds the evaluation data and a model template.

Server side only: the hook (a :class:`strategies.RoundObserver`) receives the round's full client models,
submits them to the actor and goes on; rows are appended to ``barriers.csv`` / ``landscape.csv`` as results
arrive, and ``finish`` waits for the stragglers. In Flower's simulation the actor joins Flower's Ray cluster
(its CPU/GPU share must be left free beside the client actors'); elsewhere a local Ray is started, or
``RAY_ADDRESS`` is joined.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import traceback
from collections.abc import Callable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from fedlayer.analysis.barriers import BarrierRow, Endpoints, barrier_analysis, midpoint_barriers
from fedlayer.analysis.evaluate import Evaluator
from fedlayer.analysis.landscape import LandscapeRow, landscape
from fedlayer.config import AnalysisConfig, Config
from fedlayer.contract import GLOBAL
from fedlayer.flower import LOGGER
from fedlayer.run.atomic import append_text, write_atomic
from fedlayer.run.files import ANALYSIS_ERRORS, BARRIERS, LANDSCAPE

State = dict[str, torch.Tensor]
PAIR_COLUMNS = ["round", "client_a", "client_b"]
BARRIER_COLUMNS = PAIR_COLUMNS + [f.name for f in dataclasses.fields(BarrierRow)]
LANDSCAPE_COLUMNS = PAIR_COLUMNS + [f.name for f in dataclasses.fields(LandscapeRow)]
log = logging.getLogger(LOGGER)


def is_analysis_round(cfg: AnalysisConfig, server_round: int) -> bool:
    return cfg.every > 0 and server_round % cfg.every == 0


def pairs_of(cfg: AnalysisConfig, clients: Sequence[int]) -> list[tuple[int | str, int | str]]:
    """Client-client pairs among the first ``max_clients`` clients and/or each client vs the global model."""
    chosen = sorted(clients)[: cfg.pair_clients]
    pairs: list[tuple[int | str, int | str]] = []
    if cfg.pairs in ("clients", "both"):
        pairs += list(combinations(chosen, 2))
    if cfg.pairs in ("global", "both"):
        pairs += [(client, GLOBAL) for client in chosen]
    return pairs


class BarrierWorker:
    """Runs in a Ray actor (or in-process in tests): evaluation data + model template on its device."""

    def __init__(self, cfg: Config) -> None:
        from fedlayer.experiment import federated_data, initial_model
        from fedlayer.models import model_blocks
        from strategies.algorithms import get_algorithm

        self.cfg = cfg
        self.data = federated_data(self.cfg)
        self.device = torch.device("cuda" if self.cfg.analysis.num_gpus > 0 else "cpu")
        if self.device.type == "cpu":
            # Ray leaves a num_cpus=0 actor torch's default of one thread per core: it would oversubscribe
            # the cores the client actors train on. It uses the cores it reserved, at least one.
            torch.set_num_threads(max(1, int(cfg.analysis.num_cpus)))
        self.model = initial_model(self.cfg, self.data.test, get_algorithm(cfg.strategy).extension)
        self.blocks = model_blocks(self.model)
        self.evaluator = self._evaluator(self.data.test.x, self.data.test.y)

    def _evaluator(self, x: torch.Tensor, y: torch.Tensor) -> Evaluator:
        a = self.cfg.analysis
        gen = torch.Generator().manual_seed(self.cfg.seed)
        idx = torch.randperm(len(y), generator=gen)[: a.samples]
        return Evaluator(
            self.model, (x[idx], y[idx]), device=self.device, exact=self.device.type == "cpu", bn=a.bn
        )

    def _pair_evaluator(self, a: int | str, b: int | str) -> Evaluator:
        """``pair_train``: the union of the pair's local training data (simulation only)."""
        if self.cfg.analysis.data == "global_test":
            return self.evaluator
        parts = [self.data.client(int(c))[0] for c in (a, b) if c != GLOBAL]
        return self._evaluator(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))

    def analyze(
        self, server_round: int, models: dict[int | str, State], origin: State
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Barrier rows and landscape rows of every configured pair of ``models``."""
        a_cfg = self.cfg.analysis
        clients = [c for c in models if c != GLOBAL]
        pairs = pairs_of(a_cfg, clients)  # type: ignore[arg-type]
        shared = self._shared_endpoints(models, pairs)
        barrier_rows, landscape_rows = [], []
        for a, b in pairs:
            evaluator = self._pair_evaluator(a, b)
            ends = Endpoints(shared[a][0], shared[b][0], shared[a][1], shared[b][1]) if shared else None
            rows = barrier_analysis(
                evaluator,
                models[a],
                models[b],
                self.blocks,
                alphas=a_cfg.alphas or (0.5,),
                cumulative=a_cfg.cumulative,
                random_control=a_cfg.random_control,
                seed=self.cfg.seed + server_round,
                endpoints=ends,
            )
            pair = {"round": server_round, "client_a": a, "client_b": b}
            barrier_rows += [pair | row.as_dict() for row in rows]
            if a_cfg.landscape:
                measured = midpoint_barriers(rows) | {
                    "*": midpoint_barriers(rows, kind="full", base="").get("", 0.0)
                }
                found = landscape(
                    evaluator, models[a], models[b], self.blocks, origin=origin, measured=measured
                )
                landscape_rows += [pair | row.as_dict() for row in found]
        return barrier_rows, landscape_rows

    def _shared_endpoints(
        self, models: dict[int | str, State], pairs: list[tuple[int | str, int | str]]
    ) -> dict[int | str, tuple[float, float]]:
        """Loss and error of every model in a pair, each evaluated once (not once per pair it is in), when
        all pairs share one evaluation set; {} for ``pair_train``."""
        if self.cfg.analysis.data != "global_test":
            return {}
        names = list(dict.fromkeys(name for pair in pairs for name in pair))
        results = self.evaluator.evaluate_many(self.evaluator.prepare(models[name]) for name in names)
        return dict(zip(names, results, strict=True))


class CsvLog:
    """Appends rows to a CSV file with a fixed header, flushing every write."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path, self.columns = path, columns
        if not path.exists():
            write_atomic(path, self._text(lambda writer: writer.writeheader()))

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        append_text(self.path, self._text(lambda writer: writer.writerows(rows)))

    def _text(self, write: Callable[[csv.DictWriter[str]], object]) -> str:
        text = io.StringIO(newline="")
        write(csv.DictWriter(text, self.columns, extrasaction="ignore"))
        return text.getvalue()


class AnalysisHook:
    """Submits each analysis round to the worker and writes its rows as they arrive.

    Parameters
    ----------
    cfg : Config
        The experiment; ``cfg.analysis`` says what to compute.
    run_dir : Path
        Receives ``barriers.csv``, ``landscape.csv``, ``analysis_errors.log`` and the plots.
    use_ray : bool
        False runs the worker in this process, synchronously (tests, debugging).
    """

    def __init__(self, cfg: Config, run_dir: Path, *, use_ray: bool = True) -> None:
        self.cfg, self.run_dir, self.use_ray = cfg, run_dir, use_ray
        self.barriers = CsvLog(run_dir / BARRIERS, BARRIER_COLUMNS)
        self.landscape = CsvLog(run_dir / LANDSCAPE, LANDSCAPE_COLUMNS)
        self.pending: list[tuple[int, Any]] = []
        self.failures = 0
        self.recent: dict[int, list[dict[str, Any]]] = {}  # barrier rows of rounds not read by rows_of yet
        self.worker = self._start_worker()

    def _start_worker(self) -> Any:
        if not self.use_ray:
            return BarrierWorker(self.cfg)
        import ray

        if not ray.is_initialized():  # deployment: the ServerApp process has no Ray of its own
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
        a = self.cfg.analysis
        actor = ray.remote(num_cpus=a.num_cpus, num_gpus=a.num_gpus)(BarrierWorker)
        return actor.remote(self.cfg)

    def submit(self, server_round: int, models: dict[int | str, State], origin: State) -> None:
        """Queue one round's analysis; returns at once (with Ray), writing what has finished so far."""
        if self.use_ray:
            self.pending.append((server_round, self.worker.analyze.remote(server_round, models, origin)))
            self.poll()
        else:
            self._collect(server_round, lambda: self.worker.analyze(server_round, models, origin))

    def poll(self, timeout: float | None = 0) -> None:
        """Write the rows of finished rounds; ``timeout=None`` waits for all."""
        if not self.pending:
            return
        import ray

        refs = [ref for _, ref in self.pending]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        done = set(map(id, ready))
        for server_round, ref in [item for item in self.pending if id(item[1]) in done]:
            self._collect(server_round, lambda ref=ref: ray.get(ref))
        self.pending = [item for item in self.pending if id(item[1]) not in done]

    def _collect(self, server_round: int, result: Any) -> None:
        try:
            barrier_rows, landscape_rows = result()
        except Exception as err:
            self._failed(server_round, err)
            return
        self.barriers.append(barrier_rows)
        self.landscape.append(landscape_rows)
        self.recent[server_round] = barrier_rows
        for old in sorted(self.recent)[:-4]:  # nobody asked for them: bounded memory
            del self.recent[old]

    def rows_of(self, server_round: int) -> list[dict[str, Any]]:
        """The barrier rows of ``server_round``, waiting for its analysis if it is still running
        ([] if it failed)."""
        if self.use_ray:
            import ray

            for item in [item for item in self.pending if item[0] == server_round]:
                ray.wait([item[1]], num_returns=1, timeout=None)
            self.poll()
        return self.recent.pop(server_round, [])

    def _failed(self, server_round: int, err: Exception) -> None:
        """A failing analysis never stops training unless ``analysis.strict``."""
        self.failures += 1
        text = "".join(traceback.format_exception(err))
        append_text(self.run_dir / ANALYSIS_ERRORS, f"round {server_round}:\n{text}\n")
        if self.cfg.analysis.strict:
            raise RuntimeError(
                f"analysis of round {server_round} failed (analysis.strict = true): {err}"
            ) from err
        log.error("analysis of round %d failed (see analysis_errors.log): %s", server_round, err)

    def abort(self) -> None:
        """Drop the pending rounds and stop the worker (the run is ending without them)."""
        self.pending = []
        if self.use_ray:
            import ray

            ray.kill(self.worker)

    def finish(self, interrupt: Callable[[], None] | None = None) -> None:
        """Wait for the remaining rounds, then plot; ``interrupt`` is called every second while waiting and
        may raise to end the wait (a Ctrl-C)."""
        from fedlayer.run.plots import plot_analysis

        while self.pending:
            if interrupt is not None:
                interrupt()
            self.poll(timeout=1.0)
        plot_analysis(self.run_dir)
