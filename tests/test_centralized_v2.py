"""The v2 pieces of the centralized KD methods (issue 24; `../shared/specs/centralized.md`, the
"(v2)" test plans): kd's early stopping, validation split and jitter; xtime's detrended rarity,
oracle routing and specialisation check; stkd's warm-up teacher; mixclap's infomax rule, tau
sweep and noise-augmented teacher; betakd's weight learning rates and corruption. Tiny tensors
throughout; the few that need real files say so and skip without them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

import fedkd.clients.hinton_kd as hinton_kd
from fedkd import registry
from fedkd.clients.base import ClientData, RoundInfo
from fedkd.clients.betakd import OFFICIAL_LR_MULTIPLIER, BetaKDClient, BetaKDSettings
from fedkd.clients.hinton_kd import HintonKDClient, KDSettings
from fedkd.clients.kd_training import EarlyStop, jitter_offsets, shift_images, stratified_holdout
from fedkd.clients.mixclap_fusion import fusion_grid, select_fusion, unit
from fedkd.clients.stkd import STKDClient, STKDSettings
from fedkd.clients.xtime_forecast import _Targets, oracle_routing, specialisation
from fedkd.config import ConfigError, FedkdConfig, load_config, to_yaml
from fedkd.state import ClientStateStore
from fedkd.taskdata.avmnist import INPUT_DIM, _rng, corruption_masks
from fedkd.taskdata.ett import (ROLL_MEAN, ROLL_STD, SPLIT, SPLIT_TEST, SPLIT_TRAIN, SPLIT_VAL,
                                TARGET_RAW, make_windows, rarity_from_table)

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiment"
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- kd (spec 1.6, tests 7-9) --------------------------------------------------------------------

def kd_config(*overrides: str) -> FedkdConfig:
    return load_config(EXPERIMENTS / "kd-mnist5k-v2.yaml", list(overrides))


def kd_client(**settings: Any) -> HintonKDClient:
    """A tiny kd client on 1x8x8 'images': MLP teacher (fast) unless asked otherwise."""
    s = KDSettings(**{"teacher_model": "mlp", "teacher_hidden": [16], "student_hidden": [8],
                      "teacher_epochs": 1, "student_epochs": 6, **settings})
    return HintonKDClient(kd_config(), s, (1, 8, 8), 3, CPU)


def kd_data(n: int = 120, seed: int = 0) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    return ClientData(x, y, x[:30].clone(), y[:30].clone())


def test_early_stop_keeps_the_minimum_and_stops_after_patience() -> None:
    record = EarlyStop()
    kept = [record.update(loss, epoch, patience=3)
            for epoch, loss in enumerate([1.0, 0.8, 0.9, 0.7, 0.75, 0.71, 0.72], start=1)]
    assert kept == [True, True, False, True, False, False, False]
    assert (record.best_epoch, record.best_loss, record.stopped) == (4, 0.7, True)
    never = EarlyStop()
    for epoch in range(1, 30):
        never.update(1.0, epoch, patience=0)
    assert not never.stopped and never.best_epoch == 1
    assert EarlyStop.load(record.dump()) == record


def test_a_stopped_student_no_longer_changes_while_the_other_trains() -> None:
    c, data, state = kd_client(patience=2), kd_data(), {}
    c.train({}, state, data, RoundInfo(0, 1, 0))  # teacher
    # the KD student has waited one epoch already with an unbeatable best: its next epoch stops it
    c.train({}, state, data, RoundInfo(0, 2, 0))
    state["student-stop"] = EarlyStop(best_loss=-1.0, best_epoch=1, since=1).dump()
    r = c.train({}, state, data, RoundInfo(0, 3, 0))
    assert r.metrics["student-stopped"] == 1.0 and r.metrics["baseline-stopped"] == 0.0
    student, baseline = dict(state["student"]), dict(state["baseline"])
    r = c.train({}, state, data, RoundInfo(0, 4, 0))
    assert same(student, state["student"]) and not same(baseline, state["baseline"])
    assert "student-val-loss" not in r.metrics and "baseline-val-loss" in r.metrics
    # the kept (best) weights are what the headline model serves
    served = c.inference_model({}, state, 0, 4).state_dict()
    assert same(served, state["student-best"])


def test_alpha_zero_students_stop_together_and_end_bit_identical() -> None:
    c, data, state = kd_client(alpha=0.0, patience=1, student_epochs=8, jitter_px=2), kd_data(), {}
    stops = []
    for r in range(1, 10):
        m = c.train({}, state, data, RoundInfo(0, r, 0)).metrics
        if r > 1:
            stops.append((m["student-stopped"], m["baseline-stopped"]))
    assert all(a == b for a, b in stops)
    assert same(state["student"], state["baseline"])
    assert same(state["student-best"], state["baseline-best"])
    assert state["student-stop"] == state["baseline-stop"]


def test_patience_zero_serves_the_last_epoch_and_v1_values_need_no_validation() -> None:
    c, data, state = kd_client(patience=0), kd_data(), {}
    for r in (1, 2, 3):
        c.train({}, state, data, RoundInfo(0, r, 0))
    assert same(c.inference_model({}, state, 0, 3).state_dict(), state["student"])
    v1 = kd_client(val_fraction=0.0, patience=0, teacher_keep="last")
    tr, val = v1.split(data)
    assert len(tr) == len(data.y_train) and len(val) == 0
    with pytest.raises(ConfigError, match="patience"):
        load_config(EXPERIMENTS / "kd-mnist5k-v2.yaml", ["method.val_fraction=0"])
    pinned = registry.method_settings(load_config(EXPERIMENTS / "kd-mnist5k.yaml"))
    assert (pinned.teacher_model, pinned.teacher_epochs, pinned.student_epochs, pinned.val_fraction,
            pinned.patience, pinned.teacher_keep) == ("mlp", 10, 20, 0.0, 0, "last")


def test_v2_teacher_is_pfllibs_cnn() -> None:
    c = HintonKDClient(kd_config(), KDSettings(), (1, 28, 28), 10, CPU)
    assert sum(p.numel() for p in c.nets["teacher"].parameters()) == 582_026
    big = HintonKDClient(kd_config(), KDSettings(student_hidden=[100]), (1, 28, 28), 10, CPU)
    assert sum(p.numel() for p in big.nets["student"].parameters()) == 79_510


def test_validation_split_is_stratified_disjoint_and_seeded() -> None:
    labels = np.repeat(np.arange(10), [400, 390, 410, 400, 405, 395, 400, 400, 401, 399])
    tr, val = stratified_holdout(labels, 0.1, seed=3)
    for c in range(10):
        n_c = int((labels == c).sum())
        assert abs(int((labels[val.numpy()] == c).sum()) - 0.1 * n_c) <= 1
    assert not set(tr.tolist()) & set(val.tolist())
    assert len(tr) + len(val) == len(labels)
    again = stratified_holdout(labels, 0.1, seed=3)
    assert torch.equal(again[1], val) and not torch.equal(stratified_holdout(labels, 0.1, 4)[1], val)
    # the client's split lives inside its training part: the test split is never touched
    c, data = kd_client(), kd_data()
    tr, val = c.split(data)
    assert int(tr.max()) < len(data.y_train) and int(val.max()) < len(data.y_train)


def _kd_rounds(client: HintonKDClient, data: ClientData, rounds: int) -> tuple[dict, list[dict]]:
    """Train `rounds` rounds, seeding torch per round as the runtime does (dropout draws from it)."""
    state: dict[str, Any] = {}
    metrics = []
    for r in range(1, rounds + 1):
        torch.manual_seed(r)
        metrics.append(client.train({}, state, data, RoundInfo(0, r, 0)).metrics)
    return state, metrics


def test_a_taken_teacher_gives_the_run_that_trained_its_own(tmp_path: Path) -> None:
    """teacher_from: the student stage starts from the state a run training the same teacher
    reaches, so the students (and every student-stage metric) are that run's, bit for bit."""
    data, settings = kd_data(), {"teacher_epochs": 3, "student_epochs": 5, "patience": 2}
    source, _ = _kd_rounds(kd_client(**settings), data, 8)  # a T = 4, alpha = 0.9 run
    ClientStateStore(tmp_path / "state").save(0, source)
    cell = {**settings, "temperature": 2.0, "alpha": 0.5}  # another grid cell, same teacher
    own_client, taken_client = kd_client(**cell), kd_client(**cell, teacher_from=str(tmp_path))
    own, own_metrics = _kd_rounds(own_client, data, 8)
    taken, taken_metrics = _kd_rounds(taken_client, data, 8)
    best = float(source["teacher-stop"]["best_epoch"])
    assert taken_metrics[:3] == [{"teacher-taken": 1.0, "teacher-best-epoch": best, "stage": 0}] * 3
    assert taken_metrics[3:] == own_metrics[3:]
    assert own_metrics[3]["student-val-loss"] != _kd_rounds(kd_client(**settings), data, 4)[1][3][
        "student-val-loss"]  # the cells differ: the test compares something
    for key in ("teacher-best", "student", "baseline", "student-best", "baseline-best"):
        assert same(taken[key], own[key]), key
    final = [c.evaluate({}, st, data, RoundInfo(0, 8, 0)) for c, st in ((own_client, own),
                                                                        (taken_client, taken))]
    assert final[0].metrics == final[1].metrics and final[0].accuracy == final[1].accuracy


