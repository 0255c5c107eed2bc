"""PSE (clients/pse.py) on tiny tensors: the pure pieces, the client, the ablations, the configs.

Follows the test plan of `../shared/specs/pse.md` section h (aggregation itself is the stock
FedAvg strategy's, tested elsewhere; here: what a client uploads).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from fedkd import registry
from fedkd.clients.base import Arrays, ClientData, RoundInfo, evaluate_model
from fedkd.clients.fedavg import FedAvgClient, FedAvgSettings
from fedkd.clients.pse import (ATTENTION, DIAGNOSTIC, EXCITATION, LOCAL_MODEL, PERSONAL_HEAD,
                               ROUND_START_GLOBAL, PSEClient, PSESettings, check_settings)
from fedkd.clients.pse_attention import CrossModelAttention, PSEModel
from fedkd.clients.pse_excitation import (ConvLayer, channel_gradient_norms, excitation_weights,
                                          excited_features, excited_keys, interpolate_channels,
                                          low_level_convs, normalized_differentiation)
from fedkd.config import CONFIG_DIR, ConfigError, FedkdConfig, load_yaml
from fedkd.models import FedModel, build_model
from tests.test_clients import config

CPU = torch.device("cpu")
DIAGNOSTIC_METRICS = ("pre-excitation-accuracy", "post-excitation-accuracy",
                      "pre-excitation-local-accuracy", "post-excitation-local-accuracy")



def pse_config(model: str = "cnn", **train: object) -> FedkdConfig:
    cfg = config(**{"lr": 0.005, **train})
    cfg.model.name = model
    return cfg


def client(settings: PSESettings | None = None, model: str = "cnn", **train: object) -> PSEClient:
    return PSEClient(pse_config(model, **train), settings or PSESettings(), (1, 8, 8), 2, CPU)


def separable(seed: int = 0, n: int = 64, flip: bool = False) -> ClientData:
    """Two classes, each a fixed 8x8 pattern (the same on every client) plus noise; `flip`
    swaps the labels (a client whose label semantics conflict with the others')."""
    patterns = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = patterns[y] + torch.randn(n, 1, 8, 8, generator=g)
    if flip:
        y = 1 - y
    k = n * 3 // 4
    return ClientData(x[:k], y[:k], x[k:], y[k:])


def same(a: Arrays, b: Arrays) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def clone(arrays: Arrays) -> Arrays:
    return {k: v.detach().clone() for k, v in arrays.items()}


# ---- cross-model attention --------------------------------------------------------------------


def test_attention_shapes_and_weights_sum_to_one() -> None:
    attn = CrossModelAttention(16, heads=4)
    z_l, z_g = torch.randn(5, 16), torch.randn(5, 16)
    out, weights = attn.attend(z_l, z_g)
    assert out.shape == (5, 16) and attn(z_l, z_g).shape == (5, 16)
    assert weights.shape == (5, 4, 2)
    assert torch.allclose(weights.sum(-1), torch.ones(5, 4))


def test_attention_is_hand_computable_with_identity_projections() -> None:
    """W_q = 0 -> uniform weights 1/2; W_v = W_o = I, MLP output 0 -> z = LN(z_l + (z_l + z_g)/2)."""
    d = 8
    for final_norm in (True, False):
        attn = CrossModelAttention(d, heads=2, final_norm=final_norm)
        with torch.no_grad():
            attn.q.weight.zero_()
            attn.v.weight.copy_(torch.eye(d))
            attn.out.weight.copy_(torch.eye(d))
            attn.out.bias.zero_()
            last = attn.mlp[-1]
            assert isinstance(last, nn.Linear)
            last.weight.zero_()
            last.bias.zero_()
        z_l, z_g = torch.randn(3, d), torch.randn(3, d)
        out, weights = attn.attend(z_l, z_g)
        assert torch.allclose(weights, torch.full((3, 2, 2), 0.5))
        u = z_l + (z_l + z_g) / 2
        expected = F.layer_norm(u, (d,)) if final_norm else u
        assert torch.allclose(out, expected, atol=1e-6)


def test_attention_with_the_global_token_masked_depends_on_z_local_only() -> None:
    attn = CrossModelAttention(16, heads=4)
    z_l = torch.randn(4, 16)
    masked, weights = attn.attend(z_l, None)
    assert weights.shape == (4, 4, 1) and torch.equal(weights, torch.ones(4, 4, 1))
    # two equal tokens: the same values whatever the weights, so the same as the masked block
    assert torch.allclose(attn(z_l, z_l.clone()), masked, atol=1e-5)
    assert not torch.allclose(attn(z_l, torch.randn(4, 16)), masked, atol=1e-3)


def test_attention_heads_must_divide_the_width() -> None:
    with pytest.raises(ValueError, match="divide"):
        CrossModelAttention(10, heads=4)


# ---- excitation math --------------------------------------------------------------------------


def test_normalized_differentiation_by_hand() -> None:
    g_global, g_local = torch.tensor([1.0, 1.0, 2.0]), torch.tensor([2.0, 1.0, 1.0])
    # normalized: global [.25, .25, .5], local [.5, .25, .25]
    abs_d = normalized_differentiation(g_global, g_local, "abs", eps=0.0)
    assert torch.allclose(abs_d, torch.tensor([0.25, 0.0, 0.25]))
    lower = normalized_differentiation(g_global, g_local, "global_lower", eps=0.0)
    assert torch.allclose(lower, torch.tensor([0.25, 0.0, 0.0]))
    local_lower = normalized_differentiation(g_global, g_local, "local_lower", eps=0.0)
    assert torch.allclose(local_lower, torch.tensor([0.0, 0.0, 0.25]))
    # scale-free per layer: only the profiles matter
    assert torch.allclose(normalized_differentiation(10 * g_global, g_local, "abs", eps=0.0), abs_d)


def test_sigmoid_excitation_follows_the_standardized_difference() -> None:
    d = torch.tensor([0.1, 0.4, 0.2, 0.3])
    alpha = excitation_weights(d, mode="sigmoid", beta=5.0, eps=0.0)
    z = (d - 0.25) / math.sqrt(0.0125)  # population std of d
    assert torch.allclose(alpha, torch.sigmoid(5.0 * z))
    assert alpha.argsort().tolist() == d.argsort().tolist()
    assert bool(((alpha > 0) & (alpha < 1)).all())
    sharper = excitation_weights(d, mode="sigmoid", beta=50.0)
    assert sharper.max() > alpha.max() and sharper.min() < alpha.min()


def test_identical_profiles_give_constant_alpha_without_nan() -> None:
    g = torch.tensor([3.0, 1.0, 2.0, 5.0])
    d = normalized_differentiation(g, g.clone())
    assert torch.equal(d, torch.zeros(4))
    alpha = excitation_weights(d, mode="sigmoid")
    assert torch.equal(alpha, torch.full((4,), 0.5))


def test_topk_excites_exactly_the_top_rho_channels() -> None:
    d = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.0, 0.2, 0.8, 0.4, 0.6, 0.7])
    alpha = excitation_weights(d, mode="topk", rho=0.2)
    assert alpha.tolist() == [0, 1, 0, 0, 0, 0, 1, 0, 0, 0]
    assert int(excitation_weights(d, mode="topk", rho=0.01).sum()) == 1  # at least one channel
    assert int(excitation_weights(d, mode="topk", rho=1.0).sum()) == 10


