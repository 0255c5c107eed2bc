"""Fault injection (the `faults` section; `FaultConfig` documents every kind and what each
strategy family does with it). Pure helpers; `ClientRuntime._inject` applies them."""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
from torch import Tensor

from fedkd.config import FaultConfig


def fires(f: FaultConfig, seed: int, pid: int, server_round: int, phase: str) -> bool:
    """Whether the fault strikes this client in this round and phase (reproducible draw)."""
    if pid not in f.clients or phase != f.phase or (f.rounds and server_round not in f.rounds):
        return False
    if f.probability >= 1.0:
        return True
    draw = np.random.default_rng([seed, server_round, pid, 0 if phase == "train" else 1, 0xFA17])
    return bool(draw.random() < f.probability)


def corrupt(kind: str, arrays: dict[str, Tensor], received: dict[str, Tensor],
            factor: float) -> dict[str, Tensor]:
    """A train update as a faulty client would send it (a new dict; `arrays` is not changed)."""
    out = dict(arrays)
    floats = [k for k in sorted(out) if out[k].is_floating_point() and out[k].numel()]
    if kind in ("nan", "inf"):
        for k in floats:
            t = out[k].clone()
            t.view(-1)[0] = float("nan") if kind == "nan" else float("inf")
            out[k] = t
    elif kind == "shape" and floats:
        k = next((k for k in floats if out[k].dim() and out[k].shape[0] > 1), floats[0])
        out[k] = out[k][:1].clone() if out[k].dim() else out[k].reshape(1, 1)
    elif kind == "missing_key" and out:
        del out[sorted(out)[0]]
    elif kind == "scale":
        for k in floats:
            base = received.get(k)
            if base is not None and base.shape == out[k].shape:
                base = base.to(out[k].device, out[k].dtype)
                out[k] = base + factor * (out[k] - base)
            else:
                out[k] = out[k] * factor
    return out


def in_ray_worker() -> bool:
    """Whether this code runs inside a Ray actor (never true in the driver or in pytest)."""
    if "ray" not in sys.modules:
        return False
    import ray

    return bool(ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None)


def kill_this_process() -> None:
    """SIGKILL to this process, as the OOM killer would send (no cleanup, no reply)."""
    os.kill(os.getpid(), signal.SIGKILL)
