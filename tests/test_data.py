"""fedkd.data: loading, partitioning and error messages (offline, fast)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedkd.config import ConfigError, DataConfig, PartitionerConfig
from fedkd.data import (
    DATASETS,
    DataError,
    FederatedData,
    check_available,
    load_federated,
    make_partitioner,
    partition_indices,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data dir {SHARED} absent")


def cfg(name: str = "iid", n: int = 10, dataset: str = "mnist5k", **part: object) -> DataConfig:
    return DataConfig(dataset=dataset, num_clients=n, partitioner=PartitionerConfig(name=name, **part))  # type: ignore[arg-type]


def sizes(d: FederatedData) -> list[int]:
    return [len(c.y_train) + len(c.y_test) for c in d.clients]


def classes_per_client(d: FederatedData) -> list[int]:
    return [sum(1 for a, b in zip(h["train"], h["test"]) if a + b) for h in d.label_histograms()]


@pytest.fixture(scope="module")
def mnist5k_labels() -> np.ndarray:
    d = load_federated(cfg("iid", 1), 0)
    return np.concatenate([d.clients[0].y_train, d.clients[0].y_test])


def test_datasets_listing() -> None:
    assert {"mnist5k", "pfllib-mnist", "fmnist", "cifar10-subset", "digits", "hf:<name>"} <= set(DATASETS)


def test_mnist5k_loads() -> None:
    d = load_federated(cfg("iid", 10), 0)
    assert (d.dataset, d.num_classes, d.input_shape, d.global_test) == ("mnist5k", 10, (1, 28, 28), None)
    assert len(d.clients) == 10 and sum(sizes(d)) == 5000
    for c in d.clients:
        assert c.x_train.dtype == np.float32 and c.y_train.dtype == np.int64
        assert c.x_train.shape[1:] == (1, 28, 28) and len(c.x_train) == len(c.y_train)
        assert c.x_train.min() >= -1.0 and c.x_train.max() <= 1.0
    assert set(np.concatenate([c.y_train for c in d.clients]).tolist()) == set(range(10))
    assert load_federated(cfg("iid", 10), 0) is d  # cached per process


def test_iid_partition_disjoint_and_covering(mnist5k_labels: np.ndarray) -> None:
    c = cfg("iid", 7)
    parts = partition_indices(mnist5k_labels, make_partitioner(c, 0), 0)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(np.unique(allidx)) == 5000
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert sizes(load_federated(c, 0)) == [len(p) for p in parts]


def test_seed_determinism(mnist5k_labels: np.ndarray) -> None:
    for name in ("iid", "dirichlet", "shard"):
        c = cfg(name, 5)
        a = partition_indices(mnist5k_labels, make_partitioner(c, 1), 1)
        b = partition_indices(mnist5k_labels, make_partitioner(c, 1), 1)
        other = partition_indices(mnist5k_labels, make_partitioner(c, 2), 2)
        assert all(np.array_equal(x, y) for x, y in zip(a, b)), name
        assert not all(np.array_equal(x, y) for x, y in zip(a, other)), name
    d1, d2 = load_federated(cfg("dirichlet", 5, alpha=0.3), 3), load_federated(cfg("dirichlet", 5, alpha=0.3), 4)
    assert np.array_equal(d1.clients[0].x_train, load_federated(cfg("dirichlet", 5, alpha=0.3), 3).clients[0].x_train)
    assert d1.label_histograms() != d2.label_histograms()


def test_dirichlet_more_skewed_than_iid() -> None:
    iid = classes_per_client(load_federated(cfg("iid", 10), 0))
    dirichlet = classes_per_client(load_federated(cfg("dirichlet", 10, alpha=0.1), 0))
    assert np.mean(dirichlet) < np.mean(iid) == 10
    assert sum(sizes(load_federated(cfg("dirichlet", 10, alpha=0.1), 0))) == 5000


def test_pathological_classes_per_client() -> None:
    d = load_federated(cfg("pathological", 10, classes_per_client=3), 0)
    assert classes_per_client(d) == [3] * 10


def test_shard_partition() -> None:
    d = load_federated(cfg("shard", 10, shards_per_client=2), 0)
    assert sum(sizes(d)) == 5000 and all(k <= 2 for k in classes_per_client(d))


def test_test_fraction_per_client() -> None:
    c = cfg("dirichlet", 8, alpha=0.5)
    c.test_fraction = 0.2
    for cl in load_federated(c, 0).clients:
        n = len(cl.y_train) + len(cl.y_test)
        assert len(cl.y_test) == math.ceil(0.2 * n) and len(cl.x_test) == len(cl.y_test)


def test_label_histograms_sum() -> None:
    d = load_federated(cfg("dirichlet", 6, alpha=0.3), 0)
    hs = d.label_histograms()
    assert [sum(h["train"]) for h in hs] == [len(c.y_train) for c in d.clients]
    assert [sum(h["test"]) for h in hs] == [len(c.y_test) for c in d.clients]
    assert all(len(h["train"]) == len(h["test"]) == 10 for h in hs)
    assert np.sum([h["train"] for h in hs]) + np.sum([h["test"] for h in hs]) == 5000


def test_unknown_dataset_suggests() -> None:
    with pytest.raises(ConfigError) as err:
        check_available(cfg(dataset="mnist5"))
    msg = str(err.value)
    assert "data.dataset" in msg and "'mnist5'" in msg and "did you mean 'mnist5k'" in msg


def test_hf_name_accepted() -> None:
    check_available(cfg(dataset="hf:ylecun/mnist"))  # no network: only the name is checked


def test_given_rejected_without_natural_partition() -> None:
    with pytest.raises(ConfigError, match="data.partitioner.name"):
        check_available(cfg("given", dataset="mnist5k"))
    with pytest.raises(ConfigError, match="data.partitioner.name"):
        check_available(cfg("given", dataset="fmnist"))


def test_impossible_partition_names_key() -> None:
    with pytest.raises(ConfigError, match="data.partitioner.alpha"):
        load_federated(cfg("dirichlet", 100, alpha=0.01, min_partition_size=10), 0)
    with pytest.raises(ConfigError, match="data.partitioner.classes_per_client"):
        load_federated(cfg("pathological", 5, classes_per_client=11), 0)
    with pytest.raises(ConfigError, match="data.num_clients"):
        load_federated(cfg("iid", 6000), 0)


def test_missing_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("FEDKD_DATA_DIR", str(missing))
    for ds in ("digits", "pfllib-mnist", "cifar10-subset"):
        with pytest.raises(DataError, match=str(missing)):
            check_available(cfg(dataset=ds))
    (missing / "pfllib-mnist-dir0.1" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="0.npz"):
        load_federated(cfg("given", 4, dataset="pfllib-mnist"), 0)


@needs_shared
def test_pfllib_mnist_given_matches_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDKD_DATA_DIR", str(SHARED))
    d = load_federated(cfg("given", 20, dataset="pfllib-mnist"), 0)
    assert len(d.clients) == 20 and sum(sizes(d)) == 70000 and d.input_shape == (1, 28, 28)
    base = SHARED / "pfllib-mnist-dir0.1"
    for i in (0, 16):
        tr = np.load(base / "train" / f"{i}.npz", allow_pickle=True)["data"].item()
        assert np.array_equal(d.clients[i].y_train, tr["y"]) and np.array_equal(d.clients[i].x_train, tr["x"])
    assert set(d.clients[16].y_train.tolist()) | set(d.clients[16].y_test.tolist()) == {0}
    assert d.global_test is None  # MNIST's official test images are inside PFLlib's client splits
    assert len(load_federated(cfg("given", 4, dataset="pfllib-mnist"), 0).clients) == 4
    with pytest.raises(ConfigError, match="data.num_clients"):
        check_available(cfg("given", 21, dataset="pfllib-mnist"))


@needs_shared
def test_other_offline_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDKD_DATA_DIR", str(SHARED))
    d = load_federated(cfg("given", 10, dataset="cifar10-subset"), 0)
    assert d.input_shape == (3, 32, 32) and sum(sizes(d)) == 5291
    assert set(d.clients[3].y_train.tolist()) == {0}
    d = load_federated(cfg("iid", 5, dataset="digits"), 0)
    assert d.input_shape == (1, 8, 8) and sum(sizes(d)) == 1797
    x = d.clients[0].x_train
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_medmnist_without_the_extra_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "medmnist", None)  # import fails as if not installed
    with pytest.raises(DataError, match=r"pip install 'fedkd\[medmnist\]'"):
        check_available(cfg(dataset="medmnist:pathmnist"))


def test_medmnist_file_in_the_data_dir_is_partitioned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("medmnist")  # optional extra; the file below stands in for the download
    with pytest.raises(ConfigError, match=r"medmnist:chestmnist.*allowed:.*medmnist:pathmnist"):
        check_available(cfg(dataset="medmnist:chestmnist"))  # multi-label: not a classification set
    rng = np.random.default_rng(0)
    (tmp_path / "medmnist").mkdir()
    np.savez(tmp_path / "medmnist" / "pathmnist.npz",
             train_images=rng.integers(0, 256, (300, 28, 28, 3), dtype=np.uint8),
             train_labels=rng.integers(0, 9, (300, 1)), test_images=rng.integers(0, 256, (40, 28, 28, 3), dtype=np.uint8),
             test_labels=rng.integers(0, 9, (40, 1)))
    monkeypatch.setenv("FEDKD_DATA_DIR", str(tmp_path))
    d = load_federated(cfg("dirichlet", 4, dataset="medmnist:pathmnist", alpha=0.5), 0)
    assert d.input_shape == (3, 28, 28) and len(d.clients) == 4 and sum(sizes(d)) == 300
    assert d.global_test is not None and len(d.global_test[1]) == 40
    assert -1.0 <= d.clients[0].x_train.min() and d.clients[0].x_train.max() <= 1.0


def test_fedkd_list_prints_descriptions_verbatim(capsys: pytest.CaptureFixture[str]) -> None:
    from fedkd.cli import main

    assert main(["list"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "medmnist:<flag>" in out and "fedkd[medmnist]" in out  # not eaten as rich markup
