"""fedkd: federated simulation of personalized and knowledge-distillation methods on Flower + Ray."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]


def __getattr__(name: str) -> Any:
    """`fedkd.load_model`, imported on first use (it pulls in torch and every method)."""
    if name == "load_model":
        from fedkd.saved_model import load_model

        return load_model
    raise AttributeError(f"module 'fedkd' has no attribute {name!r}")
