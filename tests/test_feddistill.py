"""FedDistill's leave-own-out teacher (`exclude_self`, `../shared/specs/local-kd.md` 4.3 and its
v2 test plan): the sum-and-count broadcast with local subtraction against a hand computation on
3 clients with uneven class counts, the edge cases, the client's bookkeeping, and v1 unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from fedkd.clients.base import RoundInfo
from fedkd.clients.class_tables import UPLOADS, FedDistillClient, FedDistillSettings
from fedkd.strategies.class_means import (CLIENT_ID, ClassMeans, decode_class_table,
                                          encode_class_table, leave_own_out)
from fedkd.testing import aggregate_train, fake_reply
from tests.test_clients import config, tiny_data
from tests.test_personalized import array_records, in_process_run

CPU = torch.device("cpu")

# 3 clients, 3 classes, logit vectors of length 3. Class 2 is held by client 0 alone; client 2
# holds class 0 only; the counts are uneven.
MEANS = {0: torch.tensor([[1.0, 2.0, 3.0], [0.0, 4.0, 0.0], [3.0, 0.0, 0.0]]),
         1: torch.tensor([[5.0, 0.0, 1.0], [2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]),
         2: torch.tensor([[-1.0, 1.0, 3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])}
COUNTS = {0: torch.tensor([2, 1, 3]), 1: torch.tensor([4, 2, 0]), 2: torch.tensor([1, 0, 0])}
NaN = float("nan")  # an absent class in the hand tables below
# the teachers, computed by hand (local-kd.md 4.3): rows = classes, NaN = no teacher
HAND = {
    "uniform": {
        0: [[2.0, 0.5, 2.0], [2.0, 2.0, 2.0], [NaN] * 3],  # class 0: (c1 + c2) / 2; class 2 is 0's alone
        1: [[0.0, 1.5, 3.0], [0.0, 4.0, 0.0], [3.0, 0.0, 0.0]],  # class 2: 1 never had it
        2: [[3.0, 1.0, 2.0], [1.0, 3.0, 1.0], [3.0, 0.0, 0.0]],  # classes 1, 2: plain means
    },
    "count": {
        0: [[19 / 5, 1 / 5, 7 / 5], [2.0, 2.0, 2.0], [NaN] * 3],  # (4 c1 + 1 c2) / 5
        1: [[1 / 3, 5 / 3, 9 / 3], [0.0, 4.0, 0.0], [3.0, 0.0, 0.0]],  # (2 c0 + 1 c2) / 3
        2: [[22 / 6, 4 / 6, 10 / 6], [4 / 3, 8 / 3, 4 / 3], [3.0, 0.0, 0.0]],  # (2 c0 + 4 c1) / 6
    },
}


def upload(pid: int, means: Tensor | None = None, counts: Tensor | None = None) -> dict[str, Tensor]:
    """Client `pid`'s leave-own-out upload: its class table plus its partition id."""
    table = encode_class_table(MEANS[pid] if means is None else means,
                               COUNTS[pid] if counts is None else counts)
    return {**table, CLIENT_ID: torch.tensor([pid], dtype=torch.int64)}


def broadcast(weighting: str, pids: tuple[int, ...] = (0, 1, 2), server_round: int = 1
              ) -> dict[str, Tensor]:
    replies = [fake_reply(upload(p), int(COUNTS[p].sum()), node_id=p + 1) for p in pids]
    arrays, _ = aggregate_train(ClassMeans(weighting, exclude_self=True), replies, server_round)
    assert arrays is not None
    return arrays


def direct_leave_own_out(tables: dict[int, tuple[Tensor, Tensor]], k: int, num_classes: int,
                         weighting: str) -> tuple[Tensor, Tensor]:
    """The teacher straight from the definition (no sums, no subtraction)."""
    table = torch.zeros(num_classes, next(iter(tables.values()))[0].shape[1], dtype=torch.float64)
    present = torch.zeros(num_classes, dtype=torch.bool)
    for c in range(num_classes):
        holders = [j for j, (_, n) in tables.items() if n[c] > 0]
        others = [j for j in holders if j != k] if k in holders else holders
        if not others:
            continue
        w = [1.0 if weighting == "uniform" else float(tables[j][1][c]) for j in others]
        table[c] = sum(wj * tables[j][0][c].double() for wj, j in zip(w, others)) / sum(w)
        present[c] = True
    return table, present


