"""Update validation before aggregation (issue 19 item 3): the checks as pure functions, a node's
group reply, and whole in-process runs (`fedkd.testing.InProcessGrid`, no Ray) on real data."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord

from fedkd.apps import run_server
from fedkd.clients.base import ExpectedArrays
from fedkd.config import ValidationConfig, load_config
from fedkd.recorder import Recorder
from fedkd.simulation import prepare_run_dir, write_run_info
from fedkd.testing import InProcessGrid, group_reply
from fedkd.validation import NORM_KEY, check_declared, check_finite, update_norm, validate_update
from fedkd.wire import ClientOutcome, client_arrays_key, rejected_ids

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs/experiment/quickstart.yaml"
#: 4 clients, MLP, 2 rounds: a few seconds per in-process run
SMALL = ["data.num_clients=4", "model.name=mlp", "train.rounds=2", "train.batch_size=20"]


def run(tmp_path: Path, *overrides: str, nodes: int = 2) -> tuple[InProcessGrid, Any, list[dict]]:
    """A whole run in this process: (grid with every message, Flower's Result, metrics.jsonl)."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    cfg = load_config(QUICKSTART, [*SMALL, *overrides])
    prepare_run_dir(cfg, tmp_path)
    write_run_info(tmp_path, cfg, "running", None)
    grid, recorder = InProcessGrid(nodes), Recorder(tmp_path)
    try:
        result = run_server(grid, cfg, tmp_path, recorder)
    finally:
        recorder.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return grid, result, records


def train_status(records: list[dict]) -> dict[tuple[int, int], str]:
    return {(r["round"], r["partition_id"]): r["status"] for r in records
            if r["phase"] == "train" and r["partition_id"] is not None}


def sent_arrays(grid: InProcessGrid, server_round: int) -> dict[str, torch.Tensor]:
    """The global arrays the server sent for training in `server_round`."""
    msg = next(m for m in grid.sent if m.metadata.message_type == "train"
               and int(m.content["config"]["server-round"]) == server_round)
    return msg.content["arrays"].to_torch_state_dict()


# -- the checks ---------------------------------------------------------------------------------
DECLARED = ExpectedArrays({"w": ((2, 3), torch.float32), "n": ((), torch.int64)})


def test_declared_layout_is_enforced() -> None:
    ok = {"w": torch.zeros(2, 3), "n": torch.tensor(4)}
    assert check_declared(ok, DECLARED) is None
    assert check_declared(ok, None) is None  # undeclared: nothing to compare
    assert "missing arrays n" in check_declared({"w": ok["w"]}, DECLARED)
    assert "unexpected arrays x" in check_declared({**ok, "x": torch.zeros(1)}, DECLARED)
    assert "shape (1, 3)" in check_declared({**ok, "w": torch.zeros(1, 3)}, DECLARED)  # broadcasts
    assert "dtype torch.float64" in check_declared({**ok, "w": torch.zeros(2, 3, dtype=torch.float64)},
                                                   DECLARED)


def test_optional_groups_go_whole_or_not_at_all() -> None:
    table = ExpectedArrays({"mean.0": ((4,), torch.float32), "count.0": ((1,), torch.int64),
                            "mean.1": ((4,), torch.float32), "count.1": ((1,), torch.int64)},
                           optional=(("mean.0", "count.0"), ("mean.1", "count.1")))
    one_class = {"mean.1": torch.zeros(4), "count.1": torch.tensor([3])}
    assert check_declared(one_class, table) is None and check_declared({}, table) is None
    assert "incomplete group" in check_declared({"mean.1": torch.zeros(4)}, table)


def test_non_finite_values_are_named() -> None:
    w = torch.zeros(5)
    w[1], w[3] = float("nan"), float("inf")
    assert check_finite({"i": torch.tensor([1]), "w": torch.zeros(2)}) is None
    assert check_finite({"w": w}) == "non-finite values in w (1 NaN, 1 inf)"


def test_norm_check_against_the_previous_median() -> None:
    received = {"w": torch.ones(4), "n": torch.tensor(1)}
    sent = {"w": torch.full((4,), 2.0), "n": torch.tensor(9)}
    assert update_norm(sent, received) == pytest.approx(2.0)  # integers do not count
    on = ValidationConfig(norm_check=True, norm_factor=3.0)
    assert validate_update(sent, received, None, on, None) == (None, pytest.approx(2.0))  # round 1
    assert validate_update(sent, received, None, on, 1.0)[0] is None
    reason, norm = validate_update(sent, received, None, on, 0.5)
    assert "update norm 2 > 3 x" in reason and norm == pytest.approx(2.0)
    assert validate_update(sent, received, None, ValidationConfig(), 0.01) == (None, None)  # off


def test_a_group_never_sums_a_layout_it_did_not_start_with() -> None:
    """The node's last line of defence for undeclared methods: a mismatching update is rejected,
    the rest of the group is summed."""
    def outcome(pid: int, w: torch.Tensor) -> ClientOutcome:
        return ClientOutcome(pid, {"num-examples": 1, "loss": 0.0, "accuracy": 1.0}, {"w": w})

    reply = group_reply([outcome(0, torch.ones(3)), outcome(1, torch.ones(1)), outcome(2, torch.ones(3))],
                        "mean", node_id=1)
    status = reply.content["status"]
    assert list(rejected_ids(status)) == [1] and "differ" in rejected_ids(status)[1]
    assert [int(p) for p in status["ok"]] == [0, 2]
    assert reply.content["sums.hi"].to_torch_state_dict()["w"].tolist() == [2.0, 2.0, 2.0]


# -- whole runs ---------------------------------------------------------------------------------
def test_nan_from_one_client_is_rejected_and_the_model_stays_finite(tmp_path: Path) -> None:
    grid, result, records = run(tmp_path, "faults.clients=[1]", "faults.rounds=[1]", "faults.kind=nan")
    status = train_status(records)
    assert status.pop((1, 1)) == "rejected" and set(status.values()) == {"ok"}
    bad = next(r for r in records if r.get("status") == "rejected")
    assert bad["error"].startswith("non-finite values in") and bad["loss"] is not None
    for arrays in (sent_arrays(grid, 2), result.arrays.to_torch_state_dict()):
        assert all(bool(torch.isfinite(t).all()) for t in arrays.values())
    evaluate = [r for r in records if r["phase"] == "evaluate"]
    assert len(evaluate) == 8 and all(r["status"] == "ok" for r in evaluate)


def test_a_round_without_valid_updates_is_skipped_and_keeps_the_model(tmp_path: Path) -> None:
    grid, result, records = run(tmp_path, "faults.clients=[0,1,2,3]", "faults.rounds=[2]",
                                "faults.kind=inf")
    skipped = [r for r in records if r.get("status") == "skipped"]
    assert [(r["round"], r["phase"], r["valid_updates"], r["min_clients"]) for r in skipped] == \
        [(2, "train", 0, 1)]
    assert {s for (rnd, _), s in train_status(records).items() if rnd == 2} == {"rejected"}
    before, after = sent_arrays(grid, 2), result.arrays.to_torch_state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the run goes on: round 2 is still evaluated, with the round-1 model
    assert {r["round"] for r in records if r["phase"] == "evaluate" and r["status"] == "ok"} == {1, 2}


def test_min_clients_counts_failed_and_rejected_alike(tmp_path: Path) -> None:
    _, _, records = run(tmp_path, "train.rounds=1", "validation.min_clients=4",
                        "faults.clients=[2]", "faults.kind=raise")
    assert train_status(records)[(1, 2)] == "failed"
    assert [r["valid_updates"] for r in records if r.get("status") == "skipped"] == [3]


@pytest.mark.parametrize("method", ["fedproto", "feddistill"])
def test_class_tables_of_clients_holding_different_classes_are_accepted(tmp_path: Path,
                                                                        method: str) -> None:
    grid, _, records = run(tmp_path, f"method.name={method}", "train.rounds=1",
                           "data.partitioner.name=pathological", "data.partitioner.classes_per_client=2",
                           "validation.norm_check=true")
    assert set(train_status(records).values()) == {"ok"}
    uploads = [set(r.content[client_arrays_key(pid)].keys()) for r in grid.replies
               for pid in range(4) if client_arrays_key(pid) in r.content]
    assert len(uploads) == 4 and len({frozenset(u) for u in uploads}) > 1  # different classes
    assert all(len(u) < 20 for u in uploads)  # 10 classes x (mean, count): nobody sends all


def test_krum_tolerates_a_scaled_client(tmp_path: Path) -> None:
    grid, result, records = run(tmp_path, "strategy.name=krum", "train.rounds=1", "faults.clients=[1]",
                                "faults.kind=scale")
    assert set(train_status(records).values()) == {"ok"}  # scale passes validation...
    chosen = result.arrays.to_torch_state_dict()
    own = {pid: r.content[client_arrays_key(pid)].to_torch_state_dict() for r in grid.replies
           for pid in range(4) if client_arrays_key(pid) in r.content}
    picked = [pid for pid, arrays in own.items() if all(torch.equal(arrays[k], chosen[k]) for k in chosen)]
    assert len(picked) == 1 and picked != [1]  # ...and Krum selects an honest client's update


def test_norm_check_rejects_a_scaled_client_under_fedavg(tmp_path: Path) -> None:
    grid, result, records = run(tmp_path, "validation.norm_check=true", "validation.norm_factor=3",
                                "faults.clients=[1]", "faults.rounds=[2]", "faults.kind=scale",
                                "faults.factor=-10")
    status = train_status(records)
    assert status.pop((2, 1)) == "rejected" and set(status.values()) == {"ok"}
    bad = next(r for r in records if r.get("status") == "rejected")
    assert "update norm" in bad["error"]
    median_sent = {int(m.content["config"]["server-round"]): m.content["config"].get(NORM_KEY)
                   for m in grid.sent if m.metadata.message_type == "train"}
    round1 = sorted(r["update_norm"] for r in records if r["round"] == 1 and r["phase"] == "train")
    assert median_sent[1] is None and median_sent[2] == pytest.approx((round1[1] + round1[2]) / 2)
    assert bad["update_norm"] > 3 * median_sent[2]


def test_without_the_norm_check_fedavg_takes_the_scaled_update(tmp_path: Path) -> None:
    _, _, records = run(tmp_path, "faults.clients=[1]", "faults.rounds=[2]", "faults.kind=scale")
    assert set(train_status(records).values()) == {"ok"}
    assert "update_norm" not in records[0]  # norms are computed only for the check


def test_skipped_rounds_and_rejections_reach_the_report(tmp_path: Path) -> None:
    from fedkd.report import write_outputs

    run(tmp_path, "faults.clients=[0,1,2,3]", "faults.rounds=[1]", "faults.kind=nan")
    summary = write_outputs(tmp_path)
    assert summary["skipped_rounds"] == [1] and summary["rejected"] == 4
    report = (tmp_path / "report.md").read_text()
    assert "Skipped rounds" in report and "non-finite values" in report


def test_fedavg_of_one_reply_is_that_reply_bit_for_bit() -> None:
    """The grouped strategy hands mean-based strategies one reply holding the exact mean; FedAvg's
    aggregate of it must not touch a bit (weight factor w / w = 1.0)."""
    from flwr.serverapp.strategy import FedAvg

    from fedkd.testing import aggregate_train, fake_reply

    w = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for weight in (1, 3, 597, 4391.0):
        arrays, _ = aggregate_train(FedAvg(), [fake_reply({"w": w.numpy()}, weight)])
        assert torch.equal(arrays["w"], w)
    assert isinstance(ArrayRecord({"w": w}), ArrayRecord)


def test_a_run_through_all_its_rounds_fails_when_nothing_it_did_counts() -> None:
    from fedkd.simulation import judge_outcome

    def rec(rnd: int, phase: str, status: str) -> dict:  # a skipped round's marker names no client
        return {"round": rnd, "phase": phase, "status": status, "partition_id": None if status == "skipped" else 0}

    ok_eval = rec(2, "evaluate", "ok")
    assert judge_outcome([rec(1, "train", "ok"), rec(2, "train", "rejected"), ok_eval]) is None
    assert judge_outcome([rec(1, "train", "failed"), rec(2, "train", "rejected"), ok_eval]) == \
        "no client update was accepted in any round"
    assert judge_outcome([rec(1, "train", "ok"), rec(1, "train", "skipped"), rec(2, "train", "ok"),
                          rec(2, "train", "skipped"), ok_eval]) == "every round was skipped (too few valid updates)"
    assert judge_outcome([rec(1, "train", "ok")]) == "no evaluation was recorded"
    assert judge_outcome([rec(1, "train", "ok"), rec(1, "evaluate", "ok"), rec(2, "evaluate", "failed")]) == \
        "no client succeeded in the last evaluation (round 2)"
