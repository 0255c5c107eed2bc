"""Per-client persistent state (personal model parts, optimizer state), keyed by partition id.

Successive calls for one client may run in different Ray worker processes, so the
state cannot live in a worker's memory; shipping every client's state with each
message (Flower's per-node `context.state` when a node serves a group) does not
scale to hundreds of clients. One file per client under the run directory does,
and it is also what a resumed run reads. A client with empty state writes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


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
        return torch.load(path, map_location="cpu", weights_only=False)

    def save(self, partition_id: int, state: dict[str, Any]) -> None:
        """Persist `state` (nothing is written for an empty state that never existed)."""
        path = self.path(partition_id)
        if not state and not path.exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
