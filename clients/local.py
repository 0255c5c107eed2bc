"""Local training only: each client trains its own model and shares nothing (the lower baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from fedkd.clients.base import PartialSharing


@dataclass
class LocalSettings:
    name: str = "local"


class LocalClient(PartialSharing):
    """The whole model is personal: it lives in the client state store between rounds."""

    def is_personal(self, key: str) -> bool:
        return True
