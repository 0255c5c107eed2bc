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
from typing import Any, Sequence

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich import box
from rich.table import Table

from fedkd import plots
from fedkd.render import Block, Failure, TableOptions, _fmt, human_bytes, to_html, to_markdown
from fedkd.rundir import UNFINISHED, resume_hint, run_status

HEADLINE = "last-round accuracy (example-weighted)"
BEST = "best-of-evaluations"
CLIENT_FIELDS = ["partition_id", "model", "num_train", "num_test", "accuracy", "loss", "last_evaluated_round",
                 "rounds_trained", "failures", "train_seconds", "bytes_sent", "bytes_received"]
#: above this many clients the tables show a summary and the SHOWN worst and best clients
MANY_CLIENTS = plots.MANY_CLIENTS
SHOWN = 20
#: failed calls listed with their traceback in a report (the rest: count and metrics.jsonl)
FAILURES_SHOWN = 50


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
        "per_factor": per_factor(partition, last_evals),
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


def failures(records: Sequence[dict]) -> list[Failure]:
    """Every failed client call, with its exception line and full traceback."""
    return [Failure(r["round"], r["phase"], r.get("partition_id"), error_line(r.get("error")),
                    (r.get("error") or "").strip())
            for r in records if r.get("status") == "failed"]


def _quantiles(values: Sequence[float]) -> list[float]:
    return [float(q) for q in np.quantile(np.asarray(values, dtype=float), [0.0, 0.1, 0.5, 0.9, 1.0])]


def worst_and_best(rows: Sequence[dict], k: int = SHOWN) -> tuple[list[dict], list[dict]]:
    """The k lowest and k highest final accuracies (ties: lower partition id first)."""
    ranked = sorted((r for r in rows if r["accuracy"] is not None),
                    key=lambda r: (r["accuracy"], r["partition_id"]))
    return ranked[:k], sorted(ranked[-k:], key=lambda r: (-r["accuracy"], r["partition_id"]))


def _client_columns(rows: Sequence[dict]) -> tuple[list[str], list[str]]:
    """Result and cost columns (clients.csv keys); model only when clients differ in it."""
    multi = len({r["model"] for r in rows}) > 1
    return (["partition_id", *(["model"] if multi else []), "num_train", "num_test", "accuracy", "loss",
             "last_evaluated_round", "rounds_trained", "failures"],
            ["partition_id", "train_seconds", "bytes_sent", "bytes_received"])


HEADS = {"partition_id": "client", "model": "model", "num_train": "train", "num_test": "test",
         "accuracy": "accuracy", "loss": "loss", "last_evaluated_round": "round",
         "rounds_trained": "trained", "failures": "fails", "train_seconds": "train s",
         "bytes_sent": "sent", "bytes_received": "received"}


def _cell(row: dict, key: str) -> Any:
    value = row[key]
    if key.startswith("bytes_"):
        return human_bytes(value)
    if key == "train_seconds":
        return _fmt(value, 2)
    return value


def _client_table(rows: Sequence[dict], keys: Sequence[str], note: str = "") -> Block:
    options = TableOptions(highlight=frozenset(i for i, r in enumerate(rows) if r["failures"]), note=note,
                           left=2 if "model" in keys else 1)
    return ("table", [HEADS[k] for k in keys], [[_cell(r, k) for k in keys] for r in rows], options)


