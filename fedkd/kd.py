"""The knowledge-distillation toolkit: one implementation of every KD loss the methods share.

Why this module exists: FedKD, FML, FedDistill, FedProto, FedNTD, PSE, MH-pFLID and the
centralized methods (Hinton KD, Beta-KD, ...) all use the same handful of losses. Written
once per method they drift apart in the details that decide whether numbers are comparable
(batchmean vs elementwise mean, the T^2 factor, where the teacher is detached, how classes
without a prototype are handled). Every method imports these functions; none re-implements them.

Everything here is a pure function of tensors (no modules, no state, no RNG). Formulas follow
`shared/specs/local-kd.md` (section 1 and the loss parts of sections 2-6) and
`shared/specs/centralized.md` (sections 1 and 5).

Conventions
- Logits are (B, C), hard targets are (B,) int64 class ids, features are (B, D).
- `reduction="batchmean"` (default): sum over classes, mean over the batch (the true KL).
  `"elementwise_mean"`: mean over batch*classes = batchmean / C, which is what PFLlib's FedKD
  and FML get from `nn.KLDivLoss()`'s default; use it only for PFLlib parity.
  `"none"`: one value per sample (B,), e.g. for Beta-KD's per-sample weights.
- Nothing detaches the teacher for you: mutual learning (FedKD, FML as in PFLlib) needs the
  gradient to reach both models. Classic KD callers pass `teacher_logits.detach()` (or compute
  the teacher under `torch.no_grad()`). `mutual_kd` is the one exception and says so.
- Per-class tables (prototypes, average logits) are a dense (C, D) tensor plus a (C,) count
  tensor; a class is present iff its count is > 0. Absent rows are zero and never used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["batchmean", "elementwise_mean", "none"]

__all__ = [
    "MODE_SCALE",
    "FedKDLosses",
    "WeightMode",
    "clamp_log_vars",
    "combine_channels",
    "equal_weighting",
    "normalized_weights",
    "uncertainty_weighting",
    "Reduction",
    "aggregate_class_means",
    "class_sums",
    "class_means",
    "embed_cosine_loss",
    "fedkd_losses",
    "feature_distance",
    "gather_class_rows",
    "kd_loss",
    "mutual_kd",
    "not_true_kd",
    "soft_cross_entropy",
    "soft_hard_loss",
]


def _reduce(per_sample: Tensor, num_classes: int, reduction: Reduction) -> Tensor:
    """Reduce a (B,) per-sample sum over classes the way the named reduction defines it."""
    if reduction == "batchmean":
        return per_sample.mean()
    if reduction == "elementwise_mean":
        return per_sample.mean() / num_classes
    if reduction == "none":
        return per_sample
    raise ValueError(f"unknown reduction {reduction!r}; expected batchmean, elementwise_mean or none")


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    reduction: Reduction = "batchmean",
    scale_t2: bool = True,
) -> Tensor:
    """Hinton KD: T^2 * KL(softmax(z_t/T) || softmax(z_s/T)).

    Computed in log space. The T^2 factor (Hinton et al. 2015) keeps the gradient size independent
    of T; `scale_t2=False` drops it (the official FedNTD code does). The teacher is NOT detached:
    callers doing one-way KD pass `teacher_logits.detach()`. Teacher probabilities q go in as
    q.log() at T = 1 (softmax(log q) = q); a -inf logit is an exact zero probability, so a one-hot
    target is 0 on the class and -inf elsewhere.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher "
                         f"{tuple(teacher_logits.shape)} logits differ in shape")
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits / temperature, dim=-1)
    q = log_q.exp()
    # q * (log q - log p) with the 0 * log 0 = 0 convention (q underflow or -inf teacher logits).
    terms = torch.where(q > 0, q * (log_q - log_p_s), torch.zeros_like(q))
    loss = _reduce(terms.sum(dim=-1), student_logits.shape[-1], reduction)
    return loss * temperature**2 if scale_t2 else loss


def soft_hard_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float,
    alpha: float,
    *,
    reduction: Reduction = "batchmean",
) -> Tensor:
    """Hinton's student objective: alpha * kd_loss + (1 - alpha) * CE(z_s, y).

    alpha weights the soft term (centralized.md 1.2). FML's `alpha*CE + (1-alpha)*KL` is this
    function with alpha -> 1 - alpha at T = 1. `reduction` applies to both terms ("none" gives
    per-sample values, "elementwise_mean" divides only the KL term by C, as PFLlib's FML does).
    """
    soft = kd_loss(student_logits, teacher_logits, temperature, reduction=reduction)
    hard = F.cross_entropy(student_logits, targets, reduction="none" if reduction == "none" else "mean")
    return alpha * soft + (1.0 - alpha) * hard


