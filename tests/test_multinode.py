"""A run on a two-node Ray cluster (two `ray start` nodes on this machine, each with its own temp
dir, 1 CPU each): actors on both nodes, client state through the driver node's state server
(`fedkd.state.StateServer`), the same records as an in-process run of the same config."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedkd.config import load_config
from fedkd.simulation import run_experiment
from fedkd.testing import InProcessGrid, comparable_records, run_in_process

pytestmark = [pytest.mark.e2e, pytest.mark.process]
ROOT = Path(__file__).resolve().parents[1]
# fedper: each client's head lives in its state, the body is averaged: state and aggregation both
SETTINGS = ["method.name=fedper", "data.num_clients=6", "model.name=mlp", "train.rounds=3",
            "train.lr=0.05", "checkpoint.every=1"]


def _node_of_worker(temp_dirs: list[Path]) -> dict[int, int]:
    """Worker pid -> index of the node (temp dir) whose session logs name it."""
    owner = {}
    for i, temp_dir in enumerate(temp_dirs):
        for log in temp_dir.glob("session_*/logs/worker-*.out"):
            match = re.search(r"-(\d+)\.out$", log.name)
            if match:
                owner[int(match.group(1))] = i
    return owner


def test_two_nodes_use_both_and_keep_client_state_without_a_shared_disk(tmp_path: Path) -> None:
    from fedkd.ray_cluster import local_cluster

    with local_cluster([1, 1]) as cluster:
        cfg = load_config(ROOT / "configs/experiment/quickstart.yaml",
                          [*SETTINGS, f"simulation.ray_address={cluster.address}"])
        run_dir = run_experiment(cfg, tmp_path / "two-nodes", quiet=True)
        owner = _node_of_worker([Path(d) for d in cluster.temp_dirs])
        import ray

        if ray.is_initialized():
            ray.shutdown()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in records if r.get("partition_id") is not None]
    nodes = {owner.get(r["worker_pid"]) for r in clients}
    assert nodes == {0, 1}, f"clients ran on nodes {nodes} (worker pids -> node: {owner})"
    # the state lives in the run directory on the driver's node, and in its checkpoint
    assert sorted(p.name for p in (run_dir / "state").glob("*.pt")) == [f"{i}.pt" for i in range(6)]
    assert len(list((run_dir / "checkpoint" / "state").glob("*.pt"))) == 6
    # the same records as the run in one process: every state read saw the last write,
    # whichever node wrote it
    local = load_config(ROOT / "configs/experiment/quickstart.yaml", SETTINGS)
    reference = run_in_process(local, tmp_path / "in-process", InProcessGrid(num_nodes=2))
    assert comparable_records(run_dir) == comparable_records(reference)
    # (Flower hands a group to whichever actor is free, so a client may or may not change nodes
    # between calls: which one it does is scheduling, not something to assert)
