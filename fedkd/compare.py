"""`fedkd compare`: several runs side by side, labelled by what differs between their configs.

Each run is named by the config keys whose values differ between the runs (for example
`strategy.name=fedadam`), not by its time-stamped directory; the outputs go to a directory of
their own, never into the one holding the runs, so `fedkd compare runs/*` can be rerun.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from fedkd import plots
from fedkd.config import flatten
from fedkd.render import Block, TableOptions, _fmt, to_html, to_markdown
from fedkd.report import BEST, HEADLINE, _config, client_rows, summarize, was_loaded

if TYPE_CHECKING:
    from rich.table import Table

#: keys that say where a run lived or how it was scheduled, not what was run
IGNORED_KEYS = ("experiment.output_dir", "data.data_dir", "simulation.ray_address")
#: differing keys shown in a label (all of them are listed under the table)
LABEL_KEYS = 3


def is_run_dir(path: Path) -> bool:
    """A directory `fedkd run` wrote (it holds metrics.jsonl)."""
    return (Path(path) / "metrics.jsonl").is_file()


def differing_keys(configs: Sequence[dict]) -> list[str]:
    """Dotted config keys whose values are not the same in every config (in config order)."""
    return _differing([flatten(c) for c in configs])


def _differing(flat: Sequence[dict]) -> list[str]:
    """`differing_keys` of configs already flattened."""
    keys = list(dict.fromkeys(k for f in flat for k in f))
    return [k for k in keys if k not in IGNORED_KEYS
            and len({repr(f.get(k, "<unset>")) for f in flat}) > 1]


def run_labels(run_dirs: Sequence[Path]) -> tuple[list[str], list[str]]:
    """(labels, differing keys): `key=value` for up to LABEL_KEYS differing keys; the directory
    name where configs are the same or labels would collide."""
    flat = [flatten(_config(Path(d))) for d in run_dirs]
    keys = _differing(flat)
    labels = [", ".join(f"{k}={f.get(k)}" for k in keys[:LABEL_KEYS])
              + (f" (+{len(keys) - LABEL_KEYS})" if len(keys) > LABEL_KEYS else "") for f in flat]
    names = [Path(d).name for d in run_dirs]
    if len(set(names)) < len(names):
        names = [f"{Path(d).parent.name}/{Path(d).name}" for d in run_dirs]
    if not keys or len(set(labels)) < len(labels):
        labels = [f"{lab} [{name}]" if lab else name for lab, name in zip(labels, names)]
    return labels, keys


@dataclass
class Compared:
    """What `compare` wrote, for the caller to show: the runs' labels, summaries and metric table."""
    labels: list[str]
    summaries: list[dict]
    keys: list[str]
    table: Block  # compare.md's metric table (`metric_table`)

    @property
    def differs(self) -> str:
        """One sentence: the config keys the runs differ in."""
        return (f"The runs differ in: {', '.join(self.keys)}." if self.keys
                else "The runs have the same config; they are named by directory.")

    @property
    def markdown(self) -> str:
        """The sentence and the metric table of compare.md (where the output is kept)."""
        return to_markdown([("p", self.differs), self.table])

    def terminal_table(self) -> "Table":
        """One row per run within 80 columns (long labels wrap): the headline (last round,
        example-weighted), the worst-10% mean, the best evaluation, s/round and the status.
        Runs as rows, not columns, so many runs grow the table down, not off the screen; every
        other metric is in compare.md."""
        from rich import box
        from rich.table import Table

        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
        table.add_column("run", overflow="fold", ratio=1, min_width=10)
        for title in ("last round", "worst 10%", "best (round)", "s/round", "status"):
            table.add_column(title, justify="right", overflow="fold", max_width=12)
        for label, s in zip(self.labels, self.summaries):
            table.add_row(label, _fmt(s["accuracy"]), _fmt(s["accuracy_worst10"]),
                          f"{_fmt(s['best_accuracy'])} ({_fmt(s['best_round'])})", _seconds(s), s["status"])
        return table


def _seconds(s: dict) -> str:
    return _fmt(s["seconds_per_round"], 2) + (" (loaded)" if was_loaded(s) else "")


def metric_table(labels: Sequence[str], sums: Sequence[dict]) -> Block:
    """Metrics as rows, one column per run: compare.md's and compare.html's table."""
    metrics: list[tuple[str, Callable[[dict], Any]]] = [
        ("experiment / method / strategy",
         lambda s: " / ".join(_fmt(s[k]) for k in ("experiment", "method", "strategy"))),
        ("dataset, clients, seed", lambda s: ", ".join(_fmt(s[k]) for k in ("dataset", "num_clients", "seed"))),
        ("evaluated", lambda s: _fmt(s["evaluated_model"])),
        (HEADLINE, lambda s: f"{_fmt(s['accuracy'])} (round {_fmt(s['last_round'])})"),
        ("unweighted mean", lambda s: _fmt(s["accuracy_unweighted"])),
        ("std across clients", lambda s: _fmt(s["accuracy_std"])),
        ("worst-10% mean", lambda s: _fmt(s["accuracy_worst10"])),
        (BEST, lambda s: f"{_fmt(s['best_accuracy'])} (round {_fmt(s['best_round'])})"),
        ("central accuracy", lambda s: _fmt(s["central_accuracy"])),
        ("s/round (median)", _seconds),
        ("failures", lambda s: s["failures"]),
        ("status", lambda s: s["status"]),
    ]
    return ("table", ["metric", *labels], [[name, *(fn(s) for s in sums)] for name, fn in metrics],
            TableOptions(left=1))


def compare(run_dirs: Sequence[Path], out_dir: Path) -> Compared:
    """compare.md/.html/.png and compare_clients.png in `out_dir`."""
    run_dirs = [Path(d) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sums = [summarize(d) for d in run_dirs]
    labels, keys = run_labels(run_dirs)
    result = Compared(labels, sums, keys, metric_table(labels, sums))
    plots.compare_accuracy(list(zip(labels, (s["per_round"] for s in sums))), out_dir / "compare.png")
    per_client = [[r["accuracy"] for r in client_rows(d) if r["accuracy"] is not None] for d in run_dirs]
    plots.compare_clients(list(zip(labels, per_client)), out_dir / "compare_clients.png")
    blocks: list[Block] = [
        ("h1", "fedkd run comparison"),
        ("ul", [f"{label}: {d}" for label, d in zip(labels, run_dirs)]),
        ("p", result.differs), result.table,
        ("img", "compare.png", "Accuracy over rounds",
         "Example-weighted accuracy per round, one line per run; band: ±1 std across clients."),
        ("img", "compare_clients.png", "Per-client accuracy per run",
         "Final accuracy of every client (dots) with its box (median, quartiles) per run: the "
         "spread behind each headline."),
    ]
    (out_dir / "compare.md").write_text(to_markdown(blocks))
    (out_dir / "compare.html").write_text(to_html(blocks, out_dir, "fedkd run comparison"))
    return result
