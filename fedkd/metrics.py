"""Evaluation metrics beyond accuracy that several methods report (calibration, agreement)."""

from __future__ import annotations

import torch
from torch import Tensor


def expected_calibration_error(logits: Tensor, targets: Tensor, bins: int = 15) -> float:
    """ECE: |accuracy - confidence| averaged over equal-width confidence bins, weighted by size."""
    probs = logits.softmax(-1)
    confidence, predicted = probs.max(-1)
    correct = (predicted == targets).float()
    edges = torch.linspace(0, 1, bins + 1, device=logits.device)
    ece = torch.zeros((), device=logits.device)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.float().mean() * (correct[inside].mean() - confidence[inside].mean()).abs()
    return float(ece)


def agreement(logits_a: Tensor, logits_b: Tensor) -> float:
    """Fraction of samples on which two models predict the same class."""
    return float((logits_a.argmax(-1) == logits_b.argmax(-1)).float().mean())
