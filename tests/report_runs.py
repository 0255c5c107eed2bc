"""Run directories for report tests, written from numbers (no Ray, no training): a seeded
population of any size, optionally with a failed client, as `fedkd run` lays them out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TRACEBACK = ("client {pid} (round {rnd}, train):\nTraceback (most recent call last):\n"
             '  File "fedkd/runtime.py", line 120, in call\n    update = self.algorithm.train(...)\n'
             '  File "clients/base.py", line 88, in train\n    raise RuntimeError(msg)\n'
             "RuntimeError: injected fault: client {pid} ran out of memory\n")


def synthetic_run(path: Path, clients: int, rounds: int = 3, seed: int = 0, failed: tuple[int, ...] = (),
                  strategy: str = "fedavg", models: list[str] | None = None) -> Path:
    """A finished run of `clients` clients over `rounds` rounds; clients in `failed` fail their
    training in round 2 (with a traceback as the runtime records it)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(
        f"experiment:\n  name: synthetic\n  seed: {seed}\nmethod:\n  name: fedavg\nstrategy:\n  name: {strategy}\n"
        f"data:\n  dataset: mnist5k\n  num_clients: {clients}\n  partitioner:\n    name: dirichlet\n"
        f"    alpha: 0.5\ntrain:\n  rounds: {rounds}\n")
    train = np.stack([rng.multinomial(int(n), rng.dirichlet(np.full(10, 0.5)))
                      for n in rng.integers(60, 600, clients)])
    test = np.maximum(train // 3, 0)
    (path / "partition.json").write_text(json.dumps({"num_classes": 10, "clients": [
        {"partition_id": i, "train": train[i].tolist(), "test": test[i].tolist()} for i in range(clients)]}))
    skill = rng.uniform(0.55, 0.98, clients)
    lines = []
    for rnd in range(1, rounds + 1):
        for pid in range(clients):
            if rnd == 2 and pid in failed:
                lines.append({"round": rnd, "phase": "train", "partition_id": pid, "status": "failed",
                              "num_examples": 0, "loss": None, "accuracy": None, "seconds": 0.1,
                              "bytes_received": 0, "bytes_sent": 0, "worker_pid": 1,
                              "error": TRACEBACK.format(pid=pid, rnd=rnd)})
                continue
            lines.append({"round": rnd, "phase": "train", "partition_id": pid, "status": "ok",
                          "num_examples": int(train[pid].sum()), "loss": 0.5, "accuracy": None,
                          "seconds": float(rng.uniform(0.2, 2.0)), "bytes_received": 2_328_104,
                          "bytes_sent": 2_328_104, "worker_pid": 1, "error": None})
        for pid in range(clients):
            acc = float(np.clip(skill[pid] * (0.8 + 0.2 * rnd / rounds) + rng.normal(0, 0.01), 0, 1))
            lines.append({"round": rnd, "phase": "evaluate", "partition_id": pid, "status": "ok",
                          "num_examples": int(test[pid].sum()), "loss": 1 - acc, "accuracy": acc,
                          "seconds": 0.05, "bytes_received": 2_328_104, "bytes_sent": 0,
                          "worker_pid": 1, "error": None})
        lines.append({"round": rnd, "phase": "central", "loss": 0.4, "accuracy": 0.6 + 0.3 * rnd / rounds,
                      "num_examples": 1000})
        lines.append({"round": rnd, "phase": "round", "seconds": 2.0})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (path / "run.json").write_text(json.dumps({
        "evaluated_model": "global", "evaluated_when": "after aggregation (global model)", "score": "accuracy",
        "client_models": models or ["cnn"], "wall_seconds": 2.0 * rounds, "status": "complete",
        "status_reason": None}))
    return path
