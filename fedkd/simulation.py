"""Launch one run on Flower's Simulation Engine (Ray backend) and write its run directory."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from fedkd.checkpoint import Checkpoint, load_checkpoint, roll_back
from fedkd.config import ConfigError, FedkdConfig, to_yaml
from fedkd.data import load_federated
from fedkd.progress import RunProgress
from fedkd.recorder import Recorder
from fedkd.rundir import (RUN_INFO, RunDirError, RunLock, check_unused, create_run_dir,
                          resume_config, run_status)


def prepare_run_dir(cfg: FedkdConfig, run_dir: str | Path | None = None) -> Path:
    """`<output_dir>/<name>-<time>` unless given, holding config, partition and run info.

    The data is loaded (and so validated) before anything is created, and the directory
    appears whole under a unique name (`fedkd.rundir`): a bad input leaves nothing behind."""
    data = load_federated(cfg.data, cfg.experiment.seed)
    partition = {"dataset": data.dataset, "num_classes": data.num_classes,
                 "clients": [{"partition_id": i, **h, **client_transform(cfg, i)}
                             for i, h in enumerate(data.label_histograms())]}
    if run_dir is not None:
        check_unused(Path(run_dir))
    files = {"config.yaml": to_yaml(cfg), "partition.json": json.dumps(partition),
             RUN_INFO: json.dumps(run_info(cfg, "running", None), indent=2)}
    return create_run_dir(cfg, files, Path(run_dir) if run_dir is not None else None)


def client_transform(cfg: FedkdConfig, pid: int) -> dict:
    """What `data.transform` did to client `pid`'s data, for partition.json (per-factor tables)."""
    from fedkd.transforms import resolution_factor

    t = cfg.data.transform
    if not t.resolution_factors:
        return {}
    return {"resolution_factor": resolution_factor(pid, t.resolution_factors, t.resolution_assign)}


def cluster_cpus(cfg: FedkdConfig) -> float:
    """CPUs of the Ray cluster the run will use (joining one connects to it first)."""
    if cfg.simulation.ray_address:
        import ray

        if not ray.is_initialized():
            ray.init(address=cfg.simulation.ray_address, logging_level=logging.WARNING)
        return float(ray.cluster_resources().get("CPU", 1))
    return float(os.cpu_count() or 1)


def num_nodes(cfg: FedkdConfig) -> int:
    """Flower nodes: one per Ray actor (a fixed number of messages per round) unless set."""
    if cfg.simulation.ray_address:
        cluster_cpus(cfg)  # joins now: where client state lives depends on the cluster's nodes
    if cfg.simulation.num_nodes:
        return min(cfg.simulation.num_nodes, cfg.data.num_clients)
    actors = max(1, math.floor(cluster_cpus(cfg) / cfg.simulation.client_cpus))
    return min(actors, cfg.data.num_clients)


def backend_config(cfg: FedkdConfig) -> dict:
    sim = cfg.simulation
    # "local": start a fresh Ray, never silently join another cluster running on this machine
    init_args: dict = {"logging_level": logging.ERROR, "log_to_driver": True,
                       "address": sim.ray_address or "local"}
    return {"client_resources": {"num_cpus": sim.client_cpus, "num_gpus": sim.client_gpus},
            "init_args": init_args}


