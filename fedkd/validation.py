"""Checks of one client's train update on its node, before it enters any sum (`validation` section).

Always: the arrays the method declares for the round (`ClientAlgorithm.expected_arrays`:
names, shapes, dtypes; class tables may leave out whole classes) and finite values.
With `validation.norm_check`: the update norm ||sent - received|| against `norm_factor`
times the median of the norms the server accepted in the previous round, which the
server sends with the round's config (`NORM_KEY`); each accepted client reports its
norm back (`UPDATE_NORM`). A failed check is a reason string: the client is recorded
`rejected` with it and its update is left out; the rest of its group goes on.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedkd.clients.base import ExpectedArrays
from fedkd.config import ValidationConfig

#: server -> node, in the train config: the previous round's median update norm
NORM_KEY = "fedkd-median-norm"
#: node -> server, in a client's metrics (norm_check on): its update norm
UPDATE_NORM = "update-norm"


def check_declared(arrays: dict[str, Tensor], expected: ExpectedArrays | None) -> str | None:
    """Why `arrays` do not match the declaration (None: they do, or nothing is declared)."""
    if expected is None:
        return None
    declared = expected.arrays
    unexpected = sorted(set(arrays) - set(declared))
    if unexpected:
        return f"unexpected arrays {', '.join(unexpected[:3])} (not declared by the method this round)"
    optional = {name for group in expected.optional for name in group}
    missing = sorted(k for k in declared if k not in arrays and k not in optional)
    if missing:
        return f"missing arrays {', '.join(missing[:3])}"
    for group in expected.optional:
        present = [k for k in group if k in arrays]
        if present and len(present) < len(group):
            absent = [k for k in group if k not in arrays]
            return f"incomplete group: {', '.join(present)} sent without {', '.join(absent)}"
    for name, tensor in arrays.items():
        shape, dtype = declared[name]
        if tuple(tensor.shape) != tuple(shape):
            return f"{name} has shape {tuple(tensor.shape)}, declared {tuple(shape)}"
        if tensor.dtype != dtype:
            return f"{name} has dtype {tensor.dtype}, declared {dtype}"
    return None


def check_finite(arrays: dict[str, Tensor]) -> str | None:
    """Why `arrays` are not all finite (None: they are)."""
    for name, tensor in arrays.items():
        if tensor.is_floating_point() or tensor.is_complex():
            if bool(torch.isfinite(tensor.sum())):  # any NaN or inf makes the sum non-finite:
                continue  # one reduction, no mask (a finite sum that overflowed: checked below)
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                nan = int(torch.isnan(tensor).sum())
                return f"non-finite values in {name} ({nan} NaN, {int((~finite).sum()) - nan} inf)"
    return None


def update_norm(sent: dict[str, Tensor], received: dict[str, Tensor]) -> float:
    """||sent - received|| over the float arrays, in float64 (an array the server did not send,
    or sent in another shape, counts whole: a class table's new class)."""
    total = 0.0
    for name, tensor in sent.items():
        if not tensor.is_floating_point():
            continue
        base = received.get(name)
        value = tensor.double()
        if base is not None and base.shape == tensor.shape:
            value = value - base.to(tensor.device).double()
        total += float(value.pow(2).sum())
    return math.sqrt(total)


def validate_update(arrays: dict[str, Tensor], received: dict[str, Tensor],
                    expected: ExpectedArrays | None, cfg: ValidationConfig,
                    median_norm: float | None) -> tuple[str | None, float | None]:
    """(why the update is rejected or None, its norm when `cfg.norm_check`)."""
    reason = check_declared(arrays, expected) or check_finite(arrays)
    if reason is not None or not cfg.norm_check:
        return reason, None
    norm = update_norm(arrays, received)
    if median_norm is not None and median_norm > 0 and norm > cfg.norm_factor * median_norm:
        return (f"update norm {norm:.4g} > {cfg.norm_factor:g} x the previous round's median "
                f"{median_norm:.4g} (validation.norm_factor)"), norm
    return None, norm
