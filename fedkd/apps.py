"""Flower's ServerApp and ClientApp for fedkd (Message API).

The ClientApp is module-level so Ray workers import it; it reads everything it
needs from the message (partition ids, the resolved run config, the state
directory). `build_server_app` closes over one run; the module-level
`server_app` serves `flwr run .` (config path and overrides from the run config).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from fedkd.checkpoint import Checkpoint, restore_server
from fedkd.config import ConfigError, FedkdConfig, load_config
from fedkd.recorder import Recorder
from fedkd.runtime import release_memory, runtime_for
from fedkd.server import build_strategy
from fedkd.state import release_location, state_location
from fedkd.strategies.resumable import Resumable
from fedkd.wire import (CONFIG_KEY, MODE_KEY, PIDS_KEY, STATE_DIR_KEY, GroupReply,
                        arrays_to_tensors)

# Ray's FutureWarning about accelerator env vars on every `flwr run` (fedkd runs set it too)
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

client_app = ClientApp()


def _serve_group(msg: Message, phase: str) -> Message:
    """Run every client of this node's group in turn; one reply for the group."""
    config = msg.content["config"]
    runtime = runtime_for(str(config[CONFIG_KEY]), str(config[STATE_DIR_KEY]))
    received = arrays_to_tensors(msg.content["arrays"]) if "arrays" in msg.content else {}
    server_round = int(config["server-round"])
    server_config = {k: v for k, v in config.items()
                     if k not in (CONFIG_KEY, PIDS_KEY, MODE_KEY, STATE_DIR_KEY)}
    reply = GroupReply(str(config[MODE_KEY]))
    for pid in config[PIDS_KEY]:
        reply.add(runtime.run(phase, int(pid), received, server_round, server_config))
    content = reply.build()
    release_memory()  # the group's freed buffers go back to the system (fedkd.runtime)
    return Message(content=content, reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    return _serve_group(msg, "train")


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _serve_group(msg, "evaluate")


def run_server(grid: Grid, cfg: FedkdConfig, run_dir: Path, recorder: Recorder,
               resume: Checkpoint | None = None) -> Result:
    """The whole federated run on the server side (continued after `resume`'s round when
    given); returns Flower's Result. Checkpoints are written as the rounds end."""
    grouped, initial, evaluate_fn = build_strategy(cfg, recorder)
    done = resume.round if resume else 0
    strategy = Resumable(grouped, run_dir, recorder, cfg.checkpoint.every, offset=done)
    if resume is not None:
        restore_server(resume, strategy.strategies())
        initial = resume.arrays
    # the state directory, or on a multi-node cluster a state server on this node (fedkd.state)
    location = state_location(run_dir / "state")
    run_config = ConfigRecord({STATE_DIR_KEY: location})
    try:
        return strategy.start(grid=grid, initial_arrays=ArrayRecord(initial),
                              num_rounds=cfg.train.rounds - done, timeout=cfg.simulation.timeout,
                              train_config=run_config, evaluate_config=ConfigRecord(dict(run_config)),
                              evaluate_fn=strategy.evaluation_hook(evaluate_fn))
    finally:
        grouped.finish_round()
        release_location(location)


def build_server_app(cfg: FedkdConfig, run_dir: Path, recorder: Recorder,
                     results: dict, resume: Checkpoint | None = None) -> ServerApp:
    """A ServerApp for one run (continued after `resume`); Flower's Result lands in
    `results["result"]`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        results["result"] = run_server(grid, cfg, run_dir, recorder, resume)

    return app


server_app = ServerApp()

#: `flwr run .` run-config keys (`[tool.flwr.app.config]` in pyproject.toml) -> fedkd config keys.
#: A key left at its "unset" value (0, -1 for the seed, "") keeps the experiment's own value;
#: `overrides` ("key=value ...") reaches every other key and is applied last.
FLWR_RUN_KEYS: dict[str, tuple[str, object]] = {
    "num-server-rounds": ("train.rounds", 0),
    "fraction-train": ("train.fraction_clients", 0.0),
    "fraction-evaluate": ("evaluation.fraction_clients", 0.0),
    "local-epochs": ("train.local_epochs", 0),
    "batch-size": ("train.batch_size", 0),
    "learning-rate": ("train.lr", 0.0),
    "num-clients": ("data.num_clients", 0),
    "seed": ("experiment.seed", -1),
    "method": ("method.name", ""),
    "strategy": ("strategy.name", ""),
    "dataset": ("data.dataset", ""),
    "model": ("model.name", ""),
    "num-nodes": ("simulation.num_nodes", 0),
}


def flwr_run_overrides(run_config: dict) -> tuple[str, list[str]]:
    """(config, overrides) from `flwr run`'s run config: the experiment (a bundled name or a YAML
    path), the flat keys that are set, then the `overrides` string."""
    overrides = []
    for key, (target, unset) in FLWR_RUN_KEYS.items():
        value = run_config.get(key, unset)
        if value != unset:
            overrides.append(f"{target}={value}")
    extra = str(run_config.get("overrides", "") or "")
    try:
        overrides += shlex.split(extra)
    except ValueError as exc:
        from fedkd.config import ConfigError

        raise ConfigError("overrides", extra, f"not a list of key=value ({exc})") from None
    return str(run_config.get("config", "quickstart")), overrides


class AppConfigError(Exception):
    """`flwr run .` with a bad config: one line (Flower adds its traceback after it)."""


@server_app.main()
def _flwr_run_main(grid: Grid, context: Context) -> None:
    """`flwr run .`: the experiment and its overrides come from the run config (FLWR_RUN_KEYS)."""
    import logging

    from flwr.common.logger import log

    from fedkd.data import DataError
    from fedkd.simulation import finish_run, num_nodes, prepare_run_dir, write_run_info

    try:
        config, overrides = flwr_run_overrides(dict(context.run_config))
        cfg = load_config(config, overrides)
        run_dir = prepare_run_dir(cfg)
    except (ConfigError, DataError) as exc:
        log(logging.ERROR, "error: %s", exc)  # the one line; Flower then fails the run
        raise AppConfigError(str(exc)) from None
    # the nodes are ours, as in `fedkd run`: one per Ray actor (or simulation.num_nodes), however
    # many SuperNodes the federation simulates (the others stay idle)
    nodes = num_nodes(cfg)
    all_nodes = grid.get_node_ids
    grid.get_node_ids = lambda: sorted(all_nodes())[:nodes]  # type: ignore[method-assign]
    log(logging.INFO, "fedkd: %s, %d rounds, %d clients on %d node(s); run directory %s",
        cfg.experiment.name, cfg.train.rounds, cfg.data.num_clients, nodes, run_dir)
    started, status = time.perf_counter(), "failed"
    write_run_info(run_dir, cfg, "running", None)
    recorder = Recorder(run_dir)
    try:
        run_server(grid, cfg, run_dir, recorder)
        status = "complete"
    finally:
        finish_run(run_dir, cfg, recorder, status, started)
    summary = json.loads((run_dir / "summary.json").read_text())
    log(logging.INFO, "fedkd: run %s, last-round accuracy (example-weighted) %s; report %s",
        summary.get("status", status), summary.get("accuracy"), run_dir / "report.md")
