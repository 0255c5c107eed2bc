"""Mix-CLAP (centralized.md section 4): fusion rule, distillation targets, noise, split, front end.

Test plan 4.6 items 1-6, plus the pieces they rest on (mel filterbank, low-pass, stage schedule).
Everything is synthetic except the tests that read a handful of FSDD wavs (never all 3,000).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedkd.clients import mixclap
from fedkd.clients.base import ClientData, RoundInfo
from fedkd.clients.mixclap import (MixAudio, MixCLAPClient, MixCLAPSettings, WaveRows,
                                   argmin_prefer_larger, entropy_fusion, fusion_grid,
                                   grid_entropies, parse_condition, unit)
from fedkd.clients.staged import stage_of
from fedkd.config import ConfigError, load_config
from fedkd.kd import embed_cosine_loss
from fedkd.registry import method_settings
from fedkd.taskdata import audio

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/experiment/mixclap-fsdd.yaml"
DATA = Path(os.environ.get("FEDKD_DATA_DIR", "data"))
needs_fsdd = pytest.mark.skipif(not (DATA / audio.RECORDINGS).is_dir(), reason="FSDD not present")
CPU = torch.device("cpu")



@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def orthonormal(n: int, dim: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, n, generator=g, dtype=torch.float64))
    return q.T.float()  # (n, dim), orthonormal rows


def client(*overrides: str) -> MixCLAPClient:
    cfg = load_config(CONFIG, list(overrides))
    settings = method_settings(cfg)
    assert isinstance(settings, MixCLAPSettings)
    return MixCLAPClient(cfg, settings, (1, 40, 101), 10, CPU)


# --- 4.6 (1-3): the fusion rule ----------------------------------------------------------------

def test_fusion_weight_is_a_grid_point_in_unit_interval() -> None:
    grid = fusion_grid(20)
    assert len(grid) == 21 and grid[0] == 0 and grid[-1] == 1
    assert torch.allclose(grid[1], torch.tensor(0.05))
    g = torch.Generator().manual_seed(1)
    protos = unit(torch.randn(10, 128, generator=g))
    e_c, e_n = torch.randn(32, 128, generator=g), torch.randn(32, 128, generator=g)
    for mode in ("per_condition", "per_clip"):
        r = entropy_fusion(e_c, e_n, protos, 0.05, grid, mode)
        assert r.entropies.shape == (21,)  # all 21 grid entropies come back (and are logged)
        assert ((r.weights >= 0) & (r.weights <= 1)).all()
        assert all(any(abs(w - p) < 1e-7 for p in grid.tolist()) for w in r.weights.tolist())
    assert len(set(entropy_fusion(e_c, e_n, protos, 0.05, grid).weights.tolist())) == 1


def test_clean_pick_and_swap() -> None:
    basis = orthonormal(11)
    protos, u = basis[:10], basis[10]  # u is orthogonal to every prototype
    y = torch.arange(10).repeat(3)
    s_c, s_n = protos[y], u.expand(len(y), -1)
    grid = fusion_grid(20)
    assert entropy_fusion(s_c, s_n, protos, 0.05, grid).weights.unique().tolist() == [1.0]
    assert entropy_fusion(s_n, s_c, protos, 0.05, grid).weights.unique().tolist() == [0.0]
    assert entropy_fusion(s_c, s_n, protos, 0.05, grid, "per_clip").weights.unique().tolist() == [1.0]
    # identical students: every lambda gives the same entropy, the tie goes to the larger lambda
    assert entropy_fusion(s_c, s_c, protos, 0.05, grid).weights.unique().tolist() == [1.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_minimum_over_the_grid(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    protos = unit(torch.randn(10, 128, generator=g))
    e_c, e_n = torch.randn(50, 128, generator=g), torch.randn(50, 128, generator=g)
    grid = fusion_grid(20)
    r = entropy_fusion(e_c, e_n, protos, 0.05, grid)
    chosen = float(grid_entropies(e_c, e_n, protos, 0.05, r.weights[:1]).mean())
    assert chosen <= float(r.entropies.min()) + 1e-6
    assert (r.entropies >= chosen - 1e-6).all()
    logp = torch.log_softmax(r.logits, -1)
    assert float(-(logp.exp() * logp).sum(-1).mean()) == pytest.approx(chosen, abs=1e-5)
    per_clip = entropy_fusion(e_c, e_n, protos, 0.05, grid, "per_clip")
    h = grid_entropies(e_c, e_n, protos, 0.05, grid)  # (B, G)
    own = h.gather(1, (per_clip.weights * 20).round().long()[:, None]).squeeze(1)
    assert (own[:, None] <= h + 1e-6).all()


# --- 4.6 (4): the distillation target ----------------------------------------------------------

def test_embed_cosine_loss() -> None:
    a = torch.randn(4, 8, requires_grad=True)
    b = torch.randn(4, 8, requires_grad=True)
    assert embed_cosine_loss(a, 3 * a).item() == pytest.approx(0.0, abs=1e-6)
    assert embed_cosine_loss(a, -a).item() == pytest.approx(2.0, abs=1e-6)
    embed_cosine_loss(a, b.detach()).backward()  # kd.py never detaches for the caller
    assert a.grad is not None and b.grad is None
    assert embed_cosine_loss(a, b, reduction="none").shape == (4,)


def test_noisy_student_target_is_the_clean_teacher_embedding() -> None:
    c = client()
    teacher, student = c.nets["teacher"].eval(), c.nets["student_noisy"]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, 40, 101, generator=g)
    x_noisy = x + 0.5 * torch.randn(x.shape, generator=g)  # known noise
    targets = unit(mixclap.embed_all(teacher.embed, x))
    protos = unit(torch.randn(10, 128, generator=g))
    rows = torch.tensor([4, 1, 5])
    loss, logits = mixclap.distill_objective(student, x_noisy, targets, protos, 0.05)(rows, rows)
    with torch.no_grad():
        expected_t = unit(teacher.embed(x[rows]))
        wrong_t = unit(teacher.embed(x_noisy[rows]))
        e = student(x_noisy[rows])
    assert loss.item() == pytest.approx(float((1 - (unit(e) * expected_t).sum(-1)).mean()), abs=1e-5)
    assert not torch.allclose(expected_t, wrong_t, atol=1e-3)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert logits.shape == (3, 10)


# --- 4.6 (5, 6): noise and split on real clips ---------------------------------------------------

def _read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    fitted = [audio.fit_clip(audio.read_wav(DATA / audio.RECORDINGS / n), 8000) for n in names]
    return np.stack([w for w, _ in fitted]), np.array([s for _, s in fitted], np.int64)


def measured_snr(signal: np.ndarray, mixed: np.ndarray, spans: np.ndarray) -> np.ndarray:
    noise = mixed.astype(np.float64) - signal
    return 10 * np.log10(audio.span_power(signal, spans) / audio.span_power(noise, spans))


@needs_fsdd
def test_mix_at_snr_hits_the_requested_snr() -> None:
    waves, spans = _read(["3_theo_7.wav", "8_george_20.wav", "1_yweweler_2.wav"])
    rng = np.random.default_rng(0)
    pool, _ = _read(["5_lucas_9.wav", "6_nicolas_12.wav", "2_jackson_30.wav"])
    noises = {"white": rng.standard_normal(waves.shape).astype(np.float32),
              "babble": audio.babble(pool, np.tile(np.arange(3), (3, 1)))}
    for snr in (20.0, 10.0, 5.0, 0.0):
        for kind, noise in noises.items():
            mixed = audio.mix_at_snr(waves, noise, snr, spans)
            assert np.abs(measured_snr(waves, mixed, spans) - snr).max() < 0.1, (kind, snr)
        filtered = audio.lowpass(waves, 1500.0)  # device: SNR relative to the filtered clip
        mixed = audio.mix_at_snr(filtered, noises["white"], snr, spans)
        assert np.abs(measured_snr(filtered, mixed, spans) - snr).max() < 0.1


def test_lowpass_is_a_4th_order_butterworth_magnitude() -> None:
    t = np.arange(8000) / 8000
    tones = np.stack([np.sin(2 * np.pi * f * t) for f in (250.0, 1500.0, 3000.0)]).astype(np.float32)
    out = audio.lowpass(tones, 1500.0, order=4)
    gain_db = 10 * np.log10((out ** 2).mean(-1) / (tones ** 2).mean(-1))
    assert gain_db[0] == pytest.approx(0.0, abs=0.05)
    assert gain_db[1] == pytest.approx(-3.01, abs=0.05)
    assert gain_db[2] == pytest.approx(-10 * math.log10(1 + 2 ** 8), abs=0.1)


@needs_fsdd
def test_official_split_has_no_shared_key_and_test_takes_0_to_4() -> None:
    clips = audio.fsdd_clips(DATA)
    assert len(clips) == 3000
    train = {(c.speaker, c.digit, c.take) for c in clips if c.split == "train"}
    test = {(c.speaker, c.digit, c.take) for c in clips if c.split == "test"}
    assert len(train) == 2700 and len(test) == 300 and not train & test
    assert {k[2] for k in test} == set(range(5))
    assert min(k[2] for k in train) == 5


# --- front end ---------------------------------------------------------------------------------

def test_mel_filterbank_bands_and_tones() -> None:
    fb = audio.mel_filterbank(129, 40, 8000)
    assert fb.shape == (129, 40) and (fb >= 0).all() and (fb.max(0) > 0).all()
    peaks = fb.argmax(0)
    assert (np.diff(peaks) >= 0).all() and peaks[-1] > peaks[0]
    centres = audio.mel_to_hz(np.linspace(0, audio.hz_to_mel(4000), 42))[1:-1]
    t = np.arange(8000) / 8000
    for f in (300.0, 1000.0, 2500.0):
        logmel = audio.log_mel(np.sin(2 * np.pi * f * t).astype(np.float32))
        assert logmel.shape == (1, 40, 101)
        band = int(logmel[0].mean(-1).argmax())
        assert abs(band - int(np.abs(centres - f).argmin())) <= 1, (f, band)


# --- stages, config, and one tiny pass through every stage on real clips ------------------------

def test_stage_schedule_and_config_validation() -> None:
    c = client()
    stages = MixCLAPClient.stages(c.settings)
    assert stages == [("teacher", 15), ("clean", 15), ("noisy", 15)] and c.cfg.train.rounds == 45
    assert [stage_of(stages, r)[1] for r in (1, 15, 16, 30, 31, 45)] == [
        "teacher", "teacher", "clean", "clean", "noisy", "noisy"]
    with pytest.raises(ConfigError, match="train.rounds"):
        load_config(CONFIG, ["train.rounds=44"])
    with pytest.raises(ConfigError, match="conditions"):
        load_config(CONFIG, ["method.conditions=[clean,pink:3]"])
    assert parse_condition("white:0").label == "white0"
    assert mixclap.num_params(c.nets["student_clean"]) < 30_000 < mixclap.num_params(c.nets["teacher"])


def _tiny(c: MixCLAPClient) -> ClientData:
    """45 real clips (3 speakers x digits 0-4; takes 5, 30 train, take 0 test), injected as the
    client's data and waveform source, in the same row order."""
    speakers, digits = ["george", "jackson", "lucas"], range(5)
    names = {s: [f"{d}_{sp}_{t}.wav" for d in digits for sp in speakers for t in takes]
             for s, takes in (("train", (5, 30)), ("test", (0,)))}
    rows = {}
    for s, ns in names.items():
        waves, spans = _read(ns)
        parts = [n[:-4].split("_") for n in ns]
        rows[s] = WaveRows(waves, spans, np.array([int(p[0]) for p in parts]),
                           np.array([p[1] for p in parts]), np.array([int(p[2]) for p in parts]))
    stats = audio.band_stats(audio.log_mel(rows["train"].waves))
    c.audio = MixAudio(rows["train"], rows["test"], stats, c.settings, c.cfg.experiment.seed)
    feats = {s: torch.from_numpy(audio.waveform_features(r.waves, stats)) for s, r in rows.items()}
    return ClientData(feats["train"], torch.from_numpy(rows["train"].labels),
                      feats["test"], torch.from_numpy(rows["test"].labels))


