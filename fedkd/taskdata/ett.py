"""ETT hourly series (ETTh1, ETTh2) as one-client forecasting datasets, for xTime.

Spec: `shared/specs/centralized.md` section 2.3. Each sample is a window of L = 96 hourly
steps x 7 z-scored columns (HUFL, HULL, MUFL, MULL, LUFL, LULL, OT) ending at step t, and
its target is OT at t + H (H = 1). Split by the *target* index, chronologically (the usual
ETT-hourly split, 12/4/4 months of 30 days): train [0, 8640), validation [8640, 11520),
test [11520, 14400); a window may start up to L steps before its split's first target, so
no training window touches a row >= 8640. Columns are z-scored with training-row statistics.
Windows end at t >= 168 so the volatility s_t below is defined from past data only.

Why the targets are a table and not one number: rarity levels depend on method settings
(`rarity_on`, `rarity_quantiles`) that a dataset cannot see, and event detection needs raw
OT values and the volatility s_t, which the 96-step window cannot give (s_t looks back 168
steps). So `y` is float32 (n, len(COLUMNS)): column TARGET is the standardized target the
models learn, the others are what the method needs to compute rarity and events itself.
The platform's ClientData keeps them aligned with `x` through every shuffle.
Validation windows travel in the test part (`x_test`, `y_test`), marked by column SPLIT,
because a ClientSplit has no validation slot; the method reports them separately.

The pure functions (`change_volatility`, `rarity_scores`, `rarity_thresholds`,
`rarity_levels`, `make_windows`) are the rarity definition of spec 2.3 (ASSUMED there:
the paper's definition was not found) and are what the leakage tests exercise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedkd.data import (ClientSplit, DataError, FederatedData, TaskDataset, _need,
                        register_task_dataset)

#: ETT-hourly split ends (exclusive) by target row: train, validation, test
TRAIN_END, VAL_END, TEST_END = 8640, 11520, 14400
LOOKBACK, HORIZON = 96, 1
#: s_t = std of the VOL_WINDOW one-step OT changes ending at t (one week of hours)
VOL_WINDOW = 168
FEATURES = ("HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")
OT = FEATURES.index("OT")
EPS = 1e-6

#: columns of `y` (float32); the split codes are SPLIT_TRAIN / SPLIT_VAL / SPLIT_TEST
COLUMNS = ("target", "target_raw", "last_raw", "vol", "split", "target_index", "ot_mean", "ot_std",
           "roll_mean", "roll_std")
(TARGET, TARGET_RAW, LAST_RAW, VOL, SPLIT, TARGET_INDEX, OT_MEAN, OT_STD, ROLL_MEAN,
 ROLL_STD) = range(len(COLUMNS))
SPLIT_TRAIN, SPLIT_VAL, SPLIT_TEST = 0, 1, 2
RARITY_KINDS = ("detrended_value", "vol_change", "abs_change", "value")


@functools.lru_cache(maxsize=2)
def read_series(path: Path) -> np.ndarray:
    """(T, 7) float64 of the numeric columns of an ETT csv (header checked; cached, read-only)."""
    import pandas as pd  # a dependency of `datasets`

    try:
        table = pd.read_csv(_need(path))
    except DataError:
        raise
    except Exception as exc:  # unreadable csv
        raise DataError(f"cannot read {path}: {exc}") from exc
    missing = [c for c in FEATURES if c not in table.columns]
    if missing:
        raise DataError(f"cannot read {path}: columns {missing} missing (found {list(table.columns)})")
    values = table[list(FEATURES)].to_numpy(np.float64)
    values.flags.writeable = False
    return values


def change_volatility(ot: np.ndarray, window: int = VOL_WINDOW) -> np.ndarray:
    """s_t = population std of the `window` one-step changes OT_j - OT_{j-1}, j = t-window+1..t.

    Uses rows <= t only (no look-ahead); NaN for t < window. ddof = 0 is ASSUMED (the spec
    says "std"); it only rescales r by sqrt((w-1)/w) and the quantile thresholds absorb that.
    """
    ot = np.asarray(ot, np.float64)
    s = np.full(len(ot), np.nan)
    d = np.diff(ot)  # d[i] = OT_{i+1} - OT_i: the change ending at i + 1
    if len(d) >= window:
        # changes ending at t-window+1..t are d[t-window .. t-1]
        s[window:] = np.lib.stride_tricks.sliding_window_view(d, window).std(axis=-1)
    return s


def rolling_level(ot: np.ndarray, window: int = VOL_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """(m_t, sd_t): mean and population std of the `window` values OT_{t-window+1..t}.

    Rows <= t only (no look-ahead); NaN for t < window - 1. The (v2) `detrended_value` rarity
    (spec 2.3) measures a target's distance from this recent level.
    """
    ot = np.asarray(ot, np.float64)
    m, sd = np.full(len(ot), np.nan), np.full(len(ot), np.nan)
    if len(ot) >= window:
        view = np.lib.stride_tricks.sliding_window_view(ot, window)  # view[i] = OT_i..OT_{i+w-1}
        m[window - 1:], sd[window - 1:] = view.mean(axis=-1), view.std(axis=-1)
    return m, sd


def rarity_from_table(target: np.ndarray, table: np.ndarray, kind: str) -> np.ndarray:
    """r of `target` (raw units: the true OT_{t+H} or a forecast of it) for the windows of a
    `y` table (its auxiliary columns), under rarity definition `kind`."""
    table = np.asarray(table, np.float64)
    if kind == "detrended_value":
        return detrended_scores(target, table[:, ROLL_MEAN], table[:, ROLL_STD])
    return rarity_scores(target, table[:, LAST_RAW], table[:, VOL], kind)


def detrended_scores(target: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """(v2) r = |z|, z = (OT_{t+H} - m_t) / (sd_t + 1e-6) (ASSUMED two-sided, 168-h window)."""
    return np.abs(np.asarray(target, np.float64) - mean) / (sd + EPS)


def rarity_scores(target: np.ndarray, last: np.ndarray, vol: np.ndarray,
                  kind: str = "vol_change") -> np.ndarray:
    """r(x) in raw units: |OT_{t+H} - OT_t| / (s_t + 1e-6) (`vol_change`, default), the plain
    |change| (`abs_change`) or the value OT_{t+H} itself (`value`); spec 2.3.

    The same function turns a forecast into a predicted rarity (pass the forecast as
    `target`), so true and predicted events share one definition (spec 2.4).
    """
    if kind == "vol_change":
        return np.abs(target - last) / (vol + EPS)
    if kind == "abs_change":
        return np.abs(target - last)
    if kind == "value":
        return np.asarray(target, np.float64).copy()
    if kind == "detrended_value":
        raise ValueError("detrended_value needs the rolling level: use rarity_from_table")
    raise ValueError(f"unknown rarity kind {kind!r}; expected one of {RARITY_KINDS}")


def rarity_thresholds(r_train: np.ndarray, quantiles: list[float] | tuple[float, ...]) -> np.ndarray:
    """tau_k, k = 1..K: quantiles of r over the *training* targets (numpy's linear rule)."""
    q = np.asarray(quantiles, np.float64)
    if np.any(np.diff(q) <= 0) or q.min() <= 0 or q.max() >= 1:
        raise ValueError(f"rarity quantiles must increase strictly inside (0, 1), got {list(quantiles)}")
    return np.quantile(np.asarray(r_train, np.float64), q)


def rarity_levels(r: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """level(x) = max{k : r(x) >= tau_k}, else 0 (tau is non-decreasing, so a count)."""
    return (np.asarray(r, np.float64)[:, None] >= np.asarray(tau)[None, :]).sum(axis=1).astype(np.int64)


@dataclass
class Windows:
    """Windows of one series: x (n, L, C) float32 z-scored, y (n, len(COLUMNS)) float32."""

    x: np.ndarray
    y: np.ndarray


def make_windows(values: np.ndarray, lookback: int = LOOKBACK, horizon: int = HORIZON,
                 bounds: tuple[int, int, int] = (TRAIN_END, VAL_END, TEST_END),
                 vol_window: int = VOL_WINDOW, target_col: int = OT) -> Windows:
    """All train, validation and test windows of `values` (T, C), in time order.

    A window ends at t (its last input row), targets row j = t + horizon, and belongs to the
    split whose range holds j. Only t >= max(vol_window, lookback - 1) is used. Statistics
    (z-score) come from rows [0, bounds[0]) only.
    """
    values = np.asarray(values, np.float64)
    train_end, val_end, test_end = bounds
    if len(values) < test_end:
        raise DataError(f"series has {len(values)} rows; the split needs {test_end}")
    mean = values[:train_end].mean(axis=0)
    std = values[:train_end].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    scaled = ((values - mean) / std).astype(np.float32)
    ot = values[:, target_col]
    vol = change_volatility(ot, vol_window)
    roll_mean, roll_std = rolling_level(ot, vol_window)
    first_t = max(vol_window, lookback - 1)
    t = np.arange(first_t, test_end - horizon)
    j = t + horizon
    split = np.select([j < train_end, j < val_end], [SPLIT_TRAIN, SPLIT_VAL], SPLIT_TEST)
    x = scaled[t[:, None] + np.arange(-lookback + 1, 1)[None, :]]  # (n, L, C)
    y = np.empty((len(t), len(COLUMNS)), np.float32)
    y[:, TARGET] = scaled[j, target_col]
    y[:, TARGET_RAW] = ot[j]
    y[:, LAST_RAW] = ot[t]
    y[:, VOL] = vol[t]
    y[:, SPLIT] = split
    y[:, TARGET_INDEX] = j
    y[:, OT_MEAN] = mean[target_col]
    y[:, OT_STD] = std[target_col]
    y[:, ROLL_MEAN] = roll_mean[t]
    y[:, ROLL_STD] = roll_std[t]
    return Windows(x, y)


@dataclass
class SeriesData(FederatedData):
    """FederatedData of a regression series: 'label histograms' are split sizes (y is float)."""

    def label_histograms(self) -> list[dict[str, list[int]]]:
        out = []
        for c in self.clients:
            test_split = c.y_test[:, SPLIT] if c.y_test.ndim == 2 else np.full(len(c.y_test), SPLIT_TEST)
            out.append({"train": [len(c.y_train)],
                        "validation": [int((test_split == SPLIT_VAL).sum())],
                        "test": [int((test_split == SPLIT_TEST).sum())]})
        return out


def load_ett(data_dir: Path, seed: int, *, series: str = "ETTh1", lookback: int = LOOKBACK,
             horizon: int = HORIZON, name: str | None = None) -> SeriesData:
    """One client: train windows in the train part, validation + test windows in the test part.

    `seed` is unused: the split is chronological, nothing is shuffled here.
    """

    w = make_windows(read_series(Path(data_dir) / "ett-small" / f"{series}.csv"), lookback, horizon)
    train = w.y[:, SPLIT] == SPLIT_TRAIN
    split = ClientSplit(w.x[train], w.y[train], w.x[~train], w.y[~train])
    return SeriesData(name or series.lower(), 1, tuple(w.x.shape[1:]), [split], None)


#: dataset names whose samples follow the layout above (xtime accepts only these)
DATASET_NAMES: list[str] = []


def register_series(name: str, series: str, lookback: int = LOOKBACK, horizon: int = HORIZON) -> None:
    """Register `ett-small/<series>.csv` as task dataset `name` (e.g. another horizon)."""
    register_task_dataset(name, TaskDataset(
        f"ETT-small {series}: {lookback} h x 7 z-scored columns -> OT at t+{horizon}, chronological "
        "8640/2880/2880 split (validation rides in the test part); y carries rarity columns (xtime)",
        (f"ett-small/{series}.csv",),
        functools.partial(load_ett, series=series, lookback=lookback, horizon=horizon, name=name)))
    if name not in DATASET_NAMES:
        DATASET_NAMES.append(name)


register_series("etth1", "ETTh1")
register_series("etth2", "ETTh2")
