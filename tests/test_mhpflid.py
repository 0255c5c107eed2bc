"""MH-pFLID client on tiny tensors (no Flower, no Ray): the spec's test plan (mhpflid.md section h)
at unit level. Server aggregation is the platform's FedAvg (tested in test_strategies.py); here a
plain example-weighted mean stands in for it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from fedkd.clients.base import Arrays, ClientData, RoundInfo, TrainResult, copy_state
from fedkd.clients.mhpflid import (LOCAL_MODEL, MESSENGER, RECEIVER, TRANSMITTER, BridgedMessenger,
                                   MHPFLIDClient, MHPFLIDSettings, check_settings,
                                   distillation_loss)
from fedkd.config import ConfigError, FedkdConfig
from fedkd.kd import kd_loss
from tests.test_clients import config, tiny_data

CPU = torch.device("cpu")



def client(per_client: list[str], messenger: str = "mlp", **settings: Any) -> MHPFLIDClient:
    cfg: FedkdConfig = config()
    cfg.model.name = messenger
    cfg.model.per_client = per_client
    return MHPFLIDClient(cfg, MHPFLIDSettings(**settings), (1, 8, 8), 2, CPU)


def same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def weighted_mean(results: list[TrainResult]) -> Arrays:
    """The server's FedAvg over the returned messengers (example-weighted)."""
    total = sum(r.num_examples for r in results)
    return {k: sum(r.arrays[k].float() * r.num_examples for r in results) / total
            for k in results[0].arrays}


def test_frozen_model_is_bit_identical_after_the_stage_that_freezes_it() -> None:
    """Messenger (cnn_bn: BN running stats too) and T untouched by injection; local model
    (resnet8: BN running stats too) and R untouched by distillation."""
    c, state, data, info = client(["resnet8"], messenger="cnn_bn"), {}, tiny_data(), RoundInfo(0, 1, 0)
    received = c.initial_arrays()
    nets = c.modules(received, state, info)
    before = {name: copy_state(nets[name]) for name in (LOCAL_MODEL, RECEIVER, TRANSMITTER)}

    c.injection(nets, state, data, info)
    injected = {name: copy_state(nets[name]) for name in nets}
    assert same(injected[MESSENGER], received)
    assert same(injected[TRANSMITTER], before[TRANSMITTER])
    assert not same(injected[LOCAL_MODEL], before[LOCAL_MODEL])
    assert not same(injected[RECEIVER], before[RECEIVER])
    assert any("running_mean" in k and not torch.equal(v, before[LOCAL_MODEL][k])
               for k, v in injected[LOCAL_MODEL].items())  # the local BN did learn statistics

    c.distillation(nets, state, data, info)
    distilled = {name: copy_state(nets[name]) for name in nets}
    assert same(distilled[LOCAL_MODEL], injected[LOCAL_MODEL])
    assert same(distilled[RECEIVER], injected[RECEIVER])
    assert not same(distilled[MESSENGER], received)
    assert not same(distilled[TRANSMITTER], injected[TRANSMITTER])


def test_only_the_messenger_goes_back_and_no_private_tensor_is_in_it() -> None:
    c, state = client(["cnn"]), {}
    received = c.initial_arrays()
    result = c.train(received, state, tiny_data(), RoundInfo(0, 1, 0))
    assert set(result.arrays) == set(received) == set(c.build_model("mlp").state_dict())
    assert all(result.arrays[k].shape == received[k].shape for k in received)
    assert not same(result.arrays, received)  # the messenger learned in distillation
    private = [t for key in (LOCAL_MODEL, RECEIVER, TRANSMITTER) for t in state[key].values()]
    assert len(private) > len(result.arrays)
    for array in result.arrays.values():
        for tensor in private:
            assert array.data_ptr() != tensor.data_ptr()
            assert array.shape != tensor.shape or not torch.equal(array, tensor)
    assert result.num_examples == 48 and result.weight == 48  # example-weighted mean (spec A8)
    assert {"loss", "accuracy", "messenger-loss", "messenger-accuracy"} <= set(result.metrics)
    assert c.global_model(received) is None


def test_heterogeneous_local_models_train_side_by_side_in_one_client_object() -> None:
    c = client(["cnn", "mlp"])
    states: list[dict[str, Any]] = [{}, {}]
    received = c.initial_arrays()
    for server_round in (1, 2):
        results = [c.train(received, states[pid], tiny_data(pid), RoundInfo(pid, server_round, 0))
                   for pid in (0, 1)]
        for r in results:
            assert {k: v.shape for k, v in r.arrays.items()} == {k: v.shape for k, v in received.items()}
        received = weighted_mean(results)
    for pid, arch, width in ((0, "cnn", 512), (1, "mlp", 200)):
        assert set(states[pid][LOCAL_MODEL]) == set(c.build_model(arch).state_dict())
        assert states[pid][RECEIVER]["w_d.weight"].shape == (200, width)  # local -> messenger width
        assert states[pid][TRANSMITTER]["w_d.weight"].shape == (200, width)
        ev = c.evaluate(received, states[pid], tiny_data(pid), RoundInfo(pid, 2, 0))
        assert 0.0 <= ev.accuracy <= 1.0 and ev.num_examples == 16
        assert 0.0 <= ev.metrics["messenger-accuracy"] <= 1.0


