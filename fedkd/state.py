"""Per-client persistent state (personal model parts, optimizer state), keyed by partition id.

Successive calls for one client may run in different Ray worker processes, so the
state cannot live in a worker's memory; shipping every client's state with each
message (Flower's per-node `context.state` when a node serves a group) does not
scale to hundreds of clients. One file per client under the run directory does,
and it is also what a resumed run reads. A client with empty state writes nothing.

A state file is read with PyTorch's allow-list unpickler (`weights_only=True`): a file
planted in a run directory can hold tensors and plain values, never code to run. So a
state holds only tensors, numbers, strings, None and dicts/lists/tuples of them.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from fedkd.data import DataError


class ClientStateStore:
    """Directory of `<partition id>.pt` files written atomically with torch.save."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, partition_id: int) -> Path:
        return self.root / f"{partition_id}.pt"

    def load(self, partition_id: int) -> dict[str, Any]:
        """The client's state, or {} for a client that has none yet."""
        path = self.path(partition_id)
        if not path.exists():
            return {}
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # a global outside torch's allow-list
            raise DataError(f"{path}: refused to load client state ({_reason(exc)}); a state file "
                            "holds only tensors and plain values, nothing in it is run") from None
        except Exception as exc:  # truncated or not a torch file
            raise DataError(f"cannot read client state {path}: {_reason(exc)}") from None

    def save(self, partition_id: int, state: dict[str, Any]) -> None:
        """Persist `state` (nothing is written for an empty state that never existed)."""
        path = self.path(partition_id)
        if not state and not path.exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a reader never sees half a file


def _reason(exc: Exception) -> str:
    """The informative line of torch's multi-paragraph load error (errors here are one line)."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)]
    return (useful or lines or [type(exc).__name__])[0]
