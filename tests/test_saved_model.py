"""The trained model is kept (issue 19, item 2): for every registered method, the model a run saves
and `fedkd.load_model` rebuilds reproduces the accuracy (or score) its client recorded last; loading
reads safetensors only, so a planted pickle under `model/` is never run.

Each case is a whole in-process run (`fedkd.testing.InProcessGrid`: the real strategy loop and
ClientApp, no Ray) at the smallest sizes that still reach the method's final model.
"""

from __future__ import annotations

import itertools
import json
import pickle
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from torch import nn

import fedkd
from fedkd import registry
from fedkd.apps import run_server
from fedkd.clients import base
from fedkd.clients.base import ClientData, evaluate_model
from fedkd.config import FedkdConfig, load_config, to_yaml
from fedkd.recorder import Recorder
from fedkd.runtime import ClientRuntime, runtime_for
from fedkd.saved_model import GLOBAL_FILE, MODEL_DIR, save_model
from fedkd.simulation import prepare_run_dir, write_run_info
from fedkd.testing import InProcessGrid

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "configs" / "experiment"
#: 4 clients, 2 of them trained: every client's model is kept, trained (a file) or not (rebuilt)
FEDERATED = ["data.num_clients=4", "train.fraction_clients=0.5", "train.rounds=1",
             "evaluation.every=1"]
#: method -> (experiment file, overrides): the smallest run that ends with the method's final model
CASES: dict[str, tuple[str, list[str]]] = {
    **{m: ("quickstart.yaml", [f"method.name={m}", *FEDERATED])
       for m in ("fedavg", "fedprox", "fedntd", "fedper", "fedrep", "lgfedavg", "ditto", "fml",
                 "fedkd_mentor", "feddistill", "fedproto", "local")},
    "pse": ("quickstart.yaml", ["method.name=pse", "method.grad_batches=2", *FEDERATED]),
    "fedbn": ("quickstart.yaml", ["method.name=fedbn", "model.name=cnn_bn", *FEDERATED]),
    # per-client architectures: the index records each client's
    "mhpflid": ("quickstart.yaml", ["method.name=mhpflid", "model.per_client=[cnn,mlp,cnn,mlp]",
                                    "method.messenger_model=cnn_narrow", *FEDERATED]),
    # centralized: one epoch per stage, evaluated once, at the end (the final stage's model)
    "kd": ("kd-mnist5k.yaml", ["method.teacher_epochs=1", "method.student_epochs=1",
                               "train.rounds=2", "evaluation.every=2"]),
    "xtime": ("xtime-etth1.yaml", ["method.expert_epochs=1", "method.router_epochs=1",
                                   "train.rounds=5", "evaluation.every=5"]),
    "stkd": ("stkd-cardio.yaml", ["method.epochs=2", "train.rounds=2", "evaluation.every=2"]),
    "mixclap": ("mixclap-fsdd.yaml", ["method.teacher_epochs=1", "method.clean_epochs=1",
                                      "method.noisy_epochs=1", "train.rounds=3",
                                      "evaluation.every=3",
                                      "method.conditions=[clean,white:0]", "method.timing_clips=4",
                                      "method.teacher_channels=[8,8,8,8]"]),
    "betakd": ("betakd-avmnist.yaml", ["method.teacher_epochs=1", "method.student_epochs=1",
                                       "train.rounds=2", "evaluation.every=2",
                                       "method.variants=[ce_only,task]",
                                       "device.threads_per_client=2"]),
}
#: extra cases: feature-level excitation (buffers) read against the round-start global model
EXTRA = {"pse-features": ("quickstart.yaml", ["method.name=pse", "method.excite_on=features",
                                              "method.grad_batches=2",
                                              "method.eval_global=round_start", *FEDERATED]),
         # (v2) the gate: alpha as buffers sized by the BatchNorms it scales
         "pse-gate": ("quickstart.yaml", ["method.name=pse", "method.excite_on=gate",
                                          "method.alpha_max=0.2", "model.name=cnn_bn",
                                          "method.grad_batches=2", *FEDERATED])}
#: metrics in which clients of methods with a global model report that model's accuracy
GLOBAL_METRIC = {"ditto": "global_accuracy", "pse": "global_accuracy", "fml": "meme_accuracy",
                 "fedkd_mentor": "mentee_accuracy"}


