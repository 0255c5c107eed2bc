"""Test your strategy without Ray: fake client replies and a direct call of its aggregation.

    from fedkd.testing import fake_reply, aggregate_train
    replies = [fake_reply({"w": np.ones(3)}, num_examples=10),
               fake_reply({"w": np.zeros(3)}, num_examples=30)]
    arrays, metrics = aggregate_train(MyStrategy(), replies)
    assert np.allclose(arrays["w"].numpy(), 0.25)

Replies look like what a Flower strategy receives from a ClientApp: an
ArrayRecord under "arrays" and one MetricRecord under "metrics" holding
"num-examples".
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedkd.wire import NUM_EXAMPLES, ClientOutcome, GroupReply, reply_message


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
