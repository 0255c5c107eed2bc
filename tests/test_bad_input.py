"""Bad input stops `fedkd run` with one line on stderr and exit code 2, before any simulation.

Config-time errors come from `load_config`; data errors from loading the data, which happens
before the simulation. A simulation that starts anyway fails the test (see `no_simulation`).
"""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from fedkd.cli import main

QUICKSTART = "configs/experiment/quickstart.yaml"


@pytest.fixture
def no_simulation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """Fail if a simulation would start; yields a run dir under tmp_path for `--run-dir`."""
    import flwr.simulation

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a simulation started")

    monkeypatch.setattr(flwr.simulation, "run_simulation", boom)
    yield tmp_path / "run"


def run_error(argv: list[str], capsys: pytest.CaptureFixture[str], *parts: str) -> str:
    """`fedkd <argv>` exits 2 with one 'error: ...' line that contains every one of `parts`."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for part in parts:
        assert part in err, err
    return err


@pytest.mark.parametrize("text, expected", [
    ("train: {lr: [0.1\n", "not valid YAML"),
    ("experiment:\n  name: x\n seed: 1\n", "not valid YAML"),
    ("train:\n  lr: 0.1\ntrain:\n  lr: 0.2\n", "duplicate key"),
    ("- experiment\n- data\n", "found a list"),
    ("just a string\n", "found the value 'just a string'"),
    ("42\n", "found the value '42'"),
    ("defaults: quickstart.yaml\n", "a list of YAML files"),
])
def test_malformed_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                               expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    run_error(["run", str(path)], capsys, expected, str(path) if "defaults" not in text else "defaults")


def test_binary_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"\xff\xfe\x00\x01")
    run_error(["run", str(path)], capsys, str(path), "not UTF-8")


def test_unreadable_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text("experiment: {name: x}\n")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: make the read fail as it would for a user
        real = Path.read_text

        def denied(self: Path, *args: object, **kwargs: object) -> str:
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(Path, "read_text", denied)
    try:
        run_error(["run", str(path)], capsys, str(path), "cannot read", "Permission denied")
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize("override, parts", [
    ("experiment.name=../outside", ("experiment.name", "'..'")),
    ("experiment.name=a/b", ("experiment.name", "'/'")),
    ("train.lr=inf", ("train.lr=inf", "finite")),
    ("train.lr=-inf", ("train.lr", "finite")),
    ("train.lr=nan", ("train.lr=nan", "finite")),
    ("train.lr=1e30", ("train.lr", "<= 10")),
    ("data.partitioner.alpha=.inf", ("data.partitioner.alpha", "finite")),
    ("simulation.timeout=.nan", ("simulation.timeout", "finite")),
    ("model.per_client=[cnn", ("model.per_client", "not a valid value")),
])
def test_bad_values_are_config_errors(capsys: pytest.CaptureFixture[str], override: str,
                                      parts: tuple[str, ...]) -> None:
    run_error(["run", QUICKSTART, override], capsys, *parts)


@pytest.mark.parametrize("overrides, key", [
    (["method.name=pse", "method.beta=.nan"], "method.beta"),  # checked by the method's dataclass
    (["method.name=pse", "method.tau=.inf"], "method.tau"),
    (["strategy.name=fedprox", "strategy.proximal_mu=.inf"], "strategy.proximal_mu"),
])
def test_method_and_strategy_settings_must_be_finite(capsys: pytest.CaptureFixture[str],
                                                     overrides: list[str], key: str) -> None:
    run_error(["run", QUICKSTART, *overrides], capsys, key, "finite")


def test_hf_dataset_without_network_fails_fast(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                               no_simulation: Path) -> None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens, refused at once
    import fedkd.simulation  # noqa: F401  (time the failure, not the first import)

    started = time.perf_counter()
    run_error(["run", QUICKSTART, "data.dataset=hf:ylecun/mnist", "--run-dir", str(no_simulation)], capsys,
              "data.dataset=hf:ylecun/mnist", "needs the network", "127.0.0.1:9")
    assert time.perf_counter() - started < 5.0
    assert not no_simulation.exists()


def pfllib_labels(root: Path, labels: list[int]) -> Path:
    """A PFLlib-style CIFAR-10 subset whose client 0 has `labels`; returns client 0's train file."""
    base = root / "pfllib-cifar10-dir0.1-subset"
    for split in ("train", "test"):
        (base / split).mkdir(parents=True)
        for i in range(10):
            y = np.array(labels if i == 0 else [0, 1], np.int64)
            data = {"x": np.zeros((len(y), 3, 32, 32), np.float32), "y": y}
            np.savez_compressed(base / split / f"{i}.npz", data=np.array(data, dtype=object))
    return base / "train" / "0.npz"


@pytest.mark.parametrize("bad", [10, -1])
def test_out_of_range_label_in_npz(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   no_simulation: Path, bad: int) -> None:
    path = pfllib_labels(tmp_path / "data", [0, 3, bad, 9])
    run_error(["run", QUICKSTART, "data.dataset=cifar10-subset", f"data.data_dir={tmp_path / 'data'}",
               "data.partitioner.name=given", "data.num_clients=1", "--run-dir", str(no_simulation)],
              capsys, str(path), f"label {bad}", "0..9")


def test_out_of_range_label_in_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   no_simulation: Path) -> None:
    path = tmp_path / "data" / "sklearn-digits" / "digits.csv.gz"
    path.parent.mkdir(parents=True)
    rows = np.zeros((40, 65))
    rows[:, -1] = np.arange(40) % 10
    rows[7, -1] = 12
    with gzip.open(path, "wt") as f:
        np.savetxt(f, rows, fmt="%g", delimiter=",")
    run_error(["run", QUICKSTART, "data.dataset=digits", f"data.data_dir={tmp_path / 'data'}",
               "data.partitioner.name=iid", "data.num_clients=2", "--run-dir", str(no_simulation)],
              capsys, str(path), "label 12.0", "0..9")
