"""Flower's own strategies, chosen by name: wrapped, never rewritten.

Each entry names the `flwr.serverapp.strategy` class, fedkd's defaults for its
options (only where the protocol differs from Flower's, e.g. FedProx mu 0.01,
since Flower's 0.0 makes FedProx plain FedAvg) and whether its server update
acts on the example-weighted mean of the replies. For those, a node serving a
group of clients may pre-average the group exactly; the robust rules (median,
trimmed mean, Krum, Bulyan) need every client's own update.

A user's own strategy is named by import path, `strategy.name=package.module:Class`:
a subclass of `flwr.serverapp.strategy.Strategy` (usually of one of Flower's
strategies) that declares whether its server update acts on the mean of the
replies (`mean_based = True`: it gets one pre-averaged reply) or needs each
client's own update (`mean_based = False`), or the run says so with
`strategy.mean_based=true|false`. Its other constructor options are checked
like the built-ins'; fedkd's sampling arguments are passed where it accepts them.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
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

    name: str = ""  # as configured (a built-in's name, or package.module:Class)

    def parameters(self) -> list[inspect.Parameter]:
        return list(inspect.signature(self.cls.__init__).parameters.values())[1:]  # not self

    def options(self) -> dict[str, Any]:
        """The user-settable constructor options and their defaults (fedkd's, else Flower's)."""
        found = {p.name: p.default for p in self.parameters()
                 if p.name not in MANAGED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        return {**found, **self.defaults}

    def sampling(self) -> dict[str, Any]:
        """fedkd's sampling arguments (EVERY_NODE) that the constructor accepts."""
        params = self.parameters()
        if any(p.kind == p.VAR_KEYWORD for p in params):  # **kwargs, handed to a Flower parent
            return dict(EVERY_NODE)
        names = {p.name for p in params}
        return {k: v for k, v in EVERY_NODE.items() if k in names}


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


#: the class attribute (or `strategy.mean_based` option) a user strategy declares
MEAN_BASED = "mean_based"


def _import_class(path: str) -> Any:
    """`package.module:Class` -> the class; the current directory is importable, as with
    `python -m` (the `fedkd` script's own directory is not where a user's module is)."""
    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname:
        raise ConfigError("strategy.name", path, "an import path is written package.module:Class")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if os.getcwd() in sys.path or exc.name != module_name.split(".")[0]:
                raise
            sys.path.append(os.getcwd())
            module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 -- any import failure of user code: one line
        raise ConfigError("strategy.name", path, f"cannot import {module_name}: "
                                                 f"{type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in qualname.split("."):
        if not hasattr(obj, part):
            names = [n for n in vars(module) if isinstance(vars(module)[n], type)]
            raise ConfigError("strategy.name", path, f"{module_name} has no {qualname}; "
                                                     f"{suggest(part, names)}")
        obj = getattr(obj, part)
    return obj


def user_strategy(path: str, section: dict[str, Any]) -> StrategySpec:
    """The spec of a user's strategy class named by import path (see the module docstring)."""
    cls = _import_class(path)
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise ConfigError("strategy.name", path, "not a Flower strategy: a class derived from "
                                                 "flwr.serverapp.strategy.Strategy (e.g. of FedAvg)")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise ConfigError("strategy.name", path, f"abstract: it does not implement {missing}")
    declared = section.get(MEAN_BASED, getattr(cls, MEAN_BASED, None))
    if not isinstance(declared, bool):
        raise ConfigError(f"strategy.{MEAN_BASED}", declared,
                          f"{path} must say whether its server update acts on the example-weighted "
                          f"mean of the replies (true: it gets one pre-averaged reply) or needs "
                          f"every client's own update (false): set `{MEAN_BASED} = True/False` on "
                          f"the class, or strategy.{MEAN_BASED}=true/false")
    doc = (inspect.getdoc(cls) or "").strip().splitlines()
    return StrategySpec(cls, doc[0] if doc else path, declared, name=path)


def strategy_spec(section: dict[str, Any]) -> StrategySpec:
    """The built-in strategy of that name, or a user's class named `package.module:Class`."""
    name = str(section.get("name", "fedavg"))
    if name in STRATEGIES:
        return STRATEGIES[name]
    if ":" in name:
        return user_strategy(name, section)
    raise ConfigError("strategy.name", name, f"unknown strategy; {suggest(name, STRATEGIES)}, "
                                             f"or your own class as package.module:Class")


def strategy_options(section: dict[str, Any]) -> tuple[StrategySpec, dict[str, Any]]:
    """Validate the `strategy` config section against the Flower class's own signature."""
    name = str(section.get("name", "fedavg"))
    spec = strategy_spec(section)
    builtin = name in STRATEGIES
    allowed = spec.options()
    options = dict(allowed)
    for key, value in section.items():
        if key == "name" or (key == MEAN_BASED and not builtin):
            continue
        if key not in allowed:
            raise ConfigError(f"strategy.{key}", value,
                              f"not an option of {name}; {suggest(key, allowed) if allowed else 'it takes none'}")
        default = allowed[key]
        if isinstance(default, bool) != isinstance(value, bool) or (
                isinstance(default, (int, float)) and not isinstance(value, (int, float))):
            raise ConfigError(f"strategy.{key}", value, f"must be a number like {default!r}")
        if builtin and isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
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
        strategy = spec.cls(**spec.sampling(), **options)
    except Exception as exc:  # noqa: BLE001 -- a user's constructor may raise anything: one line
        raise ConfigError("strategy", section, f"{spec.cls.__name__} rejected it: {exc}") from None
    return strategy, spec
