"""Partitions computed once per machine: the driver's, read back by its Ray workers.

Why: every process of a run (the driver and each client worker) partitions the pooled data
itself, from the same seed. With a flwr-datasets partitioner that costs importing
`flwr_datasets`, whose package `__init__` pulls in its visualization (seaborn, matplotlib,
pandas, scipy.stats) and Hugging Face `datasets`: 3.8 s of CPU per process, measured, before
the first round (and a Dirichlet partitioner may retry many times on top). The result depends
only on the labels, the partitioner's settings, the seed and the flwr-datasets version, so it
is stored under that key as plain integer arrays (`np.load` with `allow_pickle=False`), and
any process of this machine that asks again reads it instead. A process that cannot read or
write the cache (another node, a read-only home) just computes: same seed, same result.

Location: `$FEDKD_CACHE_DIR`, else `$XDG_CACHE_HOME/fedkd`, else `~/.cache/fedkd`;
`partitions/` under it, a few hundred KB per partition. Deleting it is always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

CACHE_ENV = "FEDKD_CACHE_DIR"


def cache_dir() -> Path:
    """Where fedkd keeps what it can recompute (see module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedkd"


def partition_key(y: np.ndarray, settings: str, seed: int) -> str:
    """A digest of everything a partition depends on: labels, settings, seed, library version."""
    digest = hashlib.sha256()
    for part in (settings, str(seed), importlib.metadata.version("flwr-datasets"), str(y.dtype)):
        digest.update(part.encode() + b"\0")
    digest.update(np.ascontiguousarray(y).tobytes())
    return digest.hexdigest()[:32]


def cached_partition(y: np.ndarray, settings: str, seed: int,
                     compute: Callable[[], list[np.ndarray]]) -> list[np.ndarray]:
    """`compute()`'s index arrays, read from the cache when this machine computed them before.

    `settings` must name every partitioner setting that changes the result (and not the
    ones that do not). Errors of `compute` propagate and nothing is stored.
    """
    path = cache_dir() / "partitions" / f"{partition_key(y, settings, seed)}.npz"
    with contextlib.suppress(OSError, ValueError, KeyError):
        with np.load(path, allow_pickle=False) as stored:
            offsets, flat = stored["offsets"], stored["flat"]
            return [flat[a:b].astype(np.int64, copy=False) for a, b in zip(offsets[:-1], offsets[1:])]  # views
    parts = compute()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, offsets=offsets, flat=np.concatenate(parts).astype(np.int64))
            os.replace(tmp, path)  # whole or absent: a reader never sees half a file
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return parts
