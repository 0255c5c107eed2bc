"""Local training only: each client trains its own model and shares nothing (the lower baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from fedkd.clients.base import PersonalModelOnly


@dataclass
class LocalSettings:
    name: str = "local"


class LocalClient(PersonalModelOnly):
    """The whole model is personal: it lives in the client state store between rounds."""
