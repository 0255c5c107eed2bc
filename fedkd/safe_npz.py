"""Read an npz whose members may be pickled object arrays, without running code from the file.

Why: PFLlib stores each client's split as an npz holding one 0-d object array (a dict of
arrays), which `np.load` reads only with `allow_pickle=True`, and a pickle can call any
importable function. Nothing a user supplies is unpickled freely (DESIGN.md, Files), so
the pickle payload of an object member is read by an unpickler whose `find_class` knows
only what rebuilds ndarrays, dtypes and numpy scalars; any other global is refused before
it is called, with a DataError naming the file and the global.
"""

from __future__ import annotations

import importlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np


def _multiarray() -> Any:
    """numpy's multiarray module under its 2.x name, else its 1.x name (no deprecation shim)."""
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 1.26
        return importlib.import_module("numpy.core.multiarray")


_MA = _multiarray()
#: (module, name) as a pickle names them -> the object; numpy 1.x pickles say numpy.core
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(mod, name): getattr(_MA, name)
       for mod in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays and plain containers, nothing else."""

    def __init__(self, file: io.BytesIO, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        from fedkd.data import DataError  # local: fedkd.data imports this module

        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(f"{self.path}: refused to unpickle {module}.{name} (an npz may only "
                            "hold numpy arrays; nothing in it is run)") from None


def load_npz(path: Path) -> dict[str, Any]:
    """Every `.npy` member of the npz by name (without `.npy`), as `np.load` would give it."""
    from fedkd.data import DataError

    out: dict[str, Any] = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if not member.endswith(".npy"):
                continue
            fp = io.BytesIO(archive.read(member))
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                _, _, dtype = np.lib.format.read_array_header_1_0(fp)
            elif version == (2, 0):
                _, _, dtype = np.lib.format.read_array_header_2_0(fp)
            else:
                raise DataError(f"{path}: {member} is .npy format {version}, not 1.0 or 2.0")
            if dtype.hasobject:  # the rest of the member is a pickle of the whole array
                out[member[:-4]] = _ArrayUnpickler(fp, path).load()
            else:
                fp.seek(0)
                out[member[:-4]] = np.lib.format.read_array(fp, allow_pickle=False)
    return out
