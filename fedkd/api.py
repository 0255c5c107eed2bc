"""The Python API: run an experiment from a script or a notebook, get its results back.

    import fedkd
    result = fedkd.run("quickstart", overrides=["train.rounds=3", "strategy.name=fedprox"])
    result.summary["accuracy"], result.clients[0]["accuracy"], result.report
    sweep = fedkd.run_sweep("quickstart", ["strategy.name=fedavg,fedprox"], seeds=[0, 1, 2])
    sweep.compare("fedprox", "fedavg").verdict, sweep.table

Bad input raises (`fedkd.ConfigError`, `fedkd.DataError`, `fedkd.RunDirError`, ...) with the
one-line message the command line prints; nothing here exits the interpreter, and `run` may be
called any number of times in one process (each call starts and stops its own Ray, or joins
`simulation.ray_address`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from fedkd.config import FedkdConfig
from fedkd.config import load_config as _load_config_file

if TYPE_CHECKING:
    from fedkd.sweep import Comparison


def load_config(config: str | Path | None = None, overrides: Iterable[str] = ()) -> FedkdConfig:
    """A validated config from a YAML path or a bundled experiment's name ("quickstart"), plus
    `key=value` overrides; raises ConfigError naming the key, the value and what is allowed."""
    return _load_config_file(config, list(overrides))


@dataclass
class RunResult:
    """What a run left in its directory, read back."""

    run_dir: Path
    status: str  # complete, failed, interrupted
    status_reason: str | None
    summary: dict[str, Any]  # summary.json: accuracy (example-weighted), unweighted mean, std, ...
    clients: list[dict[str, Any]]  # clients.csv rows: one per client, sorted by partition id
    config: FedkdConfig
    paths: dict[str, Path] = field(default_factory=dict)  # report, report_html, metrics, ...

    @property
    def ok(self) -> bool:
        return self.status == "complete"

    @property
    def accuracy(self) -> float | None:
        """The last round's example-weighted mean over clients (the run's headline number)."""
        return self.summary.get("accuracy")

    @property
    def report(self) -> Path:
        return self.paths["report"]

    @classmethod
    def read(cls, run_dir: str | Path) -> "RunResult":
        """The result of a finished (or stopped) run from its directory."""
        from fedkd.config import from_yaml
        from fedkd.rundir import read_run_info

        run_dir = Path(run_dir)
        info = read_run_info(run_dir)
        with open(run_dir / "clients.csv", newline="") as f:
            rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
        names = {"config": "config.yaml", "summary": "summary.json", "clients": "clients.csv",
                 "metrics": "metrics.jsonl", "report": "report.md", "report_html": "report.html",
                 "partition": "partition.json", "model": "model"}
        paths = {k: run_dir / v for k, v in names.items() if (run_dir / v).exists()}
        return cls(run_dir=run_dir, status=str(info.get("status")),
                   status_reason=info.get("status_reason"),
                   summary=json.loads((run_dir / "summary.json").read_text()), clients=rows,
                   config=from_yaml((run_dir / "config.yaml").read_text()), paths=paths)


def _number(text: str | None) -> Any:
    """A clients.csv cell as int/float where it is one ("" stays None)."""
    if text is None or text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run(config: str | Path | FedkdConfig | None = None, overrides: Iterable[str] = (),
        run_dir: str | Path | None = None, resume: str | Path | None = None,
        quiet: bool = True) -> RunResult:
    """Run one experiment to its end and return its result.

    `config`: a YAML path, a bundled experiment's name (see `fedkd list`) or a FedkdConfig
    (from `fedkd.load_config`); `overrides`: `key=value` strings as on the command line;
    `run_dir`: where to write (default `<experiment.output_dir>/<name>-<time>`, must not hold a
    run); `resume`: continue that unfinished run directory from its last checkpoint instead
    (`overrides` may then only extend `train.rounds`). `quiet=False` shows the progress bar.
    A run that ends `failed` is returned (see `result.status`), not raised."""
    from fedkd.simulation import resume_experiment, run_experiment

    overrides = list(overrides)
    if resume is not None:
        if config is not None or run_dir is not None:
            raise ValueError("resume=RUN_DIR continues that run with its own config: "
                             "leave config and run_dir out")
        return RunResult.read(resume_experiment(resume, overrides, quiet=quiet))
    if isinstance(config, FedkdConfig):
        if overrides:
            raise ValueError("overrides apply to a YAML config or a name; pass them to "
                             "fedkd.load_config instead")
        cfg = config
    else:
        cfg = load_config(config, overrides)
    return RunResult.read(run_experiment(cfg, run_dir, quiet=quiet))


@dataclass
class SweepResult:
    """A sweep's results as `fedkd sweep` tabulates them: one row per run (its summary.json plus
    `run`, the label), this sweep's runs and the reference labels' (`against`)."""

    out: Path
    rows: list[dict[str, Any]]
    against: list[str]

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(r["run"] for r in self.rows))

    def results(self, label: str) -> list[dict[str, Any]]:
        """One label's rows, one per seed."""
        return [r for r in self.rows if r["run"] == label]

    def compare(self, label: str, reference: str) -> "Comparison | None":
        """`label` against `reference`, paired by seed on both headline numbers, with the
        protocol's verdict (`.verdict`: beats / tie / loses / mixed; `.pairs[key].diffs` per seed);
        None when the two share no seed."""
        from fedkd.sweep import compare

        return compare(self.results(label), self.results(reference))

    @property
    def table(self) -> str:
        """The Markdown table `fedkd sweep` prints (mean ± std per label, paired verdicts)."""
        from fedkd.sweep import sweep_table

        return sweep_table(self.rows, self.against)


