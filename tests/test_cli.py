"""Command-line conventions: --version, options anywhere, experiments by name, --dry-run."""

from __future__ import annotations

from pathlib import Path

import pytest

import fedkd
from fedkd.cli import main, parse_args


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedkd {fedkd.__version__}"


@pytest.mark.parametrize("argv", [
    ["run", "quickstart", "--quiet", "train.rounds=1", "data.num_clients=2"],
    ["run", "--quiet", "quickstart", "train.rounds=1", "data.num_clients=2"],
    ["run", "quickstart", "train.rounds=1", "--quiet", "data.num_clients=2"],
    ["run", "quickstart", "train.rounds=1", "data.num_clients=2", "--quiet"],
])
def test_options_anywhere_on_the_line(argv: list[str]) -> None:
    args = parse_args(argv)
    assert (args.command, args.config, args.overrides, args.quiet) == (
        "run", "quickstart", ["train.rounds=1", "data.num_clients=2"], True)


def test_sweep_options_anywhere() -> None:
    args = parse_args(["sweep", "quickstart", "method.name=fedavg,local", "--seeds", "0,1",
                       "strategy.name=fedprox", "--quiet"])
    assert args.grid == ["method.name=fedavg,local", "strategy.name=fedprox"]
    assert args.seeds == "0,1" and args.quiet


def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    code = main(["run", "quickstart", "--dry-run", "data.num_clients=3",
                 f"experiment.output_dir={out}"])
    text = capsys.readouterr().out
    assert code == 0 and not out.exists()
    assert "num_clients: 3" in text  # the resolved config
    assert "3 clients" in text and "Flower node(s)" in text and "partition id  train  test" in text
    rows = text.split("partition id  train  test")[1].split()
    assert len(rows) == 9  # 3 clients x (id, train, test)


def test_unknown_experiment_name_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "quikstart", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config='quikstart': neither a YAML file nor a bundled experiment")
    assert "did you mean 'quickstart'" in err and "\n" not in err


def test_bad_override_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "quickstart", "--dry-run", "strategy.name=fedavgg"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: strategy.name='fedavgg': unknown strategy") and "\n" not in err


def test_list_shows_the_bundled_experiments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "experiments (fedkd run NAME)" in out and "quickstart" in out
