"""The pieces classic KD's v2 setting adds (`../shared/specs/centralized.md` section 1, v2):
a stratified validation carve-out, input jitter, and per-model early stopping whose whole
bookkeeping lives in the client state.

Pure functions and one small record class, unit-tested on tiny tensors
(`tests/test_centralized_v2.py`); the staged client is `clients/hinton_kd.py`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

_HOLDOUT_DOMAIN = 0x6B647631  # "kdv1": keeps this stream apart from every other seeded stream
#: raw pixel 0 under the platform's normalisation ((x / 255 - 0.5) / 0.5): the "zero fill"
JITTER_FILL = -1.0


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train rows, validation rows): round(fraction * n_c) rows of every class c held out, chosen
    by a generator seeded from the run seed only (the same pattern as mixclap's `val_fraction`).
    Both index tensors are sorted, so the training rows keep the client's order."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _HOLDOUT_DOMAIN]))
    held = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        held[rng.permutation(rows)[:int(round(fraction * len(rows)))]] = True
    return torch.from_numpy(np.flatnonzero(~held)), torch.from_numpy(np.flatnonzero(held))


def jitter_offsets(n: int, max_px: int, generator: torch.Generator) -> Tensor:
    """(n, 2) integer offsets (dy, dx), each uniform over [-max_px, max_px]."""
    return torch.randint(-max_px, max_px + 1, (n, 2), generator=generator)


def shift_images(x: Tensor, offsets: Tensor, fill: float = JITTER_FILL) -> Tensor:
    """Every image of x (B, C, H, W) moved by its (dy, dx) (down / right positive), the uncovered
    border filled with `fill`; offsets of 0 return the pixels unchanged."""
    if not len(x):
        return x
    p = int(offsets.abs().max())
    if p == 0:
        return x.clone()
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (p, p, p, p), value=fill)
    out = torch.empty_like(x)
    for dy, dx in torch.unique(offsets, dim=0).tolist():
        rows = ((offsets[:, 0] == dy) & (offsets[:, 1] == dx)).nonzero().squeeze(1)
        out[rows] = padded[rows, :, p - dy:p - dy + h, p - dx:p - dx + w]
    return out


@dataclass
class EarlyStop:
    """One model's early-stopping record (kept in the client state as a plain dict).

    `best_loss` is the lowest validation loss seen, `best_epoch` the 1-based epoch of the stage
    that reached it, `since` the epochs since, `stopped` whether `patience` ran out (a stopped
    model's remaining rounds are no-ops)."""

    best_loss: float = float("inf")
    best_epoch: int = 0
    since: int = 0
    stopped: bool = False

    @classmethod
    def load(cls, record: dict[str, Any] | None) -> "EarlyStop":
        return cls(**record) if record else cls()

    def dump(self) -> dict[str, Any]:
        return asdict(self)

    def update(self, loss: float, epoch: int, patience: int) -> bool:
        """Record epoch `epoch`'s validation loss; True when it is a new best (keep its weights).
        patience 0 never stops."""
        improved = loss < self.best_loss
        if improved:
            self.best_loss, self.best_epoch, self.since = loss, epoch, 0
        else:
            self.since += 1
            if patience > 0 and self.since >= patience:
                self.stopped = True
        return improved
