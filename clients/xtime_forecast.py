"""xTime's forecasting pieces (split from `clients/xtime.py`, behaviour unchanged): the Haar
transform, the rare penalty, the router's convex fusion, the per-level test metrics, the
per-window training targets and the served forecaster (`../shared/specs/centralized.md` section
2). Pure functions and small modules; the staged client lives in `clients/xtime.py`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from fedkd.models import FedModel
from fedkd.taskdata.ett import (OT_MEAN, OT_STD, TARGET, TARGET_RAW, rarity_from_table,
                                rarity_levels, rarity_thresholds)

if TYPE_CHECKING:
    from fedkd.clients.xtime import XTimeSettings


def haar1(x: Tensor) -> Tensor:
    """One-level Haar transform along time, per channel: [approximation; detail] (B, L', C).

    An odd L is padded by repeating the last step (L' = L + 1).
    """
    if x.shape[1] % 2:
        x = torch.cat([x, x[:, -1:]], dim=1)
    even, odd = x[:, 0::2], x[:, 1::2]
    return torch.cat([(even + odd) / math.sqrt(2.0), (even - odd) / math.sqrt(2.0)], dim=1)


def weighted_mse(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """The rare penalty's loss: sum_i w_i (pred_i - y_i)^2 / sum_i w_i (w = 1: plain MSE)."""
    sq = (pred - target).pow(2).reshape(len(weight), -1).mean(dim=1)
    return (weight * sq).sum() / weight.sum()


def rare_weights(levels: np.ndarray, num_levels: int, max_penalty: float) -> np.ndarray:
    """w_k(x) for k = 0..K, shape (K+1, n): 1 + (pi_k - 1) 1[level >= k], pi_k = min(cap,
    1 / frac(level >= k)); w_0 = 1. A level nobody reaches gets pi_k = cap (no sample uses it)."""
    w = np.ones((num_levels, len(levels)))
    for k in range(1, num_levels):
        at = levels >= k
        frac = at.mean() if len(levels) else 0.0
        pi = min(max_penalty, 1.0 / frac) if frac > 0 else max_penalty
        w[k, at] = pi
    return w


def fuse(gate_logits: Tensor, predictions: Tensor) -> tuple[Tensor, Tensor]:
    """(fused (B, 1), gates (B, K+1)): softmax gates, a convex combination of the experts."""
    gates = torch.softmax(gate_logits, dim=-1)
    return (gates * predictions).sum(dim=-1, keepdim=True), gates


def forecast_metrics(pred: np.ndarray, y: np.ndarray, tau: np.ndarray, kind: str,
                     min_n: int) -> dict[str, float]:
    """Per level k: n, MSE, MAE on windows with level >= k; event precision / recall / F1 (k >= 1).

    `pred` is in standardized units (as `y[:, TARGET]`); events compare r(pred in raw units)
    with tau_k (`detrended_value`: |yhat - m_t| / (sd_t + 1e-6), spec 2.4 v2). Precision with no predicted event is 0 (sklearn's zero_division=0); every metric
    of a level with fewer than `min_n` windows is NaN (spec 2.3).
    """
    y64 = y.astype(np.float64)
    pred = np.asarray(pred, np.float64).reshape(-1)
    err = pred - y64[:, TARGET]
    level = rarity_levels(rarity_from_table(y64[:, TARGET_RAW], y64, kind), tau)
    pred_raw = pred * y64[:, OT_STD] + y64[:, OT_MEAN]
    r_pred = rarity_from_table(pred_raw, y64, kind)
    out: dict[str, float] = {}
    for k in range(len(tau) + 1):
        at = level >= k
        n = int(at.sum())
        ok = n >= min_n
        out[f"n-level{k}"] = float(n)
        out[f"mse-level{k}"] = float(np.mean(err[at] ** 2)) if ok else math.nan
        out[f"mae-level{k}"] = float(np.mean(np.abs(err[at]))) if ok else math.nan
        if k >= 1:
            hit = r_pred >= tau[k - 1]
            tp = int((hit & at).sum())
            precision = tp / int(hit.sum()) if hit.any() else 0.0
            recall = tp / n if n else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
            out[f"precision-level{k}"] = precision if ok else math.nan
            out[f"recall-level{k}"] = recall if ok else math.nan
            out[f"f1-level{k}"] = f1 if ok else math.nan
    return out


class _Targets:
    """What one training pass needs per training window, as tensors on the data's device."""

    def __init__(self, y: Tensor, settings: XTimeSettings, num_levels: int) -> None:
        aux = y.detach().cpu().numpy().astype(np.float64)
        r = rarity_from_table(aux[:, TARGET_RAW], aux, settings.rarity_on)
        self.tau = rarity_thresholds(r, settings.rarity_quantiles)
        levels = rarity_levels(r, self.tau)
        dev = y.device
        self.levels = torch.as_tensor(levels, device=dev)
        self.weights = torch.as_tensor(rare_weights(levels, num_levels, settings.max_penalty),
                                       dtype=torch.float32, device=dev)
        self.target = y[:, TARGET:TARGET + 1]
        # train_epochs reports classification numbers from (logits, y); we pass row ids as `y`
        # so the objective can look up each window's target, level and weights (our own report)
        self.rows = torch.arange(len(y), dtype=torch.float32, device=dev).unsqueeze(1)


def run_expert(model: FedModel, x: Tensor) -> tuple[Tensor, Tensor]:
    """(prediction (B, 1), last hidden layer h (B, D)) on already prepared inputs."""
    h = model.features(x)
    return model.head(h), h


def router_inputs(experts: list[FedModel], x: Tensor) -> tuple[Tensor, Tensor]:
    """u = [yhat_0..yhat_K, h_0..h_K] (B, (K+1)(1+D)) and the predictions (B, K+1)."""
    outs = [run_expert(e, x) for e in experts]
    preds = torch.cat([p for p, _ in outs], dim=1)
    return torch.cat([preds, *[h for _, h in outs]], dim=1), preds


class Forecaster(nn.Module):
    """What a stage serves, as one module on raw windows -> standardized OT forecast (B, 1): the
    stage's expert alone (`router` None), or the router's fusion of all experts."""

    def __init__(self, experts: list[FedModel], router: FedModel | None, wavelet: bool) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.router = router
        self.wavelet = wavelet

    def forward(self, x: Tensor) -> Tensor:
        xp = haar1(x) if self.wavelet else x
        if self.router is None:
            return run_expert(self.experts[0], xp)[0]  # type: ignore[arg-type]
        u, preds = router_inputs(list(self.experts), xp)  # type: ignore[arg-type]
        return fuse(self.router(u), preds)[0]


@torch.no_grad()
def forecast(model: nn.Module, x: Tensor, batch_size: int = 2048) -> np.ndarray:
    """`model`'s forecasts of `x` in evaluation-sized chunks (as `XTimeClient.predictions`)."""
    model.eval()
    return np.concatenate([model(x[i:i + batch_size]).reshape(-1).cpu().numpy()
                           for i in range(0, len(x), batch_size)])


def oracle_routing(predictions: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """(v2, reference only) yhat_oracle(x) = yhat_{level(x)}(x): every window goes to the expert
    of its TRUE level. It reads the target's level, so it is an upper bound, never a result.
    `predictions` (n, K+1) per expert, `levels` (n,) in 0..K."""
    predictions = np.asarray(predictions)
    return predictions[np.arange(len(predictions)), np.asarray(levels, np.int64)]


def specialisation(pred_k: np.ndarray, pred_0: np.ndarray, target: np.ndarray, levels: np.ndarray,
                   k: int) -> tuple[float, float]:
    """(v2) (check, gain) of expert E_k against E_0 on the windows with level >= k: check = 1 when
    E_k's MSE is below E_0's, gain = 1 - MSE(E_k) / MSE(E_0); NaN for both without such windows.
    When no E_k passes, the router has no specialist to route to and can only follow E_0."""
    at = np.asarray(levels) >= k
    if not at.any():
        return math.nan, math.nan
    mse_k = float(np.mean((np.asarray(pred_k)[at] - np.asarray(target)[at]) ** 2))
    mse_0 = float(np.mean((np.asarray(pred_0)[at] - np.asarray(target)[at]) ** 2))
    gain = 1.0 - mse_k / mse_0 if mse_0 > 0 else math.nan
    return float(mse_k < mse_0), gain
