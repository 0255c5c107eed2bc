"""Nothing a user can supply is unpickled freely: planted npz and state files cannot run code.

Each malicious file's pickle calls `os.system` to create a marker file; loading must refuse it
with a one-line error naming the file, and the marker must not appear. Fast, in-process, no Ray.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedkd.config import DataConfig, PartitionerConfig
from fedkd.data import DataError, load_federated
from fedkd.safe_npz import load_npz
from fedkd.state import ClientStateStore


class RunsCommand:
    """Pickles as a call of os.system(command): what a malicious file would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


def touch(marker: Path) -> RunsCommand:
    return RunsCommand(f"touch {marker}")


def pfllib_dir(root: Path, client0: dict[str, Any]) -> Path:
    """A data dir laid out like PFLlib's CIFAR-10 subset (10 clients); client 0 holds `client0`."""
    base = root / "pfllib-cifar10-dir0.1-subset"
    good = {"x": np.zeros((4, 3, 32, 32), np.float32), "y": np.arange(4, dtype=np.int64)}
    for split in ("train", "test"):
        (base / split).mkdir(parents=True)
        for i in range(10):
            np.savez_compressed(base / split / f"{i}.npz", data=np.array(client0 if i == 0 else good, dtype=object))
    return base


def given_cfg(root: Path) -> DataConfig:
    return DataConfig(dataset="cifar10-subset", data_dir=str(root), num_clients=1,
                      partitioner=PartitionerConfig(name="given"))


def assert_one_line(exc: pytest.ExceptionInfo[Exception], *parts: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg


@pytest.mark.parametrize("where", ["whole object", "inside the dict"])
def test_malicious_pfllib_npz_is_refused_and_runs_nothing(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned"
    payload: Any = touch(marker)
    client0 = payload if where == "whole object" else {"x": np.zeros((2, 3, 32, 32), np.float32), "y": payload}
    base = pfllib_dir(tmp_path / "data", client0)
    with pytest.raises(DataError) as exc:
        load_federated(given_cfg(tmp_path / "data"), 0)
    assert_one_line(exc, str(base / "train" / "0.npz"), "refused", "system")
    assert not marker.exists()


def test_old_loader_would_have_run_the_planted_command(tmp_path: Path) -> None:
    """The planted file is a real exploit: np.load with pickles on creates the marker."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npz"
    np.savez(path, data=np.array(touch(marker), dtype=object))
    np.load(path, allow_pickle=True)["data"]
    assert marker.exists()


def test_safe_npz_reads_pfllib_style_and_plain_members(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(5, 1, 28, 28)).astype(np.float32)
    y = np.array([0, 3, 9, 1, 1], np.int64)
    path = tmp_path / "client.npz"
    np.savez_compressed(path, data=np.array({"x": x, "y": y, "n": np.float64(2.5)}, dtype=object),
                        plain=np.arange(3))
    got = load_npz(path)
    d = got["data"].item()
    assert d["x"].dtype == np.float32 and np.array_equal(d["x"], x)
    assert d["y"].dtype == np.int64 and np.array_equal(d["y"], y)
    assert d["n"] == 2.5 and np.array_equal(got["plain"], np.arange(3))


def test_pfllib_client_files_load_through_the_safe_reader(tmp_path: Path) -> None:
    pfllib_dir(tmp_path / "data", {"x": np.ones((3, 3, 32, 32), np.float32), "y": np.array([1, 2, 3])})
    c = load_federated(given_cfg(tmp_path / "data"), 0).clients[0]
    assert c.x_train.shape == (3, 3, 32, 32) and c.y_train.tolist() == [1, 2, 3]


def test_truncated_npz_is_a_one_line_data_error(tmp_path: Path) -> None:
    base = pfllib_dir(tmp_path / "data", {"x": np.ones((3, 3, 32, 32), np.float32), "y": np.arange(3)})
    path = base / "train" / "0.npz"
    with zipfile.ZipFile(path) as z:
        raw = z.read("data.npy")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data.npy", raw[: len(raw) // 2])
    with pytest.raises(DataError) as exc:
        load_federated(given_cfg(tmp_path / "data"), 0)
    assert_one_line(exc, str(path))


def test_malicious_state_file_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    store = ClientStateStore(tmp_path / "state")
    store.root.mkdir()
    torch.save({"personal": {"w": torch.ones(2)}, "extra": touch(marker)}, store.path(3))
    with pytest.raises(DataError) as exc:
        store.load(3)
    assert_one_line(exc, str(store.path(3)), "refused", "system")
    assert not marker.exists()


def test_garbage_state_file_is_a_one_line_data_error(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    store.path(0).write_bytes(b"not a torch file")
    with pytest.raises(DataError) as exc:
        store.load(0)
    assert_one_line(exc, str(store.path(0)))


def test_state_of_plain_values_round_trips(tmp_path: Path) -> None:
    """What client methods keep: nested containers of tensors, numbers, strings, optimizer state."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    state = {"personal": {k: v.detach().clone() for k, v in model.state_dict().items()},
             "optimizer": opt.state_dict(), "history": [1, 2.5, "x", None, (True, torch.arange(3))],
             "masks": {0: torch.zeros(2, dtype=torch.bool)}, "fedkd.train_calls": 2}
    store = ClientStateStore(tmp_path)
    store.save(0, state)
    got = store.load(0)
    assert got["fedkd.train_calls"] == 2 and got["history"][:4] == [1, 2.5, "x", None]
    assert torch.equal(got["history"][4][1], torch.arange(3)) and got["masks"][0].dtype == torch.bool
    assert all(torch.equal(got["personal"][k], v) for k, v in state["personal"].items())
    opt2 = torch.optim.Adam(model.parameters(), lr=0.1)
    opt2.load_state_dict(got["optimizer"])
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
