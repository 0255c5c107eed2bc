"""Config loading and the one-line errors for bad input (exit code 2, no traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedkd.cli import main
from fedkd.config import ConfigError, from_yaml, load_config, to_yaml

QUICKSTART = "configs/experiment/quickstart.yaml"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def test_defaults_and_overrides() -> None:
    cfg = load_config(QUICKSTART, ["data.num_clients=4", "strategy.name=fedprox", "train.lr=0.1"])
    assert cfg.data.num_clients == 4 and cfg.train.lr == 0.1
    assert cfg.strategy == {"name": "fedprox"}
    assert cfg.method["name"] == "fedavg"
    assert from_yaml(to_yaml(cfg)) == cfg


def test_experiment_file_inherits_dataset_defaults() -> None:
    cfg = load_config("configs/experiment/std-mnist-local.yaml")
    assert (cfg.data.dataset, cfg.data.num_clients, cfg.data.partitioner.name) == ("pfllib-mnist", 20, "given")
    assert cfg.method["name"] == "local" and cfg.train.rounds == 20 and cfg.train.lr == 0.005


@pytest.mark.parametrize("override, key, fragment", [
    ("data.num_clients=0", "data.num_clients", "must be >= 1"),
    ("data.partitioner.alpha=-1", "data.partitioner.alpha", "must be > 0"),
    ("data.test_fraction=1.5", "data.test_fraction", "< 1.0"),
    ("train.lr=abc", "train.lr", "wrong type"),
    ("data.dataa=3", "data.dataa", "did you mean 'dataset'"),
    ("method.name=fedavgg", "method.name", "did you mean 'fedavg'"),
    ("strategy.name=fedprx", "strategy.name", "did you mean 'fedprox'"),
    ("model.name=cnnn", "model.name", "did you mean 'cnn'"),
    ("data.dataset=mnist5", "data.dataset", "did you mean 'mnist5k'"),
    ("data.partitioner.name=dirichlett", "data.partitioner.name", "did you mean 'dirichlet'"),
    ("strategy.proximal_mu=0.1", "strategy.proximal_mu", "not an option of fedavg"),
    ("method.foo=1", "method.foo", "not a setting of fedavg"),
    ("device.type=tpu", "device.type", "allowed: auto, cpu, cuda"),
    ("faults.clients=[12]", "faults.clients", "0..9"),
])
def test_bad_values_name_key_value_and_allowed(override: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, [override])
    message = str(info.value)
    assert message.startswith(key) and fragment in message
    assert "\n" not in message


def test_cuda_needs_a_device_here_and_a_gpu_share_per_client(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^device.type='cuda': no CUDA device"):
        load_config(QUICKSTART, ["device.type=cuda", "simulation.client_gpus=0.5"])
    # a remote cluster may have GPUs this machine lacks
    load_config(QUICKSTART, ["device.type=cuda", "simulation.client_gpus=0.5",
                             "simulation.ray_address=10.0.0.1:6379"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"^simulation.client_gpus=0.0: device.type=cuda needs"):
        load_config(QUICKSTART, ["device.type=cuda"])
    assert load_config(QUICKSTART, ["device.type=cuda", "simulation.client_gpus=0.25"]).device.type == "cuda"


def test_strategy_options_are_checked_against_flower_signature() -> None:
    cfg = load_config(QUICKSTART, ["strategy.name=fedprox", "strategy.proximal_mu=0.5"])
    assert cfg.strategy["proximal_mu"] == 0.5
    with pytest.raises(ConfigError, match="strategy.proximal_mu.*number"):
        load_config(QUICKSTART, ["strategy.name=fedprox", "strategy.proximal_mu=high"])


def test_missing_data_dir_names_the_path(tmp_path: Path) -> None:
    from fedkd.data import DataError

    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        load_config("configs/experiment/std-mnist.yaml", [f"data.data_dir={tmp_path / 'nope'}"])


@pytest.mark.parametrize("argv", [
    ["run", QUICKSTART, "data.num_clients=0"],
    ["run", QUICKSTART, "data.partitioner.alpha=-1"],
    ["run", QUICKSTART, "strategy.name=fedprx"],
    ["run", QUICKSTART, "data.data_dir=/nonexistent", "data.dataset=pfllib-mnist",
     "data.partitioner.name=given", "data.num_clients=20"],
    ["run", "configs/experiment/missing.yaml"],
    ["run", QUICKSTART, "notakeyvalue"],
    ["sweep", QUICKSTART, "method.name=fedavg", "--set", "train.lr=0.1"],  # --set needs --variant
    ["sweep", QUICKSTART, "--set", "method.heads=0", "--variant", "bad"],  # checked before any run
])
def test_cli_exits_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


def test_every_shipped_config_is_valid() -> None:
    for path in sorted((ROOT / "configs" / "experiment").glob("*.yaml")):
        load_config(path)


def test_sweep_set_is_a_fixed_override_of_every_run(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    """`--set` reaches every run's config unsplit (commas allowed) and the label carries --variant."""
    import contextlib

    import fedkd.ray_cluster
    import fedkd.simulation

    seen = []

    def fake_run(cfg, run_dir, quiet=False):  # stop at the first run: only its config matters
        seen.append((cfg, Path(run_dir)))
        raise KeyboardInterrupt

    monkeypatch.setattr(fedkd.simulation, "run_experiment", fake_run)
    monkeypatch.setattr(fedkd.ray_cluster, "warm_ray", lambda enabled: contextlib.nullcontext(None))
    # the CLI turns the interrupt into its exit code (fedkd.engine.exit_on_signals)
    assert main(["sweep", QUICKSTART, "method.name=fedavg,fedprox", "--set", "train.lr=0.125",
                 "--set", "faults.clients=[0,1]", "--variant", "v", "--out", str(tmp_path)]) == 130
    (cfg, run_dir), = seen
    assert cfg.train.lr == 0.125 and list(cfg.faults.clients) == [0, 1]
    assert run_dir == tmp_path / "fedavg-v" / "seed0"