def test_low_level_convs_are_found_by_type_with_their_batchnorm() -> None:
    cnn = build_model("cnn", (1, 8, 8), 2, 0)
    assert low_level_convs(cnn, cnn.low_level_blocks) == [
        ConvLayer("features.conv1.0", None), ConvLayer("features.conv2.0", None)]
    cnn_bn = build_model("cnn_bn", (1, 8, 8), 2, 0)
    assert low_level_convs(cnn_bn, cnn_bn.low_level_blocks) == [
        ConvLayer("features.conv1.0", "features.conv1.1"),
        ConvLayer("features.conv2.0", "features.conv2.1")]
    resnet = build_model("resnet8", (3, 8, 8), 2, 0)
    assert low_level_convs(resnet, resnet.low_level_blocks) == [
        ConvLayer("features.stem.0", "features.stem.1"),
        ConvLayer("features.layer1.conv1", "features.layer1.bn1"),
        ConvLayer("features.layer1.conv2", "features.layer1.bn2")]
    assert low_level_convs(cnn, ["features.conv2"]) == [ConvLayer("features.conv2.0", None)]
    assert low_level_convs(build_model("mlp", (1, 8, 8), 2, 0), ["features"]) == []


def test_interpolation_moves_exactly_the_low_level_channels() -> None:
    local_model = build_model("cnn_bn", (1, 8, 8), 2, 0)
    global_model = build_model("cnn_bn", (1, 8, 8), 2, 1)
    layers = low_level_convs(local_model, ["features.conv1"])  # conv2 and the FC layers stay
    local, glob = clone(local_model.state_dict()), clone(global_model.state_dict())
    alpha = {"features.conv1.0": torch.rand(32)}
    alpha["features.conv1.0"][:3] = torch.tensor([0.0, 1.0, 0.5])
    out = interpolate_channels(local, glob, alpha, layers)
    moved = set(excited_keys(layers[0]))
    assert moved == {"features.conv1.0.weight", "features.conv1.0.bias",
                     "features.conv1.1.weight", "features.conv1.1.bias"}
    for key in local:
        if key not in moved:  # conv2, fc1, head, BN running statistics
            assert torch.equal(out[key], local[key]), key
    for key in moved:
        assert torch.equal(out[key][0], local[key][0])  # alpha 0: the local channel
        assert torch.equal(out[key][1], glob[key][1])  # alpha 1: exactly the global channel
        assert torch.allclose(out[key][2], (local[key][2] + glob[key][2]) / 2)
        a = alpha["features.conv1.0"].view(-1, *([1] * (local[key].dim() - 1)))
        assert torch.allclose(out[key], (1 - a) * local[key] + a * glob[key], atol=1e-6)
    all_layers = low_level_convs(local_model, local_model.low_level_blocks)
    zeros = {layer.conv: torch.zeros(32 if "conv1" in layer.conv else 64) for layer in all_layers}
    ones = {name: torch.ones_like(a) for name, a in zeros.items()}
    assert same(interpolate_channels(local, glob, zeros, all_layers), local)
    full = interpolate_channels(local, glob, ones, all_layers)
    for key in local:
        excited = any(key in excited_keys(layer) for layer in all_layers)
        assert torch.equal(full[key], glob[key] if excited else local[key]), key
    assert same(local, clone(local_model.state_dict()))  # inputs untouched


