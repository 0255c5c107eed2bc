"""A user's own strategy named by import path: `strategy.name=package.module:Class`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.serverapp.strategy import FedAvg, FedMedian

from fedkd.config import ConfigError, load_config
from fedkd.strategies.flower import EVERY_NODE, build_flower_strategy, strategy_options

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = ["data.num_clients=4", "model.name=mlp", "train.rounds=2", "train.batch_size=50"]


class Undeclared(FedAvg):
    """FedAvg that does not say whether it is mean-based."""


class OwnArgs(FedMedian):
    """A per-client rule with its own option and no **kwargs."""

    mean_based = False

    def __init__(self, cutoff: float = 1.0, fraction_train: float = 1.0) -> None:
        super().__init__(fraction_train=fraction_train)
        self.cutoff = cutoff


NOT_A_STRATEGY = 3


@pytest.fixture(autouse=True)
def examples_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))


def _message(section: dict) -> str:
    with pytest.raises(ConfigError) as info:
        build_flower_strategy(section)
    return str(info.value)


def test_example_strategy_is_built_with_its_options_and_fedkd_sampling() -> None:
    strategy, spec = build_flower_strategy({"name": "my_strategy:DampedFedAvg", "server_lr": 0.25})
    assert type(strategy).__name__ == "DampedFedAvg" and strategy.server_lr == 0.25
    assert spec.mean_based is True
    assert strategy.min_available_nodes == EVERY_NODE["min_available_nodes"]  # via **kwargs


def test_sampling_arguments_only_where_the_constructor_takes_them() -> None:
    strategy, spec = build_flower_strategy({"name": f"{__name__}:OwnArgs", "cutoff": 2.0})
    assert strategy.cutoff == 2.0 and spec.mean_based is False
    assert spec.sampling() == {"fraction_train": 1.0}


def test_options_are_checked_against_the_constructor() -> None:
    msg = _message({"name": "my_strategy:DampedFedAvg", "server_l": 0.5})
    assert msg.startswith("strategy.server_l=0.5: not an option of my_strategy:DampedFedAvg")
    assert "did you mean 'server_lr'" in msg
    assert "must be a number" in _message({"name": "my_strategy:DampedFedAvg", "server_lr": "x"})
    # the constructor's own check, as one line
    assert "server_lr must be in (0, 1]" in _message({"name": "my_strategy:DampedFedAvg",
                                                      "server_lr": 2.0})


@pytest.mark.parametrize("name, expected", [
    ("no_such_module:Cls", "cannot import no_such_module: ModuleNotFoundError"),
    ("my_strategy:DampedFedAv", "my_strategy has no DampedFedAv; allowed: "),
    (f"{__name__}:NOT_A_STRATEGY", "not a Flower strategy"),
    (f"{__name__}:Undeclared", "must say whether its server update acts on the example-weighted"),
    ("my_strategy:", "an import path is written package.module:Class"),
    ("fedavgg", "unknown strategy; allowed: "),
])
def test_bad_import_paths_are_one_line_config_errors(name: str, expected: str) -> None:
    msg = _message({"name": name})
    assert expected in msg and "\n" not in msg


def test_mean_based_can_be_set_in_the_config() -> None:
    spec, options = strategy_options({"name": f"{__name__}:Undeclared", "mean_based": False})
    assert spec.mean_based is False and "mean_based" not in options


def test_whole_run_with_the_example_strategy(tmp_path: Path) -> None:
    """The real strategy stack and ClientApp, in process: the example strategy is wrapped by the
    grouped-clients layer like a built-in, and the run completes."""
    from fedkd.testing import InProcessGrid, run_in_process

    cfg = load_config("quickstart", [*SMALL, "strategy.name=my_strategy:DampedFedAvg",
                                     "strategy.server_lr=0.5"])
    run_in_process(cfg, tmp_path / "run", InProcessGrid(2))
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "complete"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["accuracy"] is not None
