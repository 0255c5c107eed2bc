"""What travels in a Flower message between the grouped strategy and a node serving several clients.

Out: `arrays` (the shared model part) and `config` with the node's partition ids,
the reply mode and the resolved run config. Back: one MetricRecord per client
(`client.<pid>`), a ConfigRecord `status` (ok ids, failed ids, their
tracebacks) and either the group's example-weighted mean (`arrays` +
`metrics`, mode "mean") or every client's own arrays (`arrays.<pid>`, mode
"each").
"""

from __future__ import annotations

from dataclasses import dataclass

import time

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


def weighted_mean(parts: list[tuple[dict[str, Tensor], int]]) -> dict[str, Tensor]:
    """Example-weighted mean of named tensors (integer buffers are rounded back to their dtype)."""
    total = sum(n for _, n in parts)
    out = {}
    for key, first in parts[0][0].items():
        acc = sum(t[key].double() * (n / total) for t, n in parts)
        out[key] = acc.to(first.dtype) if first.is_floating_point() else acc.round().to(first.dtype)
    return out


def pack_reply(outcomes: list[ClientOutcome], mode: str) -> RecordDict:
    """The node's reply for its group (see the module docstring)."""
    ok = [o for o in outcomes if o.error is None]
    failed = [o for o in outcomes if o.error is not None]
    status = {"ok": [o.partition_id for o in ok] or [-1],  # ConfigRecord lists must be non-empty
              "failed": [o.partition_id for o in failed] or [-1]}
    status.update({f"error.{o.partition_id}": str(o.error) for o in failed})
    content = RecordDict({STATUS_KEY: ConfigRecord(status)})
    for o in ok:
        content[f"{CLIENT_METRIC_PREFIX}{o.partition_id}"] = MetricRecord(o.metrics)
    with_arrays = [o for o in ok if o.arrays is not None]
    if mode == "each":
        for o in with_arrays:
            content[client_arrays_key(o.partition_id)] = ArrayRecord(o.arrays)
    elif with_arrays:
        parts = [(o.arrays, int(o.metrics[NUM_EXAMPLES])) for o in with_arrays]
        total = sum(n for _, n in parts)
        content["arrays"] = ArrayRecord(weighted_mean(parts) if total else parts[0][0])
        content["metrics"] = MetricRecord({
            NUM_EXAMPLES: total,
            **{k: sum(float(o.metrics[k]) * int(o.metrics[NUM_EXAMPLES]) for o in with_arrays)
               / max(total, 1) for k in ("loss", "accuracy")},
        })
    return content


def ok_ids(status: ConfigRecord) -> list[int]:
    """Partition ids that succeeded (the -1 placeholder removed)."""
    return [int(p) for p in status["ok"] if int(p) >= 0]


def as_tensor_dict(arrays: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached CPU tensors, ready to serialize (a copy only when they live on another device)."""
    return {k: v.detach().cpu() for k, v in arrays.items()}