def _client_blocks(rows: list[dict]) -> list[Block]:
    """Per-client tables: every client up to MANY_CLIENTS, else a summary and the 20 worst and
    20 best (clients.csv always holds them all)."""
    results, cost = _client_columns(rows)
    failed_note = "Clients with a failed call are highlighted in report.html (see Failed clients)."
    if len(rows) <= MANY_CLIENTS:
        fails = any(r["failures"] for r in rows)
        return [("h2", "Per-client results"), _client_table(rows, results, failed_note if fails else ""),
                ("p", "Per-client cost: local training time summed over rounds, and bytes sent and "
                      "received over the whole run."), _client_table(rows, cost)]
    accs = [r["accuracy"] for r in rows if r["accuracy"] is not None]
    q = _quantiles(accs) if accs else [None] * 5
    worst, best = worst_and_best(rows)
    summary = [["clients", len(rows)], ["clients with a final accuracy", len(accs)],
               ["clients with a failed call", sum(bool(r["failures"]) for r in rows)],
               ["accuracy min / p10 / median", " / ".join(_fmt(v) for v in q[:3])],
               ["accuracy p90 / max", " / ".join(_fmt(v) for v in q[3:])],
               ["train s per client (median)", _fmt(float(np.median([r["train_seconds"] for r in rows])), 2)],
               ["bytes sent per client (median)", human_bytes(float(np.median([r["bytes_sent"] for r in rows])))]]
    return [("h2", f"Per-client results ({len(rows)} clients: summary, {SHOWN} worst, {SHOWN} best)"),
            ("table", ["per-client", "value"], summary),
            ("p", f"Every client's row is in clients.csv; above {MANY_CLIENTS} clients the report "
                  f"lists the {SHOWN} lowest and {SHOWN} highest final accuracies."),
            ("h2", f"{SHOWN} worst clients"), _client_table(worst, results),
            ("h2", f"{SHOWN} best clients"), _client_table(best, results)]


def _captions(s: dict, rows: list[dict], partition: dict, cfg: dict) -> dict[str, tuple[str, str]]:
    """Figure -> (alt, caption): the caption says what the figure shows that the title does not."""
    evaluated = [r for r in rows if r["accuracy"] is not None]
    out: dict[str, tuple[str, str]] = {}
    if s["per_round"]:
        central = (f" Triangles: the global model on the global test set (last {_fmt(s['central_accuracy'])})."
                   if s["central"] else "")
        out["accuracy_rounds.png"] = (
            "Accuracy over rounds", f"Line: mean across the clients evaluated each round; dark band ±1 std, "
            f"light band min to max. Dashed: example-weighted, the headline ({_fmt(s['accuracy'])} in "
            f"round {_fmt(s['last_round'])}; best round {_fmt(s['best_round'])}).{central}")
    if evaluated:
        lo = min(evaluated, key=lambda r: r["accuracy"])
        hi = max(evaluated, key=lambda r: r["accuracy"])
        shape = ("Histogram and ECDF of" if len(rows) > MANY_CLIENTS else "One dot per client:")
        failed = sum(bool(r["failures"]) for r in rows)
        out["client_accuracy.png"] = (
            "Final per-client accuracy",
            f"{shape} final accuracy of {len(evaluated)} clients, from client {lo['partition_id']} "
            f"({lo['accuracy']:.3f}) to client {hi['partition_id']} ({hi['accuracy']:.3f}); worst-10% mean "
            f"{_fmt(s['accuracy_worst10'], 3)}. The axis spans the data, not 0 to 1; the solid line is the "
            f"headline." + (f" Red crosses: {failed} client(s) with a failed call." if failed
                             and len(rows) <= MANY_CLIENTS else ""))
    clients = partition.get("clients") or []
    if clients:
        sizes = [sum(c["train"]) for c in clients]
        how = _get(cfg, "data.partitioner.name")
        how = (f" ({how}, alpha {_get(cfg, 'data.partitioner.alpha')})" if how == "dirichlet"
               else f" ({how} partition)" if how else "")
        sample = (f" Shown: a seeded sample of {plots.HEATMAP_SAMPLE} of {len(clients)} clients."
                  if len(clients) > MANY_CLIENTS else "")
        out["label_distribution.png"] = (
            "Label distribution per client",
            f"Train examples per class{how}; clients hold {min(sizes)} to {max(sizes)} train examples "
            f"(median {int(np.median(sizes))}).{sample}")
    return out


