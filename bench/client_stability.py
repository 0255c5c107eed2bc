"""How much each client's accuracy moves from one evaluation to the next, per run label.

A personalized model that the method keeps disturbing (PSE's excitation, pse.md k) shows it as
clients whose accuracy swings between evaluations while the example-weighted mean, which averages
the swings away, barely moves. Two figures per label, over every client of every seed present:
the mean absolute change of a client's accuracy between consecutive evaluations (from the
second evaluation on), and the mean over clients of their largest drop in the second half of the
run. Reads the metrics.jsonl of each finished run (a run directory beside its seed<k>.json).

    .venv/bin/python bench/client_stability.py cifar10-long local-cnn pse-cnn-amax0.2 ...
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from fedkd.render import to_markdown
from fedkd.report import ok_evals, read_metrics

RESULTS = Path(__file__).resolve().parent / "results"


def client_curves(run_dir: Path) -> dict[object, dict[int, float]]:
    """partition id -> {evaluation round: accuracy}."""
    curves: dict[object, dict[int, float]] = {}
    for rnd, clients in ok_evals(read_metrics(run_dir / "metrics.jsonl")).items():
        for pid, rec in clients.items():
            curves.setdefault(pid, {})[rnd] = rec["accuracy"]
    return curves


def stability(run_dirs: list[Path]) -> tuple[float, float] | None:
    """(mean |Δ accuracy| between consecutive evaluations after the first, mean largest drop in
    the second half), in accuracy points, over every client of every run; None without runs."""
    swings, drops = [], []
    for run_dir in run_dirs:
        for curve in client_curves(run_dir).values():
            rounds = sorted(curve)
            steps = list(zip(rounds[1:], rounds[2:]))  # from the second evaluation on
            half = rounds[-1] / 2
            if steps:
                swings.append(statistics.fmean(abs(curve[b] - curve[a]) for a, b in steps))
                drops.append(max([curve[a] - curve[b] for a, b in steps if a >= half] or [0.0]))
    return (100 * statistics.fmean(swings), 100 * statistics.fmean(drops)) if swings else None


def table(setting: str, labels: list[str]) -> str:
    body = []
    for label in labels:
        runs = sorted(p for p in (RESULTS / setting / label).glob("seed*")  # finished runs only
                      if p.is_dir() and p.with_suffix(".json").is_file())
        figures = stability(runs)
        body.append([label, len(runs), *(f"{x:.2f}" for x in figures)] if figures else [label, 0, "n/a", "n/a"])
    return to_markdown([("table", ["run", "seeds", "mean |Δ| between evaluations (points)",
                                   "largest drop, second half (points)"], body)])


if __name__ == "__main__":
    print(table(sys.argv[1], sys.argv[2:]))
