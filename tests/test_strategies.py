"""Strategy selection, client sampling/grouping, and aggregation over grouped replies (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx

from fedkd.config import ConfigError
from fedkd.recorder import Recorder
from fedkd.strategies.flower import STRATEGIES, build_flower_strategy
from fedkd.strategies.grouped import ClientPlan, GroupedClients
from fedkd.testing import aggregate_train, fake_reply, group_reply, weighted_mean_expected
from fedkd.wire import ClientOutcome


def plan(n: int = 6, **kw: object) -> ClientPlan:
    args = dict(num_clients=n, seed=0, rounds=4, train_fraction=1.0, eval_fraction=1.0,
                eval_every=2, work=tuple(range(10, 10 + n)))
    args.update(kw)
    return ClientPlan(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_builds_by_name(name: str) -> None:
    strategy, spec = build_flower_strategy({"name": name})
    assert isinstance(strategy, spec.cls)


def test_fedprox_gets_protocol_mu_and_options_are_validated() -> None:
    strategy, _ = build_flower_strategy({"name": "fedprox"})
    assert isinstance(strategy, FedProx) and strategy.proximal_mu == 0.01
    with pytest.raises(ConfigError, match="strategy.beta"):
        build_flower_strategy({"name": "fedavgm", "beta": 0.1})


def test_fedkd_testing_helpers_check_plain_fedavg() -> None:
    values = [np.array([1.0, 2.0]), np.array([3.0, 6.0])]
    arrays, metrics = aggregate_train(FedAvg(), [fake_reply({"w": v}, n, {"loss": l})
                                                for v, n, l in zip(values, [10, 30], [1.0, 3.0])])
    assert np.allclose(arrays["w"].numpy(), weighted_mean_expected(values, [10, 30]))
    assert metrics["loss"] == pytest.approx(2.5)


def test_sampling_is_seeded_sorted_and_fractional() -> None:
    p = plan(100, train_fraction=0.1)
    first = p.sample(3, "train")
    assert first == p.sample(3, "train") == sorted(first) and len(first) == 10
    assert first != p.sample(4, "train")
    assert plan(100, train_fraction=0.1, seed=1).sample(3, "train") != first
    assert p.sample(1, "evaluate") == list(range(100))


def test_evaluation_schedule_every_k_and_last() -> None:
    p = plan(rounds=5, eval_every=2)
    assert [r for r in range(1, 6) if p.evaluates(r)] == [2, 4, 5]


def test_assignment_covers_clients_once_and_balances_work() -> None:
    p = plan(6, work=(100, 1, 1, 1, 1, 96))
    groups = p.assign(list(range(6)), [11, 22])
    assert sorted(sum(groups.values(), [])) == list(range(6))
    loads = sorted(sum(p.work[i] for i in g) for g in groups.values())
    assert loads == [100, 100]


def outcome(pid: int, w: list[float], n: int, loss: float = 1.0) -> ClientOutcome:
    metrics = {"num-examples": n, "loss": loss, "accuracy": 0.5, "seconds": 0.1,
               "bytes-received": 8, "bytes-sent": 8, "worker-pid": 1}
    return ClientOutcome(pid, metrics, {"w": torch.tensor(w, dtype=torch.float64)})


def grouped(tmp_path: Path, inner: object, mean_based: bool) -> GroupedClients:
    g = GroupedClients(inner, plan(4), Recorder(tmp_path), mean_based=mean_based,  # type: ignore[arg-type]
                       shares_arrays=True, client_config="")
    g.groups["train"] = {101: [0, 2], 202: [1, 3]}
    return g


def records(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_group_pre_averaging_equals_fedavg_over_clients(tmp_path: Path) -> None:
    clients = [outcome(0, [1, 1], 10), outcome(1, [2, 0], 20), outcome(2, [4, 4], 30),
               outcome(3, [0, 8], 40)]
    g = grouped(tmp_path, FedAvg(), mean_based=True)
    replies = [group_reply([clients[0], clients[2]], "mean", 101),
               group_reply([clients[1], clients[3]], "mean", 202)]
    arrays, _ = g.aggregate_train(1, replies)
    expected = weighted_mean_expected([c.arrays["w"].numpy() for c in clients], [10, 20, 30, 40])
    assert np.allclose(arrays.to_torch_state_dict()["w"].numpy(), expected)
    assert sorted(r["partition_id"] for r in records(tmp_path)) == [0, 1, 2, 3]


def test_robust_strategies_see_every_clients_own_update(tmp_path: Path) -> None:
    clients = [outcome(0, [1.0], 10), outcome(1, [2.0], 10), outcome(2, [100.0], 10),
               outcome(3, [3.0], 10)]
    g = grouped(tmp_path, FedMedian(), mean_based=False)
    replies = [group_reply([clients[0], clients[2]], "each", 101),
               group_reply([clients[1], clients[3]], "each", 202)]
    arrays, _ = g.aggregate_train(1, replies)
    assert arrays.to_torch_state_dict()["w"].item() == pytest.approx(2.5)  # median of 1, 2, 3, 100


def test_failed_client_is_recorded_and_group_goes_on(tmp_path: Path) -> None:
    g = grouped(tmp_path, FedAvg(), mean_based=True)
    bad = ClientOutcome(2, {}, None, "Traceback (most recent call last):\nValueError: boom")
    replies = [group_reply([outcome(0, [1.0], 10), bad], "mean", 101),
               group_reply([outcome(1, [3.0], 10), outcome(3, [5.0], 20)], "mean", 202)]
    arrays, _ = g.aggregate_train(1, replies)
    assert arrays.to_torch_state_dict()["w"].item() == pytest.approx((10 + 30 + 100) / 40)
    failed = [r for r in records(tmp_path) if r["status"] == "failed"]
    assert [(r["partition_id"], r["error"].splitlines()[-1]) for r in failed] == [(2, "ValueError: boom")]
    assert g.recorder.failures[0]["partition_id"] == 2


def test_a_whole_failed_group_fails_its_clients_only(tmp_path: Path) -> None:
    from flwr.app import Error, Message

    g = grouped(tmp_path, FedAvg(), mean_based=True)
    ok = group_reply([outcome(1, [3.0], 10), outcome(3, [5.0], 10)], "mean", 202)
    metadata = group_reply([], "mean", 101).metadata
    broken = Message(error=Error(code=2, reason="actor died"), metadata=metadata)
    arrays, _ = g.aggregate_train(1, [broken, ok])
    assert arrays.to_torch_state_dict()["w"].item() == pytest.approx(4.0)
    assert sorted(r["partition_id"] for r in records(tmp_path) if r["status"] == "failed") == [0, 2]
