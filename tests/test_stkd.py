"""stkd (centralized.md section 3): the test plan of 3.6 at unit level, plus the loader, the
anomaly metrics and the variants' parity. Tiny synthetic blobs (no Flower, no Ray); the real
cardio file only where the contamination control and the loader need it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from fedkd.clients.base import ClientData, RoundInfo
from fedkd.clients.stkd import (VARIANTS, STKDClient, STKDSettings, auroc,
                                average_precision, contaminate, exclusion_mask,
                                f1_at_k, num_excluded, rho_schedule, score_all)
from fedkd.config import ConfigError, FedkdConfig, data_dir, load_config
from fedkd.data import TASK_DATASETS
from fedkd.taskdata.anomaly import (ADBENCH_FILES, DEFAULT_SUITE, ODDS_FILES, make_split)

CPU = torch.device("cpu")
EXPERIMENT = Path(__file__).resolve().parents[1] / "configs" / "experiment" / "stkd-cardio.yaml"




def config(*overrides: str) -> FedkdConfig:
    return load_config(EXPERIMENT, list(overrides))


def blob(n: int = 300, d: int = 6, frac: float = 0.05, seed: int = 0) -> ClientData:
    """Gaussian blob with `frac` far-away points (label 1), train and test alike."""
    g = torch.Generator().manual_seed(seed)

    def part(m: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(m, d, generator=g)
        y = torch.zeros(m, dtype=torch.long)
        k = int(round(frac * m))
        far = torch.randperm(m, generator=g)[:k]
        x[far] += 8.0 * torch.sign(torch.randn(k, d, generator=g))
        y[far] = 1
        return x, y

    return ClientData(*part(n), *part(n // 2))


def client(**settings: Any) -> STKDClient:
    return STKDClient(config(), STKDSettings(**settings), (6,), 2, CPU)


def run(c: STKDClient, data: ClientData, rounds: int, state: dict[str, Any] | None = None,
        ) -> tuple[dict[str, Any], list[dict[str, float]]]:
    state = {} if state is None else state
    metrics = [c.train({}, state, data, RoundInfo(0, r, 0)).metrics for r in range(1, rounds + 1)]
    return state, metrics


def same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- 3.6.1 exclusion fraction -----------------------------------------------------------------


def test_exclusion_removes_round_rho_n_highest_scores_ties_by_lower_index() -> None:
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.0])
    assert exclusion_mask(scores, 2 / 6).tolist() == [True, False, False, True, True, True]
    assert exclusion_mask(scores, 0.0).all() and not exclusion_mask(scores, 1.0).any()
    for rho in (0.01, 0.1, 1 / 3, 0.25, 0.5):
        n = 37
        s = torch.randn(n, generator=torch.Generator().manual_seed(1))
        mask = exclusion_mask(s, rho)
        assert int((~mask).sum()) == num_excluded(rho, n) == math.floor(rho * n + 0.5)
        if (~mask).any() and mask.any():
            assert s[~mask].min() > s[mask].max()
    assert num_excluded(0.5, 5) == 3  # halves round up


def test_exclusion_in_a_run_matches_the_schedule_and_the_scores() -> None:
    c, data = client(rescore_every=1, ramp_rescorings=2, rho_max=0.2), blob(n=120)
    state: dict[str, Any] = {}
    for j in (1, 2, 3):
        c.train({}, state, data, RoundInfo(0, j, 0))
        assert state["rescorings"] == j and state["rho"] == pytest.approx(rho_schedule(j, 0.2, 2))
        for v in ("st", "stkd"):
            mask = state["masks"][v]
            assert int((~mask).sum()) == num_excluded(state["rho"], 120)
            scores = score_all(c._load(v, state), data.x_train)
            assert scores[~mask].min() >= scores[mask].max()


# --- 3.6.2 schedule ---------------------------------------------------------------------------


def test_rho_is_non_decreasing_reaches_rho_max_at_j_ramp_and_round_one_uses_all() -> None:
    rhos = [rho_schedule(j, 0.1, 3) for j in range(8)]
    assert rhos[0] == 0.0 and all(a <= b for a, b in zip(rhos, rhos[1:]))
    assert rhos[3] == pytest.approx(0.1) and max(rhos) == pytest.approx(0.1)
    assert rhos[2] < 0.1
    c, data = client(rescore_every=2), blob(n=100)
    state, metrics = run(c, data, 3)
    assert [m["purified"] for m in metrics[:2]] == [100.0, 100.0]  # all data until the 1st rescoring
    assert metrics[0]["rho"] == 0.0 and metrics[2]["rho"] > 0 and metrics[2]["purified"] < 100


# --- 3.6.3 planted anomalies ------------------------------------------------------------------


def test_first_rescoring_excludes_planted_far_points() -> None:
    data = blob(n=400, frac=0.05)
    state, _ = run(client(rescore_every=1), data, 1)
    for v in ("st", "stkd"):
        excluded = ~state["masks"][v]
        assert int(excluded.sum()) == num_excluded(0.1 / 3, 400)
        assert float(data.y_train[excluded].float().mean()) >= 0.8


# --- 3.6.4 teacher frozen, variants parity ----------------------------------------------------


def test_teacher_is_the_frozen_init_encoder() -> None:
    c = client(rescore_every=1, lambda_kd=1.0)
    init = {k: v.clone() for k, v in c.teacher.state_dict().items()}
    assert same(init, {k.removeprefix("encoder."): v for k, v in c._init.items() if k.startswith("encoder.")})
    state, _ = run(c, blob(n=100), 3)
    assert same(state["teacher"], init) and same(c.teacher.state_dict(), init)
    assert not any(p.requires_grad for p in c.teacher.parameters())
    assert not same(state["kd"], state["ae"])  # the KD term does act


def test_warmup_teacher_is_written_once_and_leaves_the_other_variants_data_alone() -> None:
    data = blob(n=100)
    c = client(teacher="warmup")
    warm, _ = run(c, data, 1)
    teacher = {k: v.clone() for k, v in warm["teacher"].items()}
    init = client()
    assert not same(teacher, init.teacher.state_dict())
    c.train({}, warm, data, RoundInfo(0, 2, 0))
    assert same(warm["teacher"], teacher) and same(c.teacher.state_dict(), teacher)
    plain, _ = run(init, data, 2)
    assert same(plain["ae"], warm["ae"]) and same(plain["st"], warm["st"])  # no teacher, same batches


def test_lambda_zero_gives_stkd_bit_identical_to_st() -> None:
    state, metrics = run(client(rescore_every=1, lambda_kd=0.0), blob(n=100), 3)
    assert same(state["stkd"], state["st"]) and torch.equal(state["masks"]["stkd"], state["masks"]["st"])
    assert same(state["kd"], state["ae"]) and metrics[-1]["stkd-loss"] == metrics[-1]["st-loss"]
    default, _ = run(client(rescore_every=1), blob(n=100), 3)
    assert not same(default["stkd"], default["st"])


def test_rho_zero_gives_st_identical_to_ae_and_stkd_to_kd() -> None:
    state, _ = run(client(rescore_every=1, rho_max=0.0), blob(n=100), 3)
    assert same(state["st"], state["ae"]) and same(state["stkd"], state["kd"])
    assert not same(state["st"], state["stkd"])


# --- 3.6.5 label hygiene ----------------------------------------------------------------------


class HiddenLabels:
    """Stands in for y_train: its length is public, any read of a value raises."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item: Any) -> Any:
        raise AssertionError("training labels were read")

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"training labels were read (.{name})")

    @classmethod
    def __torch_function__(cls, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("training labels were read (torch op)")


def test_training_never_reads_training_labels() -> None:
    data = blob(n=100)
    hidden = ClientData(data.x_train, HiddenLabels(100), data.x_test, data.y_test)  # type: ignore[arg-type]
    for teacher in ("init", "warmup"):
        c = client(rescore_every=1, teacher=teacher)
        state, _ = run(c, hidden, 2)
        assert state["rescorings"] == 2
        result = c.evaluate({}, state, data, RoundInfo(0, 2, 0))  # reporting reads them: allowed
        assert "stkd-excluded-precision" in result.metrics
    with pytest.raises(AssertionError):  # the guard works: contamination control must read y
        run(client(contamination=0.02), hidden, 1)


# --- 3.6.6 contamination control --------------------------------------------------------------


@pytest.fixture(scope="module")
def cardio() -> Any:
    cfg = config()
    return TASK_DATASETS["adbench:6_cardio"].load(data_dir(cfg.data), 0)


def test_contamination_reaches_the_target_within_one_over_n(cardio: Any) -> None:
    y = cardio.clients[0].y_train
    n, natural = len(y), y.mean()
    for rate in (0.0, 0.01, 0.02, 0.05):
        keep = contaminate(y, rate, seed=0)
        assert abs(y[keep].mean() - rate) <= 1 / n
        assert len(np.unique(keep)) == len(keep)  # never duplicated
        assert set(np.flatnonzero(y == 0)) <= set(keep.tolist())  # only anomalies removed
        assert np.array_equal(keep, contaminate(y, rate, seed=0))
    assert not np.array_equal(contaminate(y, 0.05, 0), contaminate(y, 0.05, 1))
    assert np.array_equal(contaminate(y, None, 0), np.arange(n)) and natural > 0.09
    with pytest.raises(ValueError, match="natural"):
        contaminate(y, 0.20, 0)
    split = cardio.clients[0]
    data = ClientData(*(torch.as_tensor(a) for a in (split.x_train, split.y_train, split.x_test, split.y_test)))
    c = STKDClient(config(), STKDSettings(contamination=0.05), cardio.input_shape, 2, CPU)
    view = c.keep_indices(data)
    assert abs(float(data.y_train[view].float().mean()) - 0.05) <= 1 / n
    assert c.train({}, {}, data, RoundInfo(0, 1, 0)).metrics["purified"] == len(view)


# --- metrics ----------------------------------------------------------------------------------


def test_auroc_auprc_f1_by_hand_and_against_sklearn() -> None:
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auroc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5  # a tie is half credit
    assert math.isnan(auroc(np.array([1.0, 2.0]), np.array([0, 0])))
    # AP by hand: ranks 1 (pos), 2 (neg), 3 (pos): 1/2 * 1 + 1/2 * 2/3
    assert average_precision(np.array([3.0, 2.0, 1.0]), np.array([1, 0, 1])) == pytest.approx(5 / 6)
    assert f1_at_k(np.array([0.9, 0.8, 0.1, 0.7]), np.array([1, 0, 0, 1])) == 0.5
    assert f1_at_k(np.array([0.5, 0.5, 0.1]), np.array([0, 1, 0])) == 0.0  # tie: lower index flagged
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 60)
        s = rng.integers(0, 6, 60).astype(float)  # many ties
        assert auroc(s, y) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)
        assert average_precision(s, y) == pytest.approx(metrics.average_precision_score(y, s), abs=1e-12)