def test_distillation_kl_term_is_a_true_kl_toward_the_detached_local_logits() -> None:
    z, y = torch.tensor([[2.0, -1.0], [1e4, -1e4]]), torch.tensor([0, 1])
    assert float(distillation_loss(z, z.clone(), y, 0.0, 1.0, 1.0)) == 0.0
    student = torch.tensor([[0.0, 0.0], [-1e4, 1e4]], requires_grad=True)
    loss = distillation_loss(student, z.requires_grad_(), y, 0.0, 1.0, 1.0)
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    assert z.grad is None and student.grad is not None  # the local model is never a student


def test_distillation_stage_lowers_the_kl_to_the_local_model() -> None:
    c, state, data, info = client(["cnn"], injection_epochs=3, distillation_epochs=5,
                                  lambda_messenger_dis=0.0, lambda_con_dis=1.0), {}, tiny_data(), \
        RoundInfo(0, 1, 0)
    nets = c.modules(c.initial_arrays(), state, info)
    c.injection(nets, state, data, info)  # a local model with opinions to distill

    @torch.no_grad()
    def kl() -> float:
        nets.eval()
        teacher = nets[LOCAL_MODEL](data.x_train)
        student = BridgedMessenger(nets[MESSENGER], nets[LOCAL_MODEL], nets[TRANSMITTER])(data.x_train)
        return float(kd_loss(student, teacher))

    start = kl()
    c.distillation(nets, state, data, info)
    assert kl() < 0.5 * start


def blobs(seed: int, n: int = 64, shift: float = 0.5) -> ClientData:
    """Two Gaussian blobs rendered as 1x8x8 images (class 1: every pixel shifted by +shift,
    class 0 by -shift): separable, as the spec's toy problem (section h.6)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) + shift * (2 * y - 1).float().view(-1, 1, 1, 1)
    cut = n * 3 // 4
    return ClientData(x[:cut], y[:cut], x[cut:], y[cut:])


def test_three_rounds_improve_the_local_models_accuracy() -> None:
    c = client(["cnn", "mlp"])
    datasets = [blobs(pid) for pid in (0, 1)]
    states: list[dict[str, Any]] = [{}, {}]
    received = c.initial_arrays()

    def accuracy(server_round: int) -> float:
        evals = [c.evaluate(received, states[p], datasets[p], RoundInfo(p, server_round, 0))
                 for p in (0, 1)]
        return sum(e.accuracy * e.num_examples for e in evals) / sum(e.num_examples for e in evals)

    start = accuracy(0)
    for server_round in (1, 2, 3):
        received = weighted_mean([c.train(received, states[p], datasets[p],
                                          RoundInfo(p, server_round, 0)) for p in (0, 1)])
    end = accuracy(3)
    assert end > start and end >= 0.9


def test_messenger_prediction_does_not_depend_on_the_rest_of_the_batch() -> None:
    c, state = client(["cnn"]), {}
    nets = c.modules(c.initial_arrays(), state, RoundInfo(0, 1, 0))
    x = tiny_data().x_test
    for bridge in (RECEIVER, TRANSMITTER):
        model = BridgedMessenger(nets[MESSENGER], nets[LOCAL_MODEL], nets[bridge]).eval()
        with torch.no_grad():
            assert torch.allclose(model(x[:1]), model(x)[:1], atol=1e-6)


def test_two_runs_with_one_seed_are_identical() -> None:
    runs = []
    for _ in range(2):
        c, state = client(["cnn"]), {}
        result = c.train(c.initial_arrays(), state, tiny_data(), RoundInfo(0, 1, 0))
        runs.append((result.arrays, state))
    assert same(runs[0][0], runs[1][0])
    assert all(same(runs[0][1][k], runs[1][1][k]) for k in (LOCAL_MODEL, RECEIVER, TRANSMITTER))


def test_settings_checks() -> None:
    cfg = config()
    with pytest.raises(ConfigError, match="messenger_model"):
        check_settings(cfg, MHPFLIDSettings(messenger_model="nope"))
    with pytest.raises(ConfigError, match="num_tokens"):
        check_settings(cfg, MHPFLIDSettings(num_tokens=7))  # mlp: 200-dim features
    check_settings(cfg, MHPFLIDSettings(messenger_model="resnet8"))  # 64 = 8 tokens x 8
