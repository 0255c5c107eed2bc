"""What a run report says and in what order: the blocks of report.md/report.html (headline,
failed clients, per-client tables, figure captions) and the terminal's per-client table.

`fedkd.report` computes the numbers (summary.json, clients.csv) and writes the files;
`fedkd.render` turns blocks into Markdown or HTML. Above MANY_CLIENTS clients the tables give a
summary plus the SHOWN worst and best clients (clients.csv keeps every one).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from rich import box
from rich.table import Table

from fedkd import plots
from fedkd.render import Block, Failure, TableOptions, _fmt, human_bytes
from fedkd.report import BEST, HEADLINE, _get, resumed_note, was_loaded

#: above this many clients the tables show a summary and the SHOWN worst and best clients
MANY_CLIENTS = plots.MANY_CLIENTS
SHOWN = 20
#: failed calls listed with their traceback in a report (the rest: count and metrics.jsonl)
FAILURES_SHOWN = 50


def _headline_rows(s: dict) -> list[list[Any]]:
    k = math.ceil(0.1 * (s["clients_evaluated"] or 0))
    return [[f"{HEADLINE}, round {_fmt(s['last_round'])}", s["accuracy"]],
            ["unweighted mean across clients", s["accuracy_unweighted"]],
            ["std across clients (population)", s["accuracy_std"]],
            [f"worst-10% mean ({k} of {_fmt(s['clients_evaluated'])} clients)", s["accuracy_worst10"]],
            [f"{BEST} (round {_fmt(s['best_round'])}; not the headline)", s["best_accuracy"]],
            ["central accuracy (global model, global test set)", s["central_accuracy"]],
            *_second_rows(s)]


def _second_rows(s: dict) -> list[list[Any]]:
    """The protocol's second headline, the method's second model, what the method logs beside."""
    rounds = "/".join(map(str, s.get("last3_rounds") or [])) or "n/a"
    rows = [[f"mean of the last three evaluations (rounds {rounds})", s.get("accuracy_last3")]]
    if second := s.get("second_model"):
        rows += [[f"second model: {second['name']}, round {_fmt(s['last_round'])}", second["accuracy"]],
                 [f"second model: {second['name']}, mean of the last three", second["accuracy_last3"]]]
    metric = (second or {}).get("metric")
    return rows + [[f"{k} (method-reported, round {_fmt(s['last_round'])})", v]
                   for k, v in (s.get("extra_metrics") or {}).items() if k != metric]


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
    failed_note = "A client with a failed call has fails > 0 and a marked row (see Failed clients)."
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


def captions(s: dict, rows: list[dict], partition: dict, cfg: dict) -> dict[str, tuple[str, str]]:
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
        shape = ("Histogram and ECDF of" if len(evaluated) > MANY_CLIENTS else "One dot per client:")
        failed = sum(bool(r["failures"]) for r in evaluated)  # the red crosses of the plot
        out["client_accuracy.png"] = (
            "Final per-client accuracy",
            f"{shape} final accuracy of {len(evaluated)} clients, from client {lo['partition_id']} "
            f"({lo['accuracy']:.3f}) to client {hi['partition_id']} ({hi['accuracy']:.3f}); worst-10% mean "
            f"{_fmt(s['accuracy_worst10'], 3)}. The axis spans the data, not 0 to 1; the solid line is the "
            f"headline." + (f" Red crosses: {failed} client(s) with a failed call." if failed
                             and len(evaluated) <= MANY_CLIENTS else ""))
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


def _load_note(s: dict) -> str:
    """'; machine load 2.6 on 2 CPUs' and, for a loaded run, why its time is no timing figure."""
    load = s.get("machine_load")
    if not load:
        return ""
    note = f"; machine load {load['median_load']:.1f} on {load['cpus']} CPUs"
    return note + (" (loaded: other work shared the machine; not a timing figure)" if was_loaded(s) else "")


def page(s: dict, rows: list[dict], figures: dict[str, tuple[str, str]],
                   fails: list[Failure]) -> list[Block]:
    evaluated = f"{s['evaluated_model'] or 'unknown'} model, {s['evaluated_when'] or 'when: n/a'}"
    blocks: list[Block] = [
        ("h1", f"fedkd run report: {s['experiment'] or 'unnamed'}"),
        ("ul", [f"experiment: {s['experiment']} (seed {s['seed']})", f"method: {s['method']}",
                f"strategy: {s['strategy']}", f"dataset: {s['dataset']}", f"clients: {s['num_clients']}",
                f"rounds: {s['rounds_completed']} completed of {_fmt(s['rounds'])} (status: {s['status']})",
                f"evaluated: {evaluated}",
                f"time: {_fmt(s['seconds_per_round'], 2)} s/round (median), {_fmt(s['wall_seconds'], 1)} s wall"
                + (f" ({resumed})" if (resumed := resumed_note(s)) else "") + _load_note(s)]),
        *([("line", f"Incomplete run: {s['resume']}.")] if s.get("resume") else []),
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
                           TableOptions(left=0, text=frozenset({2}))))
    if s.get("per_model"):  # heterogeneous clients: is one architecture behind?
        blocks += [("h2", f"By architecture (round {_fmt(s['last_round'])})"),
                   ("table", ["model", "clients", "accuracy (weighted)", "unweighted", "min", "max"],
                    [[m, p["clients"], p["accuracy"], p["accuracy_unweighted"], p["min"], p["max"]]
                     for m, p in s["per_model"].items()])]
    blocks += [*_client_blocks(rows), ("h2", "Figures"),
               *(("img", name, alt, caption) for name, (alt, caption) in figures.items())]
    return blocks


def _short_bytes(n: float) -> str:
    """'66.6M' for the terminal's narrow columns."""
    return human_bytes(n).replace(" ", "").replace("iB", "")


def terminal_table(rows: list[dict], name: str) -> Table:
    """Final per-client results for the terminal (failing clients in red), within 80 columns.
    Above MANY_CLIENTS: the 20 worst and 20 best, the distribution in the caption."""
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
    table = Table(title=f"Per-client results: {name}", caption=caption, box=box.SIMPLE_HEAD,
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
