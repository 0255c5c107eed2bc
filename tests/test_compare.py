"""`fedkd compare`: runs named by what differs between their configs, outputs in a directory of
their own (so `fedkd compare runs/*` can be rerun), non-run directories skipped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedkd.cli import main
from fedkd.compare import compare, differing_keys, run_labels
from report_runs import synthetic_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cmp") / "runs"
    synthetic_run(root / "quickstart-20261205-101500", 6, strategy="fedavg")
    synthetic_run(root / "quickstart-20261205-101700", 6, strategy="fedadam", seed=1)
    (root / "notes").mkdir()  # not a run
    return root


def test_labels_name_the_keys_that_differ(runs: Path) -> None:
    dirs = sorted(d for d in runs.iterdir() if (d / "metrics.jsonl").exists())
    labels, keys = run_labels(dirs)
    assert keys == ["experiment.seed", "strategy.name"]
    assert labels == ["experiment.seed=0, strategy.name=fedavg", "experiment.seed=1, strategy.name=fedadam"]
    assert differing_keys([{"a": {"b": 1}, "c": 2}, {"a": {"b": 1}, "c": 3}]) == ["c"]


def test_same_config_falls_back_to_directory_names(tmp_path: Path) -> None:
    a, b = synthetic_run(tmp_path / "x" / "run", 4), synthetic_run(tmp_path / "y" / "run", 4)
    labels, keys = run_labels([a, b])
    assert keys == [] and labels == ["x/run", "y/run"]
    table = compare([a, b], tmp_path / "out").markdown
    assert "x/run" in table and "same config" in table


def test_cli_compare_can_be_rerun_on_a_glob(runs: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from fedkd import cli

    monkeypatch.setattr(cli.err, "width", 40)  # a narrow or unknown width must not break a message's line
    cwd = os.getcwd()
    os.chdir(runs.parent)
    try:
        argv = ["compare", *sorted(str(p) for p in runs.iterdir())]
        assert main(argv) == 0
        out, err = capsys.readouterr()
        assert "strategy.name=fedadam" in out and "strategy.name=fedavg" in out
        assert "quickstart-2026" not in out.split("\n| metric")[1]  # columns: what differs, not time stamps
        assert f"skipped {runs / 'notes'}: not a run directory" in err
        assert "written to compare/" in out
        out_dir = runs.parent / "compare"
        for name in ("compare.md", "compare.html", "compare.png", "compare_clients.png"):
            assert (out_dir / name).stat().st_size > 0
        assert not list(runs.glob("compare*"))  # nothing written into the directory of the runs
        html = (out_dir / "compare.html").read_text()
        assert "strategy.name=fedadam" in html and "http" not in html
        # `fedkd compare runs/*` again, also with the output directory among the arguments
        assert main([*argv, "compare"]) == 0
        assert main(["compare", str(runs / "notes")]) == 2  # nothing to compare: one line, exit 2
    finally:
        os.chdir(cwd)


def test_cli_compare_in_a_terminal_fits_80_columns_with_many_runs(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight runs would make the Markdown table (one column per run) several screens wide; in a
    terminal each run is a row, its long label wraps, and every line stays within 80 columns."""
    from rich.console import Console

    from fedkd import cli

    strategies = ["fedavg", "fedadam", "fedprox", "fedyogi", "fedadagrad", "fedavgm", "fedmedian", "krum"]
    dirs = [synthetic_run(tmp_path / "runs" / f"r{i}", 5, seed=i, strategy=s) for i, s in enumerate(strategies)]
    terminal = Console(force_terminal=True, width=80, record=True, color_system=None)
    monkeypatch.setattr(cli, "console", terminal)
    assert main(["compare", *map(str, dirs), "--out", str(tmp_path / "cmp")]) == 0
    shown = terminal.export_text()
    lines = shown.splitlines()[:-1]  # the last line names the output's path: the terminal wraps it
    assert max(map(len, lines)) <= 80 and shown.splitlines()[-1].startswith("comparison of 8 run(s)")
    assert "| metric" not in shown  # not the Markdown table
    assert "The runs differ in: experiment.seed, strategy.name." in shown
    header = next(line for line in lines if "last round" in line)
    assert all(title in header for title in ("run", "worst 10%", "s/round", "status"))
    summaries = compare(dirs, tmp_path / "again").summaries
    for s in summaries:  # every run's headline is on the screen, as compare.md has it
        assert f"{s['accuracy']:.4f}" in shown
    assert shown.count("complete") == len(dirs)
    assert "strategy.name=fedadagrad" in shown.replace("\n", "").replace(" ", "")