@pytest.fixture(autouse=True)
def few_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every training pass stops after 2 mini-batches: the runs stay seconds long, and what is
    saved is whatever was trained (how long it trained does not matter here)."""
    real = base.batches

    def first_two(*args: Any, **kwargs: Any) -> Iterator[torch.Tensor]:
        return itertools.islice(real(*args, **kwargs), 2)

    monkeypatch.setattr(base, "batches", first_two)


def in_process_run(run_dir: Path, experiment: str, overrides: list[str]) -> FedkdConfig:
    """A whole run without Ray, then the model saved as the simulation saves it."""
    cfg = load_config(EXPERIMENT / experiment, overrides)
    prepare_run_dir(cfg, run_dir)
    write_run_info(run_dir, cfg, "running", None)
    recorder = Recorder(run_dir)
    try:
        result = run_server(InProcessGrid(min(2, cfg.data.num_clients)), cfg, run_dir, recorder)
    finally:
        recorder.close()
    save_model(run_dir, cfg, result.arrays)
    return cfg


def last_records(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Each client's record of its last successful evaluation."""
    last: dict[int, dict[str, Any]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["phase"] == "evaluate" and r["status"] == "ok":
            if r["partition_id"] not in last or r["round"] >= last[r["partition_id"]]["round"]:
                last[r["partition_id"]] = r
    return last


# --- how each method scores the model it serves (as its `evaluate` does) -----------------------

Scorer = Callable[[nn.Module, ClientData, ClientRuntime], float]


def accuracy(model: nn.Module, data: ClientData, runtime: ClientRuntime) -> float:
    return evaluate_model(model, data.x_test, data.y_test).accuracy


@torch.no_grad()
def betakd_clean_accuracy(model: nn.Module, data: ClientData, runtime: ClientRuntime) -> float:
    from fedkd.taskdata.avmnist import split_test

    x, y = split_test(data.x_test, data.y_test)["clean"]
    return float((model(x).argmax(-1) == y).float().mean())


def stkd_auroc(model: nn.Module, data: ClientData, runtime: ClientRuntime) -> float:
    from fedkd.clients.stkd import auroc, score_all

    scores = score_all(model, data.x_test).numpy()  # type: ignore[arg-type]
    return auroc(scores, data.y_test.numpy())


def xtime_neg_mse_level2(model: nn.Module, data: ClientData, runtime: ClientRuntime) -> float:
    from fedkd.clients.xtime import forecast, forecast_metrics
    from fedkd.taskdata.ett import (LAST_RAW, SPLIT, SPLIT_TEST, TARGET_RAW, VOL, rarity_scores,
                                    rarity_thresholds)

    s = runtime.algorithm.settings
    train = data.y_train.numpy().astype(np.float64)
    tau = rarity_thresholds(rarity_scores(train[:, TARGET_RAW], train[:, LAST_RAW], train[:, VOL],
                                          s.rarity_on), s.rarity_quantiles)
    y = data.y_test.numpy()
    test = y[:, SPLIT] == SPLIT_TEST
    pred = forecast(model, data.x_test)
    metrics = forecast_metrics(pred[test], y[test], tau, s.rarity_on, s.min_level_samples)
    return -metrics["mse-level2"]


@torch.no_grad()
def mixclap_fused_accuracy(model: nn.Module, data: ClientData, runtime: ClientRuntime) -> float:
    conditions = runtime.algorithm.condition_features(data)  # type: ignore[attr-defined]
    accs = [float((model(x).argmax(-1) == data.y_test).float().mean()) for x in conditions.values()]
    return float(np.mean(accs))


SCORERS: dict[str, Scorer] = {"betakd": betakd_clean_accuracy, "stkd": stkd_auroc,
                              "xtime": xtime_neg_mse_level2, "mixclap": mixclap_fused_accuracy}


def test_every_registered_method_has_a_case() -> None:
    assert set(CASES) == set(registry.METHODS)


#: cases whose teachers run over a whole audio(-visual) set (~30-60 s each on 2 cores): `-m slow`
SLOW = {"betakd", "mixclap"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c
                                  for c in [*sorted(CASES), *EXTRA]])
