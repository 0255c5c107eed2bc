"""FedAvg's client (McMahan et al., 2017): local SGD from the global model, the whole model shared.

With the FedProx strategy the server sends `proximal-mu` and the same client adds
FedProx's proximal term mu/2 * ||w - w_global||^2 (Li et al., 2020).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedkd.clients.base import PartialSharing


@dataclass
class FedAvgSettings:
    name: str = "fedavg"


class FedAvgClient(PartialSharing):
    """Every parameter and buffer is shared; clients evaluate the aggregated global model."""

    evaluates = "global"
