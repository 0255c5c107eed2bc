"""Benchmark protocol v2 data: the mnist-scarce exact draw (`scarce` partitioner), the
resolution-shift transform (`data.transform.resolution_factors`) and the v2 experiment configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedkd.config import ConfigError, DataConfig, PartitionerConfig, TransformConfig, load_config
from fedkd.data import ClientSplit, FederatedData, _partitioned, _transformed, check_available
from fedkd.partitioners import balanced_class_assignment, scarce_draw
from fedkd.transforms import degrade_resolution, resolution_factor

ROOT = Path(__file__).resolve().parents[1]
V2_CONFIGS = ["cifar10-long", "fmnist-mild", "mnist-scarce", "resolution-shift", "resolution-shift-fmnist",
              "resolution-shift-mhpflid", "resolution-shift-fmnist-mhpflid"]


def synthetic_labels(per_class: int = 200, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), per_class))


# --- scarce draw ---------------------------------------------------------------------------------

def test_scarce_exact_counts_balance_and_disjointness() -> None:
    y = synthetic_labels(per_class=200)
    draws = scarce_draw(y, num_clients=20, classes_per_client=3, train_per_class=20, test_per_client=10, seed=0)
    assert len(draws) == 20
    clients_per_class = np.zeros(10, dtype=int)
    for tr, te in draws:
        classes = np.unique(y[tr])
        assert len(classes) == 3 and set(np.unique(y[te])) <= set(classes)
        assert np.bincount(y[tr], minlength=10)[classes].tolist() == [20, 20, 20]
        test_counts = np.bincount(y[te], minlength=10)[classes]
        assert test_counts.sum() == 10 and sorted(test_counts.tolist()) == [3, 3, 4]  # 10 over 3 classes
        assert len(np.intersect1d(tr, te)) == 0
        clients_per_class[classes] += 1
    assert clients_per_class.tolist() == [6] * 10  # 20 x 3 / 10: every class to exactly 6 clients
    every = np.concatenate([np.r_[tr, te] for tr, te in draws])
    assert len(every) == len(np.unique(every)) == 20 * (3 * 20 + 10)  # without replacement, disjoint


def test_scarce_protocol_shares_33_or_34() -> None:
    y = synthetic_labels(per_class=1000)
    for tr, te in scarce_draw(y, 20, 3, 100, 100, seed=3):
        assert len(tr) == 300 and len(te) == 100
        assert sorted(np.bincount(y[te])[np.unique(y[te])].tolist()) == [33, 33, 34]


def test_scarce_seed_determinism() -> None:
    y = synthetic_labels()
    a, b = scarce_draw(y, 10, 2, 15, 6, seed=1), scarce_draw(y, 10, 2, 15, 6, seed=1)
    other = scarce_draw(y, 10, 2, 15, 6, seed=2)
    assert all(np.array_equal(p, q) for da, db in zip(a, b) for p, q in zip(da, db))
    assert not all(np.array_equal(da[0], do[0]) for da, do in zip(a, other))


def test_balanced_assignment_is_always_feasible() -> None:
    for seed in range(30):
        for n, k, c in [(20, 3, 10), (10, 1, 10), (5, 10, 10), (12, 5, 6), (7, 3, 7)]:
            rows = balanced_class_assignment(n, c, k, np.random.default_rng(seed))
            assert all(len(set(r)) == k for r in rows)
            assert np.bincount(rows.ravel(), minlength=c).tolist() == [n * k // c] * c


def test_scarce_errors_name_the_key() -> None:
    y = synthetic_labels(per_class=50)
    with pytest.raises(ConfigError, match=r"^data\.partitioner\.classes_per_client=3: .*multiple of the 10"):
        scarce_draw(y, 7, 3, 10, 10, seed=0)
    with pytest.raises(ConfigError, match=r"^data\.partitioner\.classes_per_client=11: at most the 10"):
        scarce_draw(y, 10, 11, 10, 10, seed=0)
    with pytest.raises(ConfigError, match=r"^data\.partitioner\.train_per_class=40: class \d has 50 samples"):
        scarce_draw(y, 20, 3, 40, 10, seed=0)  # 6 clients x (40 + 3..4) > 50
    with pytest.raises(ConfigError, match=r"^data\.partitioner\.classes_per_client"):  # pre-flight, no file read
        check_available(DataConfig(dataset="mnist5k", num_clients=7,
                                   partitioner=PartitionerConfig(name="scarce", classes_per_client=3)))
    with pytest.raises(ConfigError, match=r"^data\.partitioner\.name='scarce'"):
        check_available(DataConfig(dataset="hf:ylecun/mnist", partitioner=PartitionerConfig(name="scarce")))


def test_scarce_through_the_loader_ignores_test_fraction() -> None:
    y = synthetic_labels(per_class=100)
    x = np.arange(len(y), dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 2, 2), np.float32)
    cfg = DataConfig(dataset="mnist5k", num_clients=10, test_fraction=0.5,
                     partitioner=PartitionerConfig(name="scarce", classes_per_client=2, train_per_class=10,
                                                   test_per_client=5))
    d = _partitioned(cfg, x, y, 0, None)
    for c in d.clients:
        assert (len(c.y_train), len(c.y_test)) == (20, 5)
        assert np.array_equal(y[c.x_train[:, 0, 0, 0].astype(int)], c.y_train)  # x and y stay paired


# --- resolution transform ------------------------------------------------------------------------

def test_diagonal_assignment_matches_the_protocol() -> None:
    factors = [1, 2, 4, 8]
    table = [resolution_factor(k, factors) for k in range(8)]
    assert table == [1, 2, 4, 8, 2, 4, 8, 1]
    # protocol: with [cnn_narrow, cnn, mlp, resnet8][k % 4], cnn_narrow sees x1 and x2, cnn x2 and x4,
    # mlp x4 and x8, resnet8 x8 and x1
    seen = {arch: sorted({table[k] for k in range(8) if k % 4 == i})
            for i, arch in enumerate(["cnn_narrow", "cnn", "mlp", "resnet8"])}
    assert seen == {"cnn_narrow": [1, 2], "cnn": [2, 4], "mlp": [4, 8], "resnet8": [1, 8]}
    assert [resolution_factor(k, factors, "cyclic") for k in range(8)] == [1, 2, 4, 8, 1, 2, 4, 8]
    with pytest.raises(ConfigError, match="data.transform.resolution_assign"):
        resolution_factor(0, factors, "random")


def test_factor_one_is_identity() -> None:
    x = np.random.default_rng(0).standard_normal((3, 2, 8, 8)).astype(np.float32)
    assert degrade_resolution(x, 1) is x


def test_factor_two_by_hand() -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 4)).astype(np.float32)
    down = x.reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))  # area: means of 2x2 blocks
    # bilinear 2 -> 4, align_corners=False: source rows -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1)
    up = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]], dtype=np.float32)
    expected = np.einsum("ik,nckl,jl->ncij", up, down, up)
    np.testing.assert_allclose(degrade_resolution(x, 2), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_block_means_then_bilinear_on_32x32(factor: int) -> None:
    x = np.random.default_rng(factor).standard_normal((2, 3, 32, 32)).astype(np.float32)
    s = 32 // factor
    blocks = torch.from_numpy(x.reshape(2, 3, s, factor, s, factor).mean(axis=(3, 5)))
    expected = F.interpolate(blocks, size=(32, 32), mode="bilinear", align_corners=False).numpy()
    out = degrade_resolution(x, factor)
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_non_divisible_size_uses_floor() -> None:
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    small = F.interpolate(torch.from_numpy(x), size=(3, 3), mode="area")  # floor(28 / 8) = 3
    expected = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(degrade_resolution(x, 8), expected, atol=1e-6)


def test_transform_per_client_train_and_test_alike_without_rng() -> None:
    rng = np.random.default_rng(0)
    clients = [ClientSplit(rng.standard_normal((4, 1, 8, 8)).astype(np.float32), np.zeros(4, np.int64),
                           rng.standard_normal((2, 1, 8, 8)).astype(np.float32), np.zeros(2, np.int64))
               for _ in range(5)]
    data = FederatedData("t", 10, (1, 8, 8), clients, None)
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()[1].copy()
    out = _transformed(data, TransformConfig(resolution_factors=[1, 2], resolution_assign="diagonal"))
    assert torch.equal(torch.random.get_rng_state(), torch_state) and np.array_equal(np.random.get_state()[1], np_state)
    for k, (a, b) in enumerate(zip(clients, out.clients)):
        f = [1, 2][(k + k // 2) % 2]
        for before, after in ((a.x_train, b.x_train), (a.x_test, b.x_test)):
            assert np.array_equal(after, degrade_resolution(before, f))
        assert (f == 1) == np.array_equal(a.x_train, b.x_train)


def test_transform_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^data\.transform\.resolution_factors=\[1, 0\]"):
        TransformConfig(resolution_factors=[1, 0])
    data = FederatedData("t", 10, (1, 8, 8), [], None)
    with pytest.raises(ConfigError, match=r"^data\.transform\.resolution_factors=\[1, 16\]: .*side 8"):
        _transformed(data, TransformConfig(resolution_factors=[1, 16]))
    with pytest.raises(ConfigError, match=r"^data\.transform\.resolution_factors.*CxHxW"):
        _transformed(FederatedData("t", 2, (5,), [], None), TransformConfig(resolution_factors=[2]))
    with pytest.raises(ConfigError, match="data.transform.resolution_factors"):
        load_config(ROOT / "configs/experiment/resolution-shift.yaml", ["data.transform.resolution_factors=[0]"])
    with pytest.raises(ConfigError, match="data.transform.resolution_assign"):
        load_config(ROOT / "configs/experiment/resolution-shift.yaml", ["data.transform.resolution_assign=diag"])


# --- configs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", V2_CONFIGS)
def test_v2_experiment_configs_load(name: str) -> None:
    path = ROOT / "configs/experiment" / f"{name}.yaml"
    assert "protocol v2 setting" in path.read_text().splitlines()[0]
    cfg = load_config(path)
    t = cfg.train
    assert (t.drop_last, t.local_epochs, t.batch_size, t.optimizer, t.lr, t.momentum, t.weight_decay,
            t.fraction_clients) == (True, 1, 10, "sgd", 0.005, 0.0, 0.0, 1.0)
    rounds, every = {"fmnist-mild": (30, 5), "mnist-scarce": (100, 10)}.get(name, (50, 5))
    assert (t.rounds, cfg.evaluation.every) == (rounds, every)
    d = cfg.data
    if name.startswith("resolution-shift"):
        assert d.num_clients == 8 and d.transform.resolution_factors == [1, 2, 4, 8]
        assert (d.partitioner.name, d.partitioner.alpha, d.test_fraction) == ("dirichlet", 0.5, 0.25)
        assert d.dataset == ("fmnist" if "fmnist" in name else "cifar10-subset")
        hetero = ["cnn_narrow", "cnn", "mlp", "resnet8"]
        assert cfg.model.per_client == (hetero if name.endswith("mhpflid") else [])
    if name == "mnist-scarce":
        p = d.partitioner
        assert (d.dataset, d.num_clients, p.name, p.classes_per_client, p.train_per_class, p.test_per_client) == \
               ("pfllib-mnist", 20, "scarce", 3, 100, 100)


def test_std_mnist_keeps_its_v1_budget() -> None:
    cfg = load_config(ROOT / "configs/experiment/std-mnist.yaml")
    assert (cfg.train.rounds, cfg.train.drop_last, cfg.evaluation.every) == (20, False, 5)
