"""The degenerate case's server: one client, and the aggregate of its one reply is that reply.

Centralized methods run as a one-client federation (DESIGN.md); averaging a single
reply would still pass its tensors through arithmetic (x * n / n), so this strategy
returns the reply's arrays untouched and refuses more than one reply.
"""

from __future__ import annotations

from typing import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg


class PassThrough(FedAvg):
    """FedAvg's configuration; `aggregate_train` returns the only reply as it is."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok = [r for r in replies if not r.has_error()]
        if len(ok) > 1:
            raise ValueError(f"passthrough takes one client; got {len(ok)} replies "
                             "(set data.num_clients=1 or use another strategy)")
        if not ok:
            return None, None
        content = ok[0].content
        arrays = content["arrays"] if "arrays" in content else None
        metrics = content["metrics"] if "metrics" in content else None
        return arrays, metrics