def _finished_kd_run(run_dir: Path, *overrides: str) -> Path:
    """What a finished kd run leaves that teacher_from reads: config.yaml, run.json, state/0.pt."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(kd_config(*overrides)))
    (run_dir / "run.json").write_text(json.dumps({"status": "complete"}))
    ClientStateStore(run_dir / "state").save(0, {"teacher": {"w": torch.zeros(1)}})
    return run_dir


def test_teacher_from_must_name_a_finished_run_with_the_same_teacher(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for seed in (0, 1):
        _finished_kd_run(tmp_path / "teachers" / f"seed{seed}", f"experiment.seed={seed}")
    # a student-side grid cell of each seed finds its seed's teacher; the path is made absolute
    for seed in (0, 1):
        cfg = kd_config("method.teacher_from=teachers/seed${experiment.seed}", f"experiment.seed={seed}",
                        "method.temperature=2", "method.alpha=0.5", "method.student_hidden=[100]")
        assert cfg.method["teacher_from"] == str(tmp_path / "teachers" / f"seed{seed}")
    cases = {"experiment.seed=2": "a finished kd run", "method.teacher_keep=last": "method.teacher_keep='best_val'",
             "train.lr=0.01": "train.lr=0.001", "data.test_fraction=0.3": "data.test_fraction=0.2"}
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            kd_config("method.teacher_from=teachers/seed${experiment.seed}", override)
        assert err.value.key == "method.teacher_from"
    (tmp_path / "teachers" / "seed0" / "run.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(ConfigError, match="run the teacher's experiment first"):
        kd_config("method.teacher_from=teachers/seed0")


def test_shift_images_moves_pixels_with_zero_fill() -> None:
    x = torch.zeros(3, 1, 5, 5)
    x[:, 0, 2, 2] = 1.0
    out = shift_images(x, torch.tensor([[0, 0], [1, -2], [-2, 2]]), fill=-1.0)
    assert torch.equal(out[0], x[0])
    assert out[1, 0, 3, 0] == 1.0 and out[1, 0, :, 3:].eq(-1.0).all()
    assert out[2, 0, 0, 4] == 1.0 and out[2, 0, 3:].eq(-1.0).all()
    offsets = jitter_offsets(10_000, 2, torch.Generator().manual_seed(0))
    assert offsets.min() == -2 and offsets.max() == 2 and len(torch.unique(offsets, dim=0)) == 25


def test_jitter_zero_leaves_inputs_unchanged_and_two_shifts_one_batch_for_all() -> None:
    data = kd_data()
    seen: dict[str, list[Tensor]] = {"teacher": [], "student": [], "baseline": []}
    targets: list[Tensor] = []

    def run(jitter: int) -> None:
        for v in seen.values():
            v.clear()
        targets.clear()
        c, state = kd_client(jitter_px=jitter, val_fraction=0.0, patience=0, teacher_keep="last"), {}
        c.train({}, state, data, RoundInfo(0, 1, 0))
        hooks = [c.nets[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].clone()))
                 for n in seen]
        real = hinton_kd.soft_hard_loss

        def spy(z: Tensor, z_t: Tensor, *args: Any, **kw: Any) -> Tensor:
            targets.append(z_t.clone())
            return real(z, z_t, *args, **kw)

        hinton_kd.soft_hard_loss = spy  # type: ignore[assignment]
        try:
            c.train({}, state, data, RoundInfo(0, 2, 0))
        finally:
            hinton_kd.soft_hard_loss = real  # type: ignore[assignment]
            for h in hooks:
                h.remove()
        teacher = c.nets["teacher"].eval()
        with torch.no_grad():
            for xb, z_t in zip(seen["student"], targets):
                assert torch.allclose(teacher(xb), z_t, atol=1e-6)

    run(0)
    originals = {tuple(x.flatten().tolist()) for x in data.x_train}
    assert all(tuple(x.flatten().tolist()) in originals for b in seen["student"] for x in b)
    run(2)
    assert len(seen["student"]) == len(seen["baseline"]) == len(targets) > 0
    for a, b in zip(seen["student"], seen["baseline"]):
        assert torch.equal(a, b)
    shifted = sum(tuple(x.flatten().tolist()) not in originals for b in seen["student"] for x in b)
    assert shifted > 0.5 * len(data.y_train)


# --- xtime (spec 2.6, tests 1 (v2), 7, 8) --------------------------------------------------------

def test_detrended_rarity_has_no_look_ahead_and_matches_hand_computation() -> None:
    rng = np.random.default_rng(0)
    n, bounds = 700, (400, 550, 700)
    values = np.column_stack([rng.normal(size=(n, 6)), 20 + np.cumsum(rng.normal(size=n))])

    def r_at(v: np.ndarray, target: int) -> float:
        w = make_windows(v, lookback=8, horizon=1, bounds=bounds)
        row = int(np.flatnonzero(w.y[:, 5] == target)[0])  # TARGET_INDEX
        return float(rarity_from_table(w.y[row:row + 1, TARGET_RAW], w.y[row:row + 1],
                                       "detrended_value")[0])

    t = 300
    base = r_at(values, t + 1)
    later, earlier = values.copy(), values.copy()
    later[t + 2:, 6] += 50.0
    earlier[:t - 167, 6] -= 50.0
    assert r_at(later, t + 1) == base and r_at(earlier, t + 1) == base
    flat = values.copy()
    flat[t - 167:t + 1, 6] = 5.0
    flat[t + 1, 6] = 5.5
    w = make_windows(flat, lookback=8, horizon=1, bounds=bounds)
    row = int(np.flatnonzero(w.y[:, 5] == t + 1)[0])
    assert w.y[row, ROLL_MEAN] == 5.0 and w.y[row, ROLL_STD] == 0.0
    assert math.isclose(r_at(flat, t + 1), 0.5 / 1e-6, rel_tol=1e-6)
    # thresholds come from training targets only
    train = w.y[:, SPLIT] == SPLIT_TRAIN
    assert int(w.y[train, 5].max()) < bounds[0]


def test_oracle_routing_sends_each_window_to_its_levels_expert() -> None:
    rng = np.random.default_rng(1)
    levels = rng.integers(0, 4, 200)
    one = rng.normal(size=200)
    assert np.array_equal(oracle_routing(np.stack([one] * 4, axis=1), levels), one)
    target = rng.normal(size=200)
    experts = rng.normal(size=(200, 4))
    experts[np.arange(200), levels] = target[:]  # each expert exact on its own level
    routed = oracle_routing(experts, levels)
    for k in range(4):
        assert np.mean((routed[levels >= k] - target[levels >= k]) ** 2) == 0.0


def test_specialisation_check_values() -> None:
    target = np.zeros(6)
    levels = np.array([0, 0, 1, 1, 2, 3])
    e0 = np.ones(6)
    ek = np.array([5.0, 5.0, 0.5, 0.5, 0.5, 0.5])
    assert specialisation(ek, e0, target, levels, 1) == (1.0, 0.75)
    assert specialisation(e0 * 2, e0, target, levels, 2) == (0.0, -3.0)
    assert all(math.isnan(v) for v in specialisation(ek, e0, target, np.zeros(6, int), 1))


@pytest.mark.slow
def test_specialisation_check_reads_validation_before_the_router_and_changes_no_expert() -> None:
    from fedkd.data import load_federated

    cfg = load_config(EXPERIMENTS / "xtime-etth1-v2.yaml",
                      ["method.expert_epochs=1", "method.router_epochs=1", "train.rounds=5"])
    c0 = load_federated(cfg.data, 0).clients[0]
    t = torch.as_tensor
    data = ClientData(t(c0.x_train[-256:]), t(c0.y_train[-256:]), t(c0.x_test), t(c0.y_test))
    client = registry.METHODS["xtime"].client(cfg, registry.method_settings(cfg), (96, 7), 1, CPU)
    state: dict[str, Any] = {}
    for r in (1, 2, 3):
        client.train({}, state, data, RoundInfo(0, r, 0))
        assert "specialist" not in state
    r4 = client.train({}, state, data, RoundInfo(0, 4, 0)).metrics
    assert {"val-specialist-check-1", "val-specialist-gain-3", "val-specialists-passed"} <= set(r4)
    frozen = {f"expert_{k}": dict(state[f"expert_{k}"]) for k in range(4)}
    tau = _Targets(data.y_train, client.settings, 4).tau
    assert client.specialist_check(state, data, SPLIT_VAL, tau) == state["specialist"]
    assert all(same(frozen[k], state[k]) for k in frozen)  # it changed no expert
    # a test window's value never enters the validation check
    poked = ClientData(data.x_train, data.y_train, data.x_test.clone(), data.y_test.clone())
    poked.x_test[poked.y_test[:, SPLIT] == SPLIT_TEST] += 100.0
    assert client.specialist_check(state, poked, SPLIT_VAL, tau) == state["specialist"]
    ev = client.evaluate({}, state, data, RoundInfo(0, 4, 0)).metrics
    assert "oracle-mse-level2" in ev and "test-specialist-gain-2" in ev


# --- stkd (spec 3.2 v2) --------------------------------------------------------------------------

def test_warmup_epochs_and_random_teacher() -> None:
    from tests.test_stkd import blob, config  # the stkd tests' tiny blob

    data = blob()
    teachers = {}
    for name, settings in (("init", {}), ("w1", {"teacher": "warmup"}),
                           ("w3", {"teacher": "warmup", "warmup_epochs": 3}),
                           ("random", {"teacher": "random"})):
        c = STKDClient(config(), STKDSettings(**settings), (6,), 2, CPU)
        state: dict[str, Any] = {}
        c.train({}, state, data, RoundInfo(0, 1, 0))
        teachers[name] = state["teacher"]
        if name == "init":
            assert same(state["teacher"], c._init_encoder)
    assert not same(teachers["w1"], teachers["w3"]) and not same(teachers["w1"], teachers["init"])
    assert not same(teachers["random"], teachers["init"])


# --- mixclap (spec 4.6, tests 7-9) ---------------------------------------------------------------

def orthonormal(n: int, dim: int = 32, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, n + 1, generator=g, dtype=torch.float64))
    return q.T.float()  # (n + 1, dim): n prototypes and one vector orthogonal to all of them


def test_infomax_does_not_pick_a_collapsed_student_and_agrees_on_clean_picks() -> None:
    basis = orthonormal(10)
    protos, u = basis[:10], basis[10]
    y = torch.arange(10).repeat(30)
    grid = fusion_grid(20)
    collapsed = protos[0].expand(len(y), -1).clone()
    noisy = unit(protos[y] + 0.7 * u)
    ent = select_fusion(collapsed, noisy, protos, 0.05, grid, rule="entropy")
    info = select_fusion(collapsed, noisy, protos, 0.05, grid, rule="infomax")
    assert float(ent.weights[0]) == 1.0
    assert float((info.logits.argmax(-1) == y).float().mean()) == 1.0
    # test 2's setup: S_c = the true prototype, S_n = a fixed vector orthogonal to all of them
    clean, other = protos[y], u.expand(len(y), -1).clone()
    for rule in ("entropy", "infomax"):
        assert float(select_fusion(clean, other, protos, 0.05, grid, rule=rule).weights[0]) == 1.0
    with pytest.raises(ValueError, match="per_condition"):
        select_fusion(clean, other, protos, 0.05, grid, mode="per_clip", rule="infomax")


def test_mixclap_v2_settings_validate_and_v1_is_pinned() -> None:
    with pytest.raises(ConfigError, match="per_condition"):
        load_config(EXPERIMENTS / "mixclap-fsdd-v2.yaml", ["method.fusion=per_clip"])
    pinned = registry.method_settings(load_config(EXPERIMENTS / "mixclap-fsdd.yaml"))
    assert (pinned.lambda_select, pinned.teacher_noise_aug, pinned.tau) == ("entropy", False, 0.05)


needs_fsdd = pytest.mark.skipif(not (Path(__import__("os").environ.get("FEDKD_DATA_DIR", ""))
                                     / "fsdd" / "recordings").is_dir(),
                                reason="needs FEDKD_DATA_DIR with fsdd/")


@needs_fsdd
@pytest.mark.slow
def test_selection_settings_change_no_weight_and_teacher_noise_is_seeded_and_half() -> None:
    from tests.test_mixclap import _tiny, client

    overrides = ("method.teacher_epochs=1", "method.clean_epochs=1", "method.noisy_epochs=1",
                 "train.rounds=3", "method.timing_clips=4")
    states, clients = [], []
    for extra in (("method.lambda_select=entropy", "method.fusion_taus=[0.3]"),
                  ("method.lambda_select=infomax",)):
        c = client(*overrides, *extra)
        data, state = _tiny(c), {}
        for r in (1, 2, 3):
            c.train({}, state, data, RoundInfo(0, r, 0))
        states.append(state)
        clients.append(c)
    for key in ("teacher", "student_clean", "student_noisy"):
        assert same(states[0][key], states[1][key])
    ev = clients[0].evaluate({}, states[0], data, RoundInfo(0, 3, 0)).metrics
    assert {"fused-infomax-accuracy-mean", "fused-entropy-tau0.3-accuracy-mean",
            "fusion-weight-infomax-white0"} <= set(ev)
    served = clients[1].evaluate({}, states[1], data, RoundInfo(0, 3, 0))  # infomax serves
    assert served.accuracy == served.metrics["fused-infomax-accuracy-mean"]
    assert served.metrics["fusion-weight-clean"] == served.metrics["fusion-weight-infomax-clean"]
    assert ev["fused-accuracy-mean"] == ev["fused-entropy-accuracy-mean"]  # entropy serves
    # teacher_noise_aug: off = the clean rows themselves; on = about half replaced, from a stream
    # of its own (the noisy student's training noise is unchanged), babble from training takes only
    c = client(*overrides, "method.teacher_noise_aug=true")
    data = _tiny(c)
    rows = c.split(data).train
    clean = data.x_train[rows]
    out, replaced = c.audio.teacher_augmented(1, rows, clean)
    n = len(rows)
    assert abs(float(replaced.float().mean()) - 0.5) <= 3 / math.sqrt(n)
    assert torch.equal(out[~replaced], clean[~replaced]) and not torch.equal(out[replaced], clean[replaced])
    again, _ = c.audio.teacher_augmented(1, rows, clean)
    assert torch.equal(again, out)
    assert c.audio.train.takes.min() >= 5  # the babble pool is the training split's


# --- betakd (spec 5.6, tests 7-8) ----------------------------------------------------------------

def test_official_weight_learning_rates_and_fixed_mode() -> None:
    cfg = load_config(EXPERIMENTS / "betakd-avmnist-v2.yaml")
    official = BetaKDClient(cfg, BetaKDSettings(teachers=["image", "audio", "multimodal"]),
                            (INPUT_DIM,), 10, CPU)
    lrs = official.weight_lrs()
    assert lrs["task.log_vars"] == pytest.approx(1000 * cfg.train.lr) == 1.0
    assert lrs["instance.weighter"] == pytest.approx(10 * cfg.train.lr)
    assert lrs["mt-task.log_vars"] == lrs["task.log_vars"]
    assert lrs["mt-instance.weighter"] == lrs["instance.weighter"]
    assert OFFICIAL_LR_MULTIPLIER == {"task": 1000.0, "instance": 10.0}
    fixed = BetaKDClient(cfg, BetaKDSettings(weight_lr_mode="fixed", weight_lr=0.01),
                         (INPUT_DIM,), 10, CPU)
    assert set(fixed.weight_lrs().values()) == {0.01}
    assert cfg.train.weight_decay == 0.0
    # the optimizer groups train_epochs builds from them
    import fedkd.clients.base as base

    groups: list[dict[str, Any]] = []
    real = base.make_optimizer

    def spy(params: Any, c: FedkdConfig) -> torch.optim.Optimizer:
        groups.extend(params)
        return real(params, c)

    base.make_optimizer = spy  # type: ignore[assignment]
    official.cfg.data.dataset = "synthetic"  # no corruption diagnostics (they read the real pairs)
    try:
        x = torch.zeros(4, INPUT_DIM)
        y = torch.arange(4)
        official.train({}, {"teachers": dict(official._init["teachers"])},
                       ClientData(x, y, x[:3], y[:3]), RoundInfo(0, 9, 0))
    finally:
        base.make_optimizer = real  # type: ignore[assignment]
    rates = sorted({g["lr"] for g in groups})
    assert rates == pytest.approx([cfg.train.lr, 10 * cfg.train.lr, 1000 * cfg.train.lr])
    pinned = registry.method_settings(load_config(EXPERIMENTS / "betakd-avmnist.yaml"))
    assert (pinned.student_hidden, pinned.weight_lr_mode, pinned.weight_lr) == (32, "fixed", 0.01)


@pytest.mark.parametrize("n", [4000, 4001, 7])
def test_corruption_masks(n: int) -> None:
    audio, image = corruption_masks(n, 0.5, "either", seed=3)
    k = int(round(0.5 * n))
    assert int((audio | image).sum()) == k and int(image.sum()) == k // 2
    assert not (audio & image).any()
    again = corruption_masks(n, 0.5, "either", seed=3)
    assert np.array_equal(again[0], audio) and np.array_equal(again[1], image)
    # v1: the audio-only choice is the one the v1 builder made, bit for bit
    v1_audio, v1_image = corruption_masks(n, 0.3, "audio", seed=3)
    expected = np.zeros(n, bool)
    expected[_rng(3, 13).permutation(n)[:int(round(0.3 * n))]] = True
    assert np.array_equal(v1_audio, expected) and not v1_image.any()
