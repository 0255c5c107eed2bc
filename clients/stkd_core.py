"""stkd's pure pieces (split from `clients/stkd.py`, behaviour unchanged): the exclusion schedule
and mask, contamination control, the robust distance of the warm-up teacher's clean pick, the
ranking metrics (AUROC, AUPRC, F1@k) and the autoencoder detector
(`../shared/specs/centralized.md` section 3). The staged client lives in `clients/stkd.py`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------
# pure pieces: schedule, exclusion, contamination, metrics


def rho_schedule(j: int, rho_max: float, ramp: int) -> float:
    """rho_j = rho_max * min(1, j / J_ramp): j = rescorings so far (0 -> train on everything)."""
    return rho_max * min(1.0, j / ramp)


def num_excluded(rho: float, n: int) -> int:
    """round(rho * n), halves rounded up (ASSUMED: Python's round would round halves to even)."""
    return int(math.floor(rho * n + 0.5))


def top_order(scores: np.ndarray) -> np.ndarray:
    """Indices by decreasing score, ties broken by lower index first."""
    scores = np.asarray(scores, np.float64)
    return np.lexsort((np.arange(len(scores)), -scores))


def exclusion_mask(scores: Tensor, rho: float) -> Tensor:
    """Kept-mask (True = in the purified set): excludes the round(rho n) highest scores."""
    order = top_order(scores.detach().cpu().numpy())
    keep = torch.ones(len(order), dtype=torch.bool)
    keep[torch.as_tensor(order[:num_excluded(rho, len(order))], dtype=torch.long)] = False
    return keep.to(scores.device)


def contaminate(y: np.ndarray, rate: float | None, seed: int) -> np.ndarray:
    """Sorted indices of the training samples kept to reach anomaly `rate` (None = natural).

    All normals stay; k = round(rate n_normal / (1 - rate)) anomalies are drawn without
    replacement (seeded), so the achieved rate is within 1/n_train of the target. A rate above
    the natural one would need duplicates: ValueError (the spec's sweep skips those).
    """
    if rate is None:
        return np.arange(len(y))
    y = np.asarray(y)
    normal, anomalous = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    k = int(math.floor(rate * len(normal) / (1.0 - rate) + 0.5))
    if k > len(anomalous):
        raise ValueError(f"contamination {rate} is above the training split's natural rate "
                         f"{len(anomalous) / max(len(y), 1):.4f} ({len(anomalous)} anomalies): skip it")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x57CD]))
    chosen = rng.choice(anomalous, size=k, replace=False)
    return np.sort(np.concatenate([normal, chosen]))


def robust_distance(x: Tensor) -> Tensor:
    """||z|| with z = (x - median) / (1.4826 MAD) per feature (teacher: warmup's clean pick).

    ASSUMED: a feature with MAD 0 (frequent in these tables) uses 1.2533 x mean absolute
    deviation, and 1 if that is 0 too.
    """
    med = x.median(0).values
    dev = (x - med).abs()
    scale = 1.4826 * dev.median(0).values
    fallback = 1.2533 * dev.mean(0)
    scale = torch.where(scale > 0, scale, torch.where(fallback > 0, fallback, torch.ones_like(scale)))
    return ((x - med) / scale).pow(2).sum(1).sqrt()


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney U); tied scores share their
    mean rank (= half credit). NaN when a class is missing."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    ranks = np.empty(len(s), np.float64)
    start = 0
    while start < len(s):  # average rank of each run of ties
        end = start
        while end + 1 < len(s) and sorted_s[end + 1] == sorted_s[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUPRC as sum_k (R_k - R_{k-1}) P_k over distinct thresholds (scikit-learn's definition)."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels).astype(np.float64)
    n_pos = y.sum()
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # end of each tie group
    tp = np.cumsum(y)[last]
    precision, recall = tp / (last + 1), tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_at_k(scores: np.ndarray, labels: np.ndarray) -> float:
    """F1 when the k highest scores are flagged, k = number of anomalies (ties: lower index
    first); precision = recall = F1 = hits / k."""
    y = np.asarray(labels).astype(bool)
    k = int(y.sum())
    if k == 0:
        return float("nan")
    return float(y[top_order(scores)[:k]].sum() / k)


# ---------------------------------------------------------------------------------------------
# model and client


class AutoEncoder(nn.Module):
    """d-hidden-code-hidden-d MLP autoencoder, ReLU hidden layers, linear code and output."""

    def __init__(self, dim: int, hidden: int, code: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, code))
        self.decoder = nn.Sequential(nn.Linear(code, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


def anomaly_score(model: AutoEncoder, x: Tensor) -> Tensor:
    """s(x) = ||x - g(f(x))||^2 / d, per sample."""
    return (x - model(x)).pow(2).mean(-1)


@torch.no_grad()
def score_all(model: AutoEncoder, x: Tensor, batch_size: int = 4096) -> Tensor:
    model.eval()
    out = torch.cat([anomaly_score(model, x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train()
    return out


def _clone(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}
