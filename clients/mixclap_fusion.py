"""Mix-CLAP's prototypes and test-time fusion, as pure functions over embeddings.

Split from `clients/mixclap.py` (behaviour unchanged): class prototypes, cosine logits, the
fusion grid, the fused embedding and the selection of the fusion weight lambda* over the grid
(`../shared/specs/centralized.md` section 4.2). No training and no labels here, except in
`grid_accuracies`, the oracle's view (reporting only).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fedkd.kd import class_means

# --- prototypes and fusion (pure functions) ------------------------------------------------------

def unit(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1)


def class_prototypes(embeddings: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """P_c = normalize(mean of the unit embeddings of class c); a class without clips gets 0."""
    means, _ = class_means(unit(embeddings), labels, num_classes)
    return unit(means)


def prototype_logits(embeddings: Tensor, prototypes: Tensor, tau: float) -> Tensor:
    """cos(e, P_c) / tau for every class: (..., D) -> (..., C)."""
    return unit(embeddings) @ prototypes.T / tau


def fusion_grid(steps: int) -> Tensor:
    """{0, 1/steps, ..., 1} (21 points for steps = 20)."""
    return torch.arange(steps + 1, dtype=torch.float64).div(steps).float()


def fuse(e_clean: Tensor, e_noisy: Tensor, lam: Tensor | float) -> Tensor:
    """e_lambda = normalize(lambda S_c + (1 - lambda) S_n) over unit-normalized student outputs;
    `lam` broadcasts (a scalar, (B, 1) per clip, or (G, 1, 1) for a whole grid)."""
    return unit(lam * unit(e_clean) + (1 - lam) * unit(e_noisy))


def grid_entropies(e_clean: Tensor, e_noisy: Tensor, prototypes: Tensor, tau: float,
                   grid: Tensor) -> Tensor:
    """(B, G): entropy of p_lambda(.|x) for every clip and every grid lambda."""
    fused = fuse(e_clean, e_noisy, grid.to(e_clean.dtype).view(-1, 1, 1))  # (G, B, D)
    logp = F.log_softmax(prototype_logits(fused, prototypes, tau), dim=-1)
    return -(logp.exp() * logp).sum(-1).T


TIE_RTOL = 1e-5  # relative: above float32 rounding of an entropy, far below a grid step's change


def argmin_prefer_larger(values: Tensor, rtol: float = TIE_RTOL) -> Tensor:
    """Index of the minimum over the last axis; values within `rtol` (relative) of it are ties,
    and ties go to the LARGER index (larger lambda). The tolerance is needed because
    lambda S + (1 - lambda) S is not bit-identical across lambda: equal students give entropies
    that differ by rounding, and which is lowest varies by machine (an exact-tie test failed on one).
    It is relative because confident fusions have entropies near 0 (1e-7) that still differ."""
    near = torch.isclose(values, values.amin(dim=-1, keepdim=True), rtol=rtol, atol=0.0)
    return values.shape[-1] - 1 - near.flip(-1).int().argmax(dim=-1)


class FusionResult(NamedTuple):
    weights: Tensor  # (B,) lambda* per clip (all equal in per_condition mode)
    entropies: Tensor  # (G,) mean entropy over the batch for each grid lambda
    logits: Tensor  # (B, C) cosine logits / tau of the fused embedding


def entropy_fusion(e_clean: Tensor, e_noisy: Tensor, prototypes: Tensor, tau: float, grid: Tensor,
                   mode: str = "per_condition") -> FusionResult:
    """lambda* = argmin_lambda mean_B H(p_lambda) (per_condition: one lambda for the batch) or
    argmin per clip (per_clip); no labels involved."""
    h = grid_entropies(e_clean, e_noisy, prototypes, tau, grid)
    mean_h = h.mean(0)
    if mode == "per_condition":
        index = argmin_prefer_larger(mean_h).expand(len(e_clean))
    elif mode == "per_clip":
        index = argmin_prefer_larger(h)
    else:
        raise ValueError(f"unknown fusion mode {mode!r}")
    lam = grid.to(e_clean.dtype)[index]
    return FusionResult(lam, mean_h, prototype_logits(fuse(e_clean, e_noisy, lam[:, None]),
                                                       prototypes, tau))


def grid_accuracies(e_clean: Tensor, e_noisy: Tensor, prototypes: Tensor, tau: float, grid: Tensor,
                    labels: Tensor) -> Tensor:
    """(G,) accuracy at every grid lambda (the oracle's view; uses labels, reporting only)."""
    fused = fuse(e_clean, e_noisy, grid.to(e_clean.dtype).view(-1, 1, 1))
    preds = prototype_logits(fused, prototypes, tau).argmax(-1)  # (G, B)
    return (preds == labels[None]).float().mean(-1)


# --- (v2) the selection rule -------------------------------------------------------------------

SELECTION_RULES = ("entropy", "infomax")


def grid_log_posteriors(e_clean: Tensor, e_noisy: Tensor, prototypes: Tensor, tau: float,
                        grid: Tensor) -> Tensor:
    """(G, B, C): log p_lambda(c|x) for every grid lambda and clip."""
    fused = fuse(e_clean, e_noisy, grid.to(e_clean.dtype).view(-1, 1, 1))  # (G, B, D)
    return F.log_softmax(prototype_logits(fused, prototypes, tau), dim=-1)


def infomax_objective(e_clean: Tensor, e_noisy: Tensor, prototypes: Tensor, tau: float,
                      grid: Tensor) -> Tensor:
    """(G,): mean_x H(p_lambda(.|x)) - H(pbar_lambda), pbar_lambda = mean_x p_lambda(.|x).

    The second term is 0 when every clip lands on one prototype and log C when predictions
    spread evenly, so a collapsed (confident) student no longer wins (spec 4.2 v2, ASSUMED)."""
    logp = grid_log_posteriors(e_clean, e_noisy, prototypes, tau, grid)
    p = logp.exp()
    mean_h = -(p * logp).sum(-1).mean(-1)
    pbar = p.mean(1)
    h_bar = -(pbar * pbar.clamp_min(1e-30).log()).sum(-1)
    return mean_h - h_bar


def select_fusion(e_clean: Tensor, e_noisy: Tensor, prototypes: Tensor, tau: float, grid: Tensor,
                  mode: str = "per_condition", rule: str = "entropy") -> FusionResult:
    """lambda* by `rule`: `entropy` (v1: min mean entropy, per condition or per clip) or
    `infomax` (v2: min mean entropy minus the entropy of the batch-mean prediction; per
    condition only, it needs a batch of several classes). Ties go to the larger lambda.
    `FusionResult.entropies` holds the rule's objective per grid lambda."""
    if rule == "entropy":
        return entropy_fusion(e_clean, e_noisy, prototypes, tau, grid, mode)
    if rule != "infomax":
        raise ValueError(f"unknown selection rule {rule!r}; expected one of {SELECTION_RULES}")
    if mode != "per_condition":
        raise ValueError("infomax selects one lambda per condition (fusion: per_condition)")
    objective = infomax_objective(e_clean, e_noisy, prototypes, tau, grid)
    index = argmin_prefer_larger(objective).expand(len(e_clean))
    lam = grid.to(e_clean.dtype)[index]
    return FusionResult(lam, objective, prototype_logits(fuse(e_clean, e_noisy, lam[:, None]),
                                                         prototypes, tau))