class _DropRunSimulationDeprecation(logging.Filter):
    """`run_simulation` is deprecated in favour of `flwr run`; fedkd supports both, so don't nag."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()


@contextmanager
def quiet_flower(enabled: bool) -> Iterator[None]:
    """Flower logs every round at INFO; fedkd shows its own progress instead."""
    logger = logging.getLogger("flwr")
    level, drop = logger.level, _DropRunSimulationDeprecation()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences Ray's FutureWarning
    if not sys.stderr.isatty():  # plain text in a pipe or a file: no colour codes from Ray's
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # worker-log prefixes, nor Flower's levels
        from flwr.common.logger import update_console_handler

        update_console_handler(colored=False)
    if enabled:
        logger.setLevel(logging.WARNING)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.removeFilter(drop)


@dataclass
class RunClock:
    """A run's wall time over all its segments: this process's, plus, for a resumed run, the
    recorded round times up to the checkpoint it continues from (rounds redone after a resume are
    counted once), so a resumed run reports about what the run takes uninterrupted.
    `resumed_after`: the checkpoint round each resume continued after, oldest first."""

    earlier: float = 0.0
    resumed_after: tuple[int, ...] = ()
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def resuming(cls, run_dir: Path, checkpoint: Checkpoint | None) -> "RunClock":
        """The clock of a run continuing after `checkpoint` (None: from the start), read once
        its metrics are rolled back to it and before run.json is rewritten."""
        if checkpoint is None:
            return cls()
        from fedkd.report import read_metrics

        earlier = sum(r.get("seconds") or 0.0 for r in read_metrics(run_dir / "metrics.jsonl")
                      if r["phase"] == "round")
        previous = json.loads((run_dir / RUN_INFO).read_text()).get("resumed_after_rounds") or []
        return cls(earlier, (*previous, checkpoint.round))

    def seconds(self) -> float:
        return self.earlier + time.perf_counter() - self.started


def run_info(cfg: FedkdConfig, status: str, wall: float | None, reason: str | None = None,
             resumed_after: Sequence[int] = ()) -> dict:
    """run.json: how the run ended (and why, when it failed), which model was evaluated, when,
    its wall time (all segments, `RunClock`) and the rounds it was resumed after."""
    from fedkd.registry import METHODS

    client = METHODS[cfg.method["name"]].client
    evaluates = client.evaluates
    when = ("after aggregation (global model)" if evaluates == "global"
            else "after the client's local training in that round (personal parts), "
                 "with the latest aggregated shared parts")
    # the clients' architectures as a cycle (client k: models[k % len]; null: the method's own
    # models), not one entry per client: a 10,000-client run.json does not repeat "cnn" 10,000 times
    models = (list(cfg.model.per_client) or [cfg.model.name]) if client.uses_model_config else None
    return {"evaluated_model": evaluates, "evaluated_when": when, "score": client.score,
            "client_models": models, "wall_seconds": wall,
            "resumed_after_rounds": list(resumed_after),
            "second_model": (dict(zip(("name", "metric"), client.second_model))
                             if client.second_model else None), "status": status,
            "status_reason": reason}


def write_run_info(run_dir: Path, cfg: FedkdConfig, status: str, wall: float | None,
                   reason: str | None = None, resumed_after: Sequence[int] = ()) -> None:
    tmp = run_dir / f".{RUN_INFO}.tmp"
    tmp.write_text(json.dumps(run_info(cfg, status, wall, reason, resumed_after), indent=2))
    os.replace(tmp, run_dir / RUN_INFO)  # a reader never sees half a status


def judge_outcome(records: Sequence[dict]) -> str | None:
    """Why a run that went through all its rounds still failed (None: it did not); `records`:
    its metrics.jsonl."""
    train = [r for r in records if r["phase"] == "train"]
    if train and not any(r.get("status") == "ok" for r in train):
        return "no client update was accepted in any round"
    skipped = {r["round"] for r in train if r.get("status") == "skipped"}
    if skipped and skipped == {r["round"] for r in train}:
        return "every round was skipped (too few valid updates)"
    evals = [r for r in records if r["phase"] == "evaluate"]
    if not evals:
        return "no evaluation was recorded"
    last = max(r["round"] for r in evals)
    if not any(r.get("status") == "ok" for r in evals if r["round"] == last):
        return f"no client succeeded in the last evaluation (round {last})"
    return None


def run_experiment(cfg: FedkdConfig, run_dir: str | Path | None = None,
                   quiet: bool = False) -> Path:
    """Run one validated config end to end; returns the run directory (report written)."""
    from fedkd.engine import check_capacity

    check_capacity(backend_config(cfg))  # a client that cannot fit: one line, no run directory
    return execute(cfg, prepare_run_dir(cfg, run_dir), None, quiet)


def resume_experiment(run_dir: str | Path, overrides: Iterable[str] = (), quiet: bool = False,
                      ray_address: str = "") -> Path:
    """Continue an unfinished run from its last complete checkpoint (or extend a finished one
    with `train.rounds=N`); records written after that checkpoint are dropped."""
    run_dir = Path(run_dir)
    cfg = resume_config(run_dir, overrides)
    with RunLock(run_dir):
        checkpoint = load_checkpoint(run_dir)
        done = checkpoint.round if checkpoint else 0
        if run_status(run_dir) == "complete" and cfg.train.rounds <= done:
            raise RunDirError(f"{run_dir}: the run is complete ({done} rounds); extend it with "
                              f"train.rounds=N (N > {done})")
        if done >= cfg.train.rounds:
            raise ConfigError("train.rounds", cfg.train.rounds,
                              f"must be > {done}, the rounds the run has done")
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        if ray_address:
            cfg.simulation.ray_address = ray_address
        # still under the lock taken for the checks: no second process can slip in between
        return execute(cfg, run_dir, checkpoint, quiet, locked=True)


def execute(cfg: FedkdConfig, run_dir: Path, checkpoint: Checkpoint | None, quiet: bool,
            locked: bool = False) -> Path:
    """Run (or continue after `checkpoint`) the simulation in a prepared run directory
    (`locked`: the caller already holds its RunLock)."""
    with nullcontext() if locked else RunLock(run_dir):  # held until the run ends, or dies
        roll_back(run_dir, checkpoint)
        clock = RunClock.resuming(run_dir, checkpoint)
        write_run_info(run_dir, cfg, "running", None, resumed_after=clock.resumed_after)
        progress = RunProgress(cfg.train.rounds, disabled=quiet)
        recorder = Recorder(run_dir, listener=progress.update)
        status = "failed"
        try:
            status = simulate(cfg, run_dir, recorder, progress, checkpoint)
        except KeyboardInterrupt as exc:  # also SIGTERM (fedkd.engine.Interrupted)
            from fedkd.engine import mark_interrupted

            status = "interrupted"
            mark_interrupted(exc, run_dir)
            raise
        finally:
            finish_run(run_dir, cfg, recorder, status, clock)
    return run_dir


def simulate(cfg: FedkdConfig, run_dir: Path, recorder: Recorder, progress: RunProgress,
             checkpoint: Checkpoint | None) -> str:
    """Flower's Simulation Engine over the run; "complete" when the server loop finished."""
    from fedkd.actors import replace_dead_actors
    from fedkd.apps import build_server_app, client_app
    from fedkd.engine import run_engine

    from fedkd.runtime import tame_malloc

    tame_malloc()  # before Ray starts: its workers inherit the allocator settings
    replace_dead_actors()  # a worker that dies (OOM killer) fails its round's group, not later ones
    results: dict = {}
    with progress, quiet_flower(True):
        run_engine(server_app=build_server_app(cfg, run_dir, recorder, results, checkpoint),
                   client_app=client_app, num_supernodes=num_nodes(cfg),
                   backend_config=backend_config(cfg))
    return "complete" if "result" in results else "failed"


def finish_run(run_dir: Path, cfg: FedkdConfig, recorder: Recorder, status: str,
               clock: RunClock) -> None:
    """Close the metrics, judge and record how the run ended, keep the trained model (a complete
    run), render the report (also for a failed or interrupted run)."""
    from fedkd.report import read_metrics, write_outputs

    recorder.close()
    records = read_metrics(run_dir / "metrics.jsonl")  # read once: judged here, reported below
    reason = None
    if status == "complete":
        reason = judge_outcome(records)
        status = "failed" if reason else status
    elif status == "failed":
        reason = "the simulation stopped before its last round"
    if status == "complete":
        keep_model(run_dir, cfg)
    write_run_info(run_dir, cfg, status, clock.seconds(), reason, clock.resumed_after)
    write_outputs(run_dir, records)


def keep_model(run_dir: Path, cfg: FedkdConfig) -> None:
    """Save the model every client evaluated last (`model/`, see `fedkd.saved_model`), from the
    last checkpoint's global arrays and the clients' state files."""
    from fedkd.saved_model import save_model

    checkpoint = load_checkpoint(run_dir)
    save_model(run_dir, cfg, checkpoint.arrays if checkpoint else {})
