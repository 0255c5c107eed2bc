"""xTime (centralized.md section 2.6 test plan): rarity labels, router, KD direction, rare penalty,
stage schedule, leakage guard; plus the evaluation metrics. Every test trains at most a few
epochs on a small slice of ETTh1 (or uses a synthetic series)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedkd import registry
from fedkd.clients.base import ClientData, RoundInfo
from fedkd.clients.staged import stage_of
from fedkd.clients.xtime import (FROZEN, XTimeClient, XTimeSettings,
                                 forecast_metrics, fuse, haar1, rare_weights, weighted_mse)
from fedkd.config import ConfigError, FedkdConfig, data_dir, load_config
from fedkd.data import load_federated
from fedkd.taskdata.ett import (COLUMNS, LAST_RAW, OT_MEAN, OT_STD, SPLIT, SPLIT_TEST, SPLIT_TRAIN,
                                SPLIT_VAL, TARGET, TARGET_INDEX, TARGET_RAW, TRAIN_END, VAL_END, VOL,
                                change_volatility, make_windows, rarity_levels, rarity_scores,
                                rarity_thresholds, read_series)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "experiment" / "xtime-etth1.yaml"
CPU = torch.device("cpu")
QUANTILES = (0.90, 0.95, 0.99)
TINY = ("method.expert_epochs=1", "method.router_epochs=1", "train.rounds=5")




def config(*overrides: str) -> FedkdConfig:
    return load_config(CONFIG, list(overrides))


def client_for(*overrides: str) -> XTimeClient:
    cfg = config(*TINY, *overrides)
    return XTimeClient(cfg, registry.method_settings(cfg), (96, 7), 1, CPU)


@pytest.fixture(scope="module")
def small() -> ClientData:
    """The last 640 training windows of ETTh1 (5 batches of 128) and all validation/test windows."""
    c = load_federated(config().data, 0).clients[0]
    t = torch.as_tensor
    return ClientData(t(c.x_train[-640:]), t(c.y_train[-640:]), t(c.x_test), t(c.y_test))


def info(server_round: int) -> RoundInfo:
    return RoundInfo(0, server_round, 0)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def changed_models(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    """Names of the model state dicts that are new or different."""
    return {k for k, v in after.items() if isinstance(v, dict) and not k.startswith("optimizer")
            and all(isinstance(t, torch.Tensor) for t in v.values())  # not the specialist check
            and (k not in before or not same(before[k], v))}


# 1. rarity labels --------------------------------------------------------------------------------

def synthetic_series(seed: int = 0, length: int = 2000) -> np.ndarray:
    """7 columns; OT (last) a random walk with slowly varying volatility."""
    rng = np.random.default_rng(seed)
    scale = 0.5 + 0.4 * np.sin(np.arange(length) / 50.0)
    ot = 20 + np.cumsum(rng.normal(0.0, scale))
    return np.column_stack([rng.normal(size=(length, 6)), ot])


BOUNDS = (1200, 1600, 2000)


def test_rarity_fractions_thresholds_from_train_only_and_no_look_ahead() -> None:
    values = synthetic_series()
    w = make_windows(values, lookback=24, horizon=1, bounds=BOUNDS)
    train = w.y[:, SPLIT] == SPLIT_TRAIN
    y = w.y[train].astype(np.float64)
    r = rarity_scores(y[:, TARGET_RAW], y[:, LAST_RAW], y[:, VOL])
    tau = rarity_thresholds(r, QUANTILES)
    level = rarity_levels(r, tau)
    n = len(r)
    for k, q in enumerate(QUANTILES, start=1):
        assert abs((level >= k).mean() - (1 - q)) <= 1 / n, (k, (level >= k).mean())
    # test-period values do not move the thresholds (nor any training window)
    moved = values.copy()
    moved[BOUNDS[1]:] += np.random.default_rng(1).normal(0, 50, size=moved[BOUNDS[1]:].shape)
    w2 = make_windows(moved, lookback=24, horizon=1, bounds=BOUNDS)
    y2 = w2.y[train].astype(np.float64)
    assert np.array_equal(w2.x[train], w.x[train]) and np.array_equal(w2.y[train], w.y[train])
    assert np.array_equal(rarity_thresholds(rarity_scores(y2[:, TARGET_RAW], y2[:, LAST_RAW],
                                                          y2[:, VOL]), QUANTILES), tau)
    # r at t depends on OT_{t+1}, OT_t and s_t only: changing everything after t+1 leaves it
    ot, t = values[:, -1], 700
    later = ot.copy()
    later[t + 2:] = np.random.default_rng(2).normal(0, 50, size=len(ot) - t - 2)
    s, s2 = change_volatility(ot), change_volatility(later)
    assert np.array_equal(s[:t + 2], s2[:t + 2], equal_nan=True)
    assert not np.array_equal(s, s2, equal_nan=True)
    assert np.isnan(s[:168]).all() and not np.isnan(s[168:]).any()
    assert rarity_scores(ot[t + 1], ot[t], s[t]) == rarity_scores(later[t + 1], later[t], s2[t])
    assert s[t] == pytest.approx(np.diff(ot[t - 168:t + 1]).std(), rel=1e-12)


# 2. router ---------------------------------------------------------------------------------------

def test_router_output_is_a_convex_combination_of_the_experts() -> None:
    client = client_for()
    gen = torch.Generator().manual_seed(0)
    state = {f"expert_{k}": {n: torch.randn(v.shape, generator=gen) * 0.1
                             for n, v in client._expert_init.items()} for k in range(4)}
    experts = [client.load(f"expert_{k}", state) for k in range(4)]
    x = torch.randn(256, 96, 7, generator=gen)
    with torch.no_grad():
        u, preds = client.router_inputs(experts, x)
        assert u.shape == (256, 4 * (1 + 64))  # [yhat_0..3, h_0..3]: 260-d
        for logits in (client.load("router", state)(u), 30 * torch.randn(256, 4, generator=gen)):
            fused, gates = fuse(logits, preds)
            assert (gates >= 0).all()
            assert torch.allclose(gates.sum(-1), torch.ones(256), atol=1e-6)
            lo, hi = preds.min(-1, keepdim=True).values, preds.max(-1, keepdim=True).values
            assert (fused >= lo - 1e-6).all() and (fused <= hi + 1e-6).all()


# 3. KD direction ---------------------------------------------------------------------------------

def test_kd_trains_only_the_current_expert_and_no_gradient_reaches_its_teacher(small: ClientData) -> None:
    client = client_for()
    state: dict[str, Any] = {}
    client.train({}, state, small, info(1))  # expert_0
    before = copy.deepcopy(state)
    teacher = client.nets["expert_0"]
    grads = [None if p.grad is None else p.grad.clone() for p in teacher.parameters()]
    calls: list[int] = []
    hooks = [p.register_hook(lambda g: calls.append(1)) for p in teacher.parameters()]
    try:
        result = client.train({}, state, small, info(2))  # expert_1 distills from expert_0
    finally:
        for h in hooks:
            h.remove()
    assert calls == [], "a gradient reached the teacher E_0"
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad)
               for g, p in zip(grads, teacher.parameters()))
    assert all(p.requires_grad for p in teacher.parameters())  # restored after the stage
    assert changed_models(before, state) == {"expert_1"}
    assert same(state["expert_0"], before["expert_0"])  # bit-identical frozen teacher
    assert state[FROZEN] == ["expert_0", "expert_1"]
    assert same(result.arrays, state["expert_1"]) and result.metrics["stage"] == 1
    assert result.metrics["kd"] > 0
    assert not same(state["expert_1"], state["expert_0"])


def test_kd_term_with_zero_weight_has_no_effect(small: ClientData) -> None:
    """Same init and batches: E_1 with lambda_kd = 0 is bit-identical to B4's no-KD E_1."""
    def trained(lambda_kd: float) -> dict[str, Any]:
        client = client_for(f"method.lambda_kd={lambda_kd}", "method.lambda_feat=0.0",
                            "method.init_from_previous=false", "method.ablate_kd=true")
        state: dict[str, Any] = {}
        for rnd in (1, 2):
            client.train({}, state, small, info(rnd))
        return state

    off = trained(0.0)
    assert same(off["expert_1"], off["nokd_expert_1"])
    on = trained(0.5)
    assert same(on["nokd_expert_1"], off["nokd_expert_1"])  # the baseline does not see lambda_kd
    assert not same(on["expert_1"], on["nokd_expert_1"])


