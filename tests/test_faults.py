"""Fault injection (issue 19 item 4): every kind in-process (InProcessGrid, no Ray), and one Ray
end-to-end run in which a client's worker process is killed mid-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedkd.config import ConfigError, FaultConfig, load_config
from fedkd.faults import corrupt, fires, in_ray_worker
from tests.test_validation import QUICKSTART, run, train_status


def test_the_draw_is_reproducible_and_per_client_round_and_seed() -> None:
    f = FaultConfig(clients=[0, 1], probability=0.5)
    draws = [[fires(f, 0, pid, rnd, "train") for rnd in range(1, 41)] for pid in (0, 1)]
    assert draws == [[fires(f, 0, pid, rnd, "train") for rnd in range(1, 41)] for pid in (0, 1)]
    assert draws[0] != draws[1] and 8 < sum(draws[0]) < 32
    assert draws[0] != [fires(f, 1, 0, rnd, "train") for rnd in range(1, 41)]  # another seed
    assert not any(fires(f, 0, 2, rnd, "train") for rnd in range(1, 41))  # not listed
    assert not fires(FaultConfig(clients=[0], rounds=[3]), 0, 0, 2, "train")
    assert not fires(FaultConfig(clients=[0]), 0, 0, 2, "evaluate")  # phase train by default
    assert not fires(FaultConfig(clients=[0], probability=0.0), 0, 0, 1, "train")


def test_corruptions_leave_the_original_alone() -> None:
    sent = {"a": torch.ones(3, 2), "b": torch.zeros(4), "n": torch.tensor(7)}
    received = {"a": torch.zeros(3, 2)}
    nan = corrupt("nan", sent, received, 1.0)
    assert all(bool(torch.isnan(nan[k]).sum() == 1) for k in ("a", "b")) and nan["n"].item() == 7
    assert bool(torch.isinf(corrupt("inf", sent, received, 1.0)["a"]).any())
    assert corrupt("shape", sent, received, 1.0)["a"].shape == (1, 2)
    assert set(corrupt("missing_key", sent, received, 1.0)) == {"b", "n"}
    scaled = corrupt("scale", sent, received, -10.0)
    assert scaled["a"].eq(-10).all() and scaled["b"].eq(0).all()  # received + f * (sent - received)
    assert sent["a"].eq(1).all() and sent["a"].shape == (3, 2) and set(sent) == {"a", "b", "n"}


def test_update_faults_need_the_train_phase() -> None:
    with pytest.raises(ConfigError, match="faults.kind='nan'.*phase=train"):
        load_config(QUICKSTART, ["faults.kind=nan", "faults.phase=evaluate"])
    with pytest.raises(ConfigError, match="faults.kind"):
        load_config(QUICKSTART, ["faults.kind=explode"])
    with pytest.raises(ConfigError, match="faults.probability"):
        load_config(QUICKSTART, ["faults.probability=1.5"])
    load_config(QUICKSTART, ["faults.kind=kill", "faults.phase=evaluate"])


#: kind -> (status of the faulty client, start of its error/reason)
EXPECTED = {
    "raise": ("failed", "client 1 (round 1, train)"),
    "nan": ("rejected", "non-finite values in"),
    "inf": ("rejected", "non-finite values in"),
    "shape": ("rejected", "features.fc1.0.bias has shape (1,)"),
    "missing_key": ("rejected", "missing arrays features.fc1.0.bias"),
    "scale": ("ok", None),
    "kill": ("failed", "client 1 (round 1, train)"),  # outside Ray: raised, pytest lives on
    "slow": ("ok", None),  # faults.seconds=0 here: no wall-clock in tests
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_each_fault_kind_in_process(tmp_path: Path, kind: str) -> None:
    grid, result, records = run(tmp_path, "train.rounds=1", "faults.clients=[1]", f"faults.kind={kind}",
                                "faults.seconds=0")
    status = train_status(records)
    expected_status, error = EXPECTED[kind]
    assert status.pop((1, 1)) == expected_status and set(status.values()) == {"ok"}
    faulty = next(r for r in records if r["phase"] == "train" and r["partition_id"] == 1)
    if error is None:
        assert faulty["error"] is None
    else:
        assert error in faulty["error"]
    if kind == "kill":
        assert "injected kill outside a Ray worker" in faulty["error"] and not in_ray_worker()
    arrays = result.arrays.to_torch_state_dict()
    assert all(bool(torch.isfinite(t).all()) for t in arrays.values())
    assert all(r["status"] == "ok" for r in records if r["phase"] == "evaluate")


def test_scale_moves_the_fedavg_mean_by_the_factor(tmp_path: Path) -> None:
    """Without the norm check a scaled update enters the mean: the Byzantine effect is real."""
    _, honest, _ = run(tmp_path / "honest", "train.rounds=1")
    _, scaled, _ = run(tmp_path / "scaled", "train.rounds=1", "faults.clients=[1]", "faults.kind=scale")
    a, b = honest.arrays.to_torch_state_dict(), scaled.arrays.to_torch_state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-3


# -- Ray ----------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.process
def test_a_killed_worker_is_replaced_and_the_run_goes_on(tmp_path: Path, ray_address: str) -> None:
    """faults.kind=kill SIGKILLs the Ray worker serving client 1 in round 1 (as the OOM killer
    would): that worker's group fails round 1, a new actor takes its place and round 2 is whole.
    (Without `replace_dead_actors`, Flower reuses the dead actor and a group fails in round 2.)"""
    from fedkd.actors import replace_dead_actors
    from fedkd.simulation import run_experiment

    assert replace_dead_actors()  # what fedkd.simulation installs before run_simulation
    cfg = load_config(QUICKSTART, ["data.num_clients=4", "model.name=mlp", "train.rounds=2",
                                   "train.batch_size=20", "simulation.num_nodes=2",
                                   f"simulation.ray_address={ray_address}", "faults.clients=[1]",
                                   "faults.rounds=[1]", "faults.kind=kill"])
    run_dir = run_experiment(cfg, tmp_path / "run", quiet=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    status = train_status(records)
    failed = [(rnd, pid) for (rnd, pid), s in status.items() if s != "ok"]
    assert (1, 1) in failed and len(failed) < 4 and all(rnd == 1 for rnd, _ in failed)
    died = next(r for r in records if (r["round"], r.get("partition_id")) == (1, 1) and r["phase"] == "train")
    assert "ActorDiedError" in died["error"]
    assert all(status[(2, pid)] == "ok" for pid in range(4))
    assert all(r["status"] == "ok" for r in records if r["phase"] == "evaluate" and r["round"] == 2)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
