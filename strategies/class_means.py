"""Per-class aggregation of tables that are not model weights (FedDistill logits, FedProto prototypes).

Clients send, for every class they hold, a vector `mean.<c>` and its sample count
`count.<c>`; classes a client lacks are absent, not zero. The server combines each
class over the clients that sent it, uniformly (PFLlib and the official FedProto
code) or weighted by the counts (FedProto's paper equation), and sends back
`mean.<c>` for every class anyone had. It is a Flower strategy (FedAvg's sampling
and configuration), so it runs under fedkd's grouped wrapper like any other, with
one reply per client.
"""

from __future__ import annotations

from typing import Iterable

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedkd.kd import aggregate_class_means
from fedkd.wire import NUM_EXAMPLES, arrays_to_tensors

MEAN, COUNT = "mean.", "count."


def encode_class_table(means: torch.Tensor, counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """(C, D) means + (C,) counts -> named tensors for the classes with count > 0."""
    out = {}
    for c in torch.nonzero(counts > 0).flatten().tolist():
        out[f"{MEAN}{c}"] = means[c].detach().cpu().clone()
        out[f"{COUNT}{c}"] = counts[c:c + 1].detach().cpu().clone()
    return out


def decode_class_table(arrays: dict[str, torch.Tensor], num_classes: int
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Named tensors -> (C, D) table and (C,) bool mask of the classes present (None if empty)."""
    keys = [k for k in arrays if k.startswith(MEAN)]
    if not keys:
        return None
    dim = arrays[keys[0]].numel()
    table = torch.zeros(num_classes, dim, dtype=arrays[keys[0]].dtype)
    present = torch.zeros(num_classes, dtype=torch.bool)
    for key in keys:
        c = int(key[len(MEAN):])
        table[c], present[c] = arrays[key].flatten(), True
    return table, present


class ClassMeans(FedAvg):
    """FedAvg's sampling/configuration with a per-class combination of class tables."""

    def __init__(self, weighting: str = "uniform", **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if weighting not in ("uniform", "count"):
            raise ValueError(f"weighting must be uniform or count, got {weighting!r}")
        self.weighting = weighting

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error()]
        tables = [arrays_to_tensors(r.content["arrays"]) for r in replies if "arrays" in r.content]
        classes = sorted({int(k[len(MEAN):]) for t in tables for k in t if k.startswith(MEAN)})
        metrics = aggregate_metricrecords([r.content for r in replies], NUM_EXAMPLES) if replies else None
        if not classes:
            return None, metrics
        num_classes, dim = classes[-1] + 1, next(v.numel() for t in tables for k, v in t.items()
                                                  if k.startswith(MEAN))
        means, counts = [], []
        for t in tables:
            m, n = torch.zeros(num_classes, dim, dtype=torch.float64), torch.zeros(num_classes, dtype=torch.long)
            for c in classes:
                if f"{MEAN}{c}" in t:
                    m[c], n[c] = t[f"{MEAN}{c}"].flatten().double(), int(t[f"{COUNT}{c}"].item())
            means.append(m)
            counts.append(n)
        table, total = aggregate_class_means(means, counts, self.weighting)
        return ArrayRecord(encode_class_table(table.float(), total)), metrics
