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

import io
import os
import pickle
import sys
import uuid
from pathlib import Path
from typing import Any

import torch

from fedkd.data import DataError

#: a state location naming a Ray actor instead of a directory: `ray-actor://<namespace>/<name>`
REMOTE = "ray-actor://"
_NAMESPACE = "fedkd"
_SERVERS: dict[str, Any] = {}  # actor name -> handle, held by the driver for the run


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

    def read_bytes(self, partition_id: int) -> bytes | None:
        path = self.path(partition_id)
        return path.read_bytes() if path.exists() else None

    def write_bytes(self, partition_id: int, data: bytes, empty: bool) -> None:
        """`save` of an already serialized state (`empty`: the state was {})."""
        path = self.path(partition_id)
        if empty and not path.exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)


class StateServer:
    """The client state store of a multi-node run, as a Ray actor on the driver's node.

    Ray's scheduler puts a client's calls on any node, and the nodes share no filesystem, so
    state files cannot live on the node that happened to train a client. This actor (0 CPUs,
    pinned to the driver's node) keeps them in the run directory exactly as a one-node run does,
    so checkpoints, resume and the saved model read them there unchanged; workers send and fetch
    each client's serialized state through Ray's object store (`RemoteStateStore`)."""

    def __init__(self, root: str) -> None:
        self.store = ClientStateStore(root)

    def read(self, partition_id: int) -> bytes | None:
        return self.store.read_bytes(partition_id)

    def write(self, partition_id: int, data: bytes, empty: bool) -> None:
        self.store.write_bytes(partition_id, data, empty)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


class RemoteStateStore(ClientStateStore):
    """`ClientStateStore` whose files live with a `StateServer` actor (a worker's side)."""

    def __init__(self, location: str) -> None:
        namespace, name = location[len(REMOTE):].split("/", 1)
        super().__init__(f"{location}")
        self.name, self.namespace = name, namespace
        self._actor: Any = None

    def _server(self) -> Any:
        if self._actor is None:
            import ray

            self._actor = ray.get_actor(self.name, namespace=self.namespace)
        return self._actor

    def path(self, partition_id: int) -> Path:
        return Path(f"{self.name}:state/{partition_id}.pt")  # for messages only

    def load(self, partition_id: int) -> dict[str, Any]:
        import ray

        data = ray.get(self._server().read.remote(partition_id))
        if data is None:
            return {}
        where = f"client state {partition_id} (state server {self.name})"
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise DataError(f"{where}: refused to load client state ({_reason(exc)}); a state file "
                            "holds only tensors and plain values, nothing in it is run") from None
        except Exception as exc:
            raise DataError(f"cannot read {where}: {_reason(exc)}") from None

    def save(self, partition_id: int, state: dict[str, Any]) -> None:
        import ray

        buf = io.BytesIO()
        torch.save(state, buf)
        # waited for: the client's next call (maybe on another node) must read this state
        ray.get(self._server().write.remote(partition_id, buf.getvalue(), not state))


def open_store(location: str | Path) -> ClientStateStore:
    """The store a worker uses for `location`: a directory, or a `StateServer` (REMOTE)."""
    if str(location).startswith(REMOTE):
        return RemoteStateStore(str(location))
    return ClientStateStore(location)


def multi_node() -> bool:
    """Whether this process is connected to a Ray cluster with more than one live node."""
    try:
        import ray
    except ImportError:
        return False
    if not ray.is_initialized():
        return False
    return sum(1 for n in ray.nodes() if n.get("Alive")) > 1


def state_location(root: str | Path) -> str:
    """Where the clients of a run keep their state: the directory `root` on one node; on a
    cluster of several nodes a `StateServer` on this (the driver's) node that keeps the same
    files in `root` (see its docstring). Called by the driver once per run."""
    if not multi_node():
        return str(root)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = f"fedkd-state-{uuid.uuid4().hex[:12]}"
    here = ray.get_runtime_context().get_node_id()
    server = ray.remote(num_cpus=0, max_concurrency=4)(StateServer).options(
        name=name, namespace=_NAMESPACE,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
    ).remote(str(root))
    if ray.get(server.node_id.remote()) != here:  # pinned: cannot happen unless Ray changes
        raise RuntimeError("the client state server did not start on the driver's node")
    _SERVERS[name] = server
    return f"{REMOTE}{_NAMESPACE}/{name}"


def release_location(location: str) -> None:
    """End the `StateServer` behind `location` (the run is over; its files stay in the root)."""
    server = _SERVERS.pop(str(location)[len(REMOTE):].split("/", 1)[-1], None)
    if server is not None:
        import ray

        try:
            ray.kill(server)
        except Exception:  # noqa: BLE001 -- Ray already down
            pass


def _reason(exc: Exception) -> str:
    """The informative line of torch's multi-paragraph load error (errors here are one line)."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)]
    return (useful or lines or [type(exc).__name__])[0]
