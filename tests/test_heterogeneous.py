"""Model-heterogeneous runs: `model.per_client` architectures side by side in one federation."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedkd.config import ConfigError, load_config
from fedkd.models import client_model_name
from fedkd.report import client_rows
from fedkd.state import ClientStateStore
from tests.test_local_kd import eval_curve
from tests.test_personalized import in_process_run

HETERO = ["data.dataset=digits", "data.num_clients=4", "train.fraction_clients=1.0", "train.rounds=2",
          "model.name=cnn_narrow", "model.per_client=[cnn_narrow,mlp]"]


def test_architectures_are_cycled_over_partition_ids() -> None:
    assert [client_model_name("cnn", ["a", "b", "c"], k) for k in range(5)] == ["a", "b", "c", "a", "b"]
    assert client_model_name("cnn", [], 7) == "cnn"


@pytest.mark.parametrize("method", ["mhpflid", "fml", "fedproto", "feddistill", "local"])
def test_heterogeneous_clients_train_side_by_side(tmp_path: Path, method: str) -> None:
    overrides = [*HETERO, f"method.name={method}"]
    if method == "fedproto":  # prototypes are averaged: feature sizes must match
        overrides[-2] = "model.per_client=[cnn,cnn_bn]"
    grid, cfg = in_process_run(tmp_path, *overrides)
    store = ClientStateStore(tmp_path / "state")
    shapes = set()
    for pid in range(4):
        state = store.load(pid)
        own = next(v for k, v in state.items() if k in ("personal", "local-model") and isinstance(v, dict))
        shapes.add(tuple(sorted((k, tuple(t.shape)) for k, t in own.items())))
    assert len(shapes) == 2  # two architectures, each kept by its own clients
    curve = eval_curve(tmp_path)
    assert len(curve) == 2 and all(0.0 <= a <= 1.0 for a in curve.values())
    # the per-client report names each client's architecture
    per_client = list(cfg.model.per_client)
    assert [r["model"] for r in client_rows(tmp_path)] == [per_client[pid % 2] for pid in range(4)]


def test_methods_that_share_weights_reject_per_client_models() -> None:
    with pytest.raises(ConfigError, match=r"model.per_client.*fedavg shares model weights.*mhpflid"):
        load_config(None, ["model.per_client=[cnn,mlp]"])
    with pytest.raises(ConfigError, match=r"model.per_client\[1\].*'cnnn'"):
        load_config(None, ["method.name=local", "model.per_client=[cnn,cnnn]"])
    with pytest.raises(ConfigError, match="feature sizes must match"):
        load_config(None, ["method.name=fedproto", "model.per_client=[cnn,resnet8]"])
