"""Beta-KD (centralized.md section 5.6 test plan, items 1-6): weighting functions, closed-form
optimum, normalized weights and clamping, noisy-teacher down-weighting, detached teacher
features, AV-MNIST pairing. Every test runs in seconds on one thread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedkd.clients.betakd import BetaKDClient, BetaKDSettings, Variant, build_student
from fedkd.kd import (clamp_log_vars, combine_channels, equal_weighting, normalized_weights,
                      uncertainty_weighting)
from fedkd.clients.base import ClientData, RoundInfo
from fedkd.config import data_dir, load_config
from fedkd.taskdata.avmnist import (AUDIO_DIM, IMAGE_DIM, INPUT_DIM, TEST_SETS, load_avmnist,
                                    pair_clips, split_test)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def _cfg(*overrides: str):  # type: ignore[no-untyped-def]
    return load_config(ROOT / "configs/experiment/betakd-avmnist.yaml", list(overrides))


@pytest.fixture(scope="module")
def avmnist():  # type: ignore[no-untyped-def]
    cfg = _cfg()
    return load_avmnist(data_dir(cfg.data), cfg.experiment.seed)


# 1 ------------------------------------------------------------------------------------------
def test_equal_is_sum_and_task_at_zero_is_half_sum() -> None:
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(16, 3, generator=g) * 4
    per_sample_sum = losses.sum(-1).mean()
    assert torch.allclose(equal_weighting(losses), per_sample_sum, atol=1e-7)
    assert torch.allclose(combine_channels("equal", losses), per_sample_sum, atol=1e-7)
    zero = torch.zeros(3)
    assert torch.allclose(combine_channels("task", losses, zero), 0.5 * per_sample_sum, atol=1e-7)
    flat = losses.mean(0)
    assert torch.allclose(combine_channels("equal", flat), flat.sum(), atol=1e-7)
    assert torch.allclose(uncertainty_weighting(flat, zero), 0.5 * flat.sum(), atol=1e-7)


# 2 ------------------------------------------------------------------------------------------
def test_closed_form_optimum_is_log_loss() -> None:
    losses = torch.tensor([0.3, 1.0, 2.5, 7.0])
    s = torch.zeros(4, requires_grad=True)
    for _ in range(300):  # plain gradient descent, lr 1 (curvature 0.5 at the optimum)
        (grad,) = torch.autograd.grad(uncertainty_weighting(losses, s), s)
        with torch.no_grad():
            s -= grad
    assert torch.allclose(s.detach(), losses.log(), atol=1e-3)
    assert torch.allclose(torch.exp(-s.detach()), 1 / losses, rtol=1e-3)


# 3 ------------------------------------------------------------------------------------------
def test_normalized_weights_and_clamp() -> None:
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(32, 4, generator=g) * 50
    s = clamp_log_vars(raw, 5.0)
    assert s.min() >= -5 and s.max() <= 5 and (s.abs() == 5).any()
    w = normalized_weights(s)
    assert (w >= 0).all()
    assert torch.allclose(w.sum(-1), torch.ones(32), atol=1e-6)
    # the client's variants keep s inside the clamp too, whatever their parameters hold
    settings = BetaKDSettings()
    student = build_student(8, 10)
    task = Variant("task", student, torch.nn.Linear(16, 128), (), 10, settings)
    inst = Variant("instance", build_student(8, 10), torch.nn.Linear(16, 128), (), 10, settings)
    with torch.no_grad():
        task.log_vars.fill_(40.0)
        inst.weighter[-1].bias.fill_(-40.0)
    x, y = torch.randn(5, INPUT_DIM), torch.arange(5)
    teacher = {"multimodal": (torch.randn(5, 10), torch.randn(5, 128))}
    for v in (task, inst):
        out = v(x, y, teacher)
        assert out.log_vars is not None and out.log_vars.abs().max() <= 5.0
    assert task.log_vars.max() <= 5.0  # the raw parameter itself was pulled back


@pytest.mark.parametrize("clamp", ["straight_through", "hard"])
def test_instance_weights_beyond_the_clamp_still_learn_only_with_straight_through(clamp: str) -> None:
    settings = BetaKDSettings(instance_clamp=clamp)
    inst = Variant("instance", build_student(8, 10), torch.nn.Linear(16, 128), (), 10, settings)
    with torch.no_grad():
        inst.weighter[-1].bias.fill_(40.0)  # s(x) far above the bound, as in the run that stuck at +5
    x, y = torch.randn(5, INPUT_DIM), torch.arange(5)
    teacher = {"multimodal": (torch.randn(5, 10), torch.randn(5, 128))}
    out = inst(x, y, teacher)
    assert out.log_vars is not None and out.log_vars.max() <= 5.0  # forward value clamped either way
    out.loss.backward()
    grad = inst.weighter[-1].bias.grad
    assert grad is not None
    # d/ds (exp(-s) L + s) = 1 - exp(-5) L > 0 here: the straight-through gradient pushes s back down
    assert (grad > 0).all() if clamp == "straight_through" else (grad == 0).all()


# 4 ------------------------------------------------------------------------------------------
def test_noisy_teacher_is_down_weighted() -> None:
    torch.manual_seed(0)
    teachers = ("image", "audio", "multimodal")
    settings = BetaKDSettings(teachers=list(teachers))
    v = Variant("mt-task", build_student(32, 10), None, teachers, 10, settings)
    assert v.channels == ("ce", "kd-image", "kd-audio", "kd-multimodal")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, INPUT_DIM, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    good = 5.0 * torch.nn.functional.one_hot(y, 10).float()
    feat = torch.zeros(64, 128)
    opt = torch.optim.Adam([{"params": v.student.parameters(), "lr": 1e-3},
                            {"params": [v.log_vars], "lr": settings.weight_lr}])
    for _ in range(200):
        noisy = torch.randn(64, 10, generator=g) * 5.0  # fresh N(0, 5^2) logits every step
        out = v(x, y, {"image": (good, feat), "audio": (noisy, feat), "multimodal": (good, feat)})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    w = normalized_weights(clamp_log_vars(v.log_vars.detach())[1:])  # teacher channels only
    assert torch.allclose(w.sum(), torch.tensor(1.0), atol=1e-6)
    assert int(w.argmin()) == teachers.index("audio")
    assert float(w[1]) < 1 / 3


# 5 ------------------------------------------------------------------------------------------
def test_instance_mode_detaches_teacher_features(avmnist) -> None:  # type: ignore[no-untyped-def]
    cfg = _cfg()
    client = BetaKDClient(cfg, BetaKDSettings(), (INPUT_DIM,), 10, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, INPUT_DIM, generator=g), torch.randint(0, 10, (16,), generator=g)
    before = {k: v.clone() for k, v in client.teachers.state_dict().items()}
    # live teacher outputs WITH a graph: the variant must cut it
    teacher = {t: (m.head(m.features(x)), m.features(x)) for t, m in client.teachers.items()}
    assert all(z.requires_grad and h.requires_grad for z, h in teacher.values())
    variant = client.variants["instance"]
    out = variant(x, y, teacher)
    out.loss.backward()
    assert all(p.grad is None for p in client.teachers.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in variant.weighter.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in variant.student.parameters())
    # a whole student round through the client: teachers bit-identical, no teacher gradient
    state = {"teachers": before}
    sets = split_test(torch.as_tensor(avmnist.x_test), torch.as_tensor(avmnist.y_test))
    x_test = torch.cat([sets[t][0][:8] for t in TEST_SETS])  # keep the stacked layout
    y_test = torch.cat([sets[t][1][:8] for t in TEST_SETS])
    data = ClientData(torch.as_tensor(avmnist.x_train[:48]), torch.as_tensor(avmnist.y_train[:48]),
                      x_test, y_test)
    for p in client.teachers.parameters():
        p.grad = None
    metrics, arrays = client.train_stage("students", state, data, RoundInfo(0, 9, 0))
    assert all(torch.equal(state["teachers"][k], before[k]) for k in before)
    assert all(p.grad is None for p in client.teachers.parameters())
    assert "instance-weight-kd" in metrics and "task-s-fd" in metrics
    assert set(arrays) == set(state["variant-task"])
    result = client.evaluate({}, state, data, RoundInfo(0, 9, 0))
    assert {f"equal-accuracy-{t}" for t in TEST_SETS} <= set(result.metrics)
    assert result.accuracy == result.metrics["task-accuracy-clean"]
    # the multi-teacher extension runs the same round with its three extra variants
    multi = BetaKDClient(cfg, BetaKDSettings(teachers=["image", "audio", "multimodal"]),
                         (INPUT_DIM,), 10, torch.device("cpu"))
    mstate = {"teachers": before}
    metrics, _ = multi.train_stage("students", mstate, data, RoundInfo(0, 9, 0))
    assert all(torch.equal(mstate["teachers"][k], before[k]) for k in before)
    weights = [metrics[f"mt-task-teacher-weight-{t}"] for t in ("image", "audio", "multimodal")]
    assert abs(sum(weights) - 1) < 1e-6 and "mt-instance-weight-kd-audio" in metrics


# 6 ------------------------------------------------------------------------------------------
def test_pairing_labels_and_split(avmnist) -> None:  # type: ignore[no-untyped-def]
    d = avmnist
    assert np.array_equal(d.train_image_labels, d.train_audio_labels)
    assert np.array_equal(d.test_image_labels, d.test_audio_labels)
    assert np.array_equal(d.train_image_labels, d.y_train)
    assert not set(d.train_image_rows) & set(d.test_image_rows)
    assert not set(d.train_clips) & set(d.test_clips)
    assert all(int(c.rsplit("_", 1)[1]) <= 4 for c in d.test_clips)
    assert all(int(c.rsplit("_", 1)[1]) >= 5 for c in d.train_clips)
    # layout and corruption
    assert d.x_train.shape == (len(d.y_train), IMAGE_DIM + AUDIO_DIM) and d.x_train.dtype == np.float32
    assert abs(d.train_audio_noise.mean() - 0.3) < 0.01
    sets = split_test(torch.as_tensor(d.x_test), torch.as_tensor(d.y_test))
    assert list(sets) == list(TEST_SETS)
    clean, audio_bad, image_bad = (sets[t][0].numpy() for t in TEST_SETS)
    assert np.array_equal(clean[:, :IMAGE_DIM], audio_bad[:, :IMAGE_DIM])
    assert not np.allclose(clean[:, IMAGE_DIM:], audio_bad[:, IMAGE_DIM:])
    assert np.array_equal(clean[:, IMAGE_DIM:], image_bad[:, IMAGE_DIM:])
    # pairing is a seeded draw within the label: same seed -> same pairs, another seed -> others
    labels, clip_labels = np.repeat(np.arange(10), 40), np.repeat(np.arange(10), 27)
    a = pair_clips(labels, clip_labels, np.random.default_rng(0))
    assert np.array_equal(clip_labels[a], labels)
    assert np.array_equal(a, pair_clips(labels, clip_labels, np.random.default_rng(0)))
    assert not np.array_equal(a, pair_clips(labels, clip_labels, np.random.default_rng(1)))
