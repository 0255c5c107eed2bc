"""One checkpoint per run directory: what a resumed run needs to continue exactly.

A checkpoint is a folder `checkpoint/` holding
- `global.safetensors`: the server's arrays after the round,
- `strategy.safetensors` + the `strategies` entry of `checkpoint.json`: the wrapped
  Flower strategy's own cross-round arrays (FedAvgM momentum, FedAdam/FedYogi/
  FedAdagrad moments, the arrays they step from), found generically among the
  strategy's attributes, so a user strategy that keeps its state in arrays is
  covered too; a strategy with other state may define `checkpoint_state()` /
  `restore_checkpoint_state(state)` (JSON-able),
- `state/`: the client state store's files as of that round (hard links: the store
  replaces files atomically, so a link keeps the old content at no copying cost),
- `checkpoint.json` (written last: its presence marks a complete checkpoint): the
  round, the metrics.jsonl byte offset at the end of the round, the server's RNG
  states and the strategy entry.

It is written as `checkpoint.tmp/` and swapped in by renames; the previous one is
kept as `checkpoint.old/` until the new one is in place, so a kill at any point
leaves at least one complete checkpoint. Nothing here is unpickled on load:
arrays are safetensors, metadata JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy
from safetensors.torch import load_file as load_torch, save_file as save_torch

CURRENT, PARTIAL, PREVIOUS = "checkpoint", "checkpoint.tmp", "checkpoint.old"
INDEX = "checkpoint.json"
#: test hook: kill -9 the driver right after the checkpoint of this round is complete
KILL_AFTER_ENV = "FEDKD_KILL_AFTER_CHECKPOINT"


class CheckpointError(Exception):
    """A checkpoint is missing or unreadable (the message names the run directory)."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: enough to continue the run after `round`."""

    path: Path
    round: int
    metrics_offset: int
    arrays: dict[str, torch.Tensor]
    meta: dict[str, Any]


# -- the wrapped strategy's own state ------------------------------------------------------------
def strategy_state(strategy: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, JSON entry) of the strategy's cross-round state (see the module docstring)."""
    arrays: dict[str, np.ndarray] = {}
    entry: dict[str, Any] = {"attributes": {}}
    for name, value in sorted(vars(strategy).items()):
        kind, items = _array_items(value)
        if kind is None:
            continue
        entry["attributes"][name] = {"kind": kind, "keys": [str(k) for k, _ in items]}
        arrays.update({f"{name}/{k}": np.ascontiguousarray(a) for k, a in items})
    if hasattr(strategy, "checkpoint_state"):
        entry["custom"] = strategy.checkpoint_state()
    return arrays, entry


def _array_items(value: Any) -> tuple[str | None, list[tuple[Any, np.ndarray]]]:
    if isinstance(value, ArrayRecord):
        return "arrayrecord", [(k, v.numpy()) for k, v in value.items()]
    if isinstance(value, np.ndarray):
        return "array", [("0", value)]
    if isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
        return "dict", list(value.items())
    if isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
        return "list", list(enumerate(value))
    return None, []


def restore_strategy_state(strategy: Any, arrays: dict[str, np.ndarray], entry: dict[str, Any]) -> None:
    """Put what `strategy_state` captured back onto a freshly built strategy."""
    for name, spec in entry.get("attributes", {}).items():
        items = [(k, arrays[f"{name}/{k}"]) for k in spec["keys"]]
        kind = spec["kind"]
        if kind == "arrayrecord":
            value: Any = ArrayRecord({k: Array(a) for k, a in items})
        elif kind == "array":
            value = items[0][1]
        elif kind == "dict":
            value = dict(items)
        else:
            value = [a for _, a in items]
        setattr(strategy, name, value)
    if "custom" in entry:
        strategy.restore_checkpoint_state(entry["custom"])


