"""Test your strategy without Ray: fake client replies and a direct call of its aggregation.

    from fedkd.testing import fake_reply, aggregate_train
    replies = [fake_reply({"w": np.ones(3)}, num_examples=10),
               fake_reply({"w": np.zeros(3)}, num_examples=30)]
    arrays, metrics = aggregate_train(MyStrategy(), replies)
    assert np.allclose(arrays["w"].numpy(), 0.25)

Replies look like what a Flower strategy receives from a ClientApp: an
ArrayRecord under "arrays" and one MetricRecord under "metrics" holding
"num-examples".

`InProcessGrid` goes one step further: it is a Flower `Grid` that hands every
message to fedkd's ClientApp in this process, so a whole run (the real
strategy loop, the real ClientApp, real messages) runs in pytest without Ray,
and the test can inspect every message in both directions:

    grid = InProcessGrid(num_nodes=2)
    run_server(grid, cfg, run_dir, Recorder(run_dir))
    assert all("head.weight" not in m.content["arrays"] for m in grid.sent)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.task_identity import TaskIdentity

from fedkd.wire import NUM_EXAMPLES, ClientOutcome, GroupReply, reply_message

if TYPE_CHECKING:
    from fedkd.config import FedkdConfig


def fake_reply(arrays: Mapping[str, np.ndarray | torch.Tensor], num_examples: int,
               metrics: Mapping[str, float] | None = None, node_id: int = 1) -> Message:
    """A training reply as a client would send it (numpy or torch values)."""
    tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()}
    record = RecordDict({"arrays": ArrayRecord(tensors),
                         "metrics": MetricRecord({NUM_EXAMPLES: num_examples, **(metrics or {})})})
    return reply_message(record, node_id, MessageType.TRAIN)


def fake_eval_reply(num_examples: int, metrics: Mapping[str, float], node_id: int = 1) -> Message:
    """An evaluation reply: metrics only."""
    record = RecordDict({"metrics": MetricRecord({NUM_EXAMPLES: num_examples, **metrics})})
    return reply_message(record, node_id, MessageType.EVALUATE)


def aggregate_train(strategy: Strategy, replies: Sequence[Message], server_round: int = 1
                    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, float] | None]:
    """Call `strategy.aggregate_train` and return plain tensors and metrics."""
    arrays, metrics = strategy.aggregate_train(server_round, list(replies))
    return (arrays.to_torch_state_dict() if arrays is not None else None,
            dict(metrics) if metrics is not None else None)


def weighted_mean_expected(values: Sequence[np.ndarray], weights: Sequence[int]) -> np.ndarray:
    """The hand-computed example-weighted mean, for assertions."""
    w = np.asarray(weights, dtype=np.float64)
    return np.tensordot(w / w.sum(), np.stack(values).astype(np.float64), axes=1)


def group_reply(outcomes: Sequence[ClientOutcome], mode: str, node_id: int,
                message_type: str = MessageType.TRAIN) -> Message:
    """A fedkd node's reply for a group of clients (for testing `GroupedClients`)."""
    reply = GroupReply(mode)
    for outcome in outcomes:
        reply.add(outcome)
    return reply_message(reply.build(), node_id, message_type)


class InProcessGrid(Grid):
    """A Flower Grid whose nodes are fedkd's ClientApp called in this process (see module doc).

    `sent` and `replies` keep a copy of every message of the run, in order, as it was
    delivered (strategies such as FedMedian consume the arrays of the replies they get).
    """

    def __init__(self, num_nodes: int) -> None:
        from fedkd.apps import client_app

        self.app = client_app
        self.node_ids = list(range(1, num_nodes + 1))
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._pending: list[Message] = []
        # Flower stamps instruction messages with the running task's identity; here there is none
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id,
                       group_id=group_id, ttl=ttl)

    def set_run(self, run_id: int) -> None:
        TaskIdentity.run_id = run_id

    @property
    def run(self) -> int:  # type: ignore[override]
        return TaskIdentity.run_id

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver now; the replies wait for `pull_messages`."""
        ids = []
        for msg in messages:
            self.sent.append(copy.deepcopy(msg))
            context = Context(run_id=TaskIdentity.run_id, node_id=msg.metadata.dst_node_id,
                              node_config={}, state=RecordDict(), run_config={})
            self._pending.append(self.app(msg, context))
            ids.append(str(len(self.sent)))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies, self._pending = self._pending, []
        self.replies.extend(copy.deepcopy(r) for r in replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


#: what may differ between two runs of the same config and seed (wall-clock measurements)
TIMING_FIELDS = frozenset({"seconds", "worker_pid", "wall_seconds", "seconds_per_round",
                           "train_seconds", "status_reason", "resumed_after_rounds", "machine_load"})


def comparable_records(run_dir: str | Path) -> list[dict]:
    """A run's metrics.jsonl without timings (and round-time records), in (round, phase, client)
    order: replies of one phase arrive in any order under Ray, their content may not differ. Two
    runs of one config and seed, resumed or not, on any number of workers, give equal lists."""
    phases = {"train": 0, "evaluate": 1, "central": 2}
    records = [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
               for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return sorted((r for r in records if r["phase"] != "round"),
                  key=lambda r: (r["round"], phases.get(r["phase"], 3), r.get("partition_id", -1)))


def run_in_process(cfg: "FedkdConfig", run_dir: str | Path, grid: InProcessGrid,
                   resume: bool = False) -> Path:
    """A whole run (or its continuation from the last checkpoint, `resume`) through the real
    strategy stack and ClientApp on `grid`, with the run directory's whole life: records,
    checkpoints, status, saved model and report, as `fedkd run` writes them. The directory is
    prepared first unless it holds the run already."""
    from fedkd.apps import run_server
    from fedkd.checkpoint import load_checkpoint, roll_back
    from fedkd.recorder import Recorder
    from fedkd.simulation import RunClock, finish_run, prepare_run_dir

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        prepare_run_dir(cfg, run_dir)
    checkpoint = load_checkpoint(run_dir) if resume else None
    if resume:
        roll_back(run_dir, checkpoint)
    clock = RunClock.resuming(run_dir, checkpoint)
    recorder, status = Recorder(run_dir), "failed"
    try:
        run_server(grid, cfg, run_dir, recorder, checkpoint)
        status = "complete"
    finally:
        finish_run(run_dir, cfg, recorder, status, clock)  # run.json's wall_seconds
    return run_dir
