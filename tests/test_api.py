"""The Python API: `fedkd.run`, `fedkd.run_sweep`, `fedkd.load_config`, `fedkd.RunResult`;
examples/api_quickstart.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import fedkd

ROOT = Path(__file__).resolve().parents[1]


def test_import_fedkd_is_light() -> None:
    """`import fedkd` pulls in neither torch nor Flower nor Ray; the API names load on use."""
    code = ("import sys, fedkd; heavy = [m for m in ('torch', 'flwr', 'ray') if m in sys.modules]; "
            "assert not heavy, heavy; assert callable(fedkd.run) and callable(fedkd.load_model); "
            "print(fedkd.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == fedkd.__version__ != "0+unknown"


def test_load_config_by_name_and_the_clis_one_line_errors() -> None:
    cfg = fedkd.load_config("quickstart", ["train.rounds=2"])
    assert cfg.train.rounds == 2 and cfg.experiment.name == "quickstart"
    assert fedkd.load_config(ROOT / "configs/experiment/quickstart.yaml").train.rounds == 10
    with pytest.raises(fedkd.ConfigError, match=r"^strategy.name='fedavgg': unknown strategy; .*"
                                                r"did you mean 'fedavg'"):
        fedkd.load_config("quickstart", ["strategy.name=fedavgg"])
    with pytest.raises(fedkd.ConfigError, match="neither a YAML file nor a bundled experiment.*"
                                                "did you mean 'quickstart'"):
        fedkd.run("quikstart")
    with pytest.raises(fedkd.ConfigError, match="file not found"):
        fedkd.run("no/such/file.yaml")


def test_run_refuses_mixed_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="leave config and run_dir out"):
        fedkd.run("quickstart", resume=tmp_path)
    with pytest.raises(ValueError, match="pass them to fedkd.load_config"):
        fedkd.run(fedkd.load_config("quickstart"), overrides=["train.rounds=1"])


@pytest.mark.e2e
def test_example_script_runs_twice_in_one_process(tmp_path: Path, ray_address: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """examples/api_quickstart.py: a caught ConfigError, then two whole runs in this process."""
    spec = importlib.util.spec_from_file_location("api_quickstart", ROOT / "examples/api_quickstart.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    results = module.main(["train.rounds=1", "data.num_clients=2", "model.name=mlp",
                           f"experiment.output_dir={tmp_path}",
                           f"simulation.ray_address={ray_address}"])
    out = capsys.readouterr().out
    assert "caught: strategy.name='fedavgg': unknown strategy" in out
    assert set(results) == {"fedavg", "fedprox"} and all(0 < a <= 1 for a in results.values())
    runs = sorted(tmp_path.glob("quickstart-*"))
    assert len(runs) == 2
    result = fedkd.RunResult.read(runs[0])
    assert result.ok and result.status_reason is None
    assert [row["partition_id"] for row in result.clients] == [0, 1]
    assert result.accuracy == result.summary["accuracy"] and result.config.train.rounds == 1
    assert {"report", "metrics", "clients", "summary", "config", "model"} <= set(result.paths)


@pytest.mark.e2e
def test_run_sweep_runs_the_grid_once_and_pairs_the_labels(
        tmp_path: Path, ray_address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """fedkd.run_sweep: two real runs on the given cluster, their rows, the paired comparison read
    from them, and a second call that runs nothing (every result exists)."""
    import fedkd.simulation

    small = ["train.rounds=1", "data.num_clients=2", "model.name=mlp"]
    kwargs = dict(fixed=small, variant="small", out=tmp_path, against=["fedavg-small"],
                  ray_address=ray_address)
    sweep = fedkd.run_sweep("quickstart", ["strategy.name=fedavg,fedprox"], **kwargs)
    assert sweep.labels == ["fedavg-small", "fedprox-small"]
    fedavg, fedprox = (sweep.results(label)[0] for label in sweep.labels)
    assert fedavg["seed"] == fedprox["seed"] == 0 and 0 < fedavg["accuracy"] <= 1
    pair = sweep.compare("fedprox-small", "fedavg-small")
    assert pair is not None and pair.seeds == [0]
    assert pair.pairs["accuracy"].diffs[0] == pytest.approx(fedprox["accuracy"] - fedavg["accuracy"])
    assert "Paired by seed against fedavg-small" in sweep.table
    assert fedkd.RunResult.read(tmp_path / "fedprox-small" / "seed0").ok

    def no_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a result that exists ran again")

    monkeypatch.setattr(fedkd.simulation, "run_experiment", no_run)
    again = fedkd.run_sweep("quickstart", ["strategy.name=fedavg,fedprox"], **kwargs)
    assert again.rows == sweep.rows
    with pytest.raises(fedkd.ConfigError, match="^variant=None: a name for the runs of the fixed"):
        fedkd.run_sweep("quickstart", fixed=small, out=tmp_path)
