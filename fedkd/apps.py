"""Flower's ServerApp and ClientApp for fedkd (Message API).

The ClientApp is module-level so Ray workers import it; it reads everything it
needs from the message (partition ids, the resolved run config, the state
directory). `build_server_app` closes over one run; `fedkd.flwr_app.server_app` is the
ServerApp of `flwr run .` (one layer up: it also manages the run directory).
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from fedkd.checkpoint import Checkpoint, restore_server
from fedkd.config import FedkdConfig
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