# ---- gradient statistics ----------------------------------------------------------------------


@pytest.mark.parametrize("stat", ["weight", "activation"])
def test_gradient_statistics_shapes_and_no_side_effects(stat: str) -> None:
    model = build_model("cnn_bn", (1, 8, 8), 2, 0).train()
    frozen = build_model("cnn_bn", (1, 8, 8), 2, 0).eval().requires_grad_(False)
    data = separable()
    batches = [(data.x_train[:16], data.y_train[:16]), (data.x_train[16:32], data.y_train[16:32])]
    convs = [layer.conv for layer in low_level_convs(model, model.low_level_blocks)]
    before = clone(model.state_dict())
    stats = channel_gradient_norms(model, convs, batches, stat)
    assert {n: tuple(v.shape) for n, v in stats.items()} == {
        "features.conv1.0": (32,), "features.conv2.0": (64,)}
    assert all(bool((v >= 0).all()) and bool((v > 0).any()) for v in stats.values())
    assert same(model.state_dict(), before)  # weights and BN running stats unchanged
    assert model.training and all(p.grad is None for p in model.parameters())
    frozen_stats = channel_gradient_norms(frozen, convs, batches, stat)
    assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    assert not frozen.training
    # same weights, same data, both in eval mode inside: identical profiles -> alpha 0.5
    for n in convs:
        assert torch.allclose(frozen_stats[n], stats[n])


def test_weight_statistic_is_the_per_filter_gradient_norm() -> None:
    model = build_model("cnn", (1, 8, 8), 2, 0)
    data = separable()
    x, y = data.x_train[:8], data.y_train[:8]
    stats = channel_gradient_norms(model, ["features.conv1.0"], [(x, y)])
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = model.get_submodule("features.conv1.0").weight.grad
    assert grad is not None
    assert torch.allclose(stats["features.conv1.0"], grad.flatten(1).norm(dim=1), atol=1e-6)


