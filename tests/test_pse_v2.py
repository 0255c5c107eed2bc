"""PSE v2 options on tiny tensors (`../shared/specs/pse.md` c.3.6, c.4 gate, c.4b, h.10-h.12):
`alpha_max`, `excite_on: gate`, the pre/post-excitation diagnostic (`log_excitation`), and the v1
settings still giving v1's behaviour."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import fedkd.clients.pse as pse_module
from fedkd.clients.base import Arrays, ClientData, RoundInfo, evaluate_model
from fedkd.clients.pse import (ATTENTION, EXCITATION, LOCAL_MODEL, PERSONAL_HEAD, PSEClient,
                               PSESettings)
from fedkd.clients.pse_attention import PSEModel
from fedkd.clients.pse_excitation import (channel_gates, excitation_weights, gate_module,
                                          low_level_convs)
from fedkd.config import ConfigError, load_config
from fedkd.models import FedModel, build_model
from tests.test_pse import DIAGNOSTIC_METRICS, clone, client, same, separable

CONVS = ["features.conv1.0", "features.conv2.0"]


def rounds(pse: PSEClient, data: ClientData, n: int, state: dict[str, Any] | None = None,
           arrays: Arrays | None = None) -> tuple[dict[str, Any], Arrays, list[dict[str, float]]]:
    """(state, last upload, train metrics per round) of `n` rounds of one client alone."""
    state = {} if state is None else state
    arrays = pse.initial_arrays() if arrays is None else arrays
    metrics = []
    for server_round in range(1, n + 1):
        result = pse.train(arrays, state, data, RoundInfo(0, server_round, 0))
        metrics.append(result.metrics)
        arrays = result.arrays
    return state, arrays, metrics


def v1_excitation_weights(d: Tensor, *, mode: str = "sigmoid", beta: float = 5.0,
                          rho: float = 0.2, eps: float = 1e-8, **_: object) -> Tensor:
    """v1's alpha (before alpha_max existed), written out: the reference of h.10."""
    if mode == "sigmoid":
        z = (d - d.mean()) / (d.std(unbiased=False) + eps)
        return torch.sigmoid(beta * z)
    alpha = torch.zeros_like(d)
    alpha[d.topk(min(d.numel(), max(1, round(rho * d.numel())))).indices] = 1.0
    return alpha


# ---- alpha_max (c.3.6, h.10) ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sigmoid", "topk"])
def test_alpha_max_bounds_and_scales_the_v1_alpha(mode: str) -> None:
    d = torch.rand(64, generator=torch.Generator().manual_seed(0))
    v1 = v1_excitation_weights(d, mode=mode, rho=0.1)
    assert torch.equal(excitation_weights(d, mode=mode, rho=0.1), v1)  # alpha_max 1 = v1, bit for bit
    bounded = excitation_weights(d, mode=mode, rho=0.1, alpha_max=0.2)
    assert float(bounded.min()) >= 0.0 and bounded.max() <= torch.tensor(0.2)
    assert torch.allclose(bounded, 0.2 * v1)
    if mode == "topk":  # exactly max(1, round(rho * C)) channels at alpha_max, the rest 0
        assert int((bounded == 0.2).sum()) == round(0.1 * 64) and int((bounded == 0).sum()) == 58
    with pytest.raises(ValueError, match="alpha_max"):
        excitation_weights(d, alpha_max=1.5)


def test_alpha_max_bounds_every_channel_the_client_excites() -> None:
    pse, data = client(PSESettings(alpha_max=0.2)), separable()
    state, _, metrics = rounds(pse, data, 2)
    alpha = torch.cat(list(state[EXCITATION].values()))
    assert float(alpha.min()) > 0.0 and alpha.max() <= torch.tensor(0.2)
    assert metrics[1]["excitation-mean"] < 0.2
    assert {f"alpha-mean-{c}" for c in CONVS} <= set(metrics[1])


