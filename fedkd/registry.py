"""Names -> things: methods (client algorithm + settings + YAML defaults), and the checks of a config.

Adding a method is one client module, one YAML in `configs/method/`, one entry here.
Strategies, models and datasets have their own tables (`fedkd.strategies.flower`,
`fedkd.models`, `fedkd.data`); `validate` checks a whole config against all of
them before any simulation starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fedkd.clients.base import ClientAlgorithm
from fedkd.clients.betakd import BetaKDClient, BetaKDSettings
from fedkd.clients.betakd import check_settings as check_betakd
from fedkd.clients.class_tables import (FedDistillClient, FedDistillSettings, FedProtoClient,
                                        FedProtoSettings)
from fedkd.clients.ditto import DittoClient, DittoSettings
from fedkd.clients.fedavg import FedAvgClient, FedAvgSettings
from fedkd.clients.fedkd_mentor import FedKDMentorClient, FedKDMentorSettings, check_settings
from fedkd.clients.fedntd import FedNTDClient, FedNTDSettings
from fedkd.clients.fml import FMLClient, FMLSettings
from fedkd.clients.hinton_kd import DESCRIPTION as KD_DESCRIPTION
from fedkd.clients.hinton_kd import HintonKDClient, KDSettings
from fedkd.clients.hinton_kd import check_settings as check_kd
from fedkd.clients.local import LocalClient, LocalSettings
from fedkd.clients.mhpflid import MHPFLIDClient, MHPFLIDSettings
from fedkd.clients.mixclap import DESCRIPTION as MIXCLAP_DESCRIPTION
from fedkd.clients.mixclap import MixCLAPClient, MixCLAPSettings
from fedkd.clients.mixclap import check_settings as check_mixclap
from fedkd.clients.mhpflid import check_settings as check_mhpflid
from fedkd.clients.staged import StagedMethod
from fedkd.clients.pse import PSEClient, PSESettings
from fedkd.clients.pse import check_settings as check_pse
from fedkd.clients.stkd import DESCRIPTION as STKD_DESCRIPTION
from fedkd.clients.stkd import STKDClient, STKDSettings
from fedkd.clients.stkd import check_settings as check_stkd
from fedkd.clients.xtime import DESCRIPTION as XTIME_DESCRIPTION
from fedkd.clients.xtime import XTimeClient, XTimeSettings
from fedkd.clients.xtime import check_settings as check_xtime
from fedkd.clients.personalized import (FedBNClient, FedBNSettings, FedPerClient, FedPerSettings,
                                        FedProxClient, FedProxSettings, FedRepClient,
                                        FedRepSettings, LGFedAvgClient, LGFedAvgSettings)
from fedkd.config import CONFIG_DIR, ConfigError, FedkdConfig, check_choice, check_fields, suggest
from fedkd.models import check_prefixes, feature_dim


@dataclass(frozen=True)
class MethodSpec:
    name: str
    client: type[ClientAlgorithm]
    settings: type  # dataclass of the `method` section
    description: str
    #: cross-section checks of the method's settings against the rest of the config
    check: Callable[[FedkdConfig, Any], None] | None = None


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> None:
    METHODS[spec.name] = spec


register_method(MethodSpec("fedavg", FedAvgClient, FedAvgSettings,
                           "global model, trained locally and averaged by the strategy"))
register_method(MethodSpec("local", LocalClient, LocalSettings,
                           "each client trains alone, nothing shared (lower baseline)"))


def _not_with_fedprox_strategy(cfg: FedkdConfig, settings: Any) -> None:
    if cfg.strategy.get("name") == "fedprox":
        raise ConfigError("strategy.name", "fedprox", "method fedprox already adds the proximal term "
                          "(method.mu); use strategy.name=fedavg, or method.name=fedavg with it")


def _layers(option: str) -> Callable[[FedkdConfig, Any], None]:
    return lambda cfg, settings: check_prefixes(f"method.{option}", getattr(settings, option),
                                                cfg.model.name)


register_method(MethodSpec("fedprox", FedProxClient, FedProxSettings,
                           "FedAvg + proximal term mu/2 ||w - w_global||^2 (method.mu)",
                           _not_with_fedprox_strategy))
register_method(MethodSpec("fedper", FedPerClient, FedPerSettings,
                           "shared base, personal head trained jointly", _layers("personal_layers")))
register_method(MethodSpec("fedrep", FedRepClient, FedRepSettings,
                           "shared body; personal head trained first with the body frozen",
                           _layers("personal_layers")))
register_method(MethodSpec("fedbn", FedBNClient, FedBNSettings,
                           "everything shared but BatchNorm layers (use a BN model, e.g. cnn_bn)"))
register_method(MethodSpec("lgfedavg", LGFedAvgClient, LGFedAvgSettings,
                           "local representation, global head", _layers("global_layers")))
register_method(MethodSpec("ditto", DittoClient, DittoSettings,
                           "FedAvg global model + personal model pulled toward it (method.mu)"))


register_method(MethodSpec("kd", HintonKDClient, KDSettings, KD_DESCRIPTION, check_kd))


register_method(MethodSpec("mhpflid", MHPFLIDClient, MHPFLIDSettings,
                           "MH-pFLID: private (heterogeneous) local model + receiver/transmitter; "
                           "a small shared messenger learns by injection and distillation",
                           check_mhpflid))


register_method(MethodSpec("pse", PSEClient, PSESettings,
                           "PSE: FedAvg global copy + private local model excited channel-wise "
                           "toward it, cross-model attention before the personal head", check_pse))
register_method(MethodSpec("xtime", XTimeClient, XTimeSettings, XTIME_DESCRIPTION, check_xtime))
register_method(MethodSpec("betakd", BetaKDClient, BetaKDSettings,
                           "centralized (1 client): Beta-KD, teachers then CE/logit-KD/feature-KD "
                           "weighted by learned uncertainty (equal, task, instance side by side)",
                           check_betakd))
register_method(MethodSpec("mixclap", MixCLAPClient, MixCLAPSettings, MIXCLAP_DESCRIPTION,
                           check_mixclap))
register_method(MethodSpec("stkd", STKDClient, STKDSettings, STKD_DESCRIPTION, check_stkd))


def _own_aggregation(cfg: FedkdConfig, settings: Any) -> None:
    if cfg.strategy.get("name", "fedavg") != "fedavg":
        raise ConfigError("strategy.name", cfg.strategy.get("name"),
                          f"{settings.name} combines per-class tables with its own rule "
                          f"(method.weighting); leave strategy.name at fedavg")


register_method(MethodSpec("fedntd", FedNTDClient, FedNTDSettings,
                           "FedAvg + not-true distillation from the global model (beta, tau)"))
register_method(MethodSpec("fedkd_mentor", FedKDMentorClient, FedKDMentorSettings,
                           "FedKD: private mentor + shared mentee, adaptive mutual distillation, "
                           "optional SVD compression", check_settings))
register_method(MethodSpec("fml", FMLClient, FMLSettings,
                           "mutual learning of a private local model and a shared meme model"))
register_method(MethodSpec("feddistill", FedDistillClient, FedDistillSettings,
                           "personal models; shares per-class mean logits (FD)", _own_aggregation))
def _prototype_dims_match(cfg: FedkdConfig, settings: Any) -> None:
    _own_aggregation(cfg, settings)
    dims = {name: feature_dim(name) for name in cfg.model.per_client}
    if len(set(dims.values())) > 1:
        raise ConfigError("model.per_client", list(cfg.model.per_client),
                          f"fedproto averages feature prototypes, so the models' feature sizes must "
                          f"match; got {dims}")


register_method(MethodSpec("fedproto", FedProtoClient, FedProtoSettings,
                           "personal models; shares per-class feature prototypes",
                           _prototype_dims_match))


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


def check_method(cfg: FedkdConfig) -> None:
    """The method's settings, alone and against the model and strategy of the run."""
    settings = method_settings(cfg)  # checks the name first
    spec = METHODS[cfg.method.get("name", "fedavg")]
    if spec.check is not None:
        spec.check(cfg, settings)
    if issubclass(spec.client, StagedMethod):
        stages = spec.client.stages(settings)
        total = sum(n for _, n in stages)
        if cfg.train.rounds != total:
            raise ConfigError("train.rounds", cfg.train.rounds,
                              f"{spec.name} runs its stages {stages} in {total} rounds (one epoch "
                              f"each); set train.rounds={total}")


