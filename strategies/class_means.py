"""Per-class aggregation of tables that are not model weights (FedDistill logits, FedProto prototypes).

Clients send, for every class they hold, a vector `mean.<c>` and its sample count
`count.<c>`; classes a client lacks are absent, not zero. The server combines each
class over the clients that sent it, uniformly (PFLlib and the official FedProto
code) or weighted by the counts (FedProto's paper equation), and sends back
`mean.<c>` for every class anyone had. It is a Flower strategy (FedAvg's sampling
and configuration), so it runs under fedkd's grouped wrapper like any other, with
one reply per client.

Leave-own-out (FedDistill's `exclude_self`, `../shared/specs/local-kd.md` 4.3): each
client also sends its partition id (`client.id`), and the server sends back the
per-class numerators and denominators instead of the means (`sum.<c>` =
sum_j w_j l_j,c and `weight.<c>` = sum_j w_j in float64, w = 1 or the count), the
partition ids whose tables entered them (`contributors`) and the round they come
from (`round`). A client that contributed subtracts its own upload of that round
(`leave_own_out`): exact for every client, whatever the sampling, grouping or
rejected updates, with one broadcast of C x D + C floats plus the ids.
"""

from __future__ import annotations

from typing import Iterable

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedkd.kd import aggregate_class_means, class_sums
from fedkd.wire import NUM_EXAMPLES, arrays_to_tensors

MEAN, COUNT = "mean.", "count."
#: leave-own-out transport: per-class numerator / denominator, who entered them, when
SUM, WEIGHT, CONTRIBUTORS, ROUND = "sum.", "weight.", "contributors", "round"
#: a client's partition id in its upload (leave-own-out only)
CLIENT_ID = "client.id"


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


def encode_class_sums(sums: torch.Tensor, weights: torch.Tensor, contributors: list[int],
                      server_round: int) -> dict[str, torch.Tensor]:
    """The leave-own-out broadcast (module doc) for the classes with weight > 0."""
    out = {CONTRIBUTORS: torch.tensor(contributors, dtype=torch.int64),
           ROUND: torch.tensor([server_round], dtype=torch.int64)}
    for c in torch.nonzero(weights > 0).flatten().tolist():
        out[f"{SUM}{c}"] = sums[c].detach().cpu().double().clone()
        out[f"{WEIGHT}{c}"] = weights[c:c + 1].detach().cpu().double().clone()
    return out


def sums_round(arrays: dict[str, torch.Tensor]) -> tuple[int, list[int]] | None:
    """(round, contributors) of a leave-own-out broadcast; None when `arrays` is not one."""
    if ROUND not in arrays:
        return None
    return int(arrays[ROUND].flatten()[0]), [int(p) for p in arrays[CONTRIBUTORS].flatten()]


def leave_own_out(arrays: dict[str, torch.Tensor], num_classes: int,
                  own: dict[str, torch.Tensor] | None, weighting: str,
                  dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A client's teacher table (C, D) and the mask of the classes it has, from the broadcast
    `arrays` (module doc) and `own`, the client's upload of the broadcast's round when it is
    among the contributors (else None). Per class c, with R_c the contributors that had it
    (local-kd.md 4.3): (sum - w_k l_k,c) / (weight - w_k) when the client is in R_c and
    |R_c| >= 2; the plain sum / weight when it is not; absent when R_c is the client alone
    (missing_class then applies). Weights are counts of contributors or samples, exact in
    float64, so "alone" is an exact test. None when nothing was broadcast (round 1)."""
    keys = [k for k in arrays if k.startswith(SUM)]
    if not keys:
        return None
    table = torch.zeros(num_classes, arrays[keys[0]].numel(), dtype=torch.float64)
    present = torch.zeros(num_classes, dtype=torch.bool)
    for key in keys:
        c = int(key[len(SUM):])
        total = arrays[key].flatten().double()
        weight = float(arrays[f"{WEIGHT}{c}"].flatten()[0])
        if own is not None and f"{MEAN}{c}" in own:
            w_own = 1.0 if weighting == "uniform" else float(own[f"{COUNT}{c}"].flatten()[0])
            total = total - w_own * own[f"{MEAN}{c}"].flatten().double()
            weight -= w_own
        if weight > 0:
            table[c], present[c] = total / weight, True
    return table.to(dtype), present


class ClassMeans(FedAvg):
    """FedAvg's sampling/configuration with a per-class combination of class tables;
    `exclude_self` broadcasts the leave-own-out transport instead of the means (module doc)."""

    def __init__(self, weighting: str = "uniform", exclude_self: bool = False,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if weighting not in ("uniform", "count"):
            raise ValueError(f"weighting must be uniform or count, got {weighting!r}")
        self.weighting = weighting
        self.exclude_self = exclude_self

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
        if self.exclude_self:
            if any(CLIENT_ID not in t for t in tables):
                raise ValueError(f"exclude_self: every class table must carry {CLIENT_ID!r}")
            sums, weights = class_sums(means, counts, self.weighting)
            contributors = [int(t[CLIENT_ID].flatten()[0]) for t in tables]
            return ArrayRecord(encode_class_sums(sums, weights, contributors, server_round)), metrics
        table, total = aggregate_class_means(means, counts, self.weighting)
        return ArrayRecord(encode_class_table(table.float(), total)), metrics