def test_alpha_max_and_excite_on_are_checked_in_the_config() -> None:
    with pytest.raises(ConfigError, match="method.alpha_max"):
        load_config(None, ["method.name=pse", "model.name=cnn", "method.alpha_max=0"])
    with pytest.raises(ConfigError, match="method.alpha_max"):
        load_config(None, ["method.name=pse", "model.name=cnn", "method.alpha_max=1.2"])
    with pytest.raises(ConfigError, match="method.excite_on"):
        load_config(None, ["method.name=pse", "model.name=cnn", "method.excite_on=channels"])
    cfg = load_config(None, ["method.name=pse", "model.name=cnn", "method.excite_on=gate",
                             "method.alpha_max=0.2"])
    assert cfg.method["excite_on"] == "gate" and cfg.method["alpha_max"] == 0.2


# ---- v1 settings still give v1 (h.10) ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["sigmoid", "topk"])
def test_v1_settings_reproduce_the_v1_run_bit_for_bit(monkeypatch: pytest.MonkeyPatch,
                                                      mode: str) -> None:
    data = separable()
    v2_state, v2_arrays, _ = rounds(client(PSESettings(mode=mode, log_excitation=False)), data, 3)
    monkeypatch.setattr(pse_module, "excitation_weights", v1_excitation_weights)
    v1_state, v1_arrays, _ = rounds(client(PSESettings(mode=mode, log_excitation=False)), data, 3)
    assert same(v2_arrays, v1_arrays)
    for key in (LOCAL_MODEL, ATTENTION, PERSONAL_HEAD, EXCITATION):
        assert same(v2_state[key], v1_state[key]), key


def test_the_method_defaults_are_v1s() -> None:
    s = PSESettings()
    assert (s.alpha_max, s.excite_on, s.mode, s.rho, s.beta) == (1.0, "weights", "sigmoid", 0.2, 5.0)
    assert s.log_excitation  # spec e: diagnostic on by default (logging only)


# ---- excite_on: gate (c.4 v2, h.11) -----------------------------------------------------------


def test_gate_with_zero_alpha_is_the_plain_forward_exactly() -> None:
    local = build_model("cnn_bn", (1, 8, 8), 2, 0).train()
    x = torch.randn(8, 1, 8, 8)
    layers = low_level_convs(local, local.low_level_blocks)
    zero = {gate_module(layer): torch.zeros(32 if "conv1" in layer.conv else 64) for layer in layers}
    plain = local.features(x)
    with channel_gates(local, zero):
        gated = local.features(x)
    assert torch.equal(plain, gated)


def test_gate_acts_after_the_batchnorm_where_a_conv_gain_would_be_normalised_away() -> None:
    local = build_model("cnn_bn", (1, 8, 8), 2, 0).train()  # BN in train mode: batch statistics
    layer = low_level_convs(local, local.low_level_blocks)[0]
    assert gate_module(layer) == layer.norm == "features.conv1.1"
    x = torch.randn(8, 1, 8, 8)
    seen: list[Tensor] = []
    bn = local.get_submodule(layer.norm)
    handle = bn.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    try:  # the BN's own hook runs first, so seen[k] is the ungated BN output
        local.features(x)
        ones = torch.ones(32)
        outputs = []
        for gain in (ones, 3 * ones):  # gains 2 and 4
            captured: list[Tensor] = []
            relu_in = local.get_submodule("features.conv1.2").register_forward_pre_hook(
                lambda m, i: captured.append(i[0].detach().clone()))  # before the in-place ReLU
            with channel_gates(local, {layer.norm: gain}):
                local.features(x)
            relu_in.remove()
            outputs.append(captured[0])  # the ReLU's input: the gated BN output
    finally:
        handle.remove()
    assert torch.allclose(outputs[0], 2 * seen[0]) and torch.allclose(outputs[1], 2 * outputs[0])
    with torch.no_grad():  # the same gain on the conv output: normalised away by the train-mode BN
        z = local.get_submodule(layer.conv)(x)
        assert torch.allclose(bn(2 * z), bn(z), atol=1e-4)


