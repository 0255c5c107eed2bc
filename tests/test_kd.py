"""The shared KD losses against hand computations and the identities the specs rely on.

Tiny float64 tensors, so every assertion is exact up to rounding and the file runs in well under a second.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.testing import assert_close

from fedkd.kd import (
    aggregate_class_means,
    class_means,
    fedkd_losses,
    feature_distance,
    gather_class_rows,
    kd_loss,
    mutual_kd,
    not_true_kd,
    soft_cross_entropy,
    soft_hard_loss,
)

D64 = torch.float64
# nn.KLDivLoss() with its default reduction is the PFLlib reference on purpose; silence its deprecation note.
pfllib_kldiv = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")


def _logits(seed: int, rows: int = 4, classes: int = 5) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, classes, generator=gen, dtype=D64) * 2.0


def _softmax(row: list[float], temperature: float) -> list[float]:
    e = [math.exp(v / temperature) for v in row]
    return [v / sum(e) for v in e]


def _kl(q: list[float], p: list[float]) -> float:
    return sum(qi * math.log(qi / pi) for qi, pi in zip(q, p))


# ---- kd_loss -----------------------------------------------------------------------------------


def test_kd_loss_one_hot_teacher_at_t1_equals_cross_entropy() -> None:
    # KL(q || p) = CE_soft(p, q) - H(q) and H(one-hot) = 0.
    student = _logits(0)
    targets = torch.tensor([0, 3, 4, 1])
    one_hot_logits = torch.full_like(student, -math.inf).scatter(1, targets[:, None], 0.0)
    assert_close(kd_loss(student, one_hot_logits, 1.0), F.cross_entropy(student, targets))


def test_kd_loss_is_soft_cross_entropy_minus_teacher_entropy() -> None:
    student, teacher = _logits(1), _logits(2)
    q = teacher.softmax(-1)
    entropy = -(q * q.log()).sum(-1).mean()
    assert_close(kd_loss(student, teacher), soft_cross_entropy(student, q) - entropy)
    # Teacher probabilities go in as their log at T = 1.
    assert_close(kd_loss(student, q.log()), kd_loss(student, teacher))


def test_kd_loss_matches_hand_computation_with_t_squared_scaling() -> None:
    s_row, t_row = [1.0, -0.5, 2.0], [0.3, 1.5, -1.0]
    student, teacher = torch.tensor([s_row], dtype=D64), torch.tensor([t_row], dtype=D64)
    for temperature in (2.0, 4.0):
        kl = _kl(_softmax(t_row, temperature), _softmax(s_row, temperature))
        expected = torch.tensor(temperature**2 * kl, dtype=D64)
        assert_close(kd_loss(student, teacher, temperature), expected)
        assert_close(kd_loss(student, teacher, temperature, scale_t2=False), expected / temperature**2)
        # Same as T = 1 on temperature-scaled logits, times T^2.
        assert_close(kd_loss(student, teacher, temperature),
                     temperature**2 * kd_loss(student / temperature, teacher / temperature, 1.0))


def test_kd_loss_zero_iff_distributions_match() -> None:
    logits = _logits(3)
    for temperature in (1.0, 2.0, 4.0):
        assert_close(kd_loss(logits, logits, temperature), torch.tensor(0.0, dtype=D64))
        # A per-row shift gives the same softmax, hence still zero.
        assert_close(kd_loss(logits, logits + torch.arange(4, dtype=D64)[:, None], temperature),
                     torch.tensor(0.0, dtype=D64))
    other = logits.clone()
    other[0, 0] += 1.0  # one row's distribution differs
    per_sample = kd_loss(other, logits, 2.0, reduction="none")
    assert per_sample[0] > 1e-4
    assert_close(per_sample[1:], torch.zeros(3, dtype=D64))


@pfllib_kldiv
def test_kd_loss_reductions_and_pytorch_kldiv_conventions() -> None:
    student, teacher = _logits(4), _logits(5)
    batchmean = kd_loss(student, teacher)
    log_p, q = student.log_softmax(-1), teacher.softmax(-1)
    assert_close(batchmean, torch.nn.KLDivLoss(reduction="batchmean")(log_p, q))
    # PFLlib FedKD/FML: nn.KLDivLoss() default = elementwise mean = batchmean / C.
    assert_close(kd_loss(student, teacher, reduction="elementwise_mean"), torch.nn.KLDivLoss()(log_p, q))
    assert_close(kd_loss(student, teacher, reduction="elementwise_mean"), batchmean / 5)
    none = kd_loss(student, teacher, reduction="none")
    assert none.shape == (4,)
    assert_close(none.mean(), batchmean)


def test_kd_loss_does_not_detach_the_teacher() -> None:
    student, teacher = _logits(6).requires_grad_(), _logits(7).requires_grad_()
    grad_s, grad_t = torch.autograd.grad(kd_loss(student, teacher, 2.0), [student, teacher])
    assert grad_s.abs().sum() > 0 and grad_t.abs().sum() > 0


# ---- soft_hard_loss ----------------------------------------------------------------------------


def test_soft_hard_loss_reduces_to_its_parts() -> None:
    student, teacher = _logits(8), _logits(9)
    targets = torch.tensor([1, 0, 2, 4])
    ce = F.cross_entropy(student, targets)
    kd = kd_loss(student, teacher, 4.0)
    assert_close(soft_hard_loss(student, teacher, targets, 4.0, alpha=0.0), ce)
    assert_close(soft_hard_loss(student, teacher, targets, 4.0, alpha=1.0), kd)
    assert_close(soft_hard_loss(student, teacher, targets, 4.0, alpha=0.9), 0.9 * kd + 0.1 * ce)
    per_sample = soft_hard_loss(student, teacher, targets, 4.0, alpha=0.9, reduction="none")
    assert_close(per_sample.mean(), 0.9 * kd + 0.1 * ce)


# ---- mutual_kd ---------------------------------------------------------------------------------


def test_mutual_kd_values_and_gradients_stay_on_own_side() -> None:
    a, b = _logits(10).requires_grad_(), _logits(11).requires_grad_()
    loss_a, loss_b = mutual_kd(a, b, 2.0)
    assert_close(loss_a, kd_loss(a, b, 2.0))
    assert_close(loss_b, kd_loss(b, a, 2.0))
    grad_a, grad_b_from_a = torch.autograd.grad(loss_a, [a, b], allow_unused=True, retain_graph=True)
    grad_a_from_b, grad_b = torch.autograd.grad(loss_b, [a, b], allow_unused=True)
    assert grad_b_from_a is None and grad_a_from_b is None
    assert grad_a.abs().sum() > 0 and grad_b.abs().sum() > 0


@pfllib_kldiv
def test_mutual_kd_without_detach_matches_pfllib_summed_backward() -> None:
    a, b = _logits(12).requires_grad_(), _logits(13).requires_grad_()
    loss_a, loss_b = mutual_kd(a, b, reduction="elementwise_mean", detach=False)
    got = torch.autograd.grad(loss_a + loss_b, [a, b])
    kl = torch.nn.KLDivLoss()
    ref = kl(a.log_softmax(-1), b.softmax(-1)) + kl(b.log_softmax(-1), a.softmax(-1))
    for g, r in zip(got, torch.autograd.grad(ref, [a, b])):
        assert_close(g, r)


# ---- not_true_kd -------------------------------------------------------------------------------


def test_not_true_kd_hand_computed_three_classes() -> None:
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=D64)
    teacher = torch.tensor([[0.2, 3.0, -1.0], [1.0, 0.5, 2.0]], dtype=D64)
    targets = torch.tensor([1, 2])
    temperature = 2.0
    # Row 0 keeps classes (0, 2), row 1 keeps (0, 1).
    row0 = _kl(_softmax([0.2, -1.0], temperature), _softmax([1.0, 0.5], temperature))
    row1 = _kl(_softmax([1.0, 0.5], temperature), _softmax([0.0, -1.0], temperature))
    expected = torch.tensor(temperature**2 * (row0 + row1) / 2, dtype=D64)
    assert_close(not_true_kd(student, teacher, targets, temperature), expected)
    assert_close(not_true_kd(student, teacher, targets, temperature, scale_t2=False),
                 expected / temperature**2)


def test_not_true_kd_ignores_the_true_class_logit() -> None:
    student, teacher = _logits(14), _logits(15)
    targets = torch.tensor([2, 0, 4, 1])
    base = not_true_kd(student, teacher, targets, 3.0)
    rows = torch.arange(4)
    for logits in (student, teacher):
        logits[rows, targets] += torch.tensor([10.0, -7.0, 3.0, 100.0], dtype=D64)
        assert_close(not_true_kd(student, teacher, targets, 3.0), base)
    # ...and sends no gradient into it, while the plain KD would.
    student.requires_grad_()
    (grad,) = torch.autograd.grad(not_true_kd(student, teacher, targets, 3.0), [student])
    assert_close(grad[rows, targets], torch.zeros(4, dtype=D64))
    assert grad.abs().sum() > 0


# ---- soft_cross_entropy ------------------------------------------------------------------------


def test_soft_cross_entropy_matches_pytorch_probability_targets_and_masks() -> None:
    logits, raw_targets = _logits(16), _logits(17)  # PFLlib FedDistill feeds raw logits as targets
    assert_close(soft_cross_entropy(logits, raw_targets), F.cross_entropy(logits, raw_targets))
    mask = torch.tensor([True, False, True, False])
    per_row = -(raw_targets * logits.log_softmax(-1)).sum(-1)
    assert_close(soft_cross_entropy(logits, raw_targets, mask), (per_row[0] + per_row[2]) / 4)


# ---- feature_distance, gather_class_rows -------------------------------------------------------


def test_feature_distance_is_mse_over_batch_and_dims() -> None:
    features = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=D64)
    targets = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=D64)
    # Squared errors 1 + 4 + 1 + 4 = 10 over 4 elements.
    assert_close(feature_distance(features, targets), torch.tensor(2.5, dtype=D64))
    assert_close(feature_distance(features, targets), F.mse_loss(features, targets))
    assert_close(feature_distance(features, targets, reduction="none"), torch.tensor([2.5, 2.5], dtype=D64))


def test_feature_distance_masks_classes_without_prototype() -> None:
    prototypes = torch.tensor([[1.0, 1.0], [math.nan, math.nan], [0.0, 2.0]], dtype=D64)
    present = torch.tensor([True, False, True])
    labels = torch.tensor([0, 1, 2, 1])
    features = torch.tensor([[2.0, 1.0], [5.0, 5.0], [0.0, 0.0], [3.0, 3.0]], dtype=D64).requires_grad_()
    rows, mask = gather_class_rows(prototypes, present, labels)
    assert mask.tolist() == [True, False, True, False]
    loss = feature_distance(features, rows, mask)
    # Present rows: (1 + 0) and (0 + 4) squared errors; absent rows add 0 but count (B*D = 8), as in PFLlib.
    assert_close(loss, torch.tensor(5.0 / 8, dtype=D64))
    (grad,) = torch.autograd.grad(loss, [features])
    assert_close(grad[1], torch.zeros(2, dtype=D64))
    assert_close(grad[3], torch.zeros(2, dtype=D64))
    assert_close(grad[0], torch.tensor([2 * 1.0 / 8, 0.0], dtype=D64))


def test_feature_distance_all_masked_is_zero_and_keeps_graph() -> None:
    features = _logits(18).requires_grad_()
    loss = feature_distance(features, torch.full_like(features, math.nan), torch.zeros(4, dtype=torch.bool))
    assert_close(loss, torch.tensor(0.0, dtype=D64))
    assert loss.requires_grad
    loss.backward()
    assert features.grad is not None
    assert_close(features.grad, torch.zeros_like(features))


def test_gather_class_rows_fallback_for_absent_classes() -> None:
    table = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=D64)
    present = torch.tensor([True, False, True])
    own = torch.tensor([[9.0, 9.0], [8.0, 8.0]], dtype=D64)
    rows, mask = gather_class_rows(table, present, torch.tensor([1, 2]), fallback=own)
    assert mask.tolist() == [False, True]
    assert_close(rows, torch.tensor([[9.0, 9.0], [0.0, 1.0]], dtype=D64))


# ---- class_means, aggregate_class_means --------------------------------------------------------


def test_class_means_with_missing_class() -> None:
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [5.0, 6.0]], dtype=D64)
    labels = torch.tensor([0, 0, 3, 0])
    means, counts = class_means(values, labels, num_classes=4)
    assert counts.tolist() == [3, 0, 0, 1]
    assert_close(means, torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0], [10.0, 0.0]], dtype=D64))
    with pytest.raises(ValueError):
        class_means(values, labels, num_classes=3)


def test_aggregate_class_means_uniform_vs_count() -> None:
    # Three clients, classes 0..2; class 2 is held by nobody, class 1 only by client b.
    m_a = torch.tensor([[0.0], [0.0], [0.0]], dtype=D64)
    m_b = torch.tensor([[3.0], [7.0], [0.0]], dtype=D64)
    m_c = torch.tensor([[6.0], [math.nan], [0.0]], dtype=D64)  # absent rows are never read
    n_a, n_b, n_c = torch.tensor([1, 0, 0]), torch.tensor([1, 2, 0]), torch.tensor([2, 0, 0])
    uniform, counts = aggregate_class_means([m_a, m_b, m_c], [n_a, n_b, n_c], "uniform")
    assert_close(uniform, torch.tensor([[3.0], [7.0], [0.0]], dtype=D64))  # (0 + 3 + 6) / 3
    assert counts.tolist() == [4, 2, 0]
    weighted, _ = aggregate_class_means([m_a, m_b, m_c], [n_a, n_b, n_c], "count")
    assert_close(weighted, torch.tensor([[15.0 / 4], [7.0], [0.0]], dtype=D64))  # (0 + 3 + 12) / 4


def test_count_aggregation_of_batches_equals_overall_mean() -> None:
    values = _logits(19, rows=10, classes=3)
    labels = torch.tensor([0, 1, 1, 0, 2, 0, 1, 1, 0, 0])
    parts = [class_means(values[i:i + 4], labels[i:i + 4], 4) for i in (0, 4, 8)]
    merged, counts = aggregate_class_means([p[0] for p in parts], [p[1] for p in parts], "count")
    full, full_counts = class_means(values, labels, 4)
    assert_close(merged, full)
    assert torch.equal(counts, full_counts)


# ---- fedkd_losses ------------------------------------------------------------------------------


@pfllib_kldiv
def test_fedkd_losses_match_pfllib_formula_and_reach_all_inputs() -> None:
    z_t, z_s = _logits(20).requires_grad_(), _logits(21).requires_grad_()
    h_t, h_s = _logits(22, classes=6).requires_grad_(), _logits(23, classes=6).requires_grad_()
    y = torch.tensor([0, 1, 2, 3])
    out = fedkd_losses(z_t, z_s, y, h_t, h_s, reduction="elementwise_mean")
    kl = torch.nn.KLDivLoss()
    c_t, c_s = F.cross_entropy(z_t, y), F.cross_entropy(z_s, y)
    denom = c_t + c_s
    hidden = F.mse_loss(h_t, h_s) / denom
    assert_close(out.mentor, c_t + kl(z_t.log_softmax(-1), z_s.softmax(-1)) / denom + hidden)
    assert_close(out.mentee, c_s + kl(z_s.log_softmax(-1), z_t.softmax(-1)) / denom + hidden)
    # Adaptive weight: distillation terms times (c_t + c_s) give back the plain KL.
    assert_close(out.distill_mentee * denom, kd_loss(z_s, z_t, reduction="elementwise_mean"))
    grads = torch.autograd.grad(out.mentor + out.mentee, [z_t, z_s, h_t, h_s])
    assert all(g.abs().sum() > 0 for g in grads)


def test_fedkd_losses_without_hidden_states() -> None:
    z_t, z_s = _logits(24), _logits(25)
    y = torch.tensor([4, 3, 2, 1])
    out = fedkd_losses(z_t, z_s, y)
    assert_close(out.hidden, torch.tensor(0.0, dtype=D64))
    assert_close(out.mentor, out.ce_mentor + out.distill_mentor)
    with pytest.raises(ValueError):
        fedkd_losses(z_t, z_s, y, mentor_hidden=z_t)
