"""Seed sweeps: a grid of overrides × seeds, one result file per run, and the tables over them.

Results go to `OUT/<label>/seed<k>.json` (the benchmark protocol's layout); a result that exists
is skipped and an unfinished run is resumed, so rerunning a sweep continues it. The tables give
mean ± sample std over seeds per label and, with `against`, the protocol's paired comparison of
every label with reference labels (per-seed differences, mean ± std of the differences, the sign on
each seed and a verdict for both headline numbers).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import shutil
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from fedkd.config import ConfigError, FedkdConfig, load_config, suggest
from fedkd.console import err
from fedkd.report import HEADLINE, resumed_note, to_markdown, was_loaded

if TYPE_CHECKING:
    from rich.table import Table

#: the protocol's two headline numbers: summary.json key -> column title
HEADLINES = {"accuracy": "last round", "accuracy_last3": "mean of last 3 evaluations"}


def parse_grid(items: Sequence[str]) -> list[list[str]]:
    """`a=1,2 b=x` -> [[a=1, b=x], [a=2, b=x]] (the sweep's grid of overrides)."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, item, "sweep axes are written key=v1,v2,...")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def label_part(override: str) -> str:
    """One override's part of a run label: the value where it names something (`fedprox`,
    `cnn_bn`), the key's last part where the value alone would be ambiguous (`true` ->
    `exclude_self`, `false` -> `no_exclude_self`, `0.9` -> `alpha0.9`)."""
    key, _, value = override.partition("=")
    leaf = key.rsplit(".", 1)[-1]
    if value.lower() == "true":
        return leaf
    if value.lower() == "false":
        return f"no_{leaf}"
    if re.match(r"[A-Za-z]", value) and value.lower() not in ("null", "none"):
        return re.sub(r"[^\w.+-]+", "_", value).strip("_")  # `adbench:6_cardio` -> adbench_6_cardio
    return leaf + re.sub(r"[^\w.+-]", "", value)


def sweep_label(combo: Sequence[str], config: str | Path, variant: str | None, out: Path) -> str:
    """The label of one grid point. Labels written by earlier versions (values only, e.g.
    `fedkd_mentor-true`) keep their name where their directory exists, because skipping
    existing results depends on it."""
    suffix = f"-{variant}" if variant else ""
    legacy = ("-".join(o.partition("=")[2] for o in combo) or Path(config).stem) + suffix
    if (out / legacy).is_dir():
        return legacy
    return ("-".join(label_part(o) for o in combo) or Path(config).stem) + suffix


@dataclass
class PlannedRun:
    label: str
    seed: int
    cfg: FedkdConfig

    def result(self, out: Path) -> Path:
        return out / self.label / f"seed{self.seed}.json"

    def run_dir(self, out: Path) -> Path:
        return out / self.label / f"seed{self.seed}"


def plan_sweep(config: str | Path, grid: Sequence[str], seeds: Sequence[int], out: Path,
               variant: str | None = None, fixed: Sequence[str] = ()) -> list[PlannedRun]:
    """Every run's label and validated config, before the first simulation starts."""
    if fixed and not variant:  # else the labels, and so the skip-existing check, collide
        raise ConfigError("variant", variant, f"a name for the runs of the fixed overrides "
                          f"{' '.join(fixed)}, which change every run of the sweep "
                          f"(--variant on the command line), e.g. attention_only")
    plans = []
    for combo in parse_grid(grid):
        label = sweep_label(combo, config, variant, out)
        for seed in seeds:
            cfg = load_config(config, [*fixed, *combo, f"experiment.seed={seed}"])
            plans.append(PlannedRun(label, seed, cfg))
    return plans


def result_rows(out: Path, first: Sequence[str] = ()) -> list[dict]:
    """Every result under OUT as table rows (`first` labels first, then the others by name), so
    several sweeps into one setting directory (other models, variants) add up to one table."""
    return [{"run": lab, **json.loads(p.read_text())} for lab in result_labels(out, first)
            for p in sorted((out / lab).glob("seed*.json"), key=lambda p: _seed_of(p))]


def result_labels(out: Path, first: Sequence[str] = ()) -> list[str]:
    """The run labels `first`, then those with a result under OUT by name (no file read)."""
    return list(dict.fromkeys([*first, *sorted(p.parent.name for p in out.glob("*/seed*.json"))]))


def by_label(rows: Sequence[dict]) -> defaultdict[str, list[dict]]:
    """Result rows grouped by run label, labels in first-seen order (a missing label: no rows)."""
    groups: defaultdict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["run"]].append(r)
    return groups


