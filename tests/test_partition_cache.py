"""The partition cache gives exactly what the partitioner computes, and computes it once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedkd.config import load_config
from fedkd.data import make_partitioner, partition_indices
from fedkd.partition_cache import CACHE_ENV, cached_partition


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "partitions"


def test_a_dirichlet_partition_is_computed_once_and_read_back_equal(cache: Path) -> None:
    cfg = load_config("quickstart", ["data.num_clients=7"]).data
    y = np.random.default_rng(0).integers(0, 10, 600)
    calls: list[int] = []

    def compute() -> list[np.ndarray]:
        calls.append(1)
        return partition_indices(y, make_partitioner(cfg, 3), 3)

    first = cached_partition(y, "dirichlet 7", 3, compute)
    again = cached_partition(y, "dirichlet 7", 3, compute)
    assert len(calls) == 1 and len(list(cache.glob("*.npz"))) == 1
    assert len(again) == 7 and all(a.dtype == np.int64 and np.array_equal(a, b) for a, b in zip(first, again))
    # another seed, other settings or other labels are other partitions
    cached_partition(y, "dirichlet 7", 4, compute)
    cached_partition(y, "dirichlet 7 alpha=1", 3, compute)
    cached_partition(y[::-1].copy(), "dirichlet 7", 3, compute)
    assert len(calls) == 4 and len(list(cache.glob("*.npz"))) == 4


def test_a_damaged_or_unwritable_cache_only_means_computing(cache: Path) -> None:
    y = np.arange(10) % 3
    parts = [np.array([0, 1, 2]), np.array([3, 4, 5, 6, 7, 8, 9])]
    cached_partition(y, "s", 0, lambda: parts)
    (stored,) = cache.glob("*.npz")
    stored.write_bytes(b"not an npz")
    assert [p.tolist() for p in cached_partition(y, "s", 0, lambda: parts)] == [p.tolist() for p in parts]
    cache.chmod(0o500)  # read-only (as root the write still works: then it is simply cached)
    try:
        got = cached_partition(y, "other", 0, lambda: parts)
    finally:
        cache.chmod(0o700)
    assert [p.tolist() for p in got] == [p.tolist() for p in parts]


def test_a_failing_partition_is_not_stored(cache: Path) -> None:
    def fails() -> list[np.ndarray]:
        raise ValueError("2 partitions are empty")

    with pytest.raises(ValueError, match="empty"):
        cached_partition(np.zeros(5, np.int64), "s", 0, fails)
    assert not cache.exists() or not list(cache.glob("*.npz"))
