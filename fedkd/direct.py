"""The reference for the degenerate case: a one-client run as a plain loop, no Flower, no Ray.

It calls the same `ClientRuntime` (so the same client algorithm, state store, seeds
and torch thread count) round by round, and feeds each train reply back as the next
round's received arrays, which is what the `passthrough` strategy does. The
one-client Flower + Ray run must give identical metrics (tests/test_e2e.py).
"""

from __future__ import annotations

from pathlib import Path

from fedkd.config import ConfigError, FedkdConfig
from fedkd.data import load_federated
from fedkd.runtime import ClientRuntime
from fedkd.server import client_plan


def run_direct(cfg: FedkdConfig, state_dir: str | Path) -> list[dict]:
    """[{"round", "phase", **metrics}, ...] of a one-client run, in the order the run makes them."""
    if cfg.data.num_clients != 1:
        raise ConfigError("data.num_clients", cfg.data.num_clients,
                          "the direct loop is the one-client reference; use 1")
    plan = client_plan(cfg, load_federated(cfg.data, cfg.experiment.seed))
    runtime = ClientRuntime(cfg, state_dir)
    arrays = runtime.algorithm.initial_arrays()
    records: list[dict] = []
    for rnd in range(1, cfg.train.rounds + 1):
        phases = ["train"] + (["evaluate"] if plan.evaluates(rnd) else [])
        for phase in phases:
            out = runtime.run(phase, 0, arrays, rnd, {"server-round": rnd})
            if out.error is not None:
                raise RuntimeError(out.error)
            if phase == "train" and out.arrays:
                arrays = out.arrays
            records.append({"round": rnd, "phase": phase, **out.metrics})
    return records
