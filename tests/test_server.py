"""Server-side pieces: initial arrays, client plan from the data, central evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from fedkd.config import load_config
from fedkd.data import ClientSplit, FederatedData
from fedkd.recorder import Recorder
from fedkd.server import central_evaluator, client_plan, server_algorithm


def synthetic(n_clients: int = 3) -> FederatedData:
    rng = np.random.default_rng(0)
    split = lambda n: (rng.standard_normal((n, 1, 8, 8)).astype(np.float32),  # noqa: E731
                       rng.integers(0, 3, n))
    clients = [ClientSplit(*split(10 + i), *split(4)) for i in range(n_clients)]
    return FederatedData("synthetic", 3, (1, 8, 8), clients, split(50))


def test_central_evaluation_of_the_global_model_on_eval_rounds(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.name=mlp", "train.rounds=4", "evaluation.every=2"])
    data = synthetic()
    algorithm = server_algorithm(cfg, data)
    plan = client_plan(cfg, data)
    assert plan.work == (10, 11, 12)
    recorder = Recorder(tmp_path)
    evaluate_fn = central_evaluator(cfg, data, algorithm, plan, recorder)
    assert evaluate_fn is not None
    arrays = ArrayRecord(algorithm.initial_arrays())
    assert evaluate_fn(0, arrays) is None and evaluate_fn(1, arrays) is None
    result = evaluate_fn(2, arrays)
    assert result is not None and 0.0 <= result["central-accuracy"] <= 1.0
    recorder.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert (record["phase"], record["round"], record["num_examples"]) == ("central", 2, 50)


def test_no_central_evaluation_without_a_global_model(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.name=mlp", "method.name=local"])
    data = synthetic()
    algorithm = server_algorithm(cfg, data)
    assert algorithm.initial_arrays() == {}
    assert central_evaluator(cfg, data, algorithm, client_plan(cfg, data), Recorder(tmp_path)) is None