def test_evaluate_reports_every_variant_and_the_stkd_auroc_as_headline() -> None:
    c, data = client(rescore_every=1), blob(n=100)
    state, _ = run(c, data, 1)
    result = c.evaluate({}, state, data, RoundInfo(0, 1, 0))
    assert STKDClient.score == "auroc" and result.accuracy == result.metrics["stkd-auroc"]
    assert all(f"{v}-{m}" in result.metrics for v in VARIANTS for m in ("auroc", "auprc", "f1"))
    assert result.num_examples == len(data.y_test) and result.accuracy > 0.9  # far points are easy


# --- loader and config ------------------------------------------------------------------------


def test_loaders_give_a_stratified_standardized_split(cardio: Any) -> None:
    assert {f"adbench:{s}" for s in ADBENCH_FILES} | {f"odds:{s}" for s in ODDS_FILES} <= set(TASK_DATASETS)
    assert set(DEFAULT_SUITE) <= set(TASK_DATASETS)
    odds = TASK_DATASETS["odds:cardio"].load(data_dir(config().data), 0)
    for fd in (cardio, odds):
        split = fd.clients[0]
        assert fd.num_classes == 2 and len(fd.clients) == 1 and fd.input_shape == (21,)
        assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int64
        assert (len(split.y_train), len(split.y_test)) == (1281, 550)
        assert (split.y_train.sum(), split.y_test.sum()) == (123, 53)  # 176 anomalies, 30% of each class
        assert np.allclose(split.x_train.mean(0), 0, atol=1e-4) and np.allclose(split.x_train.std(0), 1, atol=1e-3)
    assert np.array_equal(cardio.clients[0].x_train, odds.clients[0].x_train)  # same data, same split
    x = np.c_[np.arange(10.0), np.ones(10)]
    assert make_split("t", x, np.r_[np.zeros(8), 1, 1].astype(np.int64), 0).input_shape == (1,)


def test_config_checks() -> None:
    cfg = config("method.contamination=0.05", "method.rho_max=oracle")
    assert cfg.method["contamination"] == 0.05 and cfg.method["rho_max"] == "oracle"
    with pytest.raises(ConfigError, match="train.rounds"):
        config("train.rounds=29")
    with pytest.raises(ConfigError, match="rho_max"):
        config("method.rho_max=sometimes")
    with pytest.raises(ConfigError, match="contamination"):
        config("method.contamination=1.5")
