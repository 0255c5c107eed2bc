"""`fedkd` command line: run, sweep, list, report, compare."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from fedkd.config import ConfigError, load_config
from fedkd.console import err
from fedkd.console import out as console

if TYPE_CHECKING:
    from fedkd.config import FedkdConfig


class UsageError(Exception):
    """Bad command-line input (exit code 2, one line, no traceback)."""


def _print_result(run_dir: Path) -> None:
    from fedkd.report import client_table

    summary = json.loads((run_dir / "summary.json").read_text())
    console.print(client_table(run_dir))
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    console.print(f"last-round {summary.get('score', 'accuracy')} (example-weighted): [bold]{fmt(summary.get('accuracy'))}[/]"
                  f"  unweighted mean {fmt(summary.get('accuracy_unweighted'))}"
                  f"  std {fmt(summary.get('accuracy_std'))}"
                  f"  worst-10% {fmt(summary.get('accuracy_worst10'))}")
    if summary.get("failures"):
        console.print(f"[red]{summary['failures']} client call(s) failed; see the report[/]")
    console.print(f"report: {run_dir / 'report.md'}  (html: {run_dir / 'report.html'})")


def _report_failures(run_dir: Path) -> None:
    """Each failed client's own traceback, named by partition id."""
    from fedkd.report import read_metrics

    for rec in read_metrics(run_dir / "metrics.jsonl"):
        if rec.get("status") == "failed":
            err.print(f"[red]client {rec['partition_id']} failed in round {rec['round']} "
                      f"({rec['phase']}):[/]\n{rec['error']}", markup=True, highlight=False)


def cmd_run(args: argparse.Namespace) -> int:
    from fedkd.rundir import read_run_info
    from fedkd.simulation import resume_experiment, run_experiment

    if args.resume:
        if args.run_dir:
            raise UsageError("--resume RUN_DIR names the run directory; drop --run-dir")
        # with --resume every positional is an override (the config is the run's own)
        overrides = [args.config, *args.overrides] if args.config else args.overrides
        if args.dry_run:
            from fedkd.rundir import resume_config

            return _dry_run(resume_config(Path(args.resume), overrides))
        run_dir = resume_experiment(args.resume, overrides, quiet=args.quiet)
    else:
        if not args.config:
            raise UsageError("fedkd run needs a CONFIG: a YAML file or a bundled experiment's "
                             "name (fedkd list), or --resume RUN_DIR")
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            return _dry_run(cfg)
        run_dir = run_experiment(cfg, args.run_dir, quiet=args.quiet)
    _report_failures(run_dir)
    _print_result(run_dir)
    info = read_run_info(run_dir)
    if info.get("status") != "complete":
        err.print(f"[red]run {info.get('status')}: {info.get('status_reason')}[/]")
        return 1
    return 0


def _dry_run(cfg: "FedkdConfig") -> int:
    """The resolved config, then the clients, nodes and data sizes; nothing started or written."""
    from fedkd.api import plan
    from fedkd.config import to_yaml

    print(to_yaml(cfg), end="")
    print("---")
    print(plan(cfg).describe())
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedkd.sweep import describe_sweep, run_sweep, sweep_table, terminal_table

    out = Path(args.out)
    against = [a for a in (args.against or "").split(",") if a]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.dry_run:
        print(describe_sweep(args.config, args.grid, seeds, out,
                             variant=args.variant, fixed=args.set, against=against))
        return 0
    rows = run_sweep(args.config, args.grid, seeds, out,
                     variant=args.variant, fixed=args.set, against=against, quiet=args.quiet,
                     ray_address=args.ray_address)
    if console.is_terminal:  # a table that fits the screen; Markdown where the output is kept
        console.print(terminal_table(rows, against))
        console.print(f"all results, every column and the per-seed differences: {out / 'sweep.md'}",
                      highlight=False, soft_wrap=True)  # a path is not broken: the terminal wraps it
    else:
        print(sweep_table(rows, against))
        console.print(f"table of all results in {out}: {out / 'sweep.md'}", highlight=False, soft_wrap=True)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    from fedkd.data import DATASETS
    from fedkd.models import MODELS
    from fedkd.registry import METHODS
    from fedkd.strategies.flower import STRATEGIES

    from fedkd.config import experiments

    for title, rows in (("experiments (fedkd run NAME)",
                         {k: _first_comment(p) for k, p in experiments().items()}),
                        ("methods", {k: v.description for k, v in METHODS.items()}),
                        ("strategies", {k: v.description for k, v in STRATEGIES.items()}),
                        ("models", MODELS), ("datasets", DATASETS)):
        table = Table(title=title, show_header=False)
        for name, text in rows.items():
            table.add_row(escape(name), escape(text))  # descriptions hold literal [brackets]
        console.print(table)
    return 0


