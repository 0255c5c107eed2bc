"""What travels in a Flower message between the grouped strategy and a node serving several clients.

Out: `arrays` (the shared model part) and `config` with the node's partition ids,
the reply mode and the resolved run config. Back: one MetricRecord per client
(`client.<pid>`), a ConfigRecord `status` (ok ids, failed ids, their
tracebacks) and either the group's example-weighted mean (`arrays` +
`metrics`, mode "mean") or every client's own arrays (`arrays.<pid>`, mode
"each").
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from flwr.app import (DEFAULT_TTL, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord,
                      RecordDict)
from torch import Tensor

PIDS_KEY = "fedkd-pids"
MODE_KEY = "fedkd-mode"
CONFIG_KEY = "fedkd-config"
STATE_DIR_KEY = "fedkd-state-dir"
STATUS_KEY = "status"
CLIENT_METRIC_PREFIX = "client."
NUM_EXAMPLES = "num-examples"


def client_arrays_key(pid: int) -> str:
    return f"arrays.{pid}"


@dataclass
class ClientOutcome:
    """One client's result within a group: metrics, or the traceback of its failure."""

    partition_id: int
    metrics: dict[str, float]  # num-examples, loss, accuracy, seconds, bytes-*, worker-pid
    arrays: dict[str, Tensor] | None = None
    error: str | None = None


def reply_message(content: RecordDict, src_node_id: int, message_type: str) -> Message:
    """A reply as if received from node `src_node_id`.

    Explicit metadata, because Flower's plain constructor needs a running
    ServerApp's identity; this also works in unit tests.
    """
    metadata = Metadata(run_id=0, message_id="", src_node_id=src_node_id, dst_node_id=0,
                        reply_to_message_id="", group_id="", created_at=time.time(),
                        ttl=DEFAULT_TTL, message_type=message_type)
    return Message(content=content, metadata=metadata)


def arrays_to_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    """An ArrayRecord as named torch tensors (empty record -> empty dict)."""
    return record.to_torch_state_dict() if len(record) else {}


def nbytes(arrays: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in arrays.values())


class GroupReply:
    """Builds a node's reply client by client (see the module docstring).

    In mode "mean" each client's arrays are folded into a running example-weighted
    sum as soon as it finishes, so a node serving hundreds of clients holds one
    model's worth of sums, not one model per client.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.content = RecordDict()
        self.ok: list[int] = []
        self.failed: dict[int, str] = {}
        self._sums: dict[str, Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._examples = 0.0
        self._metric_sums = {"loss": 0.0, "accuracy": 0.0}

    def add(self, outcome: ClientOutcome) -> None:
        pid = outcome.partition_id
        if outcome.error is not None:
            self.failed[pid] = outcome.error
            return
        self.ok.append(pid)
        self.content[f"{CLIENT_METRIC_PREFIX}{pid}"] = MetricRecord(outcome.metrics)
        if outcome.arrays is None:
            return
        if self.mode == "each":
            self.content[client_arrays_key(pid)] = ArrayRecord(outcome.arrays)
            return
        n = float(outcome.metrics[NUM_EXAMPLES])
        for key, tensor in outcome.arrays.items():
            self._dtypes.setdefault(key, tensor.dtype)
            if key in self._sums:
                self._sums[key].add_(tensor, alpha=n)  # in place: no temporaries per client
            else:
                self._sums[key] = tensor.double() * n
        self._examples += n
        for k in self._metric_sums:
            self._metric_sums[k] += float(outcome.metrics[k]) * n

    def build(self) -> RecordDict:
        status = {"ok": self.ok or [-1], "failed": list(self.failed) or [-1]}  # lists can't be empty
        status.update({f"error.{pid}": str(err) for pid, err in self.failed.items()})
        self.content[STATUS_KEY] = ConfigRecord(status)
        if self._sums and self._examples > 0:
            mean = {}
            for key, total in self._sums.items():
                value = total / self._examples
                dtype = self._dtypes[key]
                mean[key] = value.to(dtype) if dtype.is_floating_point else value.round().to(dtype)
            self.content["arrays"] = ArrayRecord(mean)
            self.content["metrics"] = MetricRecord({
                NUM_EXAMPLES: self._examples,
                **{k: v / self._examples for k, v in self._metric_sums.items()}})
        return self.content


def ok_ids(status: ConfigRecord) -> list[int]:
    """Partition ids that succeeded (the -1 placeholder removed)."""
    return [int(p) for p in status["ok"] if int(p) >= 0]


def as_tensor_dict(arrays: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached CPU tensors, ready to serialize (a copy only when they live on another device)."""
    return {k: v.detach().cpu() for k, v in arrays.items()}


