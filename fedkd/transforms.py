"""Per-client data transforms, applied once when a federated dataset is loaded (not per batch).

`data.transform.resolution_factors` is the benchmark protocol's "resolution-shift, exact
transform" (MH-pFLID's feature shift by resolution): client k's train and test images are
down-sampled by F_k with area interpolation and up-sampled back with bilinear interpolation, so
every client sees the same task at a different effective resolution and the same input shape.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedkd.config import ConfigError

RESOLUTION_ASSIGN = ("diagonal", "cyclic")


def resolution_factor(k: int, factors: Sequence[int], assign: str = "diagonal") -> int:
    """F_k for client (partition id) k.

    diagonal: factors[(k + k // n) % n], n = len(factors). With factors [1, 2, 4, 8] and the
      architectures [cnn_narrow, cnn, mlp, resnet8][k % 4], each architecture sees two
      resolutions (k=0..7 -> 1, 2, 4, 8, 2, 4, 8, 1), so architecture and resolution are not
      confounded (the protocol's rule, the default).
    cyclic: factors[k % n]; with as many factors as architectures, each architecture sees one.
    """
    n = len(factors)
    if assign == "diagonal":
        return int(factors[(k + k // n) % n])
    if assign == "cyclic":
        return int(factors[k % n])
    raise ConfigError("data.transform.resolution_assign", assign, f"allowed: {', '.join(RESOLUTION_ASSIGN)}")


def check_resolution(factors: Sequence[int], input_shape: tuple[int, ...]) -> None:
    """Every factor must leave at least one pixel of a CxHxW image."""
    if len(input_shape) != 3:
        raise ConfigError("data.transform.resolution_factors", list(factors),
                          f"needs CxHxW images; this dataset's input shape is {tuple(input_shape)}")
    side = min(input_shape[1:])
    bad = [f for f in factors if not 1 <= f <= side]
    if bad:
        raise ConfigError("data.transform.resolution_factors", list(factors),
                          f"integers from 1 to the image side {side} (found {bad[0]})")


def degrade_resolution(x: np.ndarray, factor: int, chunk: int = 4096) -> np.ndarray:
    """Images (N, C, H, W) down-sampled by `factor` with area interpolation to
    (floor(H/factor), floor(W/factor)) and up-sampled back to (H, W) with bilinear interpolation
    (align_corners=False). factor 1 returns `x` unchanged. Deterministic (CPU float32)."""
    import torch
    import torch.nn.functional as F

    if factor == 1 or len(x) == 0:
        return x
    h, w = x.shape[2:]
    small = (h // factor, w // factor)
    out = np.empty_like(x, dtype=np.float32)
    with torch.no_grad():
        for s in range(0, len(x), chunk):  # bounded memory on the large pooled sets
            t = torch.from_numpy(np.ascontiguousarray(x[s:s + chunk], dtype=np.float32))
            t = F.interpolate(F.interpolate(t, size=small, mode="area"), size=(h, w), mode="bilinear",
                              align_corners=False)
            out[s:s + chunk] = t.numpy()
    return out
