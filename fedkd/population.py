"""Large client populations: each client is a pair of index arrays into one pooled dataset.

A population of 10,000 or 100,000 clients, of which a cohort of 100 or 1,000 trains per round,
must not cost one Python object, tensor copy or partitioner call per client up front. Here a
partition is stored as index arrays in CSR form (one flat int array plus offsets) and a client's
`ClientSplit` is built when it is asked for (by the worker that trains it), so set-up and memory
are O(pooled samples), not O(clients x objects).

Two partitioners use it:
- `iid`: flwr-datasets' IidPartitioner splits the seeded permutation of the pool into
  contiguous shards (`Dataset.shard(contiguous=True)`, i.e. `np.array_split`); computed here
  directly, with each client's train/test split seeded exactly as `fedkd.data._split` does, so
  the clients are the same as before, only built on demand.
- `sample` (documented in `PartitionerConfig`): clients drawn **with replacement** from the
  pool. Each client draws `samples_per_client` distinct samples (0: pool size / clients, at
  least 2) independently of the others, so clients may share samples and any population size
  works (100,000 clients from pfllib-mnist's 70,000 images). Its first
  `n - min(ceil(n * test_fraction), n - 1)` draws are its training part, the rest (at least
  one) its test part.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np

from fedkd.config import ConfigError, DataConfig

#: partitioners built lazily here (see the module docstring)
LAZY = ("iid", "sample")


def n_train(sizes: np.ndarray, test_fraction: float) -> np.ndarray:
    """Train part sizes for clients of `sizes` samples (`fedkd.data._split`'s rule, vectorised)."""
    sizes = np.asarray(sizes, np.int64)
    n_test = np.minimum(np.ceil(sizes * test_fraction).astype(np.int64), np.maximum(sizes - 1, 0))
    return sizes - n_test


class IndexedClients(Sequence):
    """A Sequence of ClientSplit over pooled `x`, `y`; client c holds `flat[offsets[c]:offsets[c+1]]`.

    `shuffle_seed` given: the client's indices are permuted with `default_rng(shuffle_seed + c)`
    before the train/test cut (the `iid` path, as `fedkd.data._split`); None: they are used in
    the stored order (the `sample` path, already random).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, flat: np.ndarray, offsets: np.ndarray,
                 test_fraction: float, shuffle_seed: int | None) -> None:
        self.x, self.y = x, y
        self.flat, self.offsets = flat, offsets
        self.test_fraction, self.shuffle_seed = test_fraction, shuffle_seed

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def train_sizes(self) -> list[int]:
        """Each client's number of training samples, without building any client."""
        return n_train(self.sizes(), self.test_fraction).tolist()

    def test_sizes(self) -> list[int]:
        sizes = self.sizes()
        return (sizes - n_train(sizes, self.test_fraction)).tolist()

    def indices(self, pid: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, test) indices into the pool of client `pid`."""
        if not -len(self) <= pid < len(self):
            raise IndexError(f"client {pid} out of range (population of {len(self)})")
        pid %= len(self)
        own = self.flat[self.offsets[pid]:self.offsets[pid + 1]]
        if self.shuffle_seed is not None:
            own = own[np.random.default_rng(self.shuffle_seed + pid).permutation(len(own))]
        cut = int(n_train(np.array([len(own)]), self.test_fraction)[0])
        return own[:cut], own[cut:]

    @overload
    def __getitem__(self, pid: int) -> Any: ...
    @overload
    def __getitem__(self, pid: slice) -> list[Any]: ...

    def __getitem__(self, pid: int | slice) -> Any:
        from fedkd.data import ClientSplit

        if isinstance(pid, slice):
            return [self[i] for i in range(*pid.indices(len(self)))]
        tr, te = self.indices(int(pid))
        return ClientSplit(self.x[tr], self.y[tr], self.x[te], self.y[te])

    def __iter__(self) -> Iterator[Any]:
        for pid in range(len(self)):
            yield self[pid]

    def label_histograms(self, num_classes: int) -> list[dict[str, list[int]]]:
        """Per client label counts of train and test (one bincount over all clients, no splits
        built for the `sample` path; the `iid` path needs each client's seeded cut)."""
        n = len(self)
        if self.shuffle_seed is None:
            sizes = self.sizes()
            cut = n_train(sizes, self.test_fraction)
            owner = np.repeat(np.arange(n), sizes)
            pos = np.arange(len(self.flat)) - np.repeat(self.offsets[:-1], sizes)
            is_test = pos >= np.repeat(cut, sizes)
            labels = self.y[self.flat]
            counts = np.zeros((2, n, num_classes), np.int64)
            np.add.at(counts, (is_test.astype(np.int64), owner, labels), 1)
            train, test = counts[0].tolist(), counts[1].tolist()
            return [{"train": a, "test": b} for a, b in zip(train, test)]
        out = []
        for pid in range(n):
            tr, te = self.indices(pid)
            out.append({"train": np.bincount(self.y[tr], minlength=num_classes).tolist(),
                        "test": np.bincount(self.y[te], minlength=num_classes).tolist()})
        return out


def iid_offsets(n_samples: int, n_clients: int) -> np.ndarray:
    """Shard boundaries of `Dataset.shard(n_clients, i, contiguous=True)` (= np.array_split)."""
    div, mod = divmod(n_samples, n_clients)
    sizes = np.full(n_clients, div, np.int64)
    sizes[:mod] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def iid_clients(cfg: DataConfig, y: np.ndarray, x: np.ndarray, seed: int) -> IndexedClients:
    """flwr-datasets' IID split of the seeded permutation, as index arrays (see module doc)."""
    n = cfg.num_clients
    if n > len(y):  # an empty client cannot train
        raise ConfigError("data.num_clients", n,
                          f"cannot split the data into {n} non-empty clients with partitioner 'iid' "
                          f"({len(y)} samples); use fewer clients, or data.partitioner.name=sample "
                          "(clients drawn with replacement)")
    order = np.random.default_rng(seed).permutation(len(y))
    return IndexedClients(x, y, order, iid_offsets(len(y), n), cfg.test_fraction, shuffle_seed=seed)


def sample_size(cfg: DataConfig, pool: int) -> int:
    """Samples per client of the `sample` partitioner (0 in the config: pool / clients, >= 2)."""
    k = int(getattr(cfg.partitioner, "samples_per_client", 0) or 0)
    if k == 0:
        k = max(2, pool // cfg.num_clients)
    if k < 2 or k > pool:
        raise ConfigError("data.partitioner.samples_per_client", k,
                          f"between 2 (one train and one test sample) and the pool's {pool} samples")
    return k


def sample_clients(cfg: DataConfig, y: np.ndarray, x: np.ndarray, seed: int) -> IndexedClients:
    """Clients drawn with replacement from the pool (see the module docstring).

    Draws are vectorised: a (clients, k) matrix of uniform indices, rows with a repeated index
    drawn again until every client's k samples are distinct (rare when k << pool)."""
    n, pool = cfg.num_clients, len(y)
    k = sample_size(cfg, pool)
    rng = np.random.default_rng([seed, 0x5A3F])
    if k * 4 > pool:  # dense draws: a permutation per client (small populations only)
        draws = np.stack([rng.permutation(pool)[:k] for _ in range(n)])
    else:
        draws = rng.integers(0, pool, size=(n, k))
        while True:
            s = np.sort(draws, axis=1)
            bad = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
            if not len(bad):
                break
            draws[bad] = rng.integers(0, pool, size=(len(bad), k))
    offsets = np.arange(n + 1, dtype=np.int64) * k
    return IndexedClients(x, y, draws.reshape(-1).astype(np.int64), offsets, cfg.test_fraction,
                          shuffle_seed=None)


def indexed(cfg: DataConfig, x: np.ndarray, y: np.ndarray, seed: int, global_test: Any) -> Any:
    """FederatedData whose clients are an IndexedClients (`iid` or `sample` partitioner)."""
    from fedkd.data import FederatedData

    name = cfg.partitioner.name
    clients = iid_clients(cfg, y, x, seed) if name == "iid" else sample_clients(cfg, y, x, seed)
    num_classes = 10  # every pooled offline set has 10 classes (as fedkd.data._federated)
    if cfg.dataset.startswith(("hf:", "medmnist:")):
        ys = [y] + ([global_test[1]] if global_test else [])
        num_classes = 1 + max(int(a.max()) for a in ys if len(a))
    return FederatedData(cfg.dataset, num_classes, tuple(x.shape[1:]), clients, global_test)


def train_sizes(clients: Sequence) -> list[int]:
    """Each client's number of training samples (no client built for an IndexedClients)."""
    if isinstance(clients, IndexedClients):
        return clients.train_sizes()
    return [len(c.y_train) for c in clients]


def test_sizes(clients: Sequence) -> list[int]:
    if isinstance(clients, IndexedClients):
        return clients.test_sizes()
    return [len(c.y_test) for c in clients]