def _seed_of(path: Path) -> int:
    return int(path.stem.removeprefix("seed"))


def check_against(against: Sequence[str], labels: Sequence[str]) -> None:
    """Reference labels must be labels of the table (a typo would silently compare nothing)."""
    for ref in against:
        if ref not in labels:
            raise ConfigError("--against", ref, "a run label of this sweep's table; " + suggest(ref, labels))


def describe_sweep(config: str | Path, grid: Sequence[str], seeds: Sequence[int], out: Path,
                   variant: str | None = None, fixed: Sequence[str] = (),
                   against: Sequence[str] = ()) -> str:
    """What `run_sweep` would do, validated the same way, running nothing: one line per label
    (seeds with a result, seeds to run) and one per reference label that has no result in OUT
    yet, which an earlier sweep into OUT must make (a bench script's first line, for example)."""
    from fedkd.rundir import RUN_INFO

    plans = plan_sweep(config, grid, seeds, out, variant, fixed)
    lines = []
    for label in dict.fromkeys(p.label for p in plans):
        mine = [p for p in plans if p.label == label]
        done = [p.seed for p in mine if p.result(out).exists()]
        todo = [f"{p.seed}" + (" (resumes)" if (p.run_dir(out) / RUN_INFO).exists() else "")
                for p in mine if not p.result(out).exists()]
        lines.append(f"plan {out} {label}: {mine[0].cfg.train.rounds} rounds; "
                     f"done {','.join(map(str, done)) or '-'}; to run {', '.join(todo) or '-'}")
    known = result_labels(out, [p.label for p in plans])
    lines += [f"reference {out} {ref}: no result yet" for ref in against if ref not in known]
    return "\n".join(lines)


def run_sweep(config: str | Path, grid: Sequence[str], seeds: Sequence[int], out: Path,
              variant: str | None = None, fixed: Sequence[str] = (), against: Sequence[str] = (),
              quiet: bool = False, ray_address: str = "") -> list[dict]:
    """Run (or continue) every missing run of the sweep; write `OUT/sweep.md` (every result under
    OUT); return this sweep's result rows and the `against` labels' (`sweep_table` renders them).
    The runs share one Ray cluster: `ray_address`'s, else a local one started for the sweep."""
    from fedkd import ray_cluster, simulation  # module attributes: tests replace them
    from fedkd.rundir import FINISHED, RUN_INFO, run_status

    plans = plan_sweep(config, grid, seeds, out, variant, fixed)
    planned = list(dict.fromkeys(p.label for p in plans))
    check_against(against, result_labels(out, planned))
    todo = [p for p in plans if not p.result(out).exists()]
    cluster = contextlib.nullcontext(ray_address) if ray_address else ray_cluster.warm_ray(enabled=bool(todo))
    with cluster as address:
        for plan in todo:
            if address:
                plan.cfg.simulation.ray_address = address
            err.print(f"[bold]{plan.label} seed {plan.seed}[/]")
            run_dir = plan.run_dir(out)
            if (run_dir / RUN_INFO).exists():  # an earlier sweep's run: continue it
                if run_status(run_dir) not in FINISHED:
                    simulation.resume_experiment(run_dir, quiet=quiet, ray_address=address or "")
            else:
                if run_dir.exists():
                    shutil.rmtree(run_dir)  # holds no run (cut before it was created)
                simulation.run_experiment(plan.cfg, run_dir, quiet=quiet)
            shutil.copyfile(run_dir / "summary.json", plan.result(out))
            err.print(result_line(plan, json.loads(plan.result(out).read_text())), markup=False)
    everything = result_rows(out, planned)
    runs = {(p.label, p.seed) for p in plans}
    order = {label: i for i, label in enumerate(result_labels(out, against))}  # one order per OUT
    (out / "sweep.md").write_text(sweep_table(sorted(everything, key=lambda r: order[r["run"]]), against) + "\n")
    return [r for r in everything if (r["run"], r.get("seed")) in runs
            or (r["run"] in against and r["run"] not in planned)]


