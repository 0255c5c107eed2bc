"""FedKD (mentor/mentee) client and its SVD codec, on tiny tensors (no Flower, no Ray).

The adaptive weight (distillation / (CE_t + CE_s)) is covered by tests/test_kd.py
(`test_fedkd_losses_match_pfllib_formula_and_reach_all_inputs`), so it is not repeated here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedkd.clients.base import RoundInfo, evaluate_model
from fedkd.clients.fedkd_mentor import (MENTOR, SYNCED, W_H, FedKDMentorClient, FedKDMentorSettings,
                                        check_settings, compress_arrays, energy_at,
                                        reconstruct_arrays, svd_compress, svd_rank,
                                        svd_reconstruct, wire_size)
from fedkd.config import ConfigError
from fedkd.models import build_model
from tests.test_clients import config, tiny_data



def client(**settings: Any) -> FedKDMentorClient:
    return FedKDMentorClient(config(), FedKDMentorSettings(**settings), (1, 8, 8), 2,
                             torch.device("cpu"))


def test_only_the_mentee_goes_back_and_one_round_trains_all_three() -> None:
    c, state = client(), {}
    start = c.initial_arrays()
    result = c.train(start, state, tiny_data(), RoundInfo(0, 1, 0))
    mentee_keys = set(build_model("mlp", (1, 8, 8), 2, 0).state_dict())
    assert set(result.arrays) == mentee_keys == set(start)
    assert set(state) >= {MENTOR, W_H}
    assert any(not torch.equal(result.arrays[k], state[MENTOR][k]) for k in result.arrays)
    assert not any(k.startswith(("mentor", "w_h", "weight")) for k in result.arrays)
    assert any(not torch.equal(result.arrays[k], start[k]) for k in start)  # mentee trained
    assert any(not torch.equal(state[MENTOR][k], start[k]) for k in start)  # mentor (same init)
    assert not torch.equal(state[W_H]["weight"], c._init[W_H]["weight"])  # W_h trained
    assert result.weight == 1.0 and result.num_examples == 48  # uniform aggregation
    assert {"loss", "accuracy", "mentee-loss", "mentee-accuracy"} <= set(result.metrics)
    assert c.wire_bytes(result.arrays, RoundInfo(0, 1, 0)) is None  # no codec: raw size


def test_examples_aggregation_weighs_by_train_examples() -> None:
    result = client(aggregation="examples").train(client().initial_arrays(), {}, tiny_data(),
                                                  RoundInfo(0, 1, 0))
    assert result.weight == 48


def test_evaluation_uses_the_mentor_and_logs_the_mentee() -> None:
    c, state, data = client(), {}, tiny_data()
    sent = c.train(c.initial_arrays(), state, data, RoundInfo(0, 1, 0)).arrays
    ev = c.evaluate(sent, state, data, RoundInfo(0, 1, 0))
    mentor = build_model("mlp", (1, 8, 8), 2, 0)
    mentor.load_state_dict(state[MENTOR])
    own = evaluate_model(mentor, data.x_test, data.y_test)
    assert ev.accuracy == own.accuracy and ev.loss == pytest.approx(own.loss)
    mentee = build_model("mlp", (1, 8, 8), 2, 0)
    mentee.load_state_dict(sent)
    assert ev.metrics["mentee-loss"] == pytest.approx(
        evaluate_model(mentee, data.x_test, data.y_test).loss)


def test_settings_checks() -> None:
    with pytest.raises(ConfigError):
        check_settings(config(), FedKDMentorSettings(t_start=0.99, t_end=0.9))
    with pytest.raises(ConfigError):
        check_settings(config(), FedKDMentorSettings(mentee_model="nope"))


# ---- SVD codec ------------------------------------------------------------------------------------


def _matrix(seed: int, shape: tuple[int, ...] = (12, 9)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["pfllib", "matrix"])
@pytest.mark.parametrize("shape", [(12, 9), (6, 3, 5, 5)])
def test_full_energy_reconstructs(mode: str, shape: tuple[int, ...]) -> None:
    w = _matrix(1, shape)
    torch.testing.assert_close(svd_reconstruct(svd_compress(w, 1.0, mode)), w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("energy", [0.3, 0.8, 0.95, 0.98])
def test_rank_is_the_smallest_that_exceeds_the_energy(energy: float) -> None:
    w = _matrix(2)
    f = svd_compress(w, energy, "matrix")
    s2 = torch.linalg.svdvals(w.double()).pow(2)
    k = f.rank
    assert k is not None and k == svd_rank(torch.linalg.svdvals(w), energy)
    assert s2[:k].sum() > energy * s2.sum()
    assert s2[:k - 1].sum() <= energy * s2.sum()


def test_pfllib_mode_pools_one_rank_over_all_kernels() -> None:
    w = _matrix(3, (4, 2, 5, 5))
    f = svd_compress(w, 0.8, "pfllib")
    assert f.u is not None and f.u.shape[:2] == (4, 2) and f.s is not None
    s2 = torch.linalg.svdvals(w.double()).pow(2).reshape(-1, 5).sum(0)
    assert s2[:f.rank].sum() > 0.8 * s2.sum() >= s2[:f.rank - 1].sum()
    m = svd_compress(w, 0.8, "matrix")  # out x (in*kh*kw): one 4 x 50 SVD
    assert m.u is not None and m.u.shape == (4, m.rank)


def test_raw_cases_and_pfllib_rank_loop() -> None:
    bias, row = _matrix(4, (7,)), _matrix(5, (1, 9))
    assert svd_compress(bias, 0.9).raw is bias and svd_compress(row, 0.9).raw is row
    assert svd_compress(torch.zeros(3, 4), 0.9).raw is not None
    flat = torch.eye(4)  # equal singular values: 3 of 4 hold 75% <= 95%
    assert svd_rank(torch.ones(4), 0.95) == 4
    assert svd_rank(torch.ones(4), 0.95, pfllib_loop=True) == 0
    assert torch.equal(svd_reconstruct(svd_compress(flat, 0.95, pfllib_loop=True)), torch.zeros(4, 4))
    with pytest.raises(ValueError):
        svd_rank(torch.ones(4), 1.5)


def test_energy_schedule() -> None:
    assert energy_at(0, 10, 0.95, 0.98) == pytest.approx(0.95)
    assert energy_at(5, 10, 0.95, 0.98) == pytest.approx(0.965)
    assert energy_at(10, 10, 0.95, 0.98) == pytest.approx(0.98)
    assert energy_at(12, 10, 0.95, 0.98) == pytest.approx(0.98)


def test_low_rank_weight_is_cheaper_on_the_wire() -> None:
    low = _matrix(6, (40, 2)) @ _matrix(7, (2, 30))  # rank 2
    factors = compress_arrays({"w": low, "b": _matrix(8, (40,))}, 0.95)
    assert factors["w"].rank == 2 and factors["w"].nbytes() < low.numel() * 4
    assert wire_size(factors) == factors["w"].nbytes() + 40 * 4


def test_compressing_client_returns_the_codec_round_trip() -> None:
    data, info = tiny_data(), RoundInfo(0, 1, 0)
    settings = dict(t_start=0.5, t_end=0.6)  # low energy: the 2-D weights shrink
    plain, packed = client(**settings), client(compress=True, **settings)
    start = plain.initial_arrays()
    # round 1 receives the seeded init uncompressed, so training matches the uncompressed client
    trained = plain.train(start, {}, data, info).arrays
    result = packed.train(start, {}, data, info)
    energy = energy_at(1, config().train.rounds, 0.5, 0.6)
    expected = reconstruct_arrays(compress_arrays(trained, energy, "pfllib"))
    assert set(result.arrays) == set(expected)
    for k in expected:
        torch.testing.assert_close(result.arrays[k], expected[k], atol=1e-5, rtol=0)
    sent = packed.wire_bytes(result.arrays, info)
    raw = sum(t.numel() * t.element_size() for t in result.arrays.values())
    assert sent is not None and sent < raw
    assert sent == wire_size(compress_arrays(trained, energy, "pfllib"))
    fc1 = "features.fc1.0.weight"
    assert svd_compress(trained[fc1], energy).nbytes() < trained[fc1].numel() * 4
    assert packed.wire_bytes(start, info) == raw  # round 1's broadcast (the init) travels raw


def test_compressing_client_uses_the_compressed_broadcast() -> None:
    data = tiny_data()
    c, state = client(compress=True, t_start=0.5, t_end=0.6), {}
    received = c.train(c.initial_arrays(), state, data, RoundInfo(0, 1, 0)).arrays
    received = {k: v + 0.01 * torch.randn_like(v) for k, v in received.items()}  # "an average"
    ev = c.evaluate(received, state, data, RoundInfo(0, 2, 0))
    energy = energy_at(2, config().train.rounds, 0.5, 0.6)
    mentee = build_model("mlp", (1, 8, 8), 2, 0)
    mentee.load_state_dict(reconstruct_arrays(compress_arrays(received, energy)))
    assert ev.metrics["mentee-loss"] == pytest.approx(
        evaluate_model(mentee, data.x_test, data.y_test).loss, abs=1e-6)
    info = RoundInfo(0, 2, 0)
    assert c.wire_bytes(received, info) == wire_size(compress_arrays(received, energy))


def _plus(base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: base[k] + delta[k] for k in base}


def _minus(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: a[k] - b[k] for k in a}


def test_update_sharing_follows_the_official_protocol() -> None:
    """`share: update` on two clients that train every round: each payload is the synced mentee plus
    the compressed update, and both clients then sync to the same mentee, the old one plus the
    compressed mean of the reconstructed updates (the official server's broadcast)."""
    settings = dict(compress=True, share="update", t_start=0.5, t_end=0.6)  # lossy energies
    clients, states = [client(**settings), client(**settings)], [{}, {}]
    data = [tiny_data(seed=1), tiny_data(seed=2)]
    start = clients[0].initial_arrays()
    energy = [energy_at(r, config().train.rounds, 0.5, 0.6) for r in (0, 1, 2)]
    payloads = []
    for c, state, d in zip(clients, states, data):
        trained = client().train(start, {}, d, RoundInfo(0, 1, 0)).arrays  # round 1 uses the init raw
        sent = c.train(start, state, d, RoundInfo(0, 1, 0))
        update = compress_arrays(_minus(trained, start), energy[1])
        expected = _plus(start, reconstruct_arrays(update))
        for k in expected:
            torch.testing.assert_close(sent.arrays[k], expected[k], atol=1e-5, rtol=0)
        assert c.wire_bytes(sent.arrays, RoundInfo(0, 1, 0)) == wire_size(update)
        assert all(torch.equal(state[SYNCED][k], start[k]) for k in start)
        payloads.append(sent.arrays)
    mean = {k: (payloads[0][k] + payloads[1][k]) / 2 for k in start}  # the server's uniform average
    broadcast = compress_arrays(_minus(mean, start), energy[1])  # round 1's aggregate, re-compressed
    synced = _plus(start, reconstruct_arrays(broadcast))
    for c, state, d in zip(clients, states, data):
        c.train(mean, state, d, RoundInfo(0, 2, 0))
        for k in start:
            torch.testing.assert_close(state[SYNCED][k], synced[k], atol=1e-5, rtol=0)
        assert c.wire_bytes(mean, RoundInfo(0, 2, 0)) == wire_size(broadcast)
    assert any((synced[k] - mean[k]).norm() > 0.01 * (mean[k] - start[k]).norm()  # lossy: not
               for k in start)  # the mean itself


def test_update_sharing_at_full_energy_is_lossless() -> None:
    """With energy 1 the synced mentee is exactly the server's average (no compression error)."""
    c, state, data = client(compress=True, share="update", t_start=1.0, t_end=1.0), {}, tiny_data()
    sent = c.train(c.initial_arrays(), state, data, RoundInfo(0, 1, 0)).arrays
    received = {k: v + 0.01 * torch.randn_like(v) for k, v in sent.items()}  # "an average"
    c.train(received, state, data, RoundInfo(0, 2, 0))
    for k in received:
        torch.testing.assert_close(state[SYNCED][k], received[k], atol=1e-5, rtol=0)


def test_a_different_mentee_architecture_is_shared_and_projected() -> None:
    cfg = config()
    cfg.model.name = "cnn"  # mentor: the run's model; mentee: the small MLP
    c, state = FedKDMentorClient(cfg, FedKDMentorSettings(mentee_model="mlp"), (1, 8, 8), 2,
                                 torch.device("cpu")), {}
    result = c.train(c.initial_arrays(), state, tiny_data(), RoundInfo(0, 1, 0))
    assert set(result.arrays) == set(build_model("mlp", (1, 8, 8), 2, 0).state_dict())
    assert set(state[MENTOR]) == set(build_model("cnn", (1, 8, 8), 2, 0).state_dict())
    assert state[W_H]["weight"].shape == (512, 200)  # mentee features 200 -> mentor features 512