# ---- the client -------------------------------------------------------------------------------


def test_round_one_local_model_is_the_global_snapshot_and_excitation_a_no_op() -> None:
    pse, data = client(), separable()
    received = pse.initial_arrays()
    snapshot = pse.load_snapshot(received)
    local = pse.load_local({}, snapshot)
    assert same(local.state_dict(), received)
    alpha = pse.excitation(local, snapshot, data, RoundInfo(0, 1, 0))
    assert all(torch.equal(a, torch.full_like(a, 0.5)) for a in alpha.values())  # D = 0
    pse.excite(local, snapshot, alpha)
    assert same(local.state_dict(), received)
    state: dict[str, Any] = {}
    result = pse.train(received, state, data, RoundInfo(0, 1, 0))
    assert result.metrics["excitation-mean"] == 0.5
    assert set(state[EXCITATION]) == {"features.conv1.0", "features.conv2.0"}


def test_uploads_are_the_plainly_trained_global_copy_and_nothing_private() -> None:
    data, state = separable(), {}
    pse = client()
    received = pse.initial_arrays()
    for server_round in (1, 2):
        info = RoundInfo(0, server_round, 0)
        result = pse.train(received, state, data, info)
        fedavg = FedAvgClient(pse_config(), FedAvgSettings(), (1, 8, 8), 2, CPU)
        expected = fedavg.train(received, {}, data, info)
        assert set(result.arrays) == set(pse.model.state_dict()) == set(received)
        assert same(result.arrays, expected.arrays)  # spec c.2: FedAvg's update of the received model
        assert result.num_examples == len(data.y_train)
        received = result.arrays
    assert set(state) == {LOCAL_MODEL, ATTENTION, PERSONAL_HEAD, EXCITATION,
                          ROUND_START_GLOBAL, DIAGNOSTIC}  # SGD, no momentum
    private = [t for key in (LOCAL_MODEL, ATTENTION, PERSONAL_HEAD) for t in state[key].values()]
    pointers = {t.data_ptr() for t in private}
    assert not any(t.data_ptr() in pointers for t in received.values())
    local = state[LOCAL_MODEL]
    assert any(not torch.equal(local[k], received[k]) for k in received)  # two different models


def test_snapshot_stays_the_received_model_and_gets_no_gradient() -> None:
    pse, data, state = client(PSESettings(lambda_kd=1.0)), separable(), {}
    received = clone(pse.initial_arrays())
    pse.train(received, state, data, RoundInfo(0, 1, 0))
    second = clone(received)
    second["head.bias"] += 0.1
    pse.train(second, state, data, RoundInfo(0, 2, 0))
    assert same(clone(pse.snapshot.state_dict()), second)
    assert all(p.grad is None for p in pse.snapshot.parameters())
    assert not pse.snapshot.training


def test_training_improves_personalized_accuracy_over_three_rounds() -> None:
    pse, data, state = client(), separable(n=96), {}
    arrays = pse.initial_arrays()
    before = pse.evaluate(arrays, state, data, RoundInfo(0, 1, 0))
    losses = []
    for server_round in (1, 2, 3):
        result = pse.train(arrays, state, data, RoundInfo(0, server_round, 0))
        losses.append(result.metrics["personal-loss"])
        arrays = result.arrays
    after = pse.evaluate(arrays, state, data, RoundInfo(0, 3, 0))
    assert after.accuracy > before.accuracy and after.accuracy >= 0.9
    assert losses[-1] < losses[0]
    assert set(after.metrics) == {"global-accuracy", "global-loss", "fused-with-round_start-accuracy",
                                  *DIAGNOSTIC_METRICS}  # round 3's own pre/post-excitation figures
    assert set(before.metrics) == {"global-accuracy", "global-loss"}  # never trained: no round start