def result_line(plan: PlannedRun, summary: dict) -> str:
    """One line per finished run, for whoever tails a long sweep's log:
    'local-cnn seed 1: 0.8424 last round, 0.8436 mean of last 3 evaluations; 589 s, complete' (and
    'resumed after round 30', 'loaded' before the status when they apply)."""
    def number(key: str) -> str:
        return f"{summary[key]:.4f}" if isinstance(summary.get(key), (int, float)) else "n/a"

    wall = summary.get("wall_seconds")
    took = f"{wall:.0f} s, " if isinstance(wall, (int, float)) else ""
    if resumed := resumed_note(summary):
        took += f"{resumed}, "
    if was_loaded(summary):
        took += "loaded, "
    scores = ", ".join(f"{number(key)} {title}" for key, title in HEADLINES.items())
    return f"{plan.label} seed {plan.seed}: {scores}; {took}{summary.get('status')}"


def mean_std(vals: Sequence[float], digits: int = 4) -> str:
    """'0.8509 ± 0.0074' (sample std, ddof=1); one value alone; 'n/a' for none."""
    if not vals:
        return "n/a"
    mean = statistics.fmean(vals)
    return f"{mean:.{digits}f} ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else f"{mean:.{digits}f}"


def _second(row: dict, key: str) -> float | None:
    return (row.get("second_model") or {}).get(key)


def second_model_cell(rows: Sequence[dict]) -> str:
    """'global: 0.4512 ± 0.0100 / 0.4400 ± 0.0090' (last round / last 3 over seeds), or '—'."""
    names = {(g.get("second_model") or {}).get("name") for g in rows} - {None}
    if not names:
        return "—"
    return f"{'/'.join(sorted(names))}: " + " / ".join(
        mean_std([v for g in rows if (v := _second(g, k)) is not None], 4) for k in HEADLINES)