def mutual_kd(
    logits_a: Tensor,
    logits_b: Tensor,
    temperature: float = 1.0,
    *,
    reduction: Reduction = "batchmean",
    detach: bool = True,
) -> tuple[Tensor, Tensor]:
    """Deep-mutual-learning pair: (loss for a, loss for b), each distilling from the other.

    With `detach=True` (default) each side's teacher distribution is detached, so the gradient of
    loss_a reaches only logits_a and vice versa: the two models can be stepped independently.
    PFLlib's FedKD and FML do not detach (their summed backward also pushes each teacher toward
    its student); reproduce that with `detach=False`.
    """
    teacher_for_a = logits_b.detach() if detach else logits_b
    teacher_for_b = logits_a.detach() if detach else logits_a
    return (kd_loss(logits_a, teacher_for_a, temperature, reduction=reduction),
            kd_loss(logits_b, teacher_for_b, temperature, reduction=reduction))


def not_true_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    *,
    reduction: Reduction = "batchmean",
    scale_t2: bool = True,
) -> Tensor:
    """FedNTD's not-true distillation: kd_loss over the C-1 classes other than each sample's label.

    The true-class column is removed from both logit rows before the softmax, so the loss cannot
    depend on (or push) the true-class logit: the local model keeps the global model's view of the
    other classes and stays free on its own label. T^2 scaling as in PFLlib (`scale_t2=False`
    matches the official code; identical at T = 1). "elementwise_mean" divides by C-1.
    """
    if student_logits.ndim != 2 or student_logits.shape[-1] < 2:
        raise ValueError(f"not_true_kd needs (B, C>=2) logits, got {tuple(student_logits.shape)}")
    batch, num_classes = student_logits.shape
    keep = ~F.one_hot(targets, num_classes).bool()
    s = student_logits[keep].view(batch, num_classes - 1)
    t = teacher_logits[keep].view(batch, num_classes - 1)
    return kd_loss(s, t, temperature, reduction=reduction, scale_t2=scale_t2)