def test_gate_multiplies_each_low_level_conv_output_by_one_plus_alpha() -> None:
    local = build_model("cnn", (1, 8, 8), 2, 0)
    glob = build_model("cnn", (1, 8, 8), 2, 1).eval().requires_grad_(False)
    head = torch.nn.Linear(512, 2)
    a1 = torch.rand(32, generator=torch.Generator().manual_seed(1))
    a2 = torch.rand(64, generator=torch.Generator().manual_seed(2))
    model = PSEModel(local, head, glob, gate_alpha={CONVS[0]: a1, CONVS[1]: a2})
    x = torch.randn(4, 1, 8, 8)
    f = local.features
    with torch.no_grad():
        h = torch.max_pool2d(torch.relu(f.conv1[0](x) * (1 + a1).view(1, -1, 1, 1)), 2)
        h = torch.max_pool2d(torch.relu(f.conv2[0](h) * (1 + a2).view(1, -1, 1, 1)), 2)
        z = f.fc1(f.flatten(h))
        out = model.parts(x)
    assert torch.allclose(out.logits, head(z), atol=1e-5)
    assert torch.allclose(out.local_logits, local.head(z), atol=1e-5)  # h_l reads the gated f_l
    with torch.no_grad():
        assert not torch.allclose(out.logits, head(local.features(x)), atol=1e-3)


