"""fedkd.sweep: labels, the protocol's paired comparison by seed, and the v2 headline numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedkd.config import ConfigError
from fedkd.report import summarize
from fedkd.sweep import (check_against, label_part, overall_verdict, paired, parse_grid, result_rows,
                         sweep_label, sweep_table, terminal_table)
from test_report import make_run


@pytest.mark.parametrize("override, part", [
    ("strategy.name=fedadam", "fedadam"), ("model.name=cnn_bn", "cnn_bn"),
    ("method.exclude_self=true", "exclude_self"), ("method.exclude_self=False", "no_exclude_self"),
    ("method.alpha=0.9", "alpha0.9"), ("train.rounds=1", "rounds1"), ("method.lam=1e-3", "lam1e-3"),
    ("model.per_client=[cnn,mlp]", "per_clientcnnmlp"), ("data.dataset=adbench:6_cardio", "adbench_6_cardio"),
])
def test_label_names_the_key_when_the_value_alone_is_ambiguous(override: str, part: str) -> None:
    assert label_part(override) == part


def test_labels_join_the_grid_point_and_the_variant(tmp_path: Path) -> None:
    combos = parse_grid(["strategy.name=fedavg,fedavgm", "train.rounds=1"])
    assert [sweep_label(c, "x/quickstart.yaml", "v", tmp_path) for c in combos] == [
        "fedavg-rounds1-v", "fedavgm-rounds1-v"]
    assert sweep_label([], "x/quickstart.yaml", None, tmp_path) == "quickstart"


def test_an_existing_result_directory_keeps_its_old_label(tmp_path: Path) -> None:
    """Skipping existing results depends on the label: old value-only labels stay where they exist."""
    combo = ["method.name=fedkd_mentor", "method.svd=true"]
    assert sweep_label(combo, "c.yaml", None, tmp_path) == "fedkd_mentor-svd"
    (tmp_path / "fedkd_mentor-true").mkdir()
    assert sweep_label(combo, "c.yaml", None, tmp_path) == "fedkd_mentor-true"


def rows(label: str, acc: list[float], last3: list[float]) -> list[dict]:
    return [{"run": label, "seed": s, "accuracy": a, "accuracy_last3": b}
            for s, (a, b) in enumerate(zip(acc, last3))]


def test_paired_difference_by_seed_against_a_hand_computation() -> None:
    a, b = rows("A", [0.80, 0.82, 0.79], [0.0] * 3), rows("B", [0.78, 0.79, 0.80], [0.0] * 3)
    p = paired(a, b, "accuracy")
    assert p.diffs == pytest.approx({0: 0.02, 1: 0.03, 2: -0.01})
    assert p.mean == pytest.approx(0.04 / 3)
    # sample std of (2, 3, -1) points: mean 4/3, squared deviations 4/9 + 25/9 + 49/9 = 78/9, /2
    assert 100 * p.std == pytest.approx((78 / 9 / 2) ** 0.5)
    assert p.cell() == "+1.33 ± 2.08 (+ + −)"


def test_paired_tie_rule() -> None:
    # |mean| 1.33 points < std 2.08: the previous test's numbers are a tie
    a, b = rows("A", [0.80, 0.82, 0.79], [0.0] * 3), rows("B", [0.78, 0.79, 0.80], [0.0] * 3)
    assert paired(a, b, "accuracy").verdict == "tie"
    steady = paired(rows("A", [0.81, 0.82, 0.83], [0] * 3), rows("B", [0.80, 0.80, 0.80], [0] * 3), "accuracy")
    assert steady.verdict == "beats" and steady.cell() == "+2.00 ± 1.00 (+ + +)"
    worse = paired(rows("A", [0.70, 0.71, 0.72], [0] * 3), rows("B", [0.80, 0.80, 0.80], [0] * 3), "accuracy")
    assert worse.verdict == "loses"


def test_only_seeds_both_labels_have_are_paired() -> None:
    p = paired(rows("A", [0.8, 0.9], [0, 0]), rows("B", [0.7], [0]), "accuracy")
    assert list(p.diffs) == [0] and p.std is None and p.cell() == "+10.00 (+)"


@pytest.mark.parametrize("verdicts, overall", [
    (["beats", "beats"], "beats"), (["loses", "loses"], "loses"), (["tie", "tie"], "tie"),
    (["beats", "tie"], "mixed"), (["beats", "loses"], "mixed"),
])
def test_beats_needs_both_headline_numbers(verdicts: list[str], overall: str) -> None:
    assert overall_verdict(verdicts) == overall


def test_sweep_table_carries_paired_verdicts_for_both_headlines() -> None:
    table = (rows("pse", [0.81, 0.82, 0.83], [0.79, 0.81, 0.83]) + rows("local", [0.80] * 3, [0.80] * 3)
             + rows("fedavg", [0.60, 0.62, 0.58], [0.6, 0.6, 0.6]))
    md = sweep_table(table, against=["local"])
    line = next(ln for ln in md.splitlines() if ln.startswith("| pse ") and "beats" in ln)
    # last round: +2 ± 1 points on every seed (beats); last 3: +1 ± 2 (a tie), so: mixed
    assert "+2.00 ± 1.00 (+ + +) | beats |" in line and "+1.00 ± 2.00 (− + +) | tie |" in line
    assert "| mixed | 0,1,2 |" in line
    fedavg = next(ln for ln in md.splitlines() if ln.startswith("| fedavg ") and "loses" in ln)
    assert fedavg.rstrip().endswith("| loses | 0,1,2 |")
    assert "mean of last 3 evaluations" in md


def test_terminal_table_fits_80_columns_with_the_verdicts() -> None:
    """`fedkd sweep` in a terminal: both headline numbers, s/round, seeds and the verdicts, each
    line within 80 columns (long labels wrap in their own column)."""
    from rich.console import Console

    table = (rows("pse-cnn-excitation_only-amax0.2", [0.81, 0.82, 0.83], [0.79, 0.81, 0.83])
             + rows("local-cnn", [0.80] * 3, [0.80] * 3) + rows("fedavg-cnn", [0.60, 0.62, 0.58], [0.6] * 3)
             + rows("one-seed", [0.9], [0.9]))
    for r in table:
        r["seconds_per_round"] = 10.0
    console = Console(width=80, record=True)
    console.print(terminal_table(table, ["local-cnn", "fedavg-cnn"]))
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80
    lines = {ln.split()[0][:6]: ln.split()[1:] for ln in text.splitlines() if ln.strip()}
    assert lines["pse-cn"] == ["0.820", "±", "0.010", "0.810", "±", "0.020", "10.0", "3", "mixed", "beats"]
    assert lines["local-"][-2:] == ["—", "beats"] and lines["fedavg"][-2:] == ["loses", "—"]
    assert lines["one-se"][-2:] == ["beats*", "beats*"] and "* on one seed only" in text
    assert terminal_table(table[:-1], ["local-cnn", "fedavg-cnn"]).caption is None  # no one-seed row


def test_sweep_table_counts_the_seeds_whose_rounds_shared_the_machine() -> None:
    table = rows("a", [0.9, 0.8], [0.9, 0.8])
    for r, (secs, busy) in zip(table, [(10.0, True), (12.0, False)]):
        r.update(seconds_per_round=secs, machine_load={"median_load": 3.5, "cpus": 2, "loaded": busy})
    line = next(ln for ln in sweep_table(table).splitlines() if ln.startswith("| a "))
    assert "| 11.00 ± 1.41 (1 loaded) |" in line


def test_one_seed_says_so() -> None:
    md = sweep_table(rows("a", [0.9], [0.9]) + rows("b", [0.8], [0.8]), against=["b"])
    assert "beats (seed 0 only)" in md


def test_unknown_reference_label_is_refused_with_the_labels() -> None:
    with pytest.raises(ConfigError, match=r"--against='locl'.*did you mean 'local'"):
        check_against(["locl"], ["local", "fedavg"])


def test_summary_carries_the_mean_of_the_last_three_evaluations_and_the_second_model(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", extra=[
        {"round": 3, "phase": "evaluate", "partition_id": p, "status": "ok", "num_examples": n,
         "accuracy": a, "global_accuracy": g}
        for p, n, a, g in ((0, 10, 0.9, 0.5), (1, 30, 0.5, 0.7), (2, 60, 0.8, 0.9))])
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "second_model": {"name": "global",
                                                                         "metric": "global-accuracy"}}))
    s = summarize(run)
    weighted = [(0.95 * 10 + 0.95 * 30 + 0.5 * 60) / 100, (0.5 * 10 + 0.6 * 30 + 0.9 * 60) / 100,
                (0.9 * 10 + 0.5 * 30 + 0.8 * 60) / 100]
    assert s["accuracy_last3"] == pytest.approx(sum(weighted) / 3)
    assert s["last3_rounds"] == [1, 2, 3]
    assert s["second_model"]["name"] == "global"
    assert s["second_model"]["accuracy"] == pytest.approx((0.5 * 10 + 0.7 * 30 + 0.9 * 60) / 100)
    row = next(ln for ln in sweep_table([{"run": "d", **s}]).splitlines() if ln.startswith("| d "))
    assert "global: 0.8000" in row
    from fedkd.report import write_outputs  # the run's own report shows both too

    write_outputs(run)
    md = (run / "report.md").read_text()
    assert "mean of the last three evaluations (rounds 1/2/3)" in md and "second model: global" in md


def test_result_rows_collect_every_label_under_out(tmp_path: Path) -> None:
    for label, seed in (("b", 0), ("a", 1), ("a", 0), ("a", 10)):
        (tmp_path / label).mkdir(exist_ok=True)
        (tmp_path / label / f"seed{seed}.json").write_text(json.dumps({"seed": seed, "accuracy": 0.5}))
    assert [(r["run"], r["seed"]) for r in result_rows(tmp_path, ["b"])] == [
        ("b", 0), ("a", 0), ("a", 1), ("a", 10)]


def test_headline_per_resolution_factor(tmp_path: Path) -> None:
    """partition.json records each client's factor (data.transform); summary and sweep table
    break the headline down by it."""
    run = make_run(tmp_path / "run")
    part = json.loads((run / "partition.json").read_text())
    for c, f in zip(part["clients"], (1, 2, 1)):
        c["resolution_factor"] = f
    (run / "partition.json").write_text(json.dumps(part))
    s = summarize(run)
    assert list(s["per_factor"]) == ["x1", "x2"]
    assert s["per_factor"]["x1"]["accuracy"] == pytest.approx((0.9 * 10 + 0.8 * 60) / 70)
    assert s["per_factor"]["x2"]["accuracy"] == pytest.approx(0.5)
    md = sweep_table([{"run": "r", **s}])
    assert "per resolution factor" in md and "| x2 | 0.5000 |" in md


def test_partition_records_the_client_resolution_factor() -> None:
    from fedkd.config import load_config
    from fedkd.simulation import client_transform

    root = Path(__file__).resolve().parents[1] / "configs" / "experiment"
    cfg = load_config(root / "resolution-shift.yaml")
    assert [client_transform(cfg, k)["resolution_factor"] for k in range(8)] == [1, 2, 4, 8, 2, 4, 8, 1]
    assert client_transform(load_config(root / "quickstart.yaml"), 0) == {}


def test_dry_run_plans_validates_and_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedkd.cli import main
    from fedkd.rundir import RUN_INFO

    out = tmp_path / "out"
    (out / "fedavg-rounds1").mkdir(parents=True)
    (out / "fedavg-rounds1" / "seed0.json").write_text("{}")  # a result: skipped
    (out / "fedprox-rounds1" / "seed1").mkdir(parents=True)
    (out / "fedprox-rounds1" / "seed1" / RUN_INFO).write_text("{}")  # an unfinished run: resumed
    args = ["sweep", "quickstart", "strategy.name=fedavg,fedprox", "train.rounds=1", "--seeds", "0,1",
            "--out", str(out), "--against", "local,fedavg-rounds1", "--dry-run"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"plan {out} fedavg-rounds1: 1 rounds; done 0; to run 1",
                     f"plan {out} fedprox-rounds1: 1 rounds; done -; to run 0, 1 (resumes)",
                     f"reference {out} local: no result yet"]
    assert sorted(p.name for p in out.iterdir()) == ["fedavg-rounds1", "fedprox-rounds1"]  # nothing written
    assert not (out / "sweep.md").exists()
    assert main([*args[:3], "strategy.name=fedavgg", *args[4:]]) == 2  # validated like a real sweep
    assert "did you mean 'fedavg'" in capsys.readouterr().err


def test_sweep_runs_each_missing_seed_once_and_says_how_each_ended(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The sweep loop with the runs replaced: a result file per run, one line per finished run
    (for whoever tails a long sweep's log), sweep.md, and a rerun that runs nothing."""
    import contextlib

    import fedkd.ray_cluster
    import fedkd.simulation
    from fedkd.cli import main

    ran = []

    def fake_run(cfg, run_dir, quiet=False):
        ran.append((cfg.strategy["name"], cfg.experiment.seed))
        Path(run_dir).mkdir(parents=True)
        accuracy = 0.5 + 0.1 * cfg.experiment.seed
        summary = {"seed": cfg.experiment.seed, "status": "complete", "accuracy": accuracy,
                   "accuracy_last3": accuracy - 0.01, "wall_seconds": 12.3}
        (Path(run_dir) / "summary.json").write_text(json.dumps(summary))
        return Path(run_dir)

    def fake_resume(run_dir, quiet=False, ray_address=""):
        ran.append(("resumed", Path(run_dir).name))
        summary = {"seed": 1, "status": "complete", "accuracy": 0.6, "accuracy_last3": 0.59, "wall_seconds": 12.3}
        (Path(run_dir) / "summary.json").write_text(json.dumps(summary))
        return Path(run_dir)

    monkeypatch.setattr(fedkd.simulation, "run_experiment", fake_run)
    monkeypatch.setattr(fedkd.simulation, "resume_experiment", fake_resume)
    monkeypatch.setattr(fedkd.ray_cluster, "warm_ray", lambda enabled: contextlib.nullcontext(None))
    out = tmp_path / "out"
    (out / "fedprox" / "seed1").mkdir(parents=True)  # a run an earlier sweep left unfinished
    (out / "fedprox" / "seed1" / "run.json").write_text(json.dumps({"status": "interrupted"}))
    args = ["sweep", "quickstart", "strategy.name=fedavg,fedprox", "--seeds", "0,1", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert ran == [("fedavg", 0), ("fedavg", 1), ("fedprox", 0), ("resumed", "seed1")]
    lines = [line for line in capsys.readouterr().err.splitlines() if ": " in line]
    assert lines == [f"{label} seed {seed}: {0.5 + 0.1 * seed:.4f} last round, {0.49 + 0.1 * seed:.4f} mean of "
                     "last 3 evaluations; 12 s, complete" for label in ("fedavg", "fedprox") for seed in (0, 1)]
    assert json.loads((out / "fedprox" / "seed1.json").read_text())["accuracy"] == pytest.approx(0.6)
    assert "| fedavg | 0.5500 ± 0.0707 |" in (out / "sweep.md").read_text()
    assert main(args) == 0 and len(ran) == 4  # every result exists: nothing runs again
    assert not [line for line in capsys.readouterr().err.splitlines() if " seed " in line]
    assert main([*args[:3], "--seeds", "0", *args[5:]]) == 0  # the printed table: this sweep's seeds
    printed = capsys.readouterr().out
    assert "| fedavg | 0.5000 |" in printed and "| fedprox | 0.5000 |" in printed
    assert "| fedavg | 0.5500 ± 0.0707 |" in (out / "sweep.md").read_text()
    # in a terminal: the 80-column table instead of Markdown
    from rich.console import Console

    import fedkd.cli
    terminal = Console(force_terminal=True, width=80, record=True, color_system=None)
    monkeypatch.setattr(fedkd.cli, "console", terminal)
    assert main(args) == 0
    shown = terminal.export_text()
    *table_lines, where = shown.splitlines()
    assert "|---" not in shown and "fedprox" in shown and max(map(len, table_lines)) <= 80
    assert where == f"all results, every column and the per-seed differences: {out / 'sweep.md'}"
    # sweep.md: the reference labels first, then by name, whichever sweep wrote it last
    assert main(["sweep", "quickstart", "strategy.name=fedprox", "--out", str(out), "--against", "fedavg"]) == 0
    assert [ln.split()[1] for ln in (out / "sweep.md").read_text().splitlines()[2:4]] == ["fedavg", "fedprox"]


def test_result_line_of_a_run_without_scores() -> None:
    from fedkd.sweep import PlannedRun, result_line

    plan = PlannedRun("mhpflid-hetero", 2, None)  # type: ignore[arg-type]
    assert result_line(plan, {"accuracy": None, "status": "failed"}) == \
        "mhpflid-hetero seed 2: n/a last round, n/a mean of last 3 evaluations; failed"


def test_result_line_of_a_resumed_run_says_after_which_rounds() -> None:
    from fedkd.sweep import PlannedRun, result_line

    plan = PlannedRun("pse-cnn", 0, None)  # type: ignore[arg-type]
    summary = {"accuracy": 0.86, "accuracy_last3": 0.85, "wall_seconds": 1850.4,
               "resumed_after_rounds": [30], "status": "complete"}
    assert result_line(plan, summary) == ("pse-cnn seed 0: 0.8600 last round, 0.8500 mean of last 3 "
                                          "evaluations; 1850 s, resumed after round 30, complete")
    summary["machine_load"] = {"median_load": 3.6, "cpus": 2, "loaded": True}
    assert result_line(plan, summary).endswith("; 1850 s, resumed after round 30, loaded, complete")
