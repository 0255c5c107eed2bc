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
import statistics
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedkd.render import Failure, to_html, to_markdown  # noqa: F401 (fedkd.sweep imports to_markdown from here)
from fedkd.rundir import UNFINISHED, resume_hint, run_status

if TYPE_CHECKING:
    from rich.table import Table

HEADLINE = "last-round accuracy (example-weighted)"
BEST = "best-of-evaluations"
CLIENT_FIELDS = ["partition_id", "model", "num_train", "num_test", "accuracy", "loss", "last_evaluated_round",
                 "rounds_trained", "failures", "train_seconds", "bytes_sent", "bytes_received"]


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
    """One line for a client's error: the exception's type and message when the text holds a
    traceback (after any header such as 'client 3 (round 2, train):'), else its first line."""
    lines = [ln.rstrip() for ln in (err or "").splitlines() if ln.strip()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")]
    if starts:  # the last traceback of a chain; its first unindented line is the exception
        tail = [ln for ln in lines[starts[-1] + 1:] if not ln.startswith((" ", "\t"))]
        if tail:
            return tail[0].strip()
    return lines[0].strip() if lines else ""


def round_stats(evals: Sequence[dict]) -> dict:
    """Accuracy stats over one round's ok evaluate records (one per client)."""
    acc = np.array([r["accuracy"] for r in evals], dtype=float)
    n = np.array([r.get("num_examples") or 0 for r in evals], dtype=float)
    weighted = float((acc * n).sum() / n.sum()) if n.sum() > 0 else float(acc.mean())
    worst = np.sort(acc)[: math.ceil(0.1 * len(acc))]
    return {"accuracy": weighted, "accuracy_unweighted": float(acc.mean()), "accuracy_std": float(acc.std()),
            "accuracy_worst10": float(worst.mean()), "min": float(acc.min()), "max": float(acc.max()),
            "clients": len(acc)}


def ok_evals(records: Sequence[dict]) -> dict[int, dict[Any, dict]]:
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
    """The architecture run.json records for partition `pid` (None when it records none).
    run.json keeps the cycle of architectures (client k gets models[k % len]), not one entry per
    client; older run.json files list every client, which the same rule reads unchanged."""
    models = run.get("client_models") or []
    return models[pid % len(models)] if isinstance(pid, int) and pid >= 0 and models else None


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


def per_factor(partition: dict, evals: Sequence[dict]) -> dict[str, dict]:
    """The headline per resolution factor (`data.transform`, recorded in partition.json)."""
    factors = {c.get("partition_id"): c["resolution_factor"] for c in partition.get("clients", [])
               if "resolution_factor" in c}
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in evals:
        if r.get("partition_id") in factors:
            groups[f"x{factors[r['partition_id']]}"].append(r)
    return {f: round_stats(rs) for f, rs in sorted(groups.items(), key=lambda kv: int(kv[0][1:]))}


def before_after_gains(trained: Sequence[dict]) -> dict[str, float]:
    """Mean over clients and rounds of `post_X` − `pre_X` for each pair a method logs while
    training (a client's "pre-X" metric, as the recorder writes it), as "post_minus_pre_X":
    PSE's excitation diagnostic (pse.md §c.4b; a clearly negative value means the step damages
    the model the personalized epoch must repair)."""
    diffs: dict[str, list[float]] = defaultdict(list)
    for r in trained:
        for k, pre in r.items():
            name = k.removeprefix("pre_")
            post = r.get(f"post_{name}")
            if k.startswith("pre_") and _number(pre) and _number(post):
                diffs[f"post_minus_pre_{name}"].append(post - pre)
    return {k: statistics.fmean(v) for k, v in sorted(diffs.items())}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def machine_load(rounds: Sequence[dict]) -> dict | None:
    """The median 1-minute load average at the end of rounds 2..R (all rounds if fewer), the CPU
    count and whether the run was loaded: a median above CPUs + 1, more than the run's own actors
    and driver account for, so other work competed and its s/round is not a timing figure
    (benchmark protocol v2, "Time"); the timing basis of most of those rounds and the machine's
    median speed probe (`fedkd.recorder.speed_probe_ms`; None before rounds recorded it). None
    for records without the load (older runs)."""
    loads = [r for r in rounds if r.get("load") is not None]
    later = [r for r in loads if r["round"] >= 2] or loads
    if not later:
        return None
    median, cpus = statistics.median(r["load"] for r in later), max(r.get("cpus") or 1 for r in later)
    probes = [r["probe_ms"] for r in later if r.get("probe_ms")]
    return {"median_load": median, "cpus": cpus, "loaded": median > cpus + 1,
            "timing": statistics.median_low(r.get("timing") or 1 for r in later),
            "probe_ms": statistics.median(probes) if probes else None}


#: two runs' s/round are divided by each other only when their machines' probes are within this factor
PROBE_TOLERANCE = 1.25


def comparable_timings(a: dict, b: dict) -> bool:
    """Whether two summaries' s/round may be divided by each other: the same timing basis, and
    machines of the same speed (probes within PROBE_TOLERANCE of each other; two runs without a
    probe, recorded before it existed, are taken as comparable, as they were before)."""
    if timing_basis(a) != timing_basis(b):
        return False
    pa, pb = ((s.get("machine_load") or {}).get("probe_ms") for s in (a, b))
    if pa is None or pb is None:
        return pa is None and pb is None
    return max(pa, pb) / min(pa, pb) <= PROBE_TOLERANCE


def timing_basis(summary: dict) -> int:
    """The timing basis most of a summary's rounds were measured under (`fedkd.recorder.TIMING_BASIS`;
    1 for rounds recorded before it existed): s/round figures compare only within one basis."""
    return (summary.get("machine_load") or {}).get("timing") or 1


def resumed_note(summary: dict) -> str:
    """'resumed after round 30' ('30, 45' for two resumes), or '' for a run never resumed."""
    rounds = summary.get("resumed_after_rounds")
    return f"resumed after round {', '.join(map(str, rounds))}" if rounds else ""


def was_loaded(summary: dict) -> bool:
    """Whether a summary's rounds shared the machine (`machine_load`); False when not recorded."""
    return bool((summary.get("machine_load") or {}).get("loaded"))


def summarize(run_dir: Path, records: Sequence[dict] | None = None) -> dict:
    """The content of summary.json (see module docstring for the headline protocol);
    `records`: metrics.jsonl already read (`write_outputs` reads it once)."""
    run_dir = Path(run_dir)
    cfg, run = _config(run_dir), _json(run_dir / "run.json") or {}
    status = run_status(run_dir) if run else "unknown (no run.json)"
    partition = _json(run_dir / "partition.json") or {}
    if records is None:
        records = read_metrics(run_dir / "metrics.jsonl")
    evals = ok_evals(records)
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
    extra = sorted({k for r in last_evals for k, v in r.items() if k not in standard and _number(v)})
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
        "per_factor": per_factor(partition, last_evals),
        "extra_metrics": {k: round_stats([{**r, "accuracy": r[k]} for r in last_evals
                                          if r.get(k) is not None])["accuracy"] for k in extra}
        | before_after_gains(trained),
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
        "machine_load": machine_load([r for r in records if r["phase"] == "round"]),
        "wall_seconds": run.get("wall_seconds"),
        "resumed_after_rounds": run.get("resumed_after_rounds") or [], "status": status,
        "status_reason": run.get("status_reason"),
        "resume": resume_hint(run_dir) if status in UNFINISHED else None,
        "score": run.get("score", "accuracy"),
        "evaluated_model": run.get("evaluated_model"), "evaluated_when": run.get("evaluated_when"),
        "per_round": per_round,
        "central": [{"round": r["round"], "accuracy": r["accuracy"], "loss": r.get("loss")} for r in central],
    }


