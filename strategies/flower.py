"""Flower's own strategies, chosen by name: wrapped, never rewritten.

Each entry names the `flwr.serverapp.strategy` class, fedkd's defaults for its
options (only where the protocol differs from Flower's, e.g. FedProx mu 0.01,
since Flower's 0.0 makes FedProx plain FedAvg) and whether its server update
acts on the example-weighted mean of the replies. For those, a node serving a
group of clients may pre-average the group exactly; the robust rules (median,
trimmed mean, Krum, Bulyan) need every client's own update.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from flwr.serverapp.strategy import (Bulyan, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian,
                                     FedProx, FedTrimmedAvg, FedYogi, Krum, MultiKrum, Strategy)

from fedkd.config import ConfigError, suggest
from fedkd.strategies.passthrough import PassThrough

#: Constructor arguments fedkd sets itself (sampling is fedkd's, by partition id and seed).
MANAGED = {"fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
           "min_available_nodes", "weighted_by_key", "arrayrecord_key", "configrecord_key",
           "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn"}


@dataclass(frozen=True)
class StrategySpec:
    cls: type[Strategy]
    description: str
    mean_based: bool
    defaults: dict[str, Any] = field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        """The user-settable constructor options and their defaults (fedkd's, else Flower's)."""
        params = inspect.signature(self.cls.__init__).parameters.values()
        found = {p.name: p.default for p in params if p.name != "self" and p.name not in MANAGED}
        return {**found, **self.defaults}


STRATEGIES: dict[str, StrategySpec] = {
    "fedavg": StrategySpec(FedAvg, "example-weighted mean (McMahan et al., 2017)", True),
    "fedprox": StrategySpec(FedProx, "FedAvg + clients' proximal term mu (Li et al., 2020)", True,
                            {"proximal_mu": 0.01}),
    "fedavgm": StrategySpec(FedAvgM, "FedAvg with server momentum (Hsu et al., 2019)", True),
    "fedadam": StrategySpec(FedAdam, "server-side Adam on the mean update (Reddi et al., 2021)", True),
    "fedyogi": StrategySpec(FedYogi, "server-side Yogi on the mean update (Reddi et al., 2021)", True),
    "fedadagrad": StrategySpec(FedAdagrad, "server-side Adagrad on the mean update", True),
    "fedmedian": StrategySpec(FedMedian, "coordinate-wise median (Yin et al., 2018)", False),
    "fedtrimmedavg": StrategySpec(FedTrimmedAvg, "coordinate-wise trimmed mean, beta cut each side",
                                  False),
    "krum": StrategySpec(Krum, "Krum: the update closest to its neighbours (Blanchard et al., 2017)",
                         False),
    "multikrum": StrategySpec(MultiKrum, "Multi-Krum: mean of the best-scored updates", False),
    "passthrough": StrategySpec(PassThrough, "one client: its reply is the aggregate (centralized "
                                "methods)", False),
    "bulyan": StrategySpec(Bulyan, "Bulyan: Krum selection then trimmed mean (El Mhamdi et al., 2018)",
                           False),
}


def strategy_options(section: dict[str, Any]) -> tuple[StrategySpec, dict[str, Any]]:
    """Validate the `strategy` config section against the Flower class's own signature."""
    name = section.get("name", "fedavg")
    if name not in STRATEGIES:
        raise ConfigError("strategy.name", name, f"unknown strategy; {suggest(name, STRATEGIES)}")
    spec = STRATEGIES[name]
    allowed = spec.options()
    options = dict(allowed)
    for key, value in section.items():
        if key == "name":
            continue
        if key not in allowed:
            raise ConfigError(f"strategy.{key}", value,
                              f"not an option of {name}; {suggest(key, allowed) if allowed else 'it takes none'}")
        default = allowed[key]
        if isinstance(default, bool) != isinstance(value, bool) or (
                isinstance(default, (int, float)) and not isinstance(value, (int, float))):
            raise ConfigError(f"strategy.{key}", value, f"must be a number like {default!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"strategy.{key}", value, "must be >= 0")
        options[key] = value
    missing = [k for k, v in options.items() if v is inspect.Parameter.empty]
    if missing:
        raise ConfigError(f"strategy.{missing[0]}", None, f"required by {name}")
    return spec, options


#: fedkd samples clients itself, so the wrapped Flower strategy addresses every node
EVERY_NODE = {"fraction_train": 1.0, "fraction_evaluate": 1.0, "min_train_nodes": 1,
              "min_evaluate_nodes": 1, "min_available_nodes": 1}


def build_flower_strategy(section: dict[str, Any]) -> tuple[Strategy, StrategySpec]:
    """The Flower strategy object; fedkd does the sampling, so Flower addresses every node."""
    spec, options = strategy_options(section)
    try:
        strategy = spec.cls(**EVERY_NODE, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError("strategy", section, f"{spec.cls.__name__} rejected it: {exc}") from None
    return strategy, spec