def sweep_table(rows: list[dict], against: Sequence[str] = ()) -> str:
    """Markdown mean ± std over seeds, one row per run label (± = sample std, ddof=1), then the
    method-reported metrics, the per-architecture headline and the paired comparisons.

    n seeds counts the rows of a label (the stats are over those rows), not distinct `seed` values.
    """
    groups = by_label(rows)
    keys = ["accuracy", "accuracy_last3", "accuracy_unweighted", "accuracy_std", "accuracy_worst10",
            "best_accuracy", "seconds_per_round", "bytes_sent_per_client_round"]
    digits = {"seconds_per_round": 2, "bytes_sent_per_client_round": 0}

    def keyed_rows(columns: dict[str, list[dict]], keys: list[str], value: Callable[[dict, str], Any]) -> list:
        """One row per key, one mean ± std cell per column, over the seeds that have the value."""
        return [[k, *(mean_std([v for g in grp if (v := value(g, k)) is not None], 4) for grp in columns.values())]
                for k in keys]

    def cell(grp: list[dict], k: str) -> str:
        text = mean_std([g[k] for g in grp if g.get(k) is not None], digits.get(k, 4))
        loaded = sum(map(was_loaded, grp)) if k == "seconds_per_round" else 0
        return f"{text} ({loaded} loaded)" if loaded else text

    body = [[label, *(cell(grp, k) for k in keys), second_model_cell(grp), len(grp)]
            for label, grp in groups.items()]
    scores = {r.get("score") or "accuracy" for r in rows}
    headline = HEADLINE.replace("accuracy", scores.pop()) if len(scores) == 1 else HEADLINE
    head = ["run", headline, "mean of last 3 evaluations", "unweighted mean", "std across clients",
            "worst-10%", "best of evaluations", "s/round", "bytes sent/client/round",
            "second model (last round / last 3)", "n seeds"]
    blocks: list[Any] = [("table", head, body)]
    # method-reported metrics (a centralized method's own baselines, e.g. student without KD)
    extra = sorted({k for r in rows for k in r.get("extra_metrics") or {}})
    if extra:
        blocks += [("p", "Method-reported metrics of the last evaluated round (mean ± std over seeds):"),
                   ("table", ["metric", *groups],
                    keyed_rows(groups, extra, lambda g, k: (g.get("extra_metrics") or {}).get(k)))]
    hetero = {label: grp for label, grp in groups.items() if any(g.get("per_model") for g in grp)}
    if hetero:  # heterogeneous runs: the headline per architecture
        archs = sorted({m for grp in hetero.values() for g in grp for m in g.get("per_model") or {}})
        blocks += [("p", f"{HEADLINE} per client architecture (mean ± std over seeds):"),
                   ("table", ["architecture", *hetero],
                    keyed_rows(hetero, archs, lambda g, m: ((g.get("per_model") or {}).get(m) or {}).get("accuracy")))]
    shifted = {label: grp for label, grp in groups.items() if any(g.get("per_factor") for g in grp)}
    if shifted:  # resolution-shift runs: the headline per resolution factor
        factors = sorted({f for grp in shifted.values() for g in grp for f in g.get("per_factor") or {}},
                         key=lambda f: int(f[1:]))
        blocks += [("p", f"{HEADLINE} per resolution factor (images down-sampled by F, mean ± std over seeds):"),
                   ("table", ["factor", *shifted],
                    keyed_rows(shifted, factors, lambda g, f: ((g.get("per_factor") or {}).get(f) or {}).get("accuracy")))]
    blocks.append(("p", "Values are mean ± sample std (ddof=1) over seeds."))
    if against:
        blocks += paired_blocks(rows, against)
    return to_markdown(blocks)


def terminal_table(rows: list[dict], against: Sequence[str] = ()) -> "Table":
    """The sweep for a terminal, within 80 columns: both headline numbers (mean ± std over seeds),
    s/round, the number of seeds and the verdict paired by seed against each reference label.
    Every other column and the per-seed differences are in the Markdown tables (`sweep_table`)."""
    from rich import box
    from rich.table import Table

    groups = by_label(rows)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=0)
    table.add_column("run", overflow="fold", ratio=1, min_width=10)  # labels are long: they wrap
    for title in ("last round", "last 3", "s/round", "seeds"):
        table.add_column(title, justify="right", no_wrap=True)
    for ref in against:
        table.add_column(f"vs\n{ref}", overflow="fold", min_width=5)

    def verdict(grp: list[dict], ref: str) -> str:
        c = compare(grp, groups[ref]) if grp is not groups[ref] else None
        if c is None:
            return "—"
        return c.verdict if len(c.seeds) > 1 else f"{c.verdict}*"

    one_seed = False
    for label, grp in groups.items():
        seconds = [g["seconds_per_round"] for g in grp if g.get("seconds_per_round") is not None]
        loaded = " loaded" if any(map(was_loaded, grp)) else ""
        verdicts = [verdict(grp, ref) for ref in against]
        one_seed = one_seed or any(v.endswith("*") for v in verdicts)
        table.add_row(label, *(mean_std([g[k] for g in grp if g.get(k) is not None], 3) for k in HEADLINES),
                      f"{statistics.fmean(seconds):.1f}{loaded}" if seconds else "n/a", str(len(grp)),
                      *verdicts)
    if one_seed:
        table.caption = "* on one seed only: its sign decides"
    return table


