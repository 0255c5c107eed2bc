"""Names -> things: methods (client algorithm + settings + YAML defaults), and the checks of a config.

Adding a method is one client module, one YAML in `configs/method/`, one entry here.
Strategies, models and datasets have their own tables (`fedkd.strategies.flower`,
`fedkd.models`, `fedkd.data`); `validate` checks a whole config against all of
them before any simulation starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fedkd.clients.base import ClientAlgorithm
from fedkd.clients.fedavg import FedAvgClient, FedAvgSettings
from fedkd.clients.local import LocalClient, LocalSettings
from fedkd.config import CONFIG_DIR, ConfigError, FedkdConfig, check_choice, check_fields, suggest


@dataclass(frozen=True)
class MethodSpec:
    name: str
    client: type[ClientAlgorithm]
    settings: type  # dataclass of the `method` section
    description: str


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> None:
    METHODS[spec.name] = spec


register_method(MethodSpec("fedavg", FedAvgClient, FedAvgSettings,
                           "global model, trained locally and averaged by the strategy"))
register_method(MethodSpec("local", LocalClient, LocalSettings,
                           "each client trains alone, nothing shared (lower baseline)"))


def apply_section_defaults(user: DictConfig, overrides: DictConfig) -> DictConfig:
    """Put `configs/method/<name>.yaml` under the method section the run ends up with."""
    name = OmegaConf.select(overrides, "method.name") or OmegaConf.select(user, "method.name") or "fedavg"
    path = CONFIG_DIR / "method" / f"{name}.yaml"
    defaults = OmegaConf.load(path).get("method", {}) if path.is_file() else {"name": name}
    own = user.get("method", {})
    keep = own if own.get("name", name) == name else {}
    user = OmegaConf.merge(user, {})  # copy
    user.method = OmegaConf.merge(defaults, keep, {"name": name})
    return user


def method_settings(cfg: FedkdConfig) -> Any:
    """The `method` section as the method's own dataclass (validated)."""
    name = cfg.method.get("name", "fedavg")
    check_choice("method.name", name, METHODS)
    spec = METHODS[name]
    try:
        node = OmegaConf.merge(OmegaConf.structured(spec.settings), cfg.method)
        settings = OmegaConf.to_object(node)
    except ConfigKeyError as exc:
        leaf = str(exc.full_key).rpartition(".")[2]
        allowed = [k for k in OmegaConf.structured(spec.settings).keys()]
        raise ConfigError(f"method.{exc.full_key}", cfg.method.get(leaf, leaf),
                          f"not a setting of {name}; {suggest(leaf, allowed)}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"method.{getattr(exc, 'full_key', '?')}", cfg.method,
                          str(exc).splitlines()[0]) from None
    check_fields(settings, "method.")
    return settings


def validate(cfg: FedkdConfig) -> None:
    """Every name and cross-section rule, before any simulation starts."""
    from fedkd.data import check_available
    from fedkd.models import MODELS
    from fedkd.strategies.flower import strategy_options

    method_settings(cfg)
    strategy_options(cfg.strategy)
    check_choice("model.name", cfg.model.name, MODELS)
    check_available(cfg.data)
    for pid in cfg.faults.clients:
        if not 0 <= pid < cfg.data.num_clients:
            raise ConfigError("faults.clients", pid, f"partition ids are 0..{cfg.data.num_clients - 1}")