def check_per_client_models(cfg: FedkdConfig) -> None:
    """`model.per_client` names registry models and the method lets clients differ."""
    from fedkd.models import MODELS

    per_client = list(cfg.model.per_client)
    for i, name in enumerate(per_client):
        check_choice(f"model.per_client[{i}]", name, MODELS)
    method = cfg.method.get("name", "fedavg")
    if per_client and not METHODS[method].client.heterogeneous:
        allowed = sorted(n for n, m in METHODS.items() if m.client.heterogeneous)
        raise ConfigError("model.per_client", per_client,
                          f"{method} shares model weights, so every client needs model.name; "
                          f"methods that allow per-client models: {', '.join(allowed)}")


def check_device(cfg: FedkdConfig) -> None:
    """`device.type=cuda` can work: there is a GPU to start the local Ray cluster on, and each
    client asks Ray for a GPU share (Ray hides the GPUs from actors that ask for none)."""
    if cfg.device.type != "cuda":
        return
    if not cfg.simulation.ray_address and not torch.cuda.is_available():
        raise ConfigError("device.type", "cuda", "no CUDA device on this machine (torch.cuda.is_available() "
                          "is False); use cpu or auto, or join a GPU cluster with simulation.ray_address")
    if cfg.simulation.client_gpus == 0:
        raise ConfigError("simulation.client_gpus", cfg.simulation.client_gpus,
                          "device.type=cuda needs a GPU share per client (Ray hides the GPUs from "
                          "clients that ask for none), e.g. simulation.client_gpus=0.25")


def validate(cfg: FedkdConfig) -> None:
    """Every name and cross-section rule, before any simulation starts."""
    from fedkd.data import check_available
    from fedkd.models import MODELS
    from fedkd.strategies.flower import strategy_options

    strategy_options(cfg.strategy)
    check_choice("model.name", cfg.model.name, MODELS)
    check_method(cfg)
    check_per_client_models(cfg)
    check_device(cfg)
    check_available(cfg.data)
    for pid in cfg.faults.clients:
        if not 0 <= pid < cfg.data.num_clients:
            raise ConfigError("faults.clients", pid, f"partition ids are 0..{cfg.data.num_clients - 1}")
