"""An example of your own strategy, run with `fedkd run quickstart strategy.name=my_strategy:DampedFedAvg`.

FedAvg with a server learning rate: the new global model moves only part of the way towards
the clients' example-weighted mean, w <- w + server_lr * (mean - w). `server_lr=1` is FedAvg.
"""

from __future__ import annotations

from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


class DampedFedAvg(FedAvg):
    """FedAvg with a server learning rate (server_lr=1 is FedAvg)."""

    #: the server update acts on the example-weighted mean of the replies, so fedkd may hand it
    #: one pre-averaged reply for all clients (False: one reply per client, as robust rules need)
    mean_based = True

    def __init__(self, server_lr: float = 0.5, **kwargs: object) -> None:
        super().__init__(**kwargs)  # fedkd passes FedAvg's sampling arguments through kwargs
        if not 0.0 < server_lr <= 1.0:
            raise ValueError(f"server_lr must be in (0, 1], got {server_lr}")
        self.server_lr = server_lr
        self.current: ArrayRecord | None = None  # the global model sent this round

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None or self.current is None:
            return mean, metrics
        old, new = self.current.to_torch_state_dict(), mean.to_torch_state_dict()
        damped = {k: (old[k] + self.server_lr * (v - old[k])).to(v.dtype)
                  if v.is_floating_point() else v for k, v in new.items()}
        return ArrayRecord(damped), metrics