def run_sweep(config: str | Path, grid: Sequence[str] = (), seeds: Sequence[int] = (0,),
              out: str | Path = "runs/sweep", variant: str | None = None, fixed: Sequence[str] = (),
              against: Sequence[str] = (), ray_address: str = "", quiet: bool = True) -> SweepResult:
    """Every run of a grid × seeds, as `fedkd sweep` runs it, and the results read back.

    `grid`: `key=v1,v2` axes (the runs are their product; a single value is a plain override);
    `fixed`: `key=value` overrides of every run, named by `variant` (appended to each label);
    `out`: results go to `OUT/<label>/seed<k>.json`, and results already there are not run again
    (an unfinished run resumes), so a cut-off sweep continues where it stopped; `against`:
    reference labels for the paired verdicts of `.table`; `ray_address`: run on that cluster
    instead of a local one started for the sweep. Every config is validated before a run starts."""
    from fedkd import sweep

    rows = sweep.run_sweep(config, grid, seeds, Path(out), variant=variant, fixed=fixed,
                           against=against, quiet=quiet, ray_address=ray_address)
    return SweepResult(out=Path(out), rows=rows, against=list(against))


@dataclass
class Plan:
    """What a run would do, without running it (`fedkd run --dry-run`)."""

    config: FedkdConfig
    nodes: int
    dataset: str
    num_classes: int
    input_shape: tuple[int, ...]
    train_sizes: list[int]
    test_sizes: list[int]
    global_test: int | None

    def describe(self) -> str:
        cfg = self.config
        lines = [f"dataset {self.dataset}: {self.num_classes} classes, input {list(self.input_shape)}, "
                 f"{sum(self.train_sizes)} train / {sum(self.test_sizes)} test examples over "
                 f"{len(self.train_sizes)} clients"
                 + (f", global test set {self.global_test}" if self.global_test else ""),
                 f"clients: {cfg.data.num_clients} ({cfg.data.partitioner.name} partition); "
                 f"per round {max(1, round(cfg.train.fraction_clients * cfg.data.num_clients))} train"
                 f" (train.fraction_clients={cfg.train.fraction_clients})",
                 f"nodes: {self.nodes} Flower node(s), {cfg.simulation.client_cpus:g} CPU(s) per "
                 f"client actor{', Ray at ' + cfg.simulation.ray_address if cfg.simulation.ray_address else ''}",
                 f"rounds: {cfg.train.rounds}, method {cfg.method['name']}, strategy "
                 f"{cfg.strategy.get('name', 'fedavg')}",
                 "partition id  train  test"]
        lines += [f"{pid:>12}  {tr:>5}  {te:>4}"
                  for pid, (tr, te) in enumerate(zip(self.train_sizes, self.test_sizes))]
        return "\n".join(lines)


def plan(cfg: FedkdConfig) -> Plan:
    """Load (and so check) the data and work out the nodes; starts nothing, writes nothing."""
    from fedkd.data import load_federated
    from fedkd.simulation import num_nodes

    data = load_federated(cfg.data, cfg.experiment.seed)
    return Plan(config=cfg, nodes=num_nodes(cfg), dataset=data.dataset,
                num_classes=data.num_classes, input_shape=tuple(data.input_shape),
                train_sizes=[len(c.y_train) for c in data.clients],
                test_sizes=[len(c.y_test) for c in data.clients],
                global_test=len(data.global_test[1]) if data.global_test is not None else None)