def test_gate_mode_never_moves_a_local_weight_and_keeps_alpha_in_the_state(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pse, data = client(PSESettings(excite_on="gate", alpha_max=0.2), model="cnn_bn"), separable()
    state, arrays, _ = rounds(pse, data, 1)
    saved = clone(state[LOCAL_MODEL])

    def boom(*args: object) -> None:
        raise AssertionError("gate mode must not interpolate weights")

    monkeypatch.setattr(pse, "excite", boom)
    seen: list[tuple[Arrays, PSEModel]] = []
    original = pse.personalized_model

    def spy(local: FedModel, *args: Any, **kwargs: Any) -> PSEModel:
        model = original(local, *args, **kwargs)
        seen.append((clone(local.state_dict()), model))
        return model

    monkeypatch.setattr(pse, "personalized_model", spy)
    pse.train(arrays, state, data, RoundInfo(0, 2, 0))
    assert len(seen) == 3  # pre diagnostic, post diagnostic, personalized training
    assert all(same(weights, saved) for weights, _ in seen)  # what training starts from
    gates = seen[-1][1].gate_alpha
    assert gates is not None and set(gates) == {"features.conv1.1", "features.conv2.1"}  # the BNs
    assert all(a.max() <= torch.tensor(0.2) for a in gates.values())
    assert seen[-1][1].feature_alpha is None
    assert set(state[EXCITATION]) == {"features.conv1.0", "features.conv2.0"}
    # evaluation scores the gated model, alpha saved with it (inference_model's buffers)
    monkeypatch.undo()
    predictor = pse.inference_model(arrays, state, 0)
    buffers = {k for k, _ in predictor.named_buffers() if k.startswith("excitation_")}
    assert buffers == {"excitation_0", "excitation_1"}
    result = pse.evaluate(arrays, state, data, RoundInfo(0, 2, 0))
    assert result.accuracy == evaluate_model(predictor, data.x_test, data.y_test).accuracy


def test_gate_changes_the_personal_training_and_the_upload_stays_fedavgs() -> None:
    data = separable()
    weights_state, weights_up, _ = rounds(client(PSESettings(alpha_max=0.2)), data, 2)
    gate_state, gate_up, _ = rounds(client(PSESettings(excite_on="gate", alpha_max=0.2)), data, 2)
    assert same(weights_up, gate_up)  # the global copy never sees the excitation
    assert not same(weights_state[LOCAL_MODEL], gate_state[LOCAL_MODEL])


# ---- the diagnostic (c.4b, h.12) --------------------------------------------------------------


def foreign_global(seed: int = 7) -> Arrays:
    """A global model unrelated to the local one (another initialization), so that moving the
    local convs onto it changes the local model's predictions."""
    return clone(build_model("cnn", (1, 8, 8), 2, seed).state_dict())


def test_pre_and_post_excitation_accuracies_are_logged_from_round_two_and_can_differ(
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = separable(n=96, flip=True)
    settings = PSESettings(mode="topk", rho=1.0)  # every channel fully to the global model's
    pse = client(settings, local_epochs=3)
    state, _, metrics = rounds(pse, data, 2)
    assert not set(DIAGNOSTIC_METRICS) & set(metrics[0])  # round 1: the local model is a copy
    assert set(DIAGNOSTIC_METRICS) <= set(metrics[1])
    before = {k: clone(state[k]) for k in (LOCAL_MODEL, ATTENTION, PERSONAL_HEAD)}
    received = foreign_global()
    excited: list[Arrays] = []
    original = pse.excite

    def spy(local: FedModel, snapshot: FedModel, alpha: dict[str, Tensor]) -> None:
        original(local, snapshot, alpha)
        excited.append(clone(local.state_dict()))

    monkeypatch.setattr(pse, "excite", spy)
    result = pse.train(received, state, data, RoundInfo(0, 3, 0))
    m = result.metrics
    assert m["pre-excitation-accuracy"] != m["post-excitation-accuracy"]
    # each equals an evaluation of the models as they were right before / right after step 4
    snapshot = build_model("cnn", (1, 8, 8), 2, 0).eval()
    snapshot.load_state_dict(received)
    for weights, key in ((before[LOCAL_MODEL], "pre"), (excited[0], "post")):
        local = build_model("cnn", (1, 8, 8), 2, 0)
        local.load_state_dict(weights)
        model = pse.personalized_model(local, snapshot, {**before, LOCAL_MODEL: weights},
                                       alpha={})
        assert m[f"{key}-excitation-accuracy"] == evaluate_model(model, data.x_test,
                                                                 data.y_test).accuracy
        assert m[f"{key}-excitation-local-accuracy"] == evaluate_model(
            local, data.x_test, data.y_test).accuracy
    # evaluation of the round the client trained repeats them (the report reads evaluations)
    evaluated = pse.evaluate(result.arrays, state, data, RoundInfo(0, 3, 0)).metrics
    assert all(evaluated[k] == m[k] for k in DIAGNOSTIC_METRICS)
    later = pse.evaluate(result.arrays, state, data, RoundInfo(0, 4, 0)).metrics
    assert not set(DIAGNOSTIC_METRICS) & set(later)


@pytest.mark.parametrize("excite_on", ["weights", "gate"])
def test_the_diagnostic_is_side_effect_free(excite_on: str) -> None:
    data = separable()

    def run(log: bool) -> tuple[dict[str, Any], Arrays, list[dict[str, float]], float]:
        pse = client(PSESettings(excite_on=excite_on, alpha_max=0.2, log_excitation=log),
                     model="cnn_bn")
        state, arrays, metrics = rounds(pse, data, 3)
        return state, arrays, metrics, pse.evaluate(arrays, state, data, RoundInfo(0, 3, 0)).accuracy

    on, off = run(True), run(False)
    assert same(on[1], off[1])  # uploads: parameters and BN statistics
    for key in (LOCAL_MODEL, ATTENTION, PERSONAL_HEAD, EXCITATION):
        assert same(on[0][key], off[0][key]), key  # BN running stats are in LOCAL_MODEL
    headline = ("loss", "accuracy", "personal-loss", "personal-accuracy", "excitation-mean")
    assert all(a[k] == b[k] for a, b in zip(on[2], off[2]) for k in headline)
    assert on[3] == off[3]
    assert set(DIAGNOSTIC_METRICS) <= set(on[2][2]) and not set(DIAGNOSTIC_METRICS) & set(off[2][2])
    assert not any(k.startswith("alpha-mean-") for k in off[2][2])


def test_no_diagnostic_without_excitation() -> None:
    _, _, metrics = rounds(client(PSESettings(excitation=False)), separable(), 2)
    assert not set(DIAGNOSTIC_METRICS) & set(metrics[1])