@needs_fsdd
def test_every_stage_on_a_few_real_clips(monkeypatch: pytest.MonkeyPatch) -> None:
    c = client("method.teacher_epochs=1", "method.clean_epochs=1", "method.noisy_epochs=1",
               "train.rounds=3", "method.timing_clips=4")
    data, state = _tiny(c), {}
    info = [RoundInfo(0, r, 0) for r in (1, 2, 3)]
    r1 = c.train(c.initial_arrays(), state, data, info[0])
    assert r1.metrics["stage"] == 0 and set(r1.arrays) == set(state["teacher"])
    ev = c.evaluate({}, state, data, info[0])
    assert 0 <= ev.accuracy <= 1 and "teacher-head-accuracy-device10" in ev.metrics
    frozen = {k: v.clone() for k, v in state["teacher"].items()}
    for p in c.nets["teacher"].parameters():
        p.grad = None  # the teacher's own last step left gradients; none may come back
    r2 = c.train({}, state, data, info[1])
    assert r2.metrics["stage"] == 1 and "prototypes" in state and "student_noisy" not in state
    clean_after_stage1 = {k: v.clone() for k, v in state["student_clean"].items()}

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    inputs: list[torch.Tensor] = []
    real_loss = mixclap.embed_cosine_loss

    def spy(e: torch.Tensor, t: torch.Tensor, **kw: object) -> torch.Tensor:
        seen.append((e, t.detach().clone()))
        return real_loss(e, t, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(mixclap, "embed_cosine_loss", spy)
    hook = c.nets["student_noisy"].register_forward_pre_hook(lambda m, a: inputs.append(a[0].clone()))
    r3 = c.train({}, state, data, info[2])
    hook.remove()
    assert r3.metrics["stage"] == 2 and "distill-loss" in r3.metrics
    # teacher untouched by both student stages, clean student untouched by the noisy stage
    assert all(torch.equal(frozen[k], state["teacher"][k]) for k in frozen)
    assert all(torch.equal(clean_after_stage1[k], state["student_clean"][k]) for k in clean_after_stage1)
    assert all(p.grad is None for p in c.nets["teacher"].parameters())
    # the noisy batch is the seeded noisy draw of training rows, and its target is the teacher
    # embedding of the same CLEAN rows
    split = c.split(data)
    noisy = c.audio.noisy_train(3, split.train)
    with torch.no_grad():
        clean_targets = unit(c.nets["teacher"].eval().embed(data.x_train[split.train]))
    batch, (_, target) = inputs[0], seen[0]
    assert len(batch) == len(split.train)  # one batch of 64 holds the tiny training set
    for x, t in zip(batch, target):
        j = [i for i in range(len(noisy)) if torch.equal(noisy[i], x)]
        assert len(j) == 1
        assert torch.allclose(t, clean_targets[j[0]], atol=1e-5)
        assert not torch.allclose(x, data.x_train[split.train[j[0]]], atol=1e-2)  # noise is there

    ev = c.evaluate({}, state, data, info[2])
    labels = [parse_condition(x).label for x in c.settings.conditions]
    for label in labels:
        assert len([k for k in ev.metrics if k.startswith(f"fusion-entropy-{label}-")]) == 21
        assert 0 <= ev.metrics[f"fusion-weight-{label}"] <= 1
    assert ev.accuracy == ev.metrics["fused-accuracy-mean"]
    assert {"teacher-accuracy-mean", "clean-student-accuracy-white0", "noisy-student-accuracy-mean",
            "fixed-half-accuracy-mean", "oracle-accuracy-mean", "teacher-ms-per-clip"} <= set(ev.metrics)
    assert ev.metrics["oracle-accuracy-mean"] >= ev.metrics["fused-accuracy-mean"] - 1e-9


def test_argmin_prefer_larger_treats_rounding_level_differences_as_ties() -> None:
    f64 = lambda *rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731 (1e-12 is real here)
    rows = f64([0.5, 0.2 + 1e-12, 0.2, 0.3], [0.4, 0.1, 0.1 + 1e-3, 0.9])
    assert argmin_prefer_larger(rows).tolist() == [2, 1]  # per row; 1e-3 is no tie
    assert argmin_prefer_larger(f64(0.2, 0.2 + 1e-12, 0.9)).item() == 1  # a rounding-level tie
    assert argmin_prefer_larger(f64(0.2, 0.2 + 1e-12, 0.9), rtol=0.0).item() == 0  # exact minimum
    assert argmin_prefer_larger(f64(0.2, 0.2, 0.9), rtol=0.0).item() == 1  # an exact tie
    assert argmin_prefer_larger(f64(3.7e-7, 9.6e-7)).item() == 0  # near-0 entropies still differ