def test_saved_model_reproduces_each_clients_last_recorded_score(tmp_path: Path, case: str) -> None:
    experiment, overrides = {**CASES, **EXTRA}[case]
    cfg = in_process_run(tmp_path, experiment, overrides)
    method = cfg.method["name"]
    index = json.loads((tmp_path / MODEL_DIR / "index.json").read_text())
    assert index["method"] == method
    assert set(index["clients"]) == {str(p) for p in range(cfg.data.num_clients)}
    # nothing but safetensors files and the JSON index
    assert all(p.suffix == ".safetensors" or p.name == "index.json"
               for p in (tmp_path / MODEL_DIR).iterdir())
    # a client has a file of its own exactly when it holds state; the others are rebuilt from
    # server.safetensors (a population of 100,000 does not write 100,000 files)
    own = {p: e["file"] for p, e in index["clients"].items() if e["file"] != GLOBAL_FILE}
    assert ({p for p, f in own.items() if f is not None}
            == {p for p in own if (tmp_path / "state" / f"{p}.pt").exists()})
    records = last_records(tmp_path)
    assert sorted(records) == list(range(cfg.data.num_clients))
    runtime = runtime_for(to_yaml(cfg), str(tmp_path / "state"))  # the run's own (cached)
    scorer = SCORERS.get(method, accuracy)
    for pid, record in records.items():
        assert record["round"] == cfg.train.rounds
        model = fedkd.load_model(tmp_path, client=pid)
        assert isinstance(model, nn.Module) and not model.training
        data = runtime.client_data(pid)
        assert scorer(model, data, runtime) == pytest.approx(record["accuracy"], rel=1e-6, abs=1e-9)
        if cfg.model.per_client:
            assert index["clients"][str(pid)]["model_name"] == cfg.model.per_client[pid]
        if method in GLOBAL_METRIC:
            shared = evaluate_model(fedkd.load_model(tmp_path), data.x_test, data.y_test)
            assert shared.accuracy == pytest.approx(record[GLOBAL_METRIC[method]], abs=1e-9)
    if index["global"] is None:
        with pytest.raises(ValueError, match="no global model.*client="):
            fedkd.load_model(tmp_path)
    else:
        assert not fedkd.load_model(tmp_path).training
    if registry.METHODS[method].client.evaluates == "global":
        assert {c["file"] for c in index["clients"].values()} == {GLOBAL_FILE}


class _Planted:
    """Unpickling this creates `marker`: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (open, (str(self.marker), "w"))


def test_a_planted_pickle_under_model_is_never_loaded(tmp_path: Path) -> None:
    run = tmp_path / "run"
    in_process_run(run, "quickstart.yaml", ["method.name=local", "model.name=mlp", *FEDERATED])
    clients = json.loads((run / MODEL_DIR / "index.json").read_text())["clients"]
    last = str(len(clients) - 1)
    trained = next(int(p) for p, e in clients.items() if e["file"])
    untrained = next(int(p) for p, e in clients.items() if e["file"] is None)
    folder, marker = run / MODEL_DIR, tmp_path / "unpickled"
    payload = pickle.dumps(_Planted(marker))
    assert fedkd.load_model(run, client=1) is not None
    # a pickle (and a torch file, a zip of pickles) in place of a client's safetensors file, or
    # of the server's arrays an untrained client is rebuilt from
    for pid, file in ((trained, f"client-{trained}.safetensors"), (untrained, "server.safetensors")):
        (folder / file).write_bytes(payload)
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            fedkd.load_model(run, client=pid)
        torch.save({"w": _Planted(marker)}, folder / file)
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            fedkd.load_model(run, client=pid)
    # an index naming a pickle (or a file outside model/) is refused before anything is opened
    (folder / "client-1.pt").write_bytes(payload)
    index = json.loads((folder / "index.json").read_text())
    for planted in ("client-1.pt", "../state/1.pt"):
        index["clients"]["1"]["file"] = planted
        (folder / "index.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match="expected 'client-1.safetensors'"):
            fedkd.load_model(run, client=1)
    assert not marker.exists()
    with pytest.raises(ValueError, match=f"clients 0..{last}"):
        fedkd.load_model(run, client=int(last) + 1)
    with pytest.raises(FileNotFoundError, match="no saved model"):
        fedkd.load_model(tmp_path)