def _report_blocks(s: dict, rows: list[dict], figures: dict[str, tuple[str, str]],
                   fails: list[Failure]) -> list[Block]:
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
    if fails:
        more = len(fails) - FAILURES_SHOWN
        blocks.append(("failures", fails[:FAILURES_SHOWN]))
        if more > 0:
            blocks.append(("p", f"{more} more failed calls are recorded in metrics.jsonl."))
    else:
        blocks.append(("p", "No failed client records."))
    if s.get("skipped_rounds") or s.get("rejected"):  # validation (fedkd.validation)
        blocks += [("h2", f"Skipped rounds ({len(s['skipped_rounds'])}) and rejected updates "
                          f"({s['rejected']})"),
                   ("p", "A rejected update failed validation on its node and was left out; a "
                         "skipped round had fewer valid updates than validation.min_clients and kept "
                         "the previous global model. Skipped rounds: "
                         f"{', '.join(map(str, s['skipped_rounds'])) or 'none'}.")]
        if s["rejected_updates"]:
            blocks.append(("table", ["round", "client", "reason"],
                           [[u["round"], u["partition_id"], u["reason"]] for u in s["rejected_updates"]],
                           TableOptions(left=0)))
    if s.get("per_model"):  # heterogeneous clients: is one architecture behind?
        blocks += [("h2", f"By architecture (round {_fmt(s['last_round'])})"),
                   ("table", ["model", "clients", "accuracy (weighted)", "unweighted", "min", "max"],
                    [[m, p["clients"], p["accuracy"], p["accuracy_unweighted"], p["min"], p["max"]]
                     for m, p in s["per_model"].items()])]
    blocks += [*_client_blocks(rows), ("h2", "Figures"),
               *(("img", name, alt, caption) for name, (alt, caption) in figures.items())]
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
    partition, cfg = _json(run_dir / "partition.json") or {}, _config(run_dir)
    captions = _captions(s, rows, partition, cfg)
    if s["per_round"]:
        plots.accuracy_over_rounds(s["per_round"], s["central"], run_dir / "accuracy_rounds.png")
    if "client_accuracy.png" in captions:
        plots.client_accuracy(rows, run_dir / "client_accuracy.png", s["accuracy"], s["accuracy_unweighted"])
    if partition.get("clients"):
        plots.label_distribution(partition, run_dir / "label_distribution.png", s["seed"] or 0)
    blocks = _report_blocks(s, rows, captions, failures(read_metrics(run_dir / "metrics.jsonl")))
    (run_dir / "report.md").write_text(to_markdown(blocks))
    (run_dir / "report.html").write_text(to_html(blocks, run_dir, f"fedkd report: {s['experiment']}"))
    return s


def _short_bytes(n: float) -> str:
    """'66.6M' for the terminal's narrow columns."""
    return human_bytes(n).replace(" ", "").replace("iB", "")


def client_table(run_dir: Path) -> Table:
    """Final per-client results for the terminal (failing clients in red), within 80 columns.
    Above MANY_CLIENTS: the 20 worst and 20 best, the distribution in the caption."""
    rows = client_rows(run_dir)
    keys, _ = _client_columns(rows)
    if len({r["last_evaluated_round"] for r in rows}) <= 1:  # every client evaluated last round
        keys.remove("last_evaluated_round")
    keys += ["train_seconds", "bytes_sent", "bytes_received"]
    heads = {**HEADS, "accuracy": "acc", "train_seconds": "sec", "partition_id": "id", "bytes_received": "recv"}
    shown, caption = rows, None
    if len(rows) > MANY_CLIENTS:
        worst, best = worst_and_best(rows)
        accs = [r["accuracy"] for r in rows if r["accuracy"] is not None]
        q = _quantiles(accs) if accs else [None] * 5
        caption = (f"{SHOWN} worst, then {SHOWN} best of {len(rows)} clients (all in clients.csv); "
                   f"accuracy min {_fmt(q[0], 3)}, median {_fmt(q[2], 3)}, max {_fmt(q[4], 3)}")
        shown = [*worst, None, *best]
    table = Table(title=f"Per-client results: {Path(run_dir).name}", caption=caption, box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, padding=0)  # the box gives one space between columns
    for k in keys:
        table.add_column(heads[k], justify="left" if k == "model" else "right", no_wrap=True)
    for r in shown:
        if r is None:
            table.add_section()
            continue
        table.add_row(*(_short_bytes(r[k]) if k.startswith("bytes") else _fmt(r[k], 2 if k == "train_seconds" else 3)
                        for k in keys), style="red" if r["failures"] else None)
    return table
