"""pFL baselines with partial sharing: what travels, what the server averages, each update rule.

The message audits run a whole federated run in-process (`fedkd.testing.InProcessGrid`):
the real strategy loop, the real ClientApp and the real Flower messages, without Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import fedkd.clients.personalized as personalized
from fedkd.apps import run_server
from fedkd.clients.base import RoundInfo
from fedkd.clients.ditto import PERSONAL_MODEL, DittoClient, DittoSettings
from fedkd.clients.fedavg import FedAvgClient, FedAvgSettings
from fedkd.clients.personalized import (FedBNClient, FedBNSettings, FedProxClient, FedProxSettings,
                                        FedRepClient, FedRepSettings)
from fedkd.config import ConfigError, FedkdConfig, load_config
from fedkd.data import load_federated
from fedkd.models import batchnorm_keys
from fedkd.recorder import Recorder
from fedkd.runtime import ClientRuntime
from fedkd.simulation import prepare_run_dir, write_run_info
from fedkd.state import ClientStateStore
from fedkd.testing import InProcessGrid, weighted_mean_expected
from fedkd.wire import client_arrays_key
from tests.test_clients import config, tiny_data

SMALL = ["data.num_clients=10", "train.fraction_clients=0.4", "train.rounds=2", "train.lr=0.05",
         "train.batch_size=50"]  # a few steps per client: what is audited is which arrays travel
#: method -> model it is audited on (FedBN needs BatchNorm layers to keep)
AUDITED = {"fedavg": "mlp", "fedprox": "mlp", "local": "mlp", "fedper": "mlp", "fedrep": "mlp",
           "lgfedavg": "mlp", "fedbn": "cnn_bn", "ditto": "mlp"}


def in_process_run(tmp_path: Path, *overrides: str, nodes: int = 2) -> tuple[InProcessGrid, FedkdConfig]:
    cfg = load_config(None, [*SMALL, *overrides])
    prepare_run_dir(cfg, tmp_path)
    write_run_info(tmp_path, cfg, "running", None)
    grid = InProcessGrid(nodes)
    recorder = Recorder(tmp_path)
    run_server(grid, cfg, tmp_path, recorder)
    recorder.close()
    return grid, cfg


def array_records(message: Any) -> list[tuple[str, dict[str, torch.Tensor]]]:
    return [(name, rec.to_torch_state_dict()) for name, rec in message.content.array_records.items()]


@pytest.mark.parametrize("method", sorted(AUDITED))
def test_personal_parameters_never_appear_in_any_message(tmp_path: Path, method: str) -> None:
    # fedmedian: every client's own arrays travel in the reply ("each" mode), not a group mean
    grid, cfg = in_process_run(tmp_path, f"method.name={method}", f"model.name={AUDITED[method]}",
                               "strategy.name=fedmedian")
    data = load_federated(cfg.data, cfg.experiment.seed)
    runtime = ClientRuntime(cfg, tmp_path / "state")
    shared = set(runtime.algorithm.initial_arrays())
    store = ClientStateStore(tmp_path / "state")
    personal = {pid: store.load(pid) for pid in range(len(data.clients))}
    trained = [pid for pid, s in personal.items() if s]
    assert bool(trained) == (method not in ("fedavg", "fedprox"))  # stateless methods keep nothing
    seen = 0
    for message in [*grid.sent, *grid.replies]:
        for _, arrays in array_records(message):
            assert set(arrays) == shared  # exactly the shared subset, in both directions
            seen += 1
    assert seen >= (4 if shared else 0)
    for message in [*grid.sent, *grid.replies]:
        for _, arrays in array_records(message):
            for state in personal.values():
                for key, own in {**state.get("personal", {}), **state.get(PERSONAL_MODEL, {})}.items():
                    assert key not in arrays or not torch.equal(arrays[key], own)
    if method == "local":  # the whole model is personal: nothing is shared
        model_keys = set(runtime.algorithm.build_model(AUDITED[method]).state_dict())
        assert not shared and all(set(personal[pid]["personal"]) == model_keys for pid in trained)
    elif method not in ("fedavg", "fedprox", "ditto"):
        assert all(set(personal[pid]["personal"]) == set(runtime.algorithm.personal_keys)
                   for pid in trained)
        assert runtime.algorithm.personal_keys and not shared & set(runtime.algorithm.personal_keys)


def test_server_aggregate_of_the_shared_subset_is_the_example_weighted_mean(tmp_path: Path) -> None:
    grid, cfg = in_process_run(tmp_path, "method.name=fedper", "model.name=mlp")
    runtime = ClientRuntime(cfg, tmp_path / "direct")
    start = runtime.algorithm.initial_arrays()
    round1 = [m for m in grid.sent if m.content["config"]["server-round"] == 1
              and m.metadata.message_type.startswith("train")]
    pids = sorted(int(p) for m in round1 for p in m.content["config"]["fedkd-pids"])
    outcomes = [runtime.run("train", pid, start, 1, {}) for pid in pids]
    assert all(o.error is None for o in outcomes)
    round2 = next(m for m in grid.sent if m.content["config"]["server-round"] == 2)
    received = round2.content["arrays"].to_torch_state_dict()
    assert set(received) == set(start) and not any(k.startswith("head.") for k in received)
    for key in received:
        expected = weighted_mean_expected([o.arrays[key].numpy() for o in outcomes],
                                          [o.metrics["num-examples"] for o in outcomes])
        assert torch.allclose(received[key].double(), torch.as_tensor(expected), atol=1e-6)


def test_fedbn_keeps_batchnorm_local_and_clients_statistics_differ(tmp_path: Path) -> None:
    grid, cfg = in_process_run(tmp_path, "method.name=fedbn", "model.name=cnn_bn")
    store = ClientStateStore(tmp_path / "state")
    states = [s for s in (store.load(pid) for pid in range(10)) if s]
    assert len(states) >= 2
    a, b = states[0]["personal"], states[1]["personal"]
    assert "features.conv1.1.running_mean" in a
    assert not torch.equal(a["features.conv1.1.running_mean"], b["features.conv1.1.running_mean"])
    assert not any("conv1.1" in key for m in grid.sent for key in m.content["arrays"].keys())


def test_fedbn_on_a_model_without_batchnorm_is_fedavg() -> None:
    cfg, data = config(), tiny_data()
    fedbn = FedBNClient(cfg, FedBNSettings(), (1, 8, 8), 2, torch.device("cpu"))
    avg = FedAvgClient(cfg, FedAvgSettings(), (1, 8, 8), 2, torch.device("cpu"))
    assert fedbn.personal_keys == [] and batchnorm_keys(fedbn.model) == []
    a = fedbn.train(fedbn.initial_arrays(), {}, data, RoundInfo(0, 1, 0)).arrays
    b = avg.train(avg.initial_arrays(), {}, data, RoundInfo(0, 1, 0)).arrays
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fedprox_method_equals_fedavg_with_the_fedprox_strategys_mu() -> None:
    cfg, data = config(local_epochs=2), tiny_data()
    prox = FedProxClient(cfg, FedProxSettings(mu=0.5), (1, 8, 8), 2, torch.device("cpu"))
    avg = FedAvgClient(cfg, FedAvgSettings(), (1, 8, 8), 2, torch.device("cpu"))
    a = prox.train(prox.initial_arrays(), {}, data, RoundInfo(0, 1, 0)).arrays
    b = avg.train(avg.initial_arrays(), {}, data, RoundInfo(0, 1, 0, {"proximal-mu": 0.5})).arrays
    c = avg.train(avg.initial_arrays(), {}, data, RoundInfo(0, 1, 0)).arrays
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    zero = FedProxClient(cfg, FedProxSettings(mu=0.0), (1, 8, 8), 2, torch.device("cpu"))
    d = zero.train(zero.initial_arrays(), {}, data, RoundInfo(0, 1, 0)).arrays
    assert all(torch.equal(d[k], c[k]) for k in d)  # mu = 0 is FedAvg bit for bit


def test_fedrep_trains_the_head_first_then_the_body(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list[str], dict[str, torch.Tensor]]] = []
    real = personalized.train_epochs

    def spy(model: torch.nn.Module, *args: Any, **kwargs: Any) -> dict[str, float]:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = real(model, *args, **kwargs)
        changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
        calls.append((kwargs["trainable"], {"changed": changed}))  # type: ignore[dict-item]
        return out

    monkeypatch.setattr(personalized, "train_epochs", spy)
    client = FedRepClient(config(), FedRepSettings(head_epochs=2), (1, 8, 8), 2, torch.device("cpu"))
    state: dict = {}
    result = client.train(client.initial_arrays(), state, tiny_data(), RoundInfo(0, 1, 0))
    (head_names, head_phase), (body_names, body_phase) = calls
    assert head_names == ["head.weight", "head.bias"]
    assert set(head_phase["changed"]) == set(head_names)  # body frozen during the head phase
    assert body_names and not set(body_names) & set(head_names)
    assert set(body_phase["changed"]) == set(body_names)  # head frozen during the body phase
    assert set(result.arrays) == set(body_names) and set(state["personal"]) == set(head_names)


def ditto_distance(mu: float) -> float:
    cfg, data = config(local_epochs=1), tiny_data()
    client = DittoClient(cfg, DittoSettings(mu=mu, personal_epochs=3), (1, 8, 8), 2, torch.device("cpu"))
    start = client.initial_arrays()
    state: dict = {}
    # a personal model that already drifted: two rounds with the global model fixed at `start`
    for rnd in (1, 2):
        client.train(start, state, data, RoundInfo(0, rnd, 0))
    return sum(float((state[PERSONAL_MODEL][k] - start[k]).pow(2).sum()) for k in start)


def test_ditto_personal_model_moves_toward_the_global_model_as_mu_grows() -> None:
    distances = [ditto_distance(mu) for mu in (0.0, 0.5, 5.0)]
    assert distances[0] > distances[1] > distances[2]


def test_ditto_global_update_is_fedavgs_and_personal_model_stays_local() -> None:
    cfg, data = config(), tiny_data()
    ditto = DittoClient(cfg, DittoSettings(mu=0.1), (1, 8, 8), 2, torch.device("cpu"))
    avg = FedAvgClient(cfg, FedAvgSettings(), (1, 8, 8), 2, torch.device("cpu"))
    state: dict = {}
    a = ditto.train(ditto.initial_arrays(), state, data, RoundInfo(0, 1, 0))
    b = avg.train(avg.initial_arrays(), {}, data, RoundInfo(0, 1, 0)).arrays
    assert all(torch.equal(a.arrays[k], b[k]) for k in b)  # personal phase does not touch w
    assert any(not torch.equal(state[PERSONAL_MODEL][k], a.arrays[k]) for k in b)
    result = ditto.evaluate(a.arrays, state, data, RoundInfo(0, 1, 0))
    assert set(result.metrics) == {"global-accuracy", "global-loss"}


def test_method_options_are_checked_before_any_simulation() -> None:
    with pytest.raises(ConfigError, match="method.personal_layers.*haed.*did you mean 'head'"):
        load_config(None, ["method.name=fedper", "method.personal_layers=[haed]"])
    with pytest.raises(ConfigError, match="strategy.name.*fedprox.*already adds the proximal term"):
        load_config(None, ["method.name=fedprox", "strategy.name=fedprox"])
    with pytest.raises(ConfigError, match="method.match.*allowed"):
        load_config(None, ["method.name=fedbn", "method.match=bn"])
    assert load_config(None, ["method.name=ditto"]).method["mu"] == 0.01


def test_mean_and_each_modes_send_the_same_shared_keys(tmp_path: Path) -> None:
    grid, _ = in_process_run(tmp_path, "method.name=lgfedavg", "model.name=mlp",
                             "strategy.name=fedmedian", nodes=1)
    reply = grid.replies[0]
    pids = [int(p) for p in reply.content["status"]["ok"]]
    keys = [set(reply.content[client_arrays_key(p)].keys()) for p in pids]
    assert keys and all(k == {"head.weight", "head.bias"} for k in keys)