@pytest.mark.parametrize("eval_global", ["received", "round_start"])
def test_evaluation_reads_the_global_model_eval_global_names(eval_global: str) -> None:
    """After an aggregation moved the global model, "received" fuses with the new aggregate and
    "round_start" with the snapshot the personalized parts trained against; each run logs the other."""
    pse, data, state = client(PSESettings(eval_global=eval_global)), separable(n=96), {}
    start = clone(pse.initial_arrays())
    pse.train(start, state, data, RoundInfo(0, 1, 0))
    moved = {k: v * 50.0 if k.startswith("features") and v.is_floating_point() else v
             for k, v in start.items()}  # a very different aggregate
    result = pse.evaluate(moved, state, data, RoundInfo(0, 1, 0))
    other = "round_start" if eval_global == "received" else "received"
    fused_with = {eval_global: result.accuracy,
                  other: result.metrics[f"fused-with-{other}-accuracy"]}
    assert fused_with["received"] != fused_with["round_start"]  # the two readings differ here
    for name, arrays in (("received", moved), ("round_start", start)):
        snapshot = pse.load_snapshot(arrays)
        model = pse.personalized_model(pse.load_local(state, snapshot), snapshot, state)
        assert fused_with[name] == evaluate_model(model, data.x_test, data.y_test).accuracy


def test_personalized_beats_the_global_model_on_conflicting_clients() -> None:
    """Two clients whose labels are swapped: no global model fits both, each personal one can."""
    datas = [separable(0, 96), separable(1, 96, flip=True)]
    pse = client()
    states: list[dict[str, Any]] = [{}, {}]
    arrays = pse.initial_arrays()
    for server_round in (1, 2, 3):
        results = [pse.train(arrays, states[i], datas[i], RoundInfo(i, server_round, 0))
                   for i in range(2)]
        total = sum(r.num_examples for r in results)
        arrays = {k: sum(r.arrays[k] * (r.num_examples / total) for r in results) for k in arrays}
    for i in range(2):
        ev = pse.evaluate(arrays, states[i], datas[i], RoundInfo(i, 3, 0))
        assert ev.accuracy > ev.metrics["global-accuracy"]
        assert ev.accuracy >= 0.9


def test_deterministic_per_seed_round_and_client() -> None:
    data = separable()

    def run(partition: int) -> tuple[Arrays, dict[str, Any]]:
        pse, state = client(), {}
        result = pse.train(pse.initial_arrays(), state, data, RoundInfo(partition, 1, 7))
        result = pse.train(result.arrays, state, data, RoundInfo(partition, 2, 7))
        return result.arrays, state

    (a, sa), (b, sb), (c, _) = run(0), run(0), run(1)
    assert same(a, b)
    for key in (LOCAL_MODEL, ATTENTION, PERSONAL_HEAD, EXCITATION):
        assert same(sa[key], sb[key])
    assert not same(a, c)


def test_evaluation_uses_the_fused_personalized_model() -> None:
    pse, data, state = client(), separable(), {}
    result = pse.train(pse.initial_arrays(), state, data, RoundInfo(0, 1, 0))
    snapshot = pse.load_snapshot(result.arrays)
    model = pse.personalized_model(pse.load_local(state, snapshot), snapshot, state).eval()
    with torch.no_grad():
        expected = pse.personal_head(pse.attention(model.local.features(data.x_test),
                                                   snapshot.features(data.x_test)))
        logits = model(data.x_test)
    assert torch.allclose(logits, expected, atol=1e-6)
    ev = pse.evaluate(result.arrays, state, data, RoundInfo(0, 1, 0))
    assert ev.accuracy == float((expected.argmax(1) == data.y_test).float().mean())
    assert isinstance(model.global_model, FedModel)
    assert not any(p is q for p in model.parameters() for q in snapshot.parameters())


@pytest.mark.parametrize("model", ["cnn_bn", "resnet8"])
def test_bn_models_excite_conv_and_bn_affine_but_not_running_statistics(model: str) -> None:
    pse = PSEClient(pse_config(model), PSESettings(), (3, 8, 8), 2, CPU)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, 8, 8, generator=g), torch.randint(0, 2, (24,), generator=g)
    data, state = ClientData(x[:16], y[:16], x[16:], y[16:]), {}
    result = pse.train(pse.initial_arrays(), state, data, RoundInfo(0, 1, 0))
    assert all(layer.norm is not None for layer in pse.layers)
    saved = clone(state[LOCAL_MODEL])
    snapshot = pse.load_snapshot(result.arrays)
    alpha = pse.excitation(pse.load_local(state, snapshot), snapshot, data, RoundInfo(0, 2, 0))
    assert {n: a.numel() for n, a in alpha.items()} == {
        layer.conv: pse.model.get_submodule(layer.conv).out_channels for layer in pse.layers}
    excited = interpolate_channels(saved, result.arrays, alpha, pse.layers)
    changed = {k for k in saved if not torch.equal(excited[k], saved[k])}
    assert changed and changed <= {k for layer in pse.layers for k in excited_keys(layer)}
    assert not any(k.endswith(("running_mean", "running_var")) for k in changed)
    assert pse.evaluate(result.arrays, state, data, RoundInfo(0, 1, 0)).num_examples == 8


