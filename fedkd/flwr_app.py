"""The ServerApp of `flwr run .`: the run config's flat keys onto fedkd's config, then one run.

A layer above `fedkd.apps` (the apps themselves) and `fedkd.simulation` (the run directory's
life), so neither of those imports the other's users: `fedkd run` goes through
`fedkd.simulation`, `flwr run` through this module; the ClientApp is `fedkd.apps.client_app`.
"""

from __future__ import annotations

import json
import logging
import shlex

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedkd.apps import run_server
from fedkd.config import ConfigError, load_config
from fedkd.data import DataError
from fedkd.recorder import Recorder
from fedkd.simulation import RunClock, finish_run, num_nodes, prepare_run_dir, write_run_info

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
        raise ConfigError("overrides", extra, f"not a list of key=value ({exc})") from None
    return str(run_config.get("config", "quickstart")), overrides


class AppConfigError(Exception):
    """`flwr run .` with a bad config: one line (Flower adds its traceback after it)."""


@server_app.main()
def _flwr_run_main(grid: Grid, context: Context) -> None:
    """`flwr run .`: the experiment and its overrides come from the run config (FLWR_RUN_KEYS)."""
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
    clock, status = RunClock(), "failed"
    write_run_info(run_dir, cfg, "running", None)
    recorder = Recorder(run_dir)
    try:
        run_server(grid, cfg, run_dir, recorder)
        status = "complete"
    finally:
        finish_run(run_dir, cfg, recorder, status, clock)
    summary = json.loads((run_dir / "summary.json").read_text())
    log(logging.INFO, "fedkd: run %s, last-round accuracy (example-weighted) %s; report %s",
        summary.get("status", status), summary.get("accuracy"), run_dir / "report.md")
