"""bench/fedproto_prediction.py: FedProto's prediction rules on one client, by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fedkd.clients.class_tables import NearestPrototype
from fedkd.data import ClientSplit

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("fedproto_prediction", ROOT / "bench/fedproto_prediction.py")
fedproto_prediction = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
spec.loader.exec_module(fedproto_prediction)  # type: ignore[union-attr]


class Identity2d(nn.Module):
    """Features = the 2-d input itself; the head scores class c by -|x - head_points[c]|^2."""

    def __init__(self, head_points: list[list[float]]) -> None:
        super().__init__()
        self.points = torch.tensor(head_points)

    def features(self, x: Tensor) -> Tensor:
        return x

    def head(self, features: Tensor) -> Tensor:
        return -(features.unsqueeze(1) - self.points).pow(2).sum(-1)


def test_each_rule_scored_against_a_hand_computation() -> None:
    # 3 classes; the client trains on classes 0 and 1 only (class 0 around (0, 0), class 1 around (4, 0))
    x_train = np.array([[0, 0], [0, 0], [4, 0], [4, 0]], dtype=np.float32)
    y_train = np.array([0, 0, 1, 1])
    # test points: (1, 0) class 0, (3, 0) class 1, (2, 3) class 0
    x_test = np.array([[1, 0], [3, 0], [2, 3]], dtype=np.float32)
    y_test = np.array([0, 1, 0])
    split = ClientSplit(x_train, y_train, x_test, y_test)
    # global prototypes: class 0 at (0, 0), class 1 at (2, 0), class 2 at (2, 4); the head's points:
    # class 0 (0, 0), class 1 (4, 0), class 2 (2, 3)
    protos = torch.tensor([[0.0, 0.0], [2.0, 0.0], [2.0, 4.0]])
    model = NearestPrototype(Identity2d([[0, 0], [4, 0], [2, 3]]), protos, torch.tensor([True, True, True]))
    scores = fedproto_prediction.client_scores(model, split, num_classes=3)
    # nearest global: (1,0) -> tie 0/1 at distance 1, argmax takes class 0 (right); (3,0) -> 1 (right);
    # (2,3) -> class 2 (wrong). Held classes only: (2,3) -> class 1 at distance 9 vs class 0 at 13 (wrong)
    assert scores["nearest global"] == 2 and scores["nearest global, held classes"] == 2
    # own prototypes (0,0) and (4,0): (1,0) -> 0, (3,0) -> 1, (2,3) -> tie, class 0 first (right)
    assert scores["nearest own"] == 3
    # head: (2,3) -> class 2 (wrong); restricted to held classes: tie 0/1, class 0 (right)
    assert scores["own head"] == 2 and scores["own head, held classes"] == 3
    assert scores["n"] == 3 and scores["rare"] == 3  # every test class has 2 < 10 training samples