# -- server RNGs ---------------------------------------------------------------------------------
def rng_states() -> dict[str, Any]:
    """Python's, NumPy's and torch's global RNG states (JSON-able)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    return {"python": [version, list(state), gauss_next],
            "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state().tolist()}


def restore_rngs(states: dict[str, Any]) -> None:
    version, state, gauss_next = states["python"]
    random.setstate((version, tuple(state), gauss_next))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))


# -- client state files --------------------------------------------------------------------------
def _mirror(src: Path, dst: Path) -> None:
    """Make `dst` hold exactly `src`'s files (hard links where possible, else copies)."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    if not src.is_dir():
        return
    for f in src.iterdir():
        if f.is_file() and ".tmp" not in f.suffix:
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)


# -- write and read ------------------------------------------------------------------------------
def write_checkpoint(run_dir: Path, server_round: int, arrays: ArrayRecord,
                     strategies: dict[str, Any], metrics_offset: int) -> Path:
    """Write the checkpoint of `server_round` atomically (see the module docstring)."""
    partial = run_dir / PARTIAL
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    tensors = {k: t.contiguous() for k, t in _as_torch(arrays).items()}
    save_torch(tensors, str(partial / "global.safetensors"))
    strategy_arrays: dict[str, np.ndarray] = {}
    entries: dict[str, Any] = {}
    for name, strategy in strategies.items():
        found, entries[name] = strategy_state(strategy)
        strategy_arrays.update({f"{name}:{k}": a for k, a in found.items()})
    save_numpy(strategy_arrays, str(partial / "strategy.safetensors"))
    _mirror(run_dir / "state", partial / "state")
    index = {"round": server_round, "metrics_offset": metrics_offset, "strategies": entries,
             "rngs": rng_states()}
    (partial / INDEX).write_text(json.dumps(index))
    current, previous = run_dir / CURRENT, run_dir / PREVIOUS
    if previous.exists():
        shutil.rmtree(previous)
    if current.exists():
        os.replace(current, previous)
    os.replace(partial, current)
    shutil.rmtree(previous, ignore_errors=True)
    if os.environ.get(KILL_AFTER_ENV) == str(server_round):
        os.kill(os.getpid(), 9)
    return current


def _as_torch(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy())) for k, v in arrays.items()}


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (the previous one if a swap was cut short)."""
    for name in (CURRENT, PREVIOUS):
        if (run_dir / name / INDEX).is_file():
            return run_dir / name
    return None


def checkpoint_round(run_dir: Path) -> int | None:
    """The round of the latest complete checkpoint, without loading its arrays."""
    path = latest_checkpoint(run_dir)
    return None if path is None else int(json.loads((path / INDEX).read_text())["round"])


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The latest complete checkpoint, or None when the run has none yet."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return None
    try:
        meta = json.loads((path / INDEX).read_text())
        arrays = load_torch(str(path / "global.safetensors"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from None
    return Checkpoint(path, int(meta["round"]), int(meta["metrics_offset"]), arrays, meta)


def roll_back(run_dir: Path, checkpoint: Checkpoint | None) -> None:
    """Put the run directory's files back as they were at `checkpoint` (None: the start):
    metrics written after it are dropped and the client state files are its own."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        with metrics.open("r+b") as f:
            f.truncate(checkpoint.metrics_offset if checkpoint else 0)
    if checkpoint is None:
        shutil.rmtree(run_dir / "state", ignore_errors=True)
    else:
        _mirror(checkpoint.path / "state", run_dir / "state")


def restore_server(checkpoint: Checkpoint, strategies: dict[str, Any]) -> None:
    """Restore the strategies' cross-round state and the server's RNGs from `checkpoint`."""
    saved = load_numpy(str(checkpoint.path / "strategy.safetensors"))
    for name, strategy in strategies.items():
        prefix = f"{name}:"
        restore_strategy_state(strategy, {k[len(prefix):]: a for k, a in saved.items()
                                          if k.startswith(prefix)},
                               checkpoint.meta["strategies"][name])
    restore_rngs(checkpoint.meta["rngs"])