# 4. rare penalty ---------------------------------------------------------------------------------

def test_rare_penalty_weights_and_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    pred, y = torch.randn(32, 1, generator=gen), torch.randn(32, 1, generator=gen)
    ones = torch.ones(32)
    assert torch.allclose(weighted_mse(pred, y, ones), torch.nn.functional.mse_loss(pred, y),
                          rtol=1e-6, atol=1e-7)
    levels = np.array([0] * 20 + [1] * 6 + [2] * 4 + [3] * 2)
    w = rare_weights(levels, 4, max_penalty=20.0)
    assert (w[0] == 1).all()
    assert np.allclose(w[1], np.where(levels >= 1, 32 / 12, 1.0))  # pi_1 = 1 / frac(level >= 1)
    assert np.allclose(w[3], np.where(levels >= 3, 16.0, 1.0))
    assert rare_weights(np.r_[np.zeros(199), 3], 4, 20.0)[3].max() == 20.0  # capped at max_penalty

    def grad(weight: torch.Tensor) -> torch.Tensor:
        p = pred.clone().requires_grad_(True)
        (weighted_mse(p, y, weight) * weight.sum()).backward()  # the un-normalized sum
        return p.grad.reshape(-1)

    w3 = torch.as_tensor(w[3], dtype=torch.float32)
    doubled = torch.where(torch.as_tensor(levels == 3), 2 * w3, w3)
    g1, g2 = grad(w3), grad(doubled)
    rare = torch.as_tensor(levels == 3)
    assert torch.allclose(g2[rare], 2 * g1[rare]) and torch.allclose(g2[~rare], g1[~rare])


