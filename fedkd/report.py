"""Run reports: summary.json, clients.csv, report.md/.html, run comparison and seed sweeps.

Benchmark protocol: the headline is the LAST evaluated round's example-weighted accuracy
(sum correct / sum samples over the clients evaluated in that round). The best round is
reported beside it, always labelled "best-of-evaluations": picking the max over rounds
selects on the test set, so it must never stand in for the headline.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich import box
from rich.table import Table

from fedkd import plots
from fedkd.render import Block, _fmt, to_html, to_markdown
from fedkd.rundir import UNFINISHED, resume_hint, run_status

HEADLINE = "last-round accuracy (example-weighted)"
BEST = "best-of-evaluations"
CLIENT_FIELDS = ["partition_id", "model", "num_train", "num_test", "accuracy", "loss", "last_evaluated_round",
                 "rounds_trained", "failures", "train_seconds", "bytes_sent", "bytes_received"]
FIGURES = {"accuracy_rounds.png": "Accuracy over rounds (spread across clients)",
           "client_accuracy.png": "Final per-client accuracy",
           "label_distribution.png": "Label distribution per client (train)"}


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records; unparsable lines (a run cut mid-write) are skipped."""
    out: list[dict] = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "phase" in rec and isinstance(rec.get("round"), int):
            out.append(rec)
    return out


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _config(run_dir: Path) -> dict:
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    except (OSError, OmegaConfBaseException, ValueError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _get(cfg: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        cfg = cfg.get(key) if isinstance(cfg, dict) else None
    return cfg


def error_line(err: str | None) -> str:
    """One line for a client's error: the exception line of a traceback, else its first line."""
    lines = [ln.strip() for ln in (err or "").splitlines() if ln.strip()]
    if not lines:
        return ""
    return lines[-1] if lines[0].startswith("Traceback (most recent call last)") else lines[0]


def round_stats(evals: Sequence[dict]) -> dict:
    """Accuracy stats over one round's ok evaluate records (one per client)."""
    acc = np.array([r["accuracy"] for r in evals], dtype=float)
    n = np.array([r.get("num_examples") or 0 for r in evals], dtype=float)
    weighted = float((acc * n).sum() / n.sum()) if n.sum() > 0 else float(acc.mean())
    worst = np.sort(acc)[: math.ceil(0.1 * len(acc))]
    return {"accuracy": weighted, "accuracy_unweighted": float(acc.mean()), "accuracy_std": float(acc.std()),
            "accuracy_worst10": float(worst.mean()), "min": float(acc.min()), "max": float(acc.max()),
            "clients": len(acc)}


def _ok_evals(records: Sequence[dict]) -> dict[int, dict[Any, dict]]:
    """round -> partition_id -> last ok evaluate record with an accuracy (retries overwrite)."""
    by_round: dict[int, dict[Any, dict]] = defaultdict(dict)
    for r in records:
        if r["phase"] == "evaluate" and r.get("status") == "ok" and r.get("accuracy") is not None:
            by_round[r["round"]][r.get("partition_id")] = r
    # in partition-id order, not arrival order: sums over clients (mean, std) then do not
    # depend on which Ray worker answered first
    return {rnd: dict(sorted(clients.items(), key=lambda kv: kv[0]))
            for rnd, clients in by_round.items()}


def client_model(run: dict, pid: Any) -> str | None:
    """The architecture run.json records for partition `pid` (None when it records none)."""
    models = run.get("client_models") or []
    return models[pid] if isinstance(pid, int) and pid < len(models) else None


def last_three(per_round: Sequence[dict]) -> float | None:
    """Headline 2 of the benchmark protocol: the mean of the last three evaluations' accuracy."""
    return statistics.fmean(p["accuracy"] for p in per_round[-3:]) if per_round else None


def second_model(spec: dict | None, evals: dict[int, dict[Any, dict]]) -> dict | None:
    """The method's second model (Ditto's global, FML's meme, ...), scored like the headline:
    example-weighted at the last evaluation and as the mean of the last three. `spec` is
    run.json's {"name", "metric"} (from `ClientAlgorithm.second_model`)."""
    if not spec:
        return None
    spec = {**spec, "metric": spec["metric"].replace("-", "_")}  # as the recorder writes metric names
    per_round = [{"round": rnd, **round_stats(recs)} for rnd in sorted(evals)
                 if (recs := [{**r, "accuracy": r[spec["metric"]]} for r in evals[rnd].values()
                              if r.get(spec["metric"]) is not None])]
    if not per_round:
        return None
    return {**spec, "accuracy": per_round[-1]["accuracy"], "accuracy_last3": last_three(per_round)}


def summarize(run_dir: Path) -> dict:
    """The content of summary.json (see module docstring for the headline protocol)."""
    run_dir = Path(run_dir)
    cfg, run = _config(run_dir), _json(run_dir / "run.json") or {}
    status = run_status(run_dir) if run else "unknown (no run.json)"
    partition = _json(run_dir / "partition.json") or {}
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = _ok_evals(records)
    per_round = [{"round": rnd, **round_stats(list(evals[rnd].values()))} for rnd in sorted(evals)]
    last = per_round[-1] if per_round else {}
    best = max(per_round, key=lambda p: p["accuracy"]) if per_round else {}  # ties: earliest round
    central = sorted((r for r in records if r["phase"] == "central"), key=lambda r: r["round"])
    failed = [r for r in records if r.get("status") == "failed"]
    round_secs = {r["round"]: r["seconds"] for r in records if r["phase"] == "round" and r.get("seconds") is not None}
    later = [s for rnd, s in sorted(round_secs.items()) if rnd >= 2] or list(round_secs.values())
    trained = [r for r in records if r["phase"] == "train" and r.get("status") == "ok"]
    last_evals = list(evals[last["round"]].values()) if last else []
    by_model: dict[str, list[dict]] = defaultdict(list)  # heterogeneous runs: the headline per architecture
    for r in last_evals:
        if (model := client_model(run, r.get("partition_id"))) is not None:
            by_model[model].append(r)
    # what a method logs beside its headline (Ditto's "global_accuracy", KD's "baseline_accuracy")
    standard = {"round", "phase", "partition_id", "status", "num_examples", "loss", "accuracy",
                "seconds", "bytes_received", "bytes_sent", "worker_pid", "error"}
    extra = sorted({k for r in last_evals for k, v in r.items()
                    if k not in standard and isinstance(v, (int, float)) and not isinstance(v, bool)})
    return {
        "experiment": _get(cfg, "experiment.name"), "method": _get(cfg, "method.name"),
        "strategy": _get(cfg, "strategy.name"), "dataset": _get(cfg, "data.dataset"),
        "seed": _get(cfg, "experiment.seed"),
        "num_clients": _get(cfg, "data.num_clients") or len(partition.get("clients", [])) or None,
        "rounds": _get(cfg, "train.rounds"),
        "rounds_completed": max(round_secs, default=max((r["round"] for r in records), default=0)),
        "last_round": last.get("round"), "accuracy": last.get("accuracy"),
        "accuracy_unweighted": last.get("accuracy_unweighted"), "accuracy_std": last.get("accuracy_std"),
        "accuracy_worst10": last.get("accuracy_worst10"), "clients_evaluated": last.get("clients"),
        "accuracy_last3": last_three(per_round), "last3_rounds": [p["round"] for p in per_round[-3:]],
        "second_model": second_model(run.get("second_model"), evals),
        "best_round": best.get("round"), "best_accuracy": best.get("accuracy"),
        "central_accuracy": central[-1]["accuracy"] if central else None,
        "per_model": ({m: round_stats(rs) for m, rs in sorted(by_model.items())} if len(by_model) > 1 else {}),
        "extra_metrics": {k: round_stats([{**r, "accuracy": r[k]} for r in last_evals
                                          if r.get(k) is not None])["accuracy"] for k in extra},
        "bytes_sent_per_client_round": (statistics.fmean(r.get("bytes_sent") or 0 for r in trained)
                                        if trained else None),
        "failures": len(failed),
        # validation: rounds that kept the previous global model, updates refused on their node
        "skipped_rounds": sorted({r["round"] for r in records if r.get("status") == "skipped"}),
        "rejected": sum(r.get("status") == "rejected" for r in records),
        "rejected_updates": [{"round": r["round"], "partition_id": r.get("partition_id"),
                              "reason": error_line(r.get("error"))}
                             for r in records if r.get("status") == "rejected"],
        "failed_clients": [{"round": r["round"], "phase": r["phase"], "partition_id": r.get("partition_id"),
                            "error": error_line(r.get("error"))} for r in failed],
        "seconds_per_round": statistics.median(later) if later else None,
        "wall_seconds": run.get("wall_seconds"), "status": status,
        "status_reason": run.get("status_reason"),
        "resume": resume_hint(run_dir) if status in UNFINISHED else None,
        "score": run.get("score", "accuracy"),
        "evaluated_model": run.get("evaluated_model"), "evaluated_when": run.get("evaluated_when"),
        "per_round": per_round,
        "central": [{"round": r["round"], "accuracy": r["accuracy"], "loss": r.get("loss")} for r in central],
    }


def client_rows(run_dir: Path) -> list[dict]:
    """Final per-client rows (clients.csv), sorted by partition id."""
    run_dir = Path(run_dir)
    counts = {c["partition_id"]: c for c in (_json(run_dir / "partition.json") or {}).get("clients", [])}
    run = _json(run_dir / "run.json") or {}
    by_pid: dict[Any, list[dict]] = defaultdict(list)
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if r["phase"] in ("train", "evaluate") and r.get("partition_id") is not None:
            by_pid[r["partition_id"]].append(r)
    rows = []
    for pid in sorted(set(counts) | set(by_pid)):
        recs = by_pid.get(pid, [])
        ok = [r for r in recs if r.get("status") == "ok"]
        evals = sorted((r for r in ok if r["phase"] == "evaluate" and r.get("accuracy") is not None),
                       key=lambda r: r["round"])
        last = evals[-1] if evals else {}
        rows.append({
            "partition_id": pid,
            "model": client_model(run, pid),
            "num_train": sum(counts[pid]["train"]) if pid in counts else None,
            "num_test": sum(counts[pid]["test"]) if pid in counts else None,
            "accuracy": last.get("accuracy"), "loss": last.get("loss"), "last_evaluated_round": last.get("round"),
            "rounds_trained": len({r["round"] for r in ok if r["phase"] == "train"}),
            "failures": sum(r.get("status") == "failed" for r in recs),
            "train_seconds": sum(r.get("seconds") or 0.0 for r in recs if r["phase"] == "train"),
            "bytes_sent": sum(r.get("bytes_sent") or 0 for r in recs),
            "bytes_received": sum(r.get("bytes_received") or 0 for r in recs),
        })
    return rows


def _headline_rows(s: dict) -> list[list[Any]]:
    k = math.ceil(0.1 * (s["clients_evaluated"] or 0))
    return [[f"{HEADLINE}, round {_fmt(s['last_round'])}", s["accuracy"]],
            ["unweighted mean across clients", s["accuracy_unweighted"]],
            ["std across clients (population)", s["accuracy_std"]],
            [f"worst-10% mean ({k} of {_fmt(s['clients_evaluated'])} clients)", s["accuracy_worst10"]],
            [f"{BEST} (round {_fmt(s['best_round'])}; not the headline)", s["best_accuracy"]],
            ["central accuracy (global model, global test set)", s["central_accuracy"]]]


def _report_blocks(s: dict, rows: list[dict], figures: list[str]) -> list[Block]:
    evaluated = f"{s['evaluated_model'] or 'unknown'} model, {s['evaluated_when'] or 'when: n/a'}"
    blocks: list[Block] = [
        ("h1", f"fedkd run report: {s['experiment'] or 'unnamed'}"),
        ("ul", [f"experiment: {s['experiment']} (seed {s['seed']})", f"method: {s['method']}",
                f"strategy: {s['strategy']}", f"dataset: {s['dataset']}", f"clients: {s['num_clients']}",
                f"rounds: {s['rounds_completed']} completed of {_fmt(s['rounds'])} (status: {s['status']})",
                f"evaluated: {evaluated}",
                f"time: {_fmt(s['seconds_per_round'], 2)} s/round (median), {_fmt(s['wall_seconds'], 1)} s wall"]),
        *([("p", f"Incomplete run: {s['resume']}.")] if s.get("resume") else []),
        *([("p", f"Status {s['status']}: {s['status_reason']}.")] if s.get("status_reason") else []),
        ("h2", "Results"), ("table", ["metric", "value"], _headline_rows(s)),
        ("p", f"The headline is the {HEADLINE} of the last evaluated round; the {BEST} figure selects a round "
              "on test data and is shown for reference only."),
        ("h2", f"Failed clients ({s['failures']})"),
    ]
    fails = s["failed_clients"]
    blocks.append(("table", ["round", "phase", "partition_id", "error"],
                   [[f["round"], f["phase"], f["partition_id"], f["error"]] for f in fails]) if fails
                  else ("p", "No failed client records."))
    if s.get("skipped_rounds") or s.get("rejected"):  # validation (fedkd.validation)
        blocks += [("h2", f"Skipped rounds ({len(s['skipped_rounds'])}) and rejected updates "
                          f"({s['rejected']})"),
                   ("p", "A rejected update failed validation on its node and was left out; a "
                         "skipped round had fewer valid updates than validation.min_clients and kept "
                         "the previous global model. Skipped rounds: "
                         f"{', '.join(map(str, s['skipped_rounds'])) or 'none'}.")]
        if s["rejected_updates"]:
            blocks.append(("table", ["round", "partition_id", "reason"],
                           [[u["round"], u["partition_id"], u["reason"]] for u in s["rejected_updates"]]))
    if s.get("per_model"):  # heterogeneous clients: is one architecture behind?
        blocks += [("h2", f"By architecture (round {_fmt(s['last_round'])})"),
                   ("table", ["model", "clients", "accuracy (example-weighted)", "unweighted mean", "min", "max"],
                    [[m, p["clients"], p["accuracy"], p["accuracy_unweighted"], p["min"], p["max"]]
                     for m, p in s["per_model"].items()])]
    blocks += [("h2", "Per-client results"), ("table", CLIENT_FIELDS, [[r[k] for k in CLIENT_FIELDS] for r in rows]),
               ("h2", "Figures"), *(("img", f, FIGURES[f]) for f in figures)]
    return blocks


def write_outputs(run_dir: Path) -> dict:
    """Write summary.json, clients.csv, figures, report.md and report.html; idempotent re-render."""
    run_dir = Path(run_dir)
    s, rows = summarize(run_dir), client_rows(run_dir)
    (run_dir / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    with open(run_dir / "clients.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CLIENT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    figures = []
    if s["per_round"]:
        figures.append(plots.accuracy_over_rounds(s["per_round"], s["central"], run_dir / "accuracy_rounds.png").name)
    if any(r["accuracy"] is not None for r in rows):
        figures.append(plots.client_accuracy(rows, run_dir / "client_accuracy.png").name)
    partition = _json(run_dir / "partition.json") or {}
    if partition.get("clients"):
        figures.append(plots.label_distribution(partition, run_dir / "label_distribution.png").name)
    blocks = _report_blocks(s, rows, figures)
    (run_dir / "report.md").write_text(to_markdown(blocks))
    (run_dir / "report.html").write_text(to_html(blocks, run_dir, f"fedkd report: {s['experiment']}"))
    return s


def client_table(run_dir: Path) -> Table:
    """Final per-client results for the terminal (failing clients in red); short headers fit 80 columns."""
    heads = ["id", "model", "train", "test", "acc", "loss", "round", "trained", "fails", "sec", "MB sent", "MB recv"]
    table = Table(title=f"Per-client results: {Path(run_dir).name}", box=box.SIMPLE_HEAD, pad_edge=False,
                  padding=(0, 1, 0, 0))
    for head in heads:
        table.add_column(head, justify="right")
    for r in client_rows(run_dir):
        r = r | {"bytes_sent": r["bytes_sent"] / 1e6, "bytes_received": r["bytes_received"] / 1e6}
        table.add_row(*(_fmt(r[k], 2 if k.startswith(("bytes", "train_s")) else 3) for k in CLIENT_FIELDS),
                      style="red" if r["failures"] else None)
    return table


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    names = [Path(d).name for d in run_dirs]
    return names if len(set(names)) == len(names) else [f"{Path(d).parent.name}/{Path(d).name}" for d in run_dirs]


def compare(run_dirs: list[Path], out_dir: Path | None = None) -> str:
    """Side-by-side table (one column per run) + compare.png/.md/.html in out_dir; returns the table."""
    run_dirs = [Path(d) for d in run_dirs]
    sums, labels = [summarize(d) for d in run_dirs], _labels(run_dirs)
    if out_dir is None:
        try:
            out_dir = Path(os.path.commonpath([d.resolve().parent for d in run_dirs]))
        except ValueError:
            out_dir = Path.cwd()
        out_dir = out_dir if len(out_dir.parts) > 1 else Path.cwd()
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: list[tuple[str, Any]] = [
        ("experiment / method / strategy", lambda s: " / ".join(_fmt(s[k]) for k in ("experiment", "method", "strategy"))),
        ("dataset, clients, seed", lambda s: ", ".join(_fmt(s[k]) for k in ("dataset", "num_clients", "seed"))),
        ("evaluated", lambda s: f"{_fmt(s['evaluated_model'])} ({_fmt(s['evaluated_when'])})"),
        (f"{HEADLINE}", lambda s: f"{_fmt(s['accuracy'])} (round {_fmt(s['last_round'])})"),
        ("unweighted mean", lambda s: _fmt(s["accuracy_unweighted"])),
        ("std across clients", lambda s: _fmt(s["accuracy_std"])),
        ("worst-10% mean", lambda s: _fmt(s["accuracy_worst10"])),
        (BEST, lambda s: f"{_fmt(s['best_accuracy'])} (round {_fmt(s['best_round'])})"),
        ("central accuracy", lambda s: _fmt(s["central_accuracy"])),
        ("s/round (median)", lambda s: _fmt(s["seconds_per_round"], 2)),
        ("failures", lambda s: s["failures"]),
    ]
    table: Block = ("table", ["metric", *labels], [[name, *(fn(s) for s in sums)] for name, fn in metrics])
    plots.compare_accuracy(list(zip(labels, (s["per_round"] for s in sums))), out_dir / "compare.png")
    blocks: list[Block] = [("h1", "fedkd run comparison"), table, ("img", "compare.png", "Accuracy over rounds")]
    (out_dir / "compare.md").write_text(to_markdown(blocks))
    (out_dir / "compare.html").write_text(to_html(blocks, out_dir, "fedkd run comparison"))
    return to_markdown([table])