def client_rows(run_dir: Path, records: Sequence[dict] | None = None) -> list[dict]:
    """Final per-client rows (clients.csv), sorted by partition id (`records` as in `summarize`)."""
    run_dir = Path(run_dir)
    counts = {c["partition_id"]: c for c in (_json(run_dir / "partition.json") or {}).get("clients", [])}
    run = _json(run_dir / "run.json") or {}
    by_pid: dict[Any, list[dict]] = defaultdict(list)
    if records is None:
        records = read_metrics(run_dir / "metrics.jsonl")
    for r in records:
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


def write_outputs(run_dir: Path, records: Sequence[dict] | None = None) -> dict:
    """Write summary.json, clients.csv, figures, report.md and report.html; idempotent re-render.
    `records`: metrics.jsonl when the caller has read it already (a large run's file is read once)."""
    from fedkd import plots  # matplotlib: loaded only when a report is rendered
    from fedkd.report_page import captions as figure_captions, page

    run_dir = Path(run_dir)
    if records is None:
        records = read_metrics(run_dir / "metrics.jsonl")
    s, rows = summarize(run_dir, records), client_rows(run_dir, records)
    (run_dir / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    with open(run_dir / "clients.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CLIENT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    partition, cfg = _json(run_dir / "partition.json") or {}, _config(run_dir)
    captions = figure_captions(s, rows, partition, cfg)
    if s["per_round"]:
        plots.accuracy_over_rounds(s["per_round"], s["central"], run_dir / "accuracy_rounds.png")
    if "client_accuracy.png" in captions:
        plots.client_accuracy(rows, run_dir / "client_accuracy.png", s["accuracy"], s["accuracy_unweighted"])
    if partition.get("clients"):
        plots.label_distribution(partition, run_dir / "label_distribution.png", s["seed"] or 0)
    blocks = page(s, rows, captions, failures(records))
    (run_dir / "report.md").write_text(to_markdown(blocks))
    (run_dir / "report.html").write_text(to_html(blocks, run_dir, f"fedkd report: {s['experiment']}"))
    return s


def failures(records: Sequence[dict]) -> list[Failure]:
    """Every failed client call, with its exception line and full traceback."""
    return [Failure(r["round"], r["phase"], r.get("partition_id"), error_line(r.get("error")),
                    (r.get("error") or "").strip())
            for r in records if r.get("status") == "failed"]


def client_table(run_dir: Path) -> "Table":
    """Final per-client results for the terminal (see `fedkd.report_page.terminal_table`)."""
    from fedkd.report_page import terminal_table

    return terminal_table(client_rows(run_dir), Path(run_dir).name)
