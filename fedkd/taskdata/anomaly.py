"""Tabular anomaly-detection datasets (ADBench "Classical" npz, ODDS .mat) for centralized methods.

Why: `stkd` (`../shared/specs/centralized.md` section 3.3) needs the ADBench / ODDS tables as one
client's train/test split. Each file is registered under its own name: `adbench:<stem>` (the
stem keeps ADBench's numeric prefix, e.g. `adbench:6_cardio`) and `odds:<stem>` (e.g.
`odds:cardio`). Names are registered explicitly (the files listed in `shared/data/README.md`,
sections 5 and 6), not discovered, because the data dir is only known per run; each name's
`files` entry is checked before a run starts.

Split (spec 3.3): stratified 70/30 train/test with the run seed; features z-scored with the
train statistics, columns constant on the train split dropped. Labels: int64, 1 = anomaly; the
method, not the loader, hides the training labels. Contamination control (subsampling training
anomalies) is a method setting, since a dataset cannot see method settings (see `clients/stkd.py`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedkd.data import ClientSplit, DataError, FederatedData, TaskDataset, register_task_dataset

#: test share of the stratified split (spec 3.3: 70/30); fixed here, `data.test_fraction` is not used
TEST_FRACTION = 0.3

ADBENCH_DIR = "adbench-classical"
ODDS_DIR = "odds-mat"

#: ADBench files (README section 5); the spec's default suite is 6_cardio, 2_annthyroid,
#: 24_mnist, 32_shuttle, 30_satellite
ADBENCH_FILES: tuple[str, ...] = (
    "2_annthyroid", "4_breastw", "6_cardio", "12_fault", "18_Ionosphere", "23_mammography",
    "24_mnist", "28_pendigits", "30_satellite", "31_satimage-2", "32_shuttle", "38_thyroid",
    "42_WBC", "44_Wilt")
DEFAULT_SUITE: tuple[str, ...] = ("adbench:6_cardio", "adbench:2_annthyroid", "adbench:24_mnist",
                                  "adbench:32_shuttle", "adbench:30_satellite")
#: ODDS files (README section 6)
ODDS_FILES: tuple[str, ...] = (
    "arrhythmia", "cardio", "glass", "ionosphere", "letter", "lympho", "mnist", "musk", "optdigits",
    "pendigits", "pima", "satellite", "satimage-2", "shuttle", "vertebral", "vowels", "wbc")


def _need(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"missing data file: {path} (the data dir is set by data.data_dir or $FEDKD_DATA_DIR)")
    return path


def read_adbench(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(X float64 (n, d), y int64 (n,)) from an ADBench npz (keys X, y; no pickle)."""
    try:
        with np.load(_need(path), allow_pickle=False) as z:
            return np.asarray(z["X"], np.float64), np.asarray(z["y"]).ravel().astype(np.int64)
    except DataError:
        raise
    except Exception as exc:  # corrupt archive, wrong keys, ...
        raise DataError(f"cannot read {path}: {exc}") from exc


def read_odds(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(X float64 (n, d), y int64 (n,)) from an ODDS MATLAB v5 file (keys X, y; dtypes vary)."""
    try:
        import scipy.io

        m = scipy.io.loadmat(str(_need(path)))
        return np.asarray(m["X"], np.float64), np.asarray(m["y"]).ravel().astype(np.int64)
    except DataError:
        raise
    except Exception as exc:  # not a v5 .mat, wrong keys, scipy missing, ...
        raise DataError(f"cannot read {path}: {exc}") from exc


def stratified_split(y: np.ndarray, seed: int, test_fraction: float = TEST_FRACTION
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices; per class round(test_fraction * n_c) go to test (seeded)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(np.floor(test_fraction * len(idx) + 0.5))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z-score with train statistics; columns constant on train are dropped (no information, /0)."""
    keep = np.ptp(x_train, axis=0) > 0
    x_train, x_test = x_train[:, keep], x_test[:, keep]
    mean, std = x_train.mean(0), x_train.std(0)
    return (((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32))


def make_split(name: str, x: np.ndarray, y: np.ndarray, seed: int) -> FederatedData:
    """One client holding the stratified, standardized split of (x, y)."""
    if x.ndim != 2 or len(x) != len(y):
        raise DataError(f"{name}: expected X (n, d) and y (n,), got {x.shape} and {y.shape}")
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise DataError(f"{name}: labels must be 0 (normal) / 1 (anomaly), found {np.unique(y)[:5]}")
    tr, te = stratified_split(y, seed)
    x_tr, x_te = standardize(x[tr], x[te])
    split = ClientSplit(x_tr, y[tr].astype(np.int64), x_te, y[te].astype(np.int64))
    return FederatedData(name, 2, (x_tr.shape[1],), [split], None)


def _register(name: str, rel: str, reader: str, description: str) -> None:
    def load(data_dir: Path, seed: int) -> FederatedData:
        read = read_adbench if reader == "adbench" else read_odds
        return make_split(name, *read(Path(data_dir) / rel), seed)

    register_task_dataset(name, TaskDataset(description, (rel,), load))


for _stem in ADBENCH_FILES:
    _register(f"adbench:{_stem}", f"{ADBENCH_DIR}/{_stem}.npz", "adbench",
              f"ADBench {_stem} anomaly table (stratified 70/30, z-scored; y=1 anomaly)")
for _stem in ODDS_FILES:
    _register(f"odds:{_stem}", f"{ODDS_DIR}/{_stem}.mat", "odds",
              f"ODDS {_stem}.mat anomaly table (stratified 70/30, z-scored; y=1 anomaly)")