def as_hand(teacher: tuple[Tensor, Tensor]) -> Tensor:
    table, present = teacher
    return torch.where(present.unsqueeze(-1), table.double(), torch.full_like(table.double(), NaN))


@pytest.mark.parametrize("weighting", ["uniform", "count"])
def test_sum_and_count_broadcast_gives_the_hand_computed_leave_own_out_teacher(
        weighting: str) -> None:
    sent = broadcast(weighting)
    assert sorted(k for k in sent if k.startswith("sum.")) == ["sum.0", "sum.1", "sum.2"]
    assert sent["contributors"].tolist() == [0, 1, 2] and sent["round"].tolist() == [1]
    assert not any(k.startswith("mean.") for k in sent)  # C x D + C floats, not the means
    tables = {p: (MEANS[p], COUNTS[p]) for p in MEANS}
    for k in (0, 1, 2):
        own = {key: v for key, v in upload(k).items() if key != CLIENT_ID}
        teacher = leave_own_out(sent, 3, own, weighting)
        assert teacher is not None
        expected = torch.tensor(HAND[weighting][k], dtype=torch.float64)
        assert torch.allclose(as_hand(teacher), expected, atol=1e-6, equal_nan=True), k
        direct = direct_leave_own_out(tables, k, 3, weighting)
        assert torch.equal(teacher[1], direct[1])
        assert torch.allclose(teacher[0].double(), direct[0], atol=1e-6)
        assert teacher[0].dtype == torch.float32


def test_a_class_reported_by_one_client_is_absent_for_it_and_present_for_every_other() -> None:
    sent = broadcast("uniform")
    present = {k: leave_own_out(sent, 3, upload(k), "uniform")[1] for k in (0, 1, 2)}  # type: ignore[index]
    assert present[0].tolist() == [True, True, False]
    assert present[1][2] and present[2][2]


def test_a_client_outside_the_contributors_gets_the_plain_means() -> None:
    # client 2's round-1 update was rejected: the broadcast holds 0 and 1 only, so 2's own
    # (stored) table must not be subtracted
    sent = broadcast("uniform", pids=(0, 1))
    assert sent["contributors"].tolist() == [0, 1]
    table, present = leave_own_out(sent, 3, None, "uniform")  # type: ignore[misc]
    assert present.tolist() == [True, True, True]
    assert torch.allclose(table[0], torch.tensor([3.0, 1.0, 2.0]))  # (c0 + c1) / 2
    assert leave_own_out({}, 3, None, "uniform") is None  # nothing aggregated yet


def test_exclude_self_false_keeps_v1s_broadcast_and_teacher_bit_for_bit() -> None:
    replies = [fake_reply(encode_class_table(MEANS[p], COUNTS[p]), 1, node_id=p + 1) for p in MEANS]
    v1, _ = aggregate_train(ClassMeans("uniform"), replies)
    off, _ = aggregate_train(ClassMeans("uniform", exclude_self=False), replies)
    assert v1 is not None and off is not None and v1.keys() == off.keys()
    assert all(torch.equal(v1[k], off[k]) for k in v1)
    assert set(v1) == {f"{kind}.{c}" for kind in ("mean", "count") for c in range(3)}
    fd = FedDistillClient(config(), FedDistillSettings(), (1, 8, 8), 3, CPU)
    teacher = fd.teacher(v1, {}, RoundInfo(0, 2, 0))
    reference = decode_class_table(v1, 3)
    assert teacher is not None and reference is not None
    assert torch.equal(teacher[0], reference[0]) and torch.equal(teacher[1], reference[1])
    assert CLIENT_ID not in fd.expected_arrays(RoundInfo(0, 1, 0)).arrays