# ---- ablations and variants -------------------------------------------------------------------


def test_attention_off_classifies_the_local_feature_alone() -> None:
    pse, data, state = client(PSESettings(attention=False)), separable(), {}
    assert pse.attention is None
    result = pse.train(pse.initial_arrays(), state, data, RoundInfo(0, 1, 0))
    assert ATTENTION not in state and EXCITATION in state
    snapshot = pse.load_snapshot(result.arrays)
    model = pse.personalized_model(pse.load_local(state, snapshot), snapshot, state).eval()
    with torch.no_grad():
        expected = pse.personal_head(model.local.features(data.x_test))
        assert torch.allclose(model(data.x_test), expected)
    other = clone(result.arrays)
    other["features.fc1.0.weight"] += 1.0  # a different global model changes nothing
    assert (pse.evaluate(other, state, data, RoundInfo(0, 1, 0)).accuracy
            == pse.evaluate(result.arrays, state, data, RoundInfo(0, 1, 0)).accuracy)
    assert not any(n.startswith("attention") for n, _ in model.named_parameters())


def test_excitation_off_never_touches_the_local_model(monkeypatch: pytest.MonkeyPatch) -> None:
    pse, data, state = client(PSESettings(excitation=False)), separable(), {}

    def boom(*args: object) -> None:
        raise AssertionError("excitation must not run")

    monkeypatch.setattr(pse, "excitation", boom)
    monkeypatch.setattr(pse, "excite", boom)
    result = pse.train(pse.initial_arrays(), state, data, RoundInfo(0, 1, 0))
    result = pse.train(result.arrays, state, data, RoundInfo(0, 2, 0))
    assert EXCITATION not in state and "excitation-mean" not in result.metrics
    assert ATTENTION in state