def soft_cross_entropy(logits: Tensor, soft_targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over the batch of -sum_c target_c * log_softmax(z)_c, targets used as given.

    This is `F.cross_entropy` with probability-style targets, written out so FedDistill's PFLlib mode
    (raw average logits fed as the "probabilities", local-kd.md 4.2) and the masked "skip" mode share
    one definition. Rows with mask False contribute zero; the mean is still over all B rows.
    """
    per_sample = -(soft_targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    if mask is not None:
        per_sample = torch.where(mask, per_sample, torch.zeros_like(per_sample))
    return per_sample.mean()


def embed_cosine_loss(student: Tensor, teacher: Tensor, *,
                      reduction: Literal["mean", "none"] = "mean") -> Tensor:
    """1 - cos(student, teacher) per row (centralized.md section 6: embedding distillation, e.g.
    Mix-CLAP's students toward the teacher's embeddings); mean over the batch, or per row."""
    per_row = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    return _reduce(per_row, 1, "batchmean" if reduction == "mean" else reduction)


def feature_distance(
    features: Tensor,
    target_features: Tensor,
    mask: Tensor | None = None,
    *,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """MSE between feature vectors and their per-sample targets (prototypes or teacher features).

    FedProto's regulariser is `lam * feature_distance(r, P[y], present[y])` (local-kd.md 5.2):
    mean over batch*D elements, and samples whose class has no global prototype (mask False)
    contribute zero loss and zero gradient while still counting in the batch size, exactly as
    PFLlib's "target = r.detach()" fallback does. With no sample left the result is 0, still
    attached to the graph. `reduction="none"` gives per-sample mean squared distance (B,) (Beta-KD's
    FD_i). Target rows are used as given: detach teacher features yourself.
    """
    if features.shape != target_features.shape:
        raise ValueError(f"features {tuple(features.shape)} and targets "
                         f"{tuple(target_features.shape)} differ in shape")
    diff = features - target_features
    if mask is not None:
        # where (not multiply): absent rows may hold NaN/inf without poisoning loss or gradient.
        diff = torch.where(mask.unsqueeze(-1), diff, torch.zeros_like(diff))
    per_sample = diff.pow(2).mean(dim=-1)
    return per_sample if reduction == "none" else per_sample.mean()


def gather_class_rows(
    table: Tensor,
    present: Tensor,
    targets: Tensor,
    fallback: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample rows table[y] and the mask saying which samples' class is present in the table.

    Builds the targets for FedProto (global prototypes) and FedDistill (global average logits).
    `present` is a (C,) bool tensor (`counts > 0`). Rows of absent classes come from `fallback`
    (B, D) when given (PFLlib FedDistill uses the sample's own detached logits), else zeros; mask
    them out with the returned mask.
    """
    mask = present[targets]
    rows = table[targets]
    other = fallback if fallback is not None else torch.zeros_like(rows)
    return torch.where(mask.unsqueeze(-1), rows, other), mask


def class_means(values: Tensor, targets: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class mean of (N, D) vectors: returns means (C, D) and sample counts (C,) int64.

    Absent classes have count 0 and a zero row. The (means, counts) pair is what both
    aggregations need (uniform: average rows with count > 0; count-weighted: weigh by counts,
    see `aggregate_class_means`), and the wire format (only present classes) is
    `{c: means[c] for c in counts.nonzero()}`. Means are computed on `values` as given (detach
    recorded logits/features first); accumulate several batches with aggregate_class_means(...,
    weighting="count"), which equals the mean over all recorded vectors.
    """
    counts = torch.bincount(targets, minlength=num_classes)
    if counts.numel() > num_classes:
        raise ValueError(f"targets contain a class >= num_classes={num_classes}")
    sums = torch.zeros(num_classes, values.shape[-1], dtype=values.dtype, device=values.device)
    sums.index_add_(0, targets, values)
    means = sums / counts.clamp(min=1).unsqueeze(-1).to(values.dtype)
    return means, counts


def aggregate_class_means(
    means: Sequence[Tensor],
    counts: Sequence[Tensor],
    weighting: Literal["uniform", "count"] = "uniform",
) -> tuple[Tensor, Tensor]:
    """Combine several clients' (or batches') class means into one table: (means (C, D), counts (C,)).

    "uniform": per class, the plain mean over the contributors that have the class (PFLlib FD and
    FedProto, FedProto official code). "count": weighted by each contributor's sample count
    (FedProto paper equation; also merges batches into an exact overall mean). Classes nobody
    has stay absent (count 0, zero row). Returned counts are total samples per class either way.
    """
    summed, total = class_sums(means, counts, weighting)
    return summed / total.clamp(min=1e-12).unsqueeze(-1), torch.stack(list(counts)).sum(dim=0)


def class_sums(
    means: Sequence[Tensor],
    counts: Sequence[Tensor],
    weighting: Literal["uniform", "count"] = "uniform",
) -> tuple[Tensor, Tensor]:
    """The numerator and denominator of `aggregate_class_means`: per class, sum_k w_k means_k (C, D)
    and sum_k w_k (C,), with w_k = 1 ("uniform") or the count ("count") for contributors that have
    the class, else 0. Kept apart so one contributor can be subtracted exactly (FedDistill's
    leave-own-out teacher, `fedkd.strategies.class_means.leave_own_out`)."""
    if not means or len(means) != len(counts):
        raise ValueError("need one counts tensor per means tensor, and at least one of each")
    n = torch.stack(list(counts))  # (K, C)
    stacked = torch.stack(list(means))  # (K, C, D)
    stacked = torch.where((n > 0).unsqueeze(-1), stacked, torch.zeros_like(stacked))
    if weighting == "uniform":
        w = (n > 0).to(stacked.dtype)
    elif weighting == "count":
        w = n.to(stacked.dtype)
    else:
        raise ValueError(f"unknown weighting {weighting!r}; expected uniform or count")
    return (stacked * w.unsqueeze(-1)).sum(dim=0), w.sum(dim=0)


class FedKDLosses(NamedTuple):
    """FedKD's per-model losses and their parts (the parts are for logging)."""

    mentor: Tensor  # c_t + Ld_t + Lh
    mentee: Tensor  # c_s + Ld_s + Lh
    ce_mentor: Tensor
    ce_mentee: Tensor
    distill_mentor: Tensor  # KL(mentee || mentor) / (c_t + c_s)
    distill_mentee: Tensor  # KL(mentor || mentee) / (c_t + c_s)
    hidden: Tensor  # MSE(h_t, W_h h_s) / (c_t + c_s); 0 without hidden states


def fedkd_losses(
    mentor_logits: Tensor,
    mentee_logits: Tensor,
    targets: Tensor,
    mentor_hidden: Tensor | None = None,
    mentee_hidden_projected: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "batchmean",
) -> FedKDLosses:
    """FedKD's adaptive mutual distillation (local-kd.md 2.2 steps 2-5) for the CNN.

    Distillation and hidden losses are divided by D = c_t + c_s, so they fade while both models
    are still wrong. As in PFLlib nothing is detached (not the teachers, not D) and both losses
    share the same hidden term; the caller backpropagates mentor + mentee. `mentee_hidden_projected`
    is W_h(h_s) (W_h is a trainable Linear the caller owns). PFLlib parity: reduction
    "elementwise_mean". Transformer attention-map losses are not defined for our models.
    """
    if reduction == "none":
        raise ValueError("fedkd_losses needs a scalar reduction (batchmean or elementwise_mean)")
    ce_t = F.cross_entropy(mentor_logits, targets)
    ce_s = F.cross_entropy(mentee_logits, targets)
    denom = ce_t + ce_s
    kl_t, kl_s = mutual_kd(mentor_logits, mentee_logits, temperature, reduction=reduction, detach=False)
    if (mentor_hidden is None) != (mentee_hidden_projected is None):
        raise ValueError("give both mentor_hidden and mentee_hidden_projected, or neither")
    if mentor_hidden is not None and mentee_hidden_projected is not None:
        hidden = feature_distance(mentor_hidden, mentee_hidden_projected) / denom
    else:
        hidden = denom.new_zeros(())
    d_t, d_s = kl_t / denom, kl_s / denom
    return FedKDLosses(ce_t + d_t + hidden, ce_s + d_s + hidden, ce_t, ce_s, d_t, d_s, hidden)


# ---- uncertainty weighting of several loss channels (Beta-KD, centralized.md section 5) ----

WeightMode = Literal["equal", "task", "instance"]
#: scale of `exp(-s) L + s` per mode, as in the official code (task: Kendall's 0.5; instance: 1)
MODE_SCALE: dict[str, float] = {"task": 0.5, "instance": 1.0}


def clamp_log_vars(log_vars: Tensor, bound: float = 5.0, *, straight_through: bool = False) -> Tensor:
    """s clamped to [-bound, bound] (official code: 5), so no weight explodes or vanishes.

    `straight_through`: the forward value is clamped but the gradient passes as if it were not,
    so a network whose output overshot the bound is still pulled back (a hard clamp has zero
    gradient there and leaves it stuck)."""
    clamped = log_vars.clamp(-bound, bound)
    return log_vars + (clamped - log_vars).detach() if straight_through else clamped


def equal_weighting(losses: Tensor) -> Tensor:
    """Plain sum over channels (last dim), mean over samples: the `equal` baseline."""
    return losses.sum(dim=-1).mean() if losses.ndim > 1 else losses.sum()


def uncertainty_weighting(losses: Tensor, log_vars: Tensor, scale: float = 0.5) -> Tensor:
    """scale * sum_i (exp(-s_i) L_i + s_i), mean over samples.

    The log-variance form of the Gibbs-prior objective beta * l - (d/2) log beta (beta = exp(-s)).
    `losses` is (K,) or (B, K); `log_vars` is (K,) (task mode, broadcast over samples) or (B, K)
    (instance mode). Minimizing over s gives s* = log L, i.e. weight exp(-s*) = 1 / L.
    """
    per = scale * (torch.exp(-log_vars) * losses + log_vars)
    return per.sum(dim=-1).mean() if per.ndim > 1 else per.sum()


def normalized_weights(log_vars: Tensor) -> Tensor:
    """w_i = exp(-s_i) / sum_j exp(-s_j) over the last dim: comparable weights that sum to 1."""
    return torch.softmax(-log_vars, dim=-1)


def combine_channels(mode: WeightMode, losses: Tensor, log_vars: Tensor | None = None,
                     bound: float = 5.0) -> Tensor:
    """One scalar objective from per-channel losses under `mode` (equal / task / instance)."""
    if mode == "equal":
        return equal_weighting(losses)
    if log_vars is None:
        raise ValueError(f"mode {mode!r} needs log_vars")
    return uncertainty_weighting(losses, clamp_log_vars(log_vars, bound), MODE_SCALE[mode])