def test_the_client_uploads_its_id_keeps_its_uploads_and_distils_toward_the_leave_own_out_mean(
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = tiny_data()
    fd = FedDistillClient(config(), FedDistillSettings(exclude_self=True), (1, 8, 8), 2, CPU)
    assert fd.expected_arrays(RoundInfo(0, 1, 0)).arrays[CLIENT_ID] == ((1,), torch.int64)
    state: dict[str, Any] = {}
    first = fd.train({}, state, data, RoundInfo(0, 1, 0))
    assert first.arrays[CLIENT_ID].tolist() == [0]
    assert list(state[UPLOADS]) == ["1"]
    assert all(torch.equal(state[UPLOADS]["1"][k], first.arrays[k]) for k in state[UPLOADS]["1"])
    # round 1's aggregate over this client and another one that holds class 0 only
    other = {**encode_class_table(torch.tensor([[7.0, -7.0], [0.0, 0.0]]), torch.tensor([5, 0])),
             CLIENT_ID: torch.tensor([1], dtype=torch.int64)}
    replies = [fake_reply(first.arrays, 48, node_id=1), fake_reply(other, 5, node_id=2)]
    sent, _ = aggregate_train(ClassMeans("uniform", exclude_self=True), replies, 1)
    assert sent is not None
    seen: list[tuple[Tensor, Tensor] | None] = []
    original = fd.step

    def spy(model: Any, x: Tensor, y: Tensor, table: tuple[Tensor, Tensor] | None) -> Any:
        seen.append(table)
        return original(model, x, y, table)

    monkeypatch.setattr(fd, "step", spy)
    fd.train(sent, state, data, RoundInfo(0, 2, 0))
    table, present = seen[0]  # type: ignore[misc]
    assert present.tolist() == [True, False]  # class 0: the other client's; class 1: 0's alone
    assert torch.allclose(table[0], torch.tensor([7.0, -7.0]))
    assert sorted(state[UPLOADS]) == ["1", "2"]  # round 2's broadcast will need round 2's upload
    own2 = {**state[UPLOADS]["2"], CLIENT_ID: torch.tensor([0], dtype=torch.int64)}
    sent3, _ = aggregate_train(ClassMeans("uniform", exclude_self=True),
                               [fake_reply(own2, 48), fake_reply(other, 5, node_id=2)], 2)
    assert sent3 is not None
    fd.train(sent3, state, data, RoundInfo(0, 3, 0))
    assert sorted(state[UPLOADS]) == ["2", "3"]  # older than the broadcast's round: dropped
    # a contributor whose upload of that round is gone cannot subtract it: an error, not a guess
    del state[UPLOADS]["2"]
    with pytest.raises(ValueError, match="holds no upload"):
        fd.train(sent3, state, data, RoundInfo(0, 4, 0))


def test_exclude_self_run_in_process_uses_the_exact_leave_own_out_teacher_under_sampling(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uploads: dict[tuple[int, int], dict[str, Tensor]] = {}
    teachers: dict[tuple[int, int], tuple[Tensor, Tensor] | None] = {}
    train, teacher = FedDistillClient.train, FedDistillClient.teacher

    def record_train(self: FedDistillClient, received: Any, state: Any, data: Any,
                     info: RoundInfo) -> Any:
        result = train(self, received, state, data, info)
        uploads[(info.server_round, info.partition_id)] = dict(result.arrays)
        return result

    def record_teacher(self: FedDistillClient, received: Any, state: Any,
                       info: RoundInfo) -> Any:
        out = teacher(self, received, state, info)
        teachers[(info.server_round, info.partition_id)] = out
        return out

    monkeypatch.setattr(FedDistillClient, "train", record_train)
    monkeypatch.setattr(FedDistillClient, "teacher", record_teacher)
    grid, _ = in_process_run(tmp_path, "method.name=feddistill", "method.exclude_self=true",
                             "method.weighting=count", "model.name=mlp", "train.rounds=3",
                             "data.partitioner.name=pathological",
                             "data.partitioner.classes_per_client=2")
    sent = [arrays for m in grid.sent for _, arrays in array_records(m) if arrays]
    assert sent and all("contributors" in a and not any(k.startswith("mean.") for k in a)
                        for a in sent)
    checked = 0
    for (rnd, pid), got in teachers.items():
        if rnd == 1:
            assert got is None
            continue
        tables = {p: decode_upload(arrays) for (r, p), arrays in uploads.items() if r == rnd - 1}
        assert all(int(uploads[(rnd - 1, p)][CLIENT_ID]) == p for p in tables)
        expected = direct_leave_own_out(tables, pid, 10, "count")
        assert got is not None and torch.equal(got[1], expected[1])
        assert torch.allclose(got[0].double(), expected[0], atol=1e-5)
        checked += 1
    assert checked >= 4  # rounds 2 and 3, 4 sampled clients each (some not sampled before)


def decode_upload(arrays: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(means (C, D), counts (C,)) of one client's upload, zeros for the classes it lacks."""
    means = torch.zeros(10, 10)
    counts = torch.zeros(10, dtype=torch.int64)
    for key, value in arrays.items():
        if key.startswith("mean."):
            c = int(key.split(".")[1])
            means[c], counts[c] = value, int(arrays[f"count.{c}"])
    return means, counts