# 5. stage schedule -------------------------------------------------------------------------------

def test_stage_schedule_and_router_only_after_all_experts(small: ClientData) -> None:
    default = XTimeClient.stages(XTimeSettings())
    assert default == [("expert_0", 10), ("expert_1", 10), ("expert_2", 10), ("expert_3", 10),
                       ("router", 5)]
    assert config().train.rounds == 45
    assert [stage_of(default, r)[1] for r in (1, 10, 11, 40, 41, 45)] == \
        ["expert_0", "expert_0", "expert_1", "expert_3", "router", "router"]
    with pytest.raises(ConfigError, match="train.rounds"):
        config("train.rounds=44")

    client = client_for("method.ablate_kd=true")
    with pytest.raises(RuntimeError, match="expert_0"):
        client.train({}, {}, small, info(5))  # the router needs all experts stored
    state: dict[str, Any] = {}
    expected = [{"expert_0"}, {"expert_1", "nokd_expert_1"}, {"expert_2", "nokd_expert_2"},
                {"expert_3", "nokd_expert_3"}, {"router", "nokd_router"}]
    for rnd, names in enumerate(expected, start=1):
        before = copy.deepcopy(state)
        result = client.train({}, state, small, info(rnd))
        assert result.metrics["stage"] == rnd - 1
        assert changed_models(before, state) == names, rnd
    assert set(state[FROZEN]) == set().union(*expected)
    assert not any(k.startswith("optimizer") for k in state)  # dropped at each stage's end
    ev = client.evaluate({}, state, small, info(5))
    assert ev.accuracy == -ev.metrics["mse-level2"] == -ev.metrics["xtime-mse-level2"]
    assert ev.num_examples == int((small.y_test[:, SPLIT] == SPLIT_TEST).sum())
    for name in ("b1", "b2", "b3", "b4", "e1", "xtime"):
        assert math.isfinite(ev.metrics[f"{name}-mse-level3"]), name
    assert ev.metrics["b1-mse-level0"] == ev.metrics["e0-mse-level0"]
    assert ev.metrics["n-level3"] >= 10 and "val-f1-level1" in ev.metrics


