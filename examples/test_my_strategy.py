"""The example strategy's test, through fedkd.testing (no Ray, no Flower simulation):
`pytest examples/test_my_strategy.py`."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedkd.testing import aggregate_train, fake_reply, weighted_mean_expected
from my_strategy import DampedFedAvg


def test_moves_half_way_to_the_weighted_mean() -> None:
    strategy = DampedFedAvg(server_lr=0.5)
    strategy.current = ArrayRecord({"w": torch.zeros(3)})  # what configure_train remembers
    replies = [fake_reply({"w": np.ones(3)}, num_examples=10),
               fake_reply({"w": np.full(3, 3.0)}, num_examples=30)]
    arrays, _ = aggregate_train(strategy, replies)
    mean = weighted_mean_expected([np.ones(3), np.full(3, 3.0)], [10, 30])  # 2.5
    assert np.allclose(arrays["w"].numpy(), 0.5 * mean)


def test_server_lr_one_is_fedavg() -> None:
    strategy = DampedFedAvg(server_lr=1.0)
    strategy.current = ArrayRecord({"w": torch.zeros(2)})
    arrays, _ = aggregate_train(strategy, [fake_reply({"w": [2.0, 4.0]}, num_examples=5)])
    assert arrays["w"].tolist() == [2.0, 4.0]
