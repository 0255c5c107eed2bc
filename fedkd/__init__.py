"""fedkd: federated simulation of personalized and knowledge-distillation methods on Flower + Ray.

The Python API (`fedkd.run`, `fedkd.load_config`, `fedkd.load_model`, ...) is imported on first
use, so `import fedkd` stays light (no torch, Flower or Ray until a function is called).
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:  # the one source of the version is pyproject.toml, read back from the installed metadata
    __version__ = version("fedkd")
except PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"

#: public name -> module that defines it
_LAZY = {
    "run": "fedkd.api", "RunResult": "fedkd.api", "load_config": "fedkd.api",
    "run_sweep": "fedkd.api", "SweepResult": "fedkd.api",
    "ConfigError": "fedkd.config", "DataError": "fedkd.data", "RunDirError": "fedkd.rundir",
    "load_model": "fedkd.saved_model", "FedkdConfig": "fedkd.config",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use (they pull in torch, Flower and every method)."""
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedkd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
