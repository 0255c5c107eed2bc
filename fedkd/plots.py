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


#: above this many clients per-client figures become distributions (one bar per client stops reading)
MANY_CLIENTS = 200
#: clients drawn (seeded) for the label heat-map of a large population
HEATMAP_SAMPLE = 100


def _padded(lo: float, hi: float) -> tuple[float, float]:
    """Axis limits around the data's range (not from 0: a 0.85-0.99 spread must stay visible)."""
    pad = max(0.02, 0.08 * (hi - lo))
    return max(0.0, lo - pad), (min(1.0, hi + pad) if hi <= 1.0 else hi + pad)


def client_accuracy(rows: Sequence[dict], path: Path, headline: float | None = None,
                    mean: float | None = None) -> Path:
    """Final accuracy per client: who the model fails, which a mean hides. A dot per client
    (failed ones as red crosses) up to MANY_CLIENTS, else histogram and ECDF; the headline
    (example-weighted) and the unweighted mean are marked."""
    rows = [r for r in rows if r.get("accuracy") is not None]
    acc = np.array([r["accuracy"] for r in rows], dtype=float)
    lo, hi = _padded(float(acc.min()), float(acc.max()))
    marks = [(v, style, label) for v, style, label in
             ((headline, "-", "headline (example-weighted)"), (mean, ":", "unweighted mean"))
             if v is not None]
    if len(rows) > MANY_CLIENTS:
        fig = Figure(figsize=(8.0, 3.6), layout="constrained")
        FigureCanvasAgg(fig)
        hist, ecdf = fig.subplots(1, 2)
        hist.hist(acc, bins=min(40, max(10, len(acc) // 20)), range=(lo, hi), color="C0", alpha=0.8)
        hist.set(xlabel="final accuracy", ylabel="clients", title=f"Per-client accuracy ({len(acc)} clients)")
        ecdf.ecdf(acc, color="C0")
        ecdf.set(xlabel="final accuracy", ylabel="fraction of clients at or below", xlim=(lo, hi),
                 title="ECDF")
        for ax in (hist, ecdf):
            for v, style, label in marks:
                ax.axvline(v, color="C3", linestyle=style, label=label)
            ax.grid(alpha=0.3)
        ecdf.legend(fontsize="small", loc="upper left")
        return _save(fig, path)
    fig, ax = _new(min(10.0, max(6.0, 0.12 * len(rows) + 4)), 4.0)
    ids = np.array([r["partition_id"] for r in rows])
    failed = np.array([bool(r.get("failures")) for r in rows])
    ax.vlines(ids, lo, acc, color="C0", alpha=0.25, linewidth=1)
    ax.plot(ids[~failed], acc[~failed], "o", color="C0", label="client")
    if failed.any():
        ax.plot(ids[failed], acc[failed], "X", color="C3", markersize=8, label="client with a failed call")
    for v, style, label in marks:
        ax.axhline(v, color="C3" if style == "-" else "0.3", linestyle=style, label=f"{label} {v:.3f}")
    ax.set(xlabel="partition id", ylabel="final accuracy", ylim=(lo, hi),
           title=f"Final per-client accuracy ({len(rows)} clients)")
    if len(rows) <= 30:
        ax.set_xticks(ids)
    fig.legend(fontsize="small", loc="outside lower center", ncols=2)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _class_colors(n_classes: int) -> list:
    qualitative = "tab10" if n_classes <= 10 else "tab20" if n_classes <= 20 else None
    cmap = colormaps[qualitative or "viridis"]
    return [cmap(k) if qualitative else cmap(k / max(1, n_classes - 1)) for k in range(n_classes)]


def label_distribution(partition: dict, path: Path, seed: int = 0) -> Path:
    """Train examples per class per client: makes the non-IID split visible. Stacked bars up to
    MANY_CLIENTS; above, a heat-map of class shares over a seeded sample of clients."""
    clients = sorted(partition.get("clients", []), key=lambda c: c["partition_id"])
    counts = np.array([c["train"] for c in clients], dtype=float).reshape(len(clients), -1)
    n_classes = counts.shape[1]
    if len(clients) > MANY_CLIENTS:
        pick = np.sort(np.random.default_rng(seed).choice(len(clients), HEATMAP_SAMPLE, replace=False))
        share = counts[pick] / np.maximum(counts[pick].sum(axis=1, keepdims=True), 1)
        fig, ax = _new(8.0, 3.2 + 0.08 * n_classes)
        image = ax.imshow(share.T, aspect="auto", cmap="viridis", interpolation="nearest",
                          extent=(-0.5, len(pick) - 0.5, n_classes - 0.5, -0.5))
        fig.colorbar(image, ax=ax, label="share of the client's train examples")
        ax.set(xlabel=f"client ({len(pick)} of {len(clients)}, seeded sample, by partition id)",
               ylabel="class", title="Label distribution (share per class)")
        if n_classes <= 20:
            ax.set_yticks(range(n_classes))
        return _save(fig, path)
    fig, ax = _new(min(10.0, max(6.0, 0.12 * len(clients) + 4)), 4.0)
    ids = np.array([c["partition_id"] for c in clients])
    bottom = np.zeros(len(clients))
    for k, color in enumerate(_class_colors(n_classes)):
        ax.bar(ids, counts[:, k], bottom=bottom, color=color, label=str(k), width=0.85)
        bottom += counts[:, k]
    ax.set(xlabel="partition id", ylabel="train examples", title="Label distribution per client")
    if len(clients) <= 30:
        ax.set_xticks(ids)
    if n_classes <= 20:
        ax.legend(title="class", fontsize="x-small", ncols=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
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


def compare_clients(series: Sequence[tuple[str, Sequence[float]]], path: Path) -> Path:
    """Final per-client accuracy per run side by side: a box with every client as a dot, so two
    runs with the same headline but different spreads read differently."""
    fig, ax = _new(max(5.0, 1.6 * len(series) + 2), 4.0)
    data = [np.asarray(acc, dtype=float) for _, acc in series]
    shown = [i for i, d in enumerate(data) if d.size]
    if shown:
        ax.boxplot([data[i] for i in shown], positions=shown, widths=0.5, showfliers=False)
        jitter = np.random.default_rng(0)
        for i in shown:
            x = i + jitter.uniform(-0.15, 0.15, data[i].size)
            ax.plot(x, data[i], "o", color=f"C{i % 10}", alpha=0.5, markersize=3)
        everything = np.concatenate([data[i] for i in shown])
        ax.set_ylim(*_padded(float(everything.min()), float(everything.max())))
    ax.set_xticks(range(len(series)), [label for label, _ in series],
                  rotation=20 if len(series) > 3 else 0, ha="right" if len(series) > 3 else "center")
    ax.set(ylabel="final accuracy per client", title="Per-client accuracy, last evaluated round")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
