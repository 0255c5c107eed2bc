"""The server side of one run: the strategy stack, the initial arrays and central evaluation."""

from __future__ import annotations

from typing import Callable

import torch
from flwr.app import ArrayRecord, MetricRecord

from fedkd import registry
from fedkd.clients.base import Arrays, ClientAlgorithm, evaluate_model
from fedkd.config import FedkdConfig, to_yaml
from fedkd.data import FederatedData, load_federated
from fedkd.population import train_sizes
from fedkd.recorder import Recorder
from fedkd.strategies.class_means import ClassMeans
from fedkd.strategies.flower import EVERY_NODE, build_flower_strategy
from fedkd.strategies.grouped import ClientPlan, GroupedClients
from fedkd.wire import arrays_to_tensors

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


def server_algorithm(cfg: FedkdConfig, data: FederatedData) -> ClientAlgorithm:
    """The method's algorithm on the server's CPU: initial arrays and the global model."""
    spec = registry.METHODS[cfg.method["name"]]
    return spec.client(cfg, registry.method_settings(cfg), data.input_shape, data.num_classes,
                       torch.device("cpu"))


def client_plan(cfg: FedkdConfig, data: FederatedData) -> ClientPlan:
    return ClientPlan(num_clients=len(data.clients), seed=cfg.experiment.seed,
                      rounds=cfg.train.rounds, train_fraction=cfg.train.fraction_clients,
                      eval_fraction=cfg.evaluation.fraction_clients,
                      eval_every=cfg.evaluation.every,
                      work=tuple(train_sizes(data.clients)))  # no client built (fedkd.population)


def central_evaluator(cfg: FedkdConfig, data: FederatedData, algorithm: ClientAlgorithm,
                      plan: ClientPlan, recorder: Recorder) -> EvaluateFn | None:
    """The global model on the dataset's global test set, on evaluation rounds (None if n/a)."""
    if data.global_test is None or not cfg.evaluation.central or algorithm.global_model({}) is None:
        return None
    x, y = (torch.as_tensor(a) for a in data.global_test)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 or not plan.evaluates(server_round):
            return None
        model = algorithm.global_model(arrays_to_tensors(arrays))
        result = evaluate_model(model, x, y.long())
        recorder.central(server_round, result.loss, result.accuracy, result.num_examples)
        return MetricRecord({"central-loss": result.loss, "central-accuracy": result.accuracy})

    return evaluate_fn


def build_strategy(cfg: FedkdConfig, recorder: Recorder
                   ) -> tuple[GroupedClients, Arrays, EvaluateFn | None]:
    data = load_federated(cfg.data, cfg.experiment.seed)
    algorithm = server_algorithm(cfg, data)
    if algorithm.aggregation == "class-means":  # per-class tables: one reply per client
        inner, mean_based = ClassMeans(weighting=algorithm.settings.weighting,
                                       exclude_self=getattr(algorithm.settings, "exclude_self", False),
                                       **EVERY_NODE), False
    else:
        inner, spec = build_flower_strategy(cfg.strategy)
        mean_based = spec.mean_based
    plan = client_plan(cfg, data)
    initial = algorithm.initial_arrays()
    shares = bool(initial) or algorithm.aggregation != "strategy"
    strategy = GroupedClients(inner, plan, recorder, mean_based=mean_based,
                              shares_arrays=shares, client_config=to_yaml(cfg))
    return strategy, initial, central_evaluator(cfg, data, algorithm, plan, recorder)
