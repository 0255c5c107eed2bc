"""Client algorithms on tiny tensors, without Flower or Ray; the client state store."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import torch

from fedkd.clients.base import ClientData, RoundInfo, batches
from fedkd.clients.fedavg import FedAvgClient, FedAvgSettings
from fedkd.clients.local import LocalClient, LocalSettings
from fedkd.config import FedkdConfig, TrainConfig
from fedkd.state import ClientStateStore


def tiny_data(seed: int = 0, n: int = 64) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()  # learnable: the sign of the mean pixel
    return ClientData(x[: n * 3 // 4], y[: n * 3 // 4], x[n * 3 // 4:], y[n * 3 // 4:])


def config(**train: object) -> FedkdConfig:
    cfg = FedkdConfig()
    cfg.model.name = "mlp"
    cfg.train = TrainConfig(**{"lr": 0.1, "batch_size": 8, **train})  # type: ignore[arg-type]
    return cfg


def fedavg(cfg: FedkdConfig) -> FedAvgClient:
    return FedAvgClient(cfg, FedAvgSettings(), (1, 8, 8), 2, torch.device("cpu"))


def test_fedavg_local_training_lowers_the_loss() -> None:
    client, data = fedavg(config(local_epochs=5)), tiny_data()
    start = client.initial_arrays()
    before = client.evaluate(start, {}, data, RoundInfo(0, 1, 0))
    result = client.train(start, {}, data, RoundInfo(0, 1, 0))
    after = client.evaluate(result.arrays, {}, data, RoundInfo(0, 1, 0))
    assert after.loss < before.loss
    assert result.num_examples == 48 and set(result.arrays) == set(start)


def test_training_is_deterministic_per_seed_round_and_client() -> None:
    data = tiny_data()
    runs = [fedavg(config()).train(fedavg(config()).initial_arrays(), {}, data, RoundInfo(3, 2, 7))
            for _ in range(2)]
    assert all(torch.equal(runs[0].arrays[k], runs[1].arrays[k]) for k in runs[0].arrays)
    other = fedavg(config()).train(fedavg(config()).initial_arrays(), {}, data, RoundInfo(4, 2, 7))
    assert any(not torch.equal(runs[0].arrays[k], other.arrays[k]) for k in other.arrays)


def test_proximal_term_keeps_weights_near_the_global_model() -> None:
    data, start = tiny_data(), fedavg(config()).initial_arrays()

    def drift(mu: float) -> float:
        result = fedavg(config(local_epochs=5)).train(start, {}, data,
                                                      RoundInfo(0, 1, 0, {"proximal-mu": mu}))
        return sum(float((result.arrays[k] - start[k]).pow(2).sum()) for k in start)

    assert drift(10.0) < drift(0.0)


def test_local_method_shares_nothing_and_keeps_its_model_in_state() -> None:
    client = LocalClient(config(), LocalSettings(), (1, 8, 8), 2, torch.device("cpu"))
    assert client.initial_arrays() == {}
    state: dict = {}
    result = client.train({}, state, tiny_data(), RoundInfo(0, 1, 0))
    assert result.arrays == {} and set(state["personal"]) == set(client.build_model().state_dict())
    first = {k: v.clone() for k, v in state["personal"].items()}
    client.train({}, state, tiny_data(), RoundInfo(0, 2, 0))
    assert any(not torch.equal(first[k], state["personal"][k]) for k in first)
    assert client.global_model({}) is None


def test_momentum_optimizer_state_persists_across_rounds() -> None:
    client, state = fedavg(config(momentum=0.9)), {}
    client.train(client.initial_arrays(), state, tiny_data(), RoundInfo(0, 1, 0))
    assert state["optimizer"]["state"]


def test_state_store_roundtrip_and_no_files_for_empty_state(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path / "state")
    store.save(3, {})
    assert not (tmp_path / "state").exists() and store.load(3) == {}
    store.save(3, {"personal": {"w": torch.ones(2)}, "n": 1})
    loaded = store.load(3)
    assert loaded["n"] == 1 and torch.equal(loaded["personal"]["w"], torch.ones(2))


def _train_once_in_fresh_process(state_dir: str, server_round: int, queue: "mp.Queue") -> None:
    from fedkd.runtime import ClientRuntime
    from fedkd.config import load_config

    cfg = load_config(None, ["method.name=local", "model.name=mlp", "data.num_clients=4"])
    runtime = ClientRuntime(cfg, state_dir)
    out = runtime.run("train", 1, {}, server_round, {})
    queue.put((out.error, out.metrics.get("train-calls"), out.metrics.get("worker-pid")))


def test_state_survives_a_change_of_worker_process(tmp_path: Path) -> None:
    """Two rounds of one client in two different processes: the second sees the first's state."""
    ctx = mp.get_context("spawn")
    results = []
    for server_round in (1, 2):
        queue = ctx.Queue()
        proc = ctx.Process(target=_train_once_in_fresh_process,
                           args=(str(tmp_path), server_round, queue))
        proc.start()
        results.append(queue.get(timeout=120))
        proc.join()
    assert [r[0] for r in results] == [None, None]
    assert [r[1] for r in results] == [1, 2]
    assert results[0][2] != results[1][2]


def test_results_of_one_client_survive_training_the_next_with_the_same_model() -> None:
    """A node trains its group with one model object: earlier results must not alias it."""
    client = fedavg(config())
    start = client.initial_arrays()
    first = client.train(start, {}, tiny_data(0), RoundInfo(0, 1, 0))
    snapshot = {k: v.clone() for k, v in first.arrays.items()}
    client.train(start, {}, tiny_data(1), RoundInfo(1, 1, 0))
    assert all(torch.equal(snapshot[k], first.arrays[k]) for k in snapshot)


def test_drop_last_skips_only_an_incomplete_last_batch() -> None:
    def sizes(n: int, drop_last: bool) -> list[int]:
        return [len(b) for b in batches(n, 10, torch.Generator().manual_seed(0), drop_last)]

    assert sizes(951, False) == [10] * 95 + [1]
    assert sizes(951, True) == [10] * 95  # PFLlib's train loader: no 1-sample SGD step
    assert sizes(950, True) == [10] * 95
    assert sizes(7, True) == [7]  # the only batch is kept, so a tiny client still trains
    kept = torch.cat(list(batches(951, 10, torch.Generator().manual_seed(0), True)))
    assert torch.equal(kept, torch.cat(list(batches(951, 10, torch.Generator().manual_seed(0))))[:950])
