"""Large populations as index arrays (fedkd.population): the same clients as before, built lazily,
and the `sample` partitioner (clients drawn with replacement)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedkd.config import ConfigError, DataConfig, PartitionerConfig
from fedkd.data import _split, load_federated, make_partitioner, partition_indices
from fedkd.population import IndexedClients, sample_clients, train_sizes


def _pool(n: int = 997, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1, 2, 2)).astype(np.float32), rng.integers(0, 10, n)


@pytest.mark.parametrize("clients", [1, 7, 100])
def test_iid_index_arrays_equal_flwr_datasets_split(clients: int) -> None:
    """The lazy `iid` clients are exactly flwr-datasets' IidPartitioner + fedkd's seeded split."""
    from fedkd.population import indexed

    x, y = _pool()
    cfg = DataConfig(dataset="mnist5k", num_clients=clients, test_fraction=0.25,
                     partitioner=PartitionerConfig(name="iid"))
    lazy = indexed(cfg, x, y, 5, None).clients
    parts = partition_indices(y, make_partitioner(cfg, 5), 5)
    assert len(lazy) == clients
    for c, idx in enumerate(parts):
        ref = _split(x[idx], y[idx], 0.25, 5 + c)
        got = lazy[c]
        for a, b in ((got.x_train, ref.x_train), (got.y_train, ref.y_train),
                     (got.x_test, ref.x_test), (got.y_test, ref.y_test)):
            np.testing.assert_array_equal(a, b)
    assert train_sizes(lazy) == [len(c.y_train) for c in lazy]


def test_label_histograms_match_built_clients() -> None:
    x, y = _pool()
    for name in ("iid", "sample"):
        cfg = DataConfig(num_clients=50, partitioner=PartitionerConfig(name=name))
        from fedkd.population import indexed

        data = indexed(cfg, x, y, 1, None)
        expect = [{"train": np.bincount(c.y_train, minlength=10).tolist(),
                   "test": np.bincount(c.y_test, minlength=10).tolist()} for c in data.clients]
        assert data.label_histograms() == expect


def test_sample_draws_with_replacement_each_client_train_and_test() -> None:
    """100,000 clients from 997 samples: every client has >= 1 train and >= 1 test sample,
    distinct within the client; clients share samples; seeded."""
    x, y = _pool()
    cfg = DataConfig(num_clients=100_000, partitioner=PartitionerConfig(name="sample"))
    t0 = time.perf_counter()
    clients = sample_clients(cfg, y, x, 0)
    assert time.perf_counter() - t0 < 5
    assert len(clients) == 100_000
    assert min(clients.train_sizes()) >= 1 and min(clients.test_sizes()) >= 1
    for pid in (0, 1, 99_999):
        tr, te = clients.indices(pid)
        assert len(tr) >= 1 and len(te) >= 1 and len(set(tr) | set(te)) == len(tr) + len(te)
    assert len(np.unique(clients.flat)) < len(clients.flat)  # samples shared between clients
    again = sample_clients(cfg, y, x, 0)
    np.testing.assert_array_equal(clients.flat, again.flat)
    assert not np.array_equal(clients.flat, sample_clients(cfg, y, x, 1).flat)


def test_sample_size_option_and_its_error() -> None:
    x, y = _pool()
    cfg = DataConfig(num_clients=10, test_fraction=0.25,
                     partitioner=PartitionerConfig(name="sample", samples_per_client=8))
    clients = sample_clients(cfg, y, x, 0)
    assert clients.sizes().tolist() == [8] * 10 and clients.train_sizes() == [6] * 10
    bad = DataConfig(num_clients=10, partitioner=PartitionerConfig(name="sample", samples_per_client=1))
    with pytest.raises(ConfigError, match="samples_per_client"):
        sample_clients(bad, y, x, 0)


def test_iid_more_clients_than_samples_points_to_sample() -> None:
    x, y = _pool(50)
    from fedkd.population import iid_clients

    with pytest.raises(ConfigError, match="sample"):
        iid_clients(DataConfig(num_clients=51), y, x, 0)


def test_population_10000_loads_fast_without_building_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """mnist5k (5,000 images) with 10,000 `sample` clients: loading builds no ClientSplit; a
    client is built when asked for."""
    import fedkd.data as data_mod

    built = []
    real = data_mod.ClientSplit

    def counting(*args):  # type: ignore[no-untyped-def]
        built.append(1)
        return real(*args)

    monkeypatch.setattr(data_mod, "ClientSplit", counting)
    cfg = DataConfig(dataset="mnist5k", num_clients=10_000, partitioner=PartitionerConfig(name="sample"))
    data = load_federated(cfg, 0)
    assert isinstance(data.clients, IndexedClients) and len(data.clients) == 10_000
    assert built == []
    split = data.clients[9_999]
    assert len(split.y_train) >= 1 and len(split.y_test) >= 1 and split.x_train.shape[1:] == (1, 28, 28)
