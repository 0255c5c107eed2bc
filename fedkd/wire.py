"""What travels in a Flower message between the grouped strategy and a node serving several clients.

Out: `arrays` (the shared model part) and `config` with the node's partition ids,
the reply mode and the resolved run config. Back: one MetricRecord per client
(`client.<pid>`), a ConfigRecord `status` (ok ids, failed ids and their
tracebacks, rejected ids and the reasons) and either the group's example-weighted
sum (mode "mean": `sums.hi` + `sums.lo`, a float64 sum and its rounding error,
`sums.info` with the summed ids and each array's dtype; `metrics` holds the
group's weight and mean loss/accuracy) or every client's own arrays (`arrays.<pid>`,
mode "each").

Why sums, not means: a node's float32 mean, averaged again by the server, depends
on how clients were grouped onto nodes. Here each node keeps a compensated
float64 sum (TwoSum: the sum plus its exact rounding error), the server adds the
nodes' sums in a fixed order the same way and divides and casts once
(`CompensatedSum`). The pair holds the exact sum to ~2^-100 of its terms, so the
mean is the same float64 (and float32) for any number of nodes, unless the exact
value lies within that distance of a rounding boundary (odds ~2^-50 per value).
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
SUMS_HI, SUMS_LO, SUMS_INFO = "sums.hi", "sums.lo", "sums.info"


def client_arrays_key(pid: int) -> str:
    return f"arrays.{pid}"


@dataclass
class ClientOutcome:
    """One client's result within a group: metrics, or the traceback of its failure; `rejected`
    is why validation refused its train update (its metrics still travel, its arrays do not)."""

    partition_id: int
    metrics: dict[str, float]  # num-examples, loss, accuracy, seconds, bytes-*, worker-pid
    arrays: dict[str, Tensor] | None = None
    error: str | None = None
    rejected: str | None = None


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


class CompensatedSum:
    """Named float64 sums kept with their rounding error (see the module docstring).

    Knuth's TwoSum runs in place on buffers kept per name: a node folds hundreds of client
    updates into one sum, and fresh model-sized float64 temporaries per update (five per array)
    cost more in page faults than the arithmetic (measured: 25 ms per CNN update).
    """

    def __init__(self) -> None:
        self.hi: dict[str, Tensor] = {}
        self.lo: dict[str, Tensor] = {}
        self._spare: dict[str, list[Tensor]] = {}  # three buffers shaped like hi[key]
        self._scaled: dict[str, Tensor] = {}

    def add(self, key: str, value: Tensor, lo: Tensor | None = None) -> None:
        """Add `value` (+ `lo`, another sum's error term) to the sum named `key`."""
        if key not in self.hi:  # own copies: the buffers below are overwritten later
            self.hi[key] = value.to(torch.float64, copy=True)
            self.lo[key] = (torch.zeros_like(self.hi[key]) if lo is None
                            else lo.to(torch.float64, copy=True))
            return
        hi, value = self.hi[key], value.double()
        s, t, u = self._spare.get(key) or [torch.empty_like(hi) for _ in range(3)]
        # s = hi + value rounded; its exact error (hi - (s - bb)) + (value - bb), bb = s - hi
        torch.add(hi, value, out=s)
        torch.sub(s, hi, out=t)
        torch.sub(s, t, out=u)
        torch.sub(hi, u, out=u)
        torch.sub(value, t, out=t)
        self.lo[key].add_(u.add_(t))
        if lo is not None:
            self.lo[key].add_(lo.double())
        self.hi[key], self._spare[key] = s, [hi, t, u]

    def add_scaled(self, key: str, tensor: Tensor, weight: float) -> None:
        """Add `tensor` × `weight` computed in float64 (as `tensor.double() * weight`), in a
        buffer reused from call to call."""
        buf = self._scaled.get(key)
        if buf is None or buf.shape != tensor.shape:
            buf = self._scaled[key] = torch.empty(tensor.shape, dtype=torch.float64)
        self.add(key, buf.copy_(tensor).mul_(weight))

    def mean(self, weight: float, dtypes: dict[str, torch.dtype]) -> dict[str, Tensor]:
        """sum / weight, rounded once to each array's dtype (integers: to the nearest)."""
        out = {}
        for key, hi in self.hi.items():
            value = (hi + self.lo[key]) / weight
            dtype = dtypes[key]
            out[key] = value.to(dtype) if dtype.is_floating_point else value.round().to(dtype)
        return out


def _layout(arrays: dict[str, Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in arrays.items()}


class GroupReply:
    """Builds a node's reply client by client (see the module docstring).

    In mode "mean" each client's arrays are folded into the group's running example-weighted
    sum as soon as it finishes, so a node serving hundreds of clients holds one model's worth of
    sums, not one model per client. Updates are validated before they get here (the runtime);
    one whose layout still differs from the group's first update is rejected, not summed.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.content = RecordDict()
        self.ok: list[int] = []
        self.failed: dict[int, str] = {}
        self.rejected: dict[int, str] = {}
        self._sums = CompensatedSum()
        self._layout: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
        self._summed: list[int] = []
        self._examples = 0.0
        self._metric_sums = {"loss": 0.0, "accuracy": 0.0}

    def add(self, outcome: ClientOutcome) -> None:
        pid = outcome.partition_id
        if outcome.error is not None:
            self.failed[pid] = outcome.error
            return
        if outcome.rejected is None and outcome.arrays is not None and self.mode == "mean":
            layout = _layout(outcome.arrays)
            if self._layout is not None and layout != self._layout:
                differ = sorted(k for k in {*layout, *self._layout} if layout.get(k) != self._layout.get(k))
                outcome.rejected = (f"arrays {', '.join(differ[:3])} differ in presence, shape or "
                                    "dtype from the group's first update")
        self.content[f"{CLIENT_METRIC_PREFIX}{pid}"] = MetricRecord(outcome.metrics)
        if outcome.rejected is not None:
            self.rejected[pid] = outcome.rejected
            return
        self.ok.append(pid)
        if outcome.arrays is None:
            return
        if self.mode == "each":
            self.content[client_arrays_key(pid)] = ArrayRecord(outcome.arrays)
            return
        n = float(outcome.metrics[NUM_EXAMPLES])
        for key, tensor in outcome.arrays.items():
            self._sums.add_scaled(key, tensor, n)
        self._layout = self._layout or _layout(outcome.arrays)
        self._summed.append(pid)
        self._examples += n
        for k in self._metric_sums:
            self._metric_sums[k] += float(outcome.metrics[k]) * n

    def build(self) -> RecordDict:
        status: dict = {"ok": self.ok or [-1], "failed": list(self.failed) or [-1],  # lists can't be empty
                        "rejected": list(self.rejected) or [-1]}
        status.update({f"error.{pid}": str(err) for pid, err in self.failed.items()})
        status.update({f"rejected.{pid}": str(why) for pid, why in self.rejected.items()})
        self.content[STATUS_KEY] = ConfigRecord(status)
        if self._summed and self._sums.hi and self._layout is not None:
            self.content[SUMS_HI] = ArrayRecord(self._sums.hi)
            self.content[SUMS_LO] = ArrayRecord(self._sums.lo)
            self.content[SUMS_INFO] = ConfigRecord({
                "pids": self._summed,
                **{f"dtype.{k}": str(dtype).removeprefix("torch.") for k, (_, dtype) in self._layout.items()}})
            if self._examples > 0:
                self.content["metrics"] = MetricRecord({
                    NUM_EXAMPLES: self._examples,
                    **{k: v / self._examples for k, v in self._metric_sums.items()}})
        return self.content


def group_sums(content: RecordDict) -> tuple[list[int], dict[str, Tensor], dict[str, Tensor],
                                              dict[str, torch.dtype]] | None:
    """(summed ids, sums, their errors, dtypes) of a mode-"mean" node reply (None: no sums)."""
    if SUMS_HI not in content:
        return None
    info = content[SUMS_INFO]
    dtypes = {k[len("dtype."):]: getattr(torch, str(v)) for k, v in info.items() if k.startswith("dtype.")}
    return ([int(p) for p in info["pids"]], arrays_to_tensors(content[SUMS_HI]),
            arrays_to_tensors(content[SUMS_LO]), dtypes)


def ok_ids(status: ConfigRecord) -> list[int]:
    """Partition ids that succeeded (the -1 placeholder removed)."""
    return [int(p) for p in status["ok"] if int(p) >= 0]


def rejected_ids(status: ConfigRecord) -> dict[int, str]:
    """Partition id -> why its update was rejected."""
    ids = [int(p) for p in status["rejected"] if int(p) >= 0] if "rejected" in status else []
    return {pid: str(status.get(f"rejected.{pid}", "rejected")) for pid in ids}


def as_tensor_dict(arrays: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached CPU tensors, ready to serialize (a copy only when they live on another device)."""
    return {k: v.detach().cpu() for k, v in arrays.items()}


