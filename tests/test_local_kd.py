"""Local-KD methods (FedNTD, FML, FedDistill, FedProto, FedKD): payloads, aggregation, update rules."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from fedkd.clients.base import RoundInfo, evaluate_model
from fedkd.clients.class_tables import (FedDistillClient, FedDistillSettings, FedProtoClient,
                                        FedProtoSettings)
from fedkd.clients.fedavg import FedAvgClient, FedAvgSettings
from fedkd.clients.fedntd import FedNTDClient, FedNTDSettings
from fedkd.clients.fml import LOCAL_MODEL, FMLClient, FMLSettings
from fedkd.clients.local import LocalClient, LocalSettings
from fedkd.config import ConfigError, load_config
from fedkd.runtime import ClientRuntime
from fedkd.state import ClientStateStore
from fedkd.strategies.class_means import ClassMeans, decode_class_table, encode_class_table
from fedkd.testing import aggregate_train, fake_reply
from tests.test_clients import config, tiny_data
from tests.test_personalized import array_records, in_process_run

CPU = torch.device("cpu")
KD_METHODS = ["fedntd", "fml", "feddistill", "fedproto", "fedkd_mentor"]
PRIVATE_KEYS = ("personal", LOCAL_MODEL, "mentor", "w_h")


def eval_curve(run_dir: Path) -> dict[int, float]:
    """Example-weighted evaluation accuracy per round."""
    hits: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["phase"] == "evaluate" and r["status"] == "ok":
            hits[r["round"]][0] += r["accuracy"] * r["num_examples"]
            hits[r["round"]][1] += r["num_examples"]
    return {rnd: c / n for rnd, (c, n) in sorted(hits.items())}


# each method at its defaults, and FedKD's SVD codec compressing updates (the official protocol)
KD_RUNS = [(m, ()) for m in KD_METHODS] + [("fedkd_mentor", ("method.compress=true",
                                                            "method.share=update"))]


@pytest.mark.parametrize(("method", "overrides"), KD_RUNS, ids=[" ".join((m, *o)) for m, o in KD_RUNS])
def test_kd_method_shares_only_its_payload_and_improves(tmp_path: Path, method: str,
                                                        overrides: tuple[str, ...]) -> None:
    grid, cfg = in_process_run(tmp_path, f"method.name={method}", *overrides, "model.name=mlp",
                               "data.num_clients=2", "train.fraction_clients=1.0", "train.rounds=3")
    runtime = ClientRuntime(cfg, tmp_path / "state")
    shared = set(runtime.algorithm.initial_arrays())
    states = [ClientStateStore(tmp_path / "state").load(pid) for pid in (0, 1)]
    private = [t for s in states for key in PRIVATE_KEYS if isinstance(s.get(key), dict)
               for t in s[key].items()]
    assert bool(private) == (method != "fedntd"), "a private model lives in the client state"
    payload = 0
    for message in [*grid.sent, *grid.replies]:
        for _, arrays in array_records(message):
            if runtime.algorithm.aggregation == "class-means":
                assert all(k.split(".")[0] in ("mean", "count") for k in arrays)
                assert sum(t.numel() for t in arrays.values()) <= 10 * (200 + 1)  # <= C x (D + 1)
            else:
                assert set(arrays) == shared
            for key, own in private:
                assert key not in arrays or not torch.equal(arrays[key], own)
            payload += len(arrays)
    assert payload > 0
    curve = eval_curve(tmp_path)
    assert curve[3] > curve[1], curve


def test_class_means_aggregate_per_class_over_the_clients_that_have_it() -> None:
    a = encode_class_table(torch.tensor([[1.0, 1.0], [0.0, 0.0], [3.0, 3.0]]), torch.tensor([2, 0, 1]))
    b = encode_class_table(torch.tensor([[5.0, 5.0], [7.0, 7.0], [0.0, 0.0]]), torch.tensor([6, 1, 0]))
    assert set(a) == {"mean.0", "count.0", "mean.2", "count.2"}  # class 1 absent, not zero
    replies = [fake_reply(a, 3, node_id=1), fake_reply(b, 7, node_id=2)]
    uniform, _ = aggregate_train(ClassMeans("uniform"), replies)
    count, _ = aggregate_train(ClassMeans("count"), replies)
    assert uniform is not None and count is not None
    assert torch.allclose(uniform["mean.0"], torch.tensor([3.0, 3.0]))  # (1 + 5) / 2
    assert torch.allclose(count["mean.0"], torch.tensor([4.0, 4.0]))  # (2*1 + 6*5) / 8
    assert torch.allclose(uniform["mean.1"], torch.tensor([7.0, 7.0]))  # only b has class 1
    assert torch.allclose(uniform["mean.2"], torch.tensor([3.0, 3.0]))
    table, present = decode_class_table(uniform, 4)  # type: ignore[misc]
    assert present.tolist() == [True, True, True, False] and table.shape == (4, 2)


def test_fedntd_with_beta_zero_is_fedavgs_update_and_averages_uniformly() -> None:
    cfg, data = config(), tiny_data()
    ntd = FedNTDClient(cfg, FedNTDSettings(beta=0.0), (1, 8, 8), 2, CPU)
    avg = FedAvgClient(cfg, FedAvgSettings(), (1, 8, 8), 2, CPU)
    a = ntd.train(ntd.initial_arrays(), {}, data, RoundInfo(0, 1, 0))
    b = avg.train(avg.initial_arrays(), {}, data, RoundInfo(0, 1, 0))
    assert all(torch.equal(a.arrays[k], b.arrays[k]) for k in b.arrays)
    assert a.weight == 1.0 and b.weight == b.num_examples
    # with 2 classes one not-true class is left and the term is 0; with 3 it acts
    off3 = FedNTDClient(cfg, FedNTDSettings(beta=0.0), (1, 8, 8), 3, CPU)
    on = FedNTDClient(cfg, FedNTDSettings(beta=1.0), (1, 8, 8), 3, CPU)
    a3 = off3.train(off3.initial_arrays(), {}, data, RoundInfo(0, 1, 0))
    c = on.train(on.initial_arrays(), {}, data, RoundInfo(0, 1, 0))
    assert any(not torch.equal(a3.arrays[k], c.arrays[k]) for k in a3.arrays)
    received = on.initial_arrays()  # the teacher is the received model, untouched by training
    assert all(torch.equal(on.teacher.state_dict()[k], received[k]) for k in received)
    assert not any(p.requires_grad for p in on.teacher.parameters())


def test_fml_with_alpha_and_beta_one_trains_meme_as_fedavg_and_evaluates_the_local_model() -> None:
    cfg, data = config(), tiny_data()
    fml = FMLClient(cfg, FMLSettings(alpha=1.0, beta=1.0, max_grad_norm=1e9), (1, 8, 8), 2, CPU)
    avg = FedAvgClient(cfg, FedAvgSettings(), (1, 8, 8), 2, CPU)
    state: dict = {}
    meme = fml.train(fml.initial_arrays(), state, data, RoundInfo(0, 1, 0))
    b = avg.train(avg.initial_arrays(), {}, data, RoundInfo(0, 1, 0))
    assert all(torch.allclose(meme.arrays[k], b.arrays[k], atol=1e-6) for k in b.arrays)
    result = fml.evaluate(meme.arrays, state, data, RoundInfo(0, 1, 0))
    assert result.accuracy == evaluate_model(fml.local.load(state, "mlp"), data.x_test, data.y_test).accuracy
    assert "meme-accuracy" in result.metrics


def test_fml_mutual_terms_move_both_models_away_from_plain_ce() -> None:
    cfg, data = config(), tiny_data()
    plain = FMLClient(cfg, FMLSettings(alpha=1.0, beta=1.0), (1, 8, 8), 2, CPU)
    mutual = FMLClient(cfg, FMLSettings(alpha=0.5, beta=0.5), (1, 8, 8), 2, CPU)
    s1: dict = {}
    s2: dict = {}
    a = plain.train(plain.initial_arrays(), s1, data, RoundInfo(0, 1, 0))
    b = mutual.train(mutual.initial_arrays(), s2, data, RoundInfo(0, 1, 0))
    assert any(not torch.equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
    assert any(not torch.equal(s1[LOCAL_MODEL][k], s2[LOCAL_MODEL][k]) for k in s1[LOCAL_MODEL])


def test_feddistill_without_global_logits_is_local_training_and_uploads_class_means() -> None:
    cfg, data = config(), tiny_data()
    fd = FedDistillClient(cfg, FedDistillSettings(), (1, 8, 8), 2, CPU)
    local = LocalClient(cfg, LocalSettings(), (1, 8, 8), 2, CPU)
    s1: dict = {}
    s2: dict = {}
    out = fd.train({}, s1, data, RoundInfo(0, 1, 0))
    local.train({}, s2, data, RoundInfo(0, 1, 0))
    assert all(torch.equal(s1["personal"][k], s2["personal"][k]) for k in s2["personal"])
    counts = torch.bincount(data.y_train, minlength=2)
    present = [c for c in range(2) if counts[c] > 0]
    assert sorted(out.arrays) == sorted([f"mean.{c}" for c in present] + [f"count.{c}" for c in present])
    assert all(out.arrays[f"count.{c}"].item() == counts[c] for c in present)
    assert out.arrays[f"mean.{present[0]}"].shape == (2,)  # a C-vector of logits per class
    # with global logits, the distillation term changes the update
    table = encode_class_table(torch.tensor([[4.0, -4.0], [-4.0, 4.0]]), torch.tensor([5, 5]))
    s3: dict = {}
    fd.train({k: v for k, v in table.items()}, s3, data, RoundInfo(0, 1, 0))
    assert any(not torch.equal(s1["personal"][k], s3["personal"][k]) for k in s1["personal"])


def test_fedproto_predicts_the_nearest_global_prototype_and_never_an_absent_class() -> None:
    cfg, data = config(), tiny_data()
    proto = FedProtoClient(cfg, FedProtoSettings(), (1, 8, 8), 2, CPU)
    state: dict = {}
    out = proto.train({}, state, data, RoundInfo(0, 1, 0))
    assert all(out.arrays[k].shape == (200,) for k in out.arrays if k.startswith("mean."))
    only_class_1 = {k: v for k, v in out.arrays.items() if k.endswith(".1")}
    result = proto.evaluate(only_class_1, state, data, RoundInfo(0, 2, 0))
    assert result.accuracy == pytest.approx(float((data.y_test == 1).float().mean()))
    assert "head-accuracy" in result.metrics
    model = proto.own_model(state, RoundInfo(0, 2, 0)).eval()
    with torch.no_grad():
        feats = model.features(data.x_test[:2])
        protos = torch.stack([feats[1], feats[0], feats[0] + 100])
        predicted = proto.predict(model, data.x_test[:2], protos, torch.tensor([True, True, False]))
    assert predicted.tolist() == [1, 0]  # each sample's own feature is its class's prototype


def test_class_table_methods_reject_another_strategy() -> None:
    with pytest.raises(ConfigError, match="strategy.name.*fedmedian.*own rule"):
        load_config(None, ["method.name=fedproto", "strategy.name=fedmedian"])


def test_uniform_aggregation_reaches_the_strategy_as_equal_weights(tmp_path: Path) -> None:
    grid, _ = in_process_run(tmp_path, "method.name=fedntd", "model.name=mlp", "train.rounds=1")
    train_replies = [r for r in grid.replies if "metrics" in r.content]
    assert train_replies
    for reply in train_replies:  # a node's weight = its number of clients: 1 per client
        ok = [p for p in reply.content["status"]["ok"] if int(p) >= 0]
        assert float(reply.content["metrics"]["num-examples"]) == len(ok)