@dataclass
class Paired:
    """A − B per seed for one headline number, and the protocol's verdict on it."""
    diffs: dict[int, float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs.values())

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.diffs.values()) if len(self.diffs) > 1 else None

    @property
    def verdict(self) -> str:
        """'tie' when |mean| < paired std (or no difference at all); else 'beats' / 'loses'.
        One seed has no std: its sign decides, and the table says which seed."""
        if self.mean == 0 or (self.std is not None and abs(self.mean) < self.std):
            return "tie"
        return "beats" if self.mean > 0 else "loses"

    @property
    def signs(self) -> str:
        """The sign of each seed's difference, in seed order: '+ + −'."""
        return " ".join("+" if d > 0 else "−" if d < 0 else "0" for d in self.diffs.values())

    def cell(self) -> str:
        """'+0.42 ± 0.31 (+ + −)' in accuracy points (×100)."""
        spread = f" ± {100 * self.std:.2f}" if self.std is not None else ""
        return f"{100 * self.mean:+.2f}{spread} ({self.signs})"


def paired(a: Sequence[dict], b: Sequence[dict], key: str) -> Paired | None:
    """Per-seed differences of `key` between two labels' result rows, on the seeds both have."""
    bs = {r.get("seed"): r.get(key) for r in b}
    diffs = {s: r[key] - bs[s] for r in a if (s := r.get("seed")) in bs
             and r.get(key) is not None and bs[s] is not None}
    return Paired(dict(sorted(diffs.items()))) if diffs else None


@dataclass
class Comparison:
    """A against B on both headline numbers, paired on the same seeds."""
    pairs: dict[str, Paired]  # headline key -> the per-seed differences

    @property
    def seeds(self) -> list[int]:
        return list(next(iter(self.pairs.values())).diffs)

    @property
    def verdict(self) -> str:
        return overall_verdict([p.verdict for p in self.pairs.values()])

    def seeds_note(self, of: int) -> str:
        """'' on all `of` seeds, else ' (seed 0 only)' / ' (seeds 0,1 only)'."""
        if len(self.seeds) >= of:
            return ""
        return f" (seed{'s' if len(self.seeds) > 1 else ''} {','.join(map(str, self.seeds))} only)"


def compare(a: Sequence[dict], b: Sequence[dict]) -> Comparison | None:
    """A's result rows against B's on the seeds where both have both headline numbers (None: no
    such seed), so the two numbers' verdicts rest on the same runs."""
    def complete(rows: Sequence[dict]) -> set:
        return {r.get("seed") for r in rows if all(r.get(k) is not None for k in HEADLINES)}

    seeds = complete(a) & complete(b)
    if not seeds:
        return None
    a, b = [r for r in a if r.get("seed") in seeds], [r for r in b if r.get("seed") in seeds]
    return Comparison({k: paired(a, b, k) for k in HEADLINES})  # type: ignore[misc]


def overall_verdict(verdicts: Sequence[str]) -> str:
    """The protocol: A beats B only with a non-tie in the same direction for both headline numbers;
    both ties is a tie; anything else (one tie, or opposite directions) is 'mixed'."""
    if len(set(verdicts)) == 1:
        return verdicts[0]
    return "mixed"


def paired_blocks(rows: Sequence[dict], against: Sequence[str]) -> list[Any]:
    """One table per reference label: every other label against it, paired by seed."""
    groups = by_label(rows)
    blocks: list[Any] = []
    for ref in against:
        body = []
        for label, grp in groups.items():
            if label == ref:
                continue
            if (c := compare(grp, groups[ref])) is None:
                continue
            verdict = c.verdict + c.seeds_note(2)  # one seed has no std: say which
            body.append([label, *(x for p in c.pairs.values() for x in (p.cell(), p.verdict)),
                         verdict, ",".join(map(str, c.seeds))])
        if body:
            blocks += [("p", f"Paired by seed against {ref}: difference in accuracy points "
                             "(mean ± sample std of the per-seed differences, sign on each seed); "
                             "a tie when |mean| < std; 'beats' needs a non-tie in the same direction "
                             "on both headline numbers."),
                       ("table", ["run", *(x for t in HEADLINES.values() for x in (f"{t}: Δ vs {ref}", "verdict")),
                                  "both", "seeds"], body)]
    return blocks