def test_excitation_on_interpolates_the_saved_local_model_before_training(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pse, data, state = client(), separable(), {}
    result = pse.train(pse.initial_arrays(), state, data, RoundInfo(0, 1, 0))
    saved = clone(state[LOCAL_MODEL])
    seen: list[tuple[Arrays, dict[str, Tensor]]] = []
    original = pse.excite

    def spy(local: FedModel, snapshot: FedModel, alpha: dict[str, Tensor]) -> None:
        assert same(clone(local.state_dict()), saved)
        original(local, snapshot, alpha)
        seen.append((clone(local.state_dict()), alpha))

    monkeypatch.setattr(pse, "excite", spy)
    pse.train(result.arrays, state, data, RoundInfo(0, 2, 0))
    (excited, alpha), = seen
    expected = interpolate_channels(saved, result.arrays, alpha, pse.layers)
    assert same(excited, expected) and not same(excited, saved)
    assert all(torch.equal(excited[k], saved[k]) for k in saved if not k.startswith("features.conv"))


def test_feature_excitation_adds_the_global_conv_outputs() -> None:
    local = build_model("cnn", (1, 8, 8), 2, 0)
    glob = build_model("cnn", (1, 8, 8), 2, 1).eval().requires_grad_(False)
    convs = ["features.conv1.0", "features.conv2.0"]
    x = torch.randn(4, 1, 8, 8)
    zero = {"features.conv1.0": torch.zeros(32), "features.conv2.0": torch.zeros(64)}
    z_l, z_g = excited_features(local, glob, convs, zero, x)
    assert torch.allclose(z_l, local.features(x)) and torch.allclose(z_g, glob.features(x))
    only_first = {"features.conv1.0": torch.ones(32)}
    z_l, _ = excited_features(local, glob, ["features.conv1.0"], only_first, x)
    conv1 = local.get_submodule("features.conv1.0")
    with torch.no_grad():
        a = conv1(x) + glob.get_submodule("features.conv1.0")(x)
        h = local.features.conv2(torch.max_pool2d(torch.relu(a), 2))
        expected = local.features.fc1(local.features.flatten(h))
    assert torch.allclose(z_l, expected, atol=1e-5)
    pse, data, state = client(PSESettings(excite_on="features")), separable(), {}
    result = pse.train(pse.initial_arrays(), state, data, RoundInfo(0, 1, 0))
    snapshot = pse.load_snapshot(result.arrays)
    model = pse.personalized_model(pse.load_local(state, snapshot), snapshot, state)
    assert model.feature_alpha is not None and set(model.feature_alpha) == set(convs)


def test_upload_local_sends_the_trained_local_model() -> None:
    pse, data, state = client(PSESettings(upload="local"), momentum=0.9), separable(), {}
    received = pse.initial_arrays()
    result = pse.train(received, state, data, RoundInfo(0, 1, 0))
    assert set(result.arrays) == set(received)
    assert same(result.arrays, state[LOCAL_MODEL])
    assert result.metrics["loss"] == result.metrics["personal-loss"]
    assert "optimizer" not in state and "optimizer-personal" in state  # no global-copy pass


def test_kd_term_and_topk_mode_change_the_personal_training() -> None:
    data = separable()

    def personal(settings: PSESettings) -> Arrays:
        pse, state = client(settings), {}
        result = pse.train(pse.initial_arrays(), state, data, RoundInfo(0, 1, 0))
        pse.train(result.arrays, state, data, RoundInfo(0, 2, 0))
        return state[LOCAL_MODEL]

    base = personal(PSESettings())
    assert not same(base, personal(PSESettings(lambda_kd=1.0)))
    assert not same(base, personal(PSESettings(mode="topk")))
    assert not same(base, personal(PSESettings(grad_stat="activation")))


def test_pse_model_keeps_the_global_model_out_of_its_parameters() -> None:
    local, glob = build_model("cnn", (1, 8, 8), 2, 0), build_model("cnn", (1, 8, 8), 2, 1).eval()
    model = PSEModel(local, nn.Linear(512, 2), glob, CrossModelAttention(512, 4))
    names = [n for n, _ in model.named_parameters()]
    assert names and all(n.split(".")[0] in ("local", "head", "attention") for n in names)
    model.train()
    assert not glob.training


# ---- settings and configs ---------------------------------------------------------------------


def test_settings_checks() -> None:
    with pytest.raises(ConfigError, match="model.name"):
        client(model="mlp")
    client(PSESettings(excitation=False), model="mlp")  # attention only works without convs
    with pytest.raises(ConfigError, match="method.heads"):
        client(PSESettings(heads=3))
    cfg = pse_config()
    check_settings(cfg, PSESettings())
    with pytest.raises(ConfigError, match="method.low_level"):
        check_settings(cfg, PSESettings(low_level=["features.conv9"]))
    with pytest.raises(ConfigError, match="model.name"):
        check_settings(cfg, PSESettings(low_level=["features.fc1"]))
    cfg.model.per_client = ["cnn", "cnn_bn"]
    with pytest.raises(ConfigError, match="per_client"):
        check_settings(cfg, PSESettings())


def test_method_yaml_holds_every_default(monkeypatch: pytest.MonkeyPatch) -> None:
    section = OmegaConf.load(CONFIG_DIR / "method" / "pse.yaml")["method"]
    assert set(section) == {f.name for f in dataclasses.fields(PSESettings)}
    assert OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PSESettings), section)) \
        == PSESettings()
    monkeypatch.setitem(registry.METHODS, "pse", registry.MethodSpec(
        "pse", PSEClient, PSESettings, "test", check_settings))
    cfg = pse_config()
    cfg.method = dict(OmegaConf.to_container(section))  # type: ignore[arg-type]
    assert registry.method_settings(cfg) == PSESettings()
    experiment = load_yaml(CONFIG_DIR / "experiment" / "std-mnist-pse.yaml")
    assert experiment.method.name == "pse" and experiment.experiment.name == "std-mnist-pse"
    assert experiment.model.name == "cnn"
    assert Path(CONFIG_DIR / "experiment" / "std-mnist.yaml").is_file()