# 6. leakage guard --------------------------------------------------------------------------------

def test_no_training_window_reaches_the_validation_period() -> None:
    cfg = config()
    c = load_federated(cfg.data, 0).clients[0]
    assert c.y_train.shape[1] == len(COLUMNS)
    assert c.y_train[:, TARGET_INDEX].max() < TRAIN_END  # targets (and so every input row)
    assert (c.y_train[:, SPLIT] == SPLIT_TRAIN).all()
    val, test = c.y_test[:, SPLIT] == SPLIT_VAL, c.y_test[:, SPLIT] == SPLIT_TEST
    assert val.sum() == test.sum() == 2880
    assert c.y_test[val, TARGET_INDEX].min() == TRAIN_END and c.y_test[test, TARGET_INDEX].min() == VAL_END
    # everything from row 8640 on replaced: training windows and their targets are bit-identical
    values = np.array(read_series(data_dir(cfg.data) / "ett-small" / "ETTh1.csv"))
    values[TRAIN_END:] = np.random.default_rng(0).normal(0, 100, size=values[TRAIN_END:].shape)
    w = make_windows(values)
    train = w.y[:, SPLIT] == SPLIT_TRAIN
    assert np.array_equal(w.x[train], c.x_train) and np.array_equal(w.y[train], c.y_train)


# evaluation metrics ------------------------------------------------------------------------------

def test_forecast_metrics_perfect_forecast_and_small_levels() -> None:
    rng = np.random.default_rng(0)
    n = 400
    y = np.zeros((n, len(COLUMNS)), np.float32)
    y[:, LAST_RAW] = 10.0
    y[:, VOL] = 1.0
    y[:, TARGET_RAW] = 10.0 + rng.normal(0, 1, n)
    y[:, OT_MEAN], y[:, OT_STD] = 10.0, 2.0
    y[:, TARGET] = (y[:, TARGET_RAW] - 10.0) / 2.0
    tau = rarity_thresholds(np.abs(y[:, TARGET_RAW] - 10.0), QUANTILES)
    m = forecast_metrics(y[:, TARGET], y, tau, "vol_change", min_n=10)
    assert m["mse-level0"] < 1e-12 and m["n-level1"] == 40
    assert m["precision-level1"] == m["recall-level1"] == m["f1-level1"] == 1.0
    assert math.isnan(m["mse-level3"]) and math.isnan(m["f1-level3"])  # 4 windows < 10
    flat = forecast_metrics(np.full(n, 0.0), y, tau, "vol_change", min_n=10)  # predicts "no change"
    assert flat["recall-level1"] == 0.0 and flat["precision-level1"] == 0.0


def test_haar1_option_is_orthonormal_and_trains(small: ClientData) -> None:
    x = torch.randn(8, 96, 7, generator=torch.Generator().manual_seed(0))
    z = haar1(x)
    assert z.shape == x.shape
    assert torch.allclose(z.pow(2).sum(dim=(1, 2)), x.pow(2).sum(dim=(1, 2)), rtol=1e-5)
    assert haar1(x[:, :95]).shape == (8, 96, 7)  # odd length: last step repeated
    client = client_for("method.wavelet=haar1")
    result = client.train({}, {}, small, info(1))
    assert math.isfinite(result.metrics["loss"])
