"""Launch one run on Flower's Simulation Engine (Ray backend) and write its run directory."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

from fedkd.config import FedkdConfig, to_yaml
from fedkd.data import load_federated
from fedkd.progress import RunProgress
from fedkd.recorder import Recorder


def prepare_run_dir(cfg: FedkdConfig, run_dir: str | Path | None = None) -> Path:
    """`<output_dir>/<name>-<timestamp>` unless given; holds config, partition, metrics, report."""
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.experiment.output_dir) / f"{cfg.experiment.name}-{stamp}"
        n = 1
        while run_dir.exists():
            n += 1
            run_dir = Path(cfg.experiment.output_dir) / f"{cfg.experiment.name}-{stamp}-{n}"
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    data = load_federated(cfg.data, cfg.experiment.seed)
    partition = {"dataset": data.dataset, "num_classes": data.num_classes,
                 "clients": [{"partition_id": i, **h} for i, h in enumerate(data.label_histograms())]}
    (run_dir / "partition.json").write_text(json.dumps(partition))
    return run_dir


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
    if enabled:
        logger.setLevel(logging.WARNING)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.removeFilter(drop)


def write_run_info(run_dir: Path, cfg: FedkdConfig, status: str, wall: float | None) -> None:
    from fedkd.models import client_model_name
    from fedkd.registry import METHODS

    client = METHODS[cfg.method["name"]].client
    evaluates = client.evaluates
    when = ("after aggregation (global model)" if evaluates == "global"
            else "after the client's local training in that round (personal parts), "
                 "with the latest aggregated shared parts")
    # each client's architecture, for the per-client report (null: the method's own models)
    models = ([client_model_name(cfg.model.name, cfg.model.per_client, pid) for pid in range(cfg.data.num_clients)]
              if client.uses_model_config else None)
    info = {"evaluated_model": evaluates, "evaluated_when": when, "score": client.score,
            "client_models": models, "wall_seconds": wall,
            "status": status}
    (run_dir / "run.json").write_text(json.dumps(info, indent=2))


def run_experiment(cfg: FedkdConfig, run_dir: str | Path | None = None,
                   quiet: bool = False) -> Path:
    """Run one validated config end to end; returns the run directory (report written)."""
    from flwr.simulation import run_simulation

    from fedkd.apps import build_server_app, client_app

    started = time.perf_counter()
    run_dir = prepare_run_dir(cfg, run_dir)
    write_run_info(run_dir, cfg, "running", None)
    progress = RunProgress(cfg.train.rounds, disabled=quiet)
    recorder = Recorder(run_dir, listener=progress.update)
    results: dict = {}
    status = "failed"
    try:
        with progress, quiet_flower(True):
            run_simulation(server_app=build_server_app(cfg, run_dir, recorder, results),
                           client_app=client_app, num_supernodes=num_nodes(cfg),
                           backend_config=backend_config(cfg))
        status = "complete" if "result" in results else "failed"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        finish_run(run_dir, cfg, recorder, status, started)
    return run_dir


def finish_run(run_dir: Path, cfg: FedkdConfig, recorder: Recorder, status: str,
               started: float) -> None:
    """Close the metrics, record how the run ended, render the report (also for a failed run)."""
    from fedkd.report import write_outputs

    recorder.close()
    write_run_info(run_dir, cfg, status, time.perf_counter() - started)
    write_outputs(run_dir)
