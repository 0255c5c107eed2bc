"""Matplotlib figures for run reports.

Figures are built with `matplotlib.figure.Figure` directly (Agg canvas), not pyplot:
no global figure state and no display needed, so reports render on headless servers
and inside Ray workers without touching the caller's backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _new(width: float = 7.0, height: float = 4.0) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path) -> Path:
    for ax in fig.axes:
        if ax.get_xlabel() == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(path, dpi=110)
    return path


def accuracy_over_rounds(per_round: Sequence[dict], central: Sequence[dict], path: Path) -> Path:
    """Mean client accuracy per round with min–max and ±std bands (+ weighted and central lines)."""
    fig, ax = _new()
    r = np.array([p["round"] for p in per_round])
    mean = np.array([p["accuracy_unweighted"] for p in per_round])
    std = np.array([p["accuracy_std"] for p in per_round])
    ax.fill_between(r, [p["min"] for p in per_round], [p["max"] for p in per_round],
                    alpha=0.15, color="C0", label="min–max across clients")
    ax.fill_between(r, mean - std, mean + std, alpha=0.3, color="C0", label="±1 std across clients")
    ax.plot(r, mean, "o-", color="C0", label="mean across clients (unweighted)")
    ax.plot(r, [p["accuracy"] for p in per_round], "s--", color="C2", label="example-weighted")
    if central:
        ax.plot([c["round"] for c in central], [c["accuracy"] for c in central], "^-", color="C3",
                label="central (global model, global test set)")
    ax.set(xlabel="round", ylabel="accuracy", title="Accuracy over rounds")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def client_accuracy(rows: Sequence[dict], path: Path) -> Path:
    """Final accuracy per partition id: shows who the model fails, which a mean hides."""
    rows = [r for r in rows if r.get("accuracy") is not None]
    fig, ax = _new(max(5.0, 0.25 * len(rows) + 2), 3.5)
    ax.bar([str(r["partition_id"]) for r in rows], [r["accuracy"] for r in rows], color="C0")
    ax.set(xlabel="partition id", ylabel="accuracy", title="Final per-client accuracy", ylim=(0, 1.0))
    if len(rows) > 30:
        ax.tick_params(axis="x", labelsize=6, labelrotation=90)
    return _save(fig, path)


def label_distribution(partition: dict, path: Path) -> Path:
    """Stacked train counts per class per client: makes the non-IID split visible."""
    clients = sorted(partition.get("clients", []), key=lambda c: c["partition_id"])
    counts = np.array([c["train"] for c in clients], dtype=float).reshape(len(clients), -1)
    n_classes = counts.shape[1]
    fig, ax = _new(max(5.0, 0.25 * len(clients) + 2), 4.0)
    ids = [str(c["partition_id"]) for c in clients]
    qualitative = "tab10" if n_classes <= 10 else "tab20" if n_classes <= 20 else None
    cmap = colormaps[qualitative or "viridis"]
    bottom = np.zeros(len(clients))
    for k in range(n_classes):
        color = cmap(k) if qualitative else cmap(k / max(1, n_classes - 1))
        ax.bar(ids, counts[:, k], bottom=bottom, color=color, label=str(k))
        bottom += counts[:, k]
    ax.set(xlabel="partition id", ylabel="train examples", title="Label distribution per client")
    if n_classes <= 20:
        ax.legend(title="class", fontsize="x-small", ncols=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if len(clients) > 30:
        ax.tick_params(axis="x", labelsize=6, labelrotation=90)
    return _save(fig, path)


def compare_accuracy(series: Sequence[tuple[str, Sequence[dict]]], path: Path) -> Path:
    """Example-weighted accuracy per round, one line per run, ±std-across-clients band."""
    fig, ax = _new()
    for i, (label, per_round) in enumerate(series):
        if not per_round:
            continue
        r = np.array([p["round"] for p in per_round])
        acc = np.array([p["accuracy"] for p in per_round])
        std = np.array([p["accuracy_std"] for p in per_round])
        ax.plot(r, acc, "o-", color=f"C{i % 10}", label=label)
        ax.fill_between(r, acc - std, acc + std, color=f"C{i % 10}", alpha=0.2)
    ax.set(xlabel="round", ylabel="accuracy (example-weighted)",
           title="Accuracy over rounds (band: ±1 std across clients)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)