def _first_comment(path: Path) -> str:
    """An experiment's description: the first comment line of its YAML (or nothing)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def cmd_report(args: argparse.Namespace) -> int:
    from fedkd.report import write_outputs

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise UsageError(f"{run_dir}: not a run directory (no metrics.jsonl)")
    summary = write_outputs(run_dir)
    _print_result(run_dir)
    if summary.get("resume"):
        err.print(f"[yellow]{summary['status']}: {summary['resume']}[/]")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fedkd.compare import compare, is_run_dir

    out = Path(args.out)
    dirs = []
    for d in map(Path, args.run_dirs):
        if d.resolve() == out.resolve():
            continue  # an earlier comparison's own output (`fedkd compare runs/*` run twice)
        if is_run_dir(d):
            dirs.append(d)
        else:
            err.print(f"skipped {d}: not a run directory (no metrics.jsonl)", highlight=False)
    if not dirs:
        raise UsageError("no run directory to compare (each holds a metrics.jsonl)")
    result = compare(dirs, out)
    if console.is_terminal:  # one row per run, within the screen; Markdown where the output is kept
        console.print(result.differs, highlight=False)
        console.print(result.terminal_table())
    else:
        print(result.markdown)  # Markdown: no terminal wrapping
    console.print(f"comparison of {len(dirs)} run(s) written to {out}/: compare.md, compare.html, "
                  "compare.png, compare_clients.png", highlight=False, soft_wrap=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fedkd import __version__

    parser = argparse.ArgumentParser(prog="fedkd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fedkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run one experiment: CONFIG [key=value ...], or continue one: "
                                   "--resume RUN_DIR [train.rounds=N]")
    p.add_argument("config", nargs="?", help="YAML file, or a bundled experiment's name "
                                             "(fedkd list), e.g. quickstart")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. strategy.name=fedprox")
    p.add_argument("--run-dir", help="where to write the run (default <output_dir>/<name>-<time>); "
                                     "must not hold a run already")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an unfinished run from its last checkpoint (train.rounds=N extends it)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the clients, nodes and data sizes; run nothing")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("sweep", help="grid of runs x seeds, resumable, one mean ± std table")
    p.add_argument("config")
    p.add_argument("grid", nargs="*", help="key=v1,v2 axes (and plain key=value overrides)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--out", default="runs/sweep", help="results: OUT/<label>/seed<k>.json")
    p.add_argument("--variant", help="appended to every label, e.g. 'hetero' -> mhpflid-hetero")
    p.add_argument("--ray-address", default="", metavar="HOST:PORT",
                   help="run on this Ray cluster (default: start a local one for the sweep)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a fixed override, not an axis (so a value may hold commas, e.g. "
                        "method.teachers=[image,audio]); needs --variant; repeatable")
    p.add_argument("--against", metavar="LABELS",
                   help="comma-separated reference labels (e.g. local,fedavg): every other label "
                        "paired by seed against each, with the benchmark protocol's verdict")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--dry-run", action="store_true",
                   help="validate every run's config and print the labels, the seeds done and "
                        "those to run; run nothing")
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("list", help="bundled experiments, methods, strategies, models, datasets")
    p.set_defaults(fn=cmd_list)
    p = sub.add_parser("report", help="re-render a run directory's report")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("compare", help="side-by-side table and plot of several runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="compare",
                   help="directory for compare.md/.html/.png (default ./compare; printed at the end)")
    p.set_defaults(fn=cmd_compare)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options anywhere on the line: `fedkd run CFG --quiet train.rounds=1` (each subcommand's
    arguments are parsed intermixed; argparse cannot do that through subparsers itself)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if not argv or argv[0] not in subs:  # --version, --help, a missing or unknown command
        return parser.parse_args(argv)
    args = subs[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from fedkd.engine import EngineError, exit_on_signals

    args = parse_args(argv)
    # Ctrl-C and `kill`/timeout (SIGTERM) unwind through the context managers, so the run's
    # report is written and Ray (a sweep's head too) stopped; then one line, exit 128+signal
    with exit_on_signals() as interrupted:
        from fedkd.checkpoint import CheckpointError
        from fedkd.data import DataError
        from fedkd.rundir import RunDirError

        try:
            return args.fn(args)
        except (ConfigError, DataError, UsageError, RunDirError, CheckpointError) as exc:
            print(f"error: {exc}", file=sys.stderr)  # one line, no traceback
            return 2
        except EngineError as exc:  # e.g. no client actor could be placed
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return interrupted.code or 130


if __name__ == "__main__":
    sys.exit(main())
