"""Personalized FL by partial model sharing: FedPer, FedRep, FedBN, LG-FedAvg (and FedProx).

Each method only chooses which state_dict entries stay on the client
(`PartialSharing.is_personal`); the platform never sends personal entries,
the server aggregates the rest with whatever Flower strategy the run names,
and the client state store keeps the personal entries between rounds. The
update rules follow `../shared/specs/pfl-baselines.md` (PFLlib's reading).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedkd.clients.base import (Arrays, ClientData, PartialSharing, RoundInfo, proximal_term,
                                train_epochs)
from fedkd.config import setting
from fedkd.models import FedModel, batchnorm_keys, under


@dataclass
class FedProxSettings:
    name: str = "fedprox"
    mu: float = setting(0.01, min=0.0)  # proximal weight; the benchmark protocol's value


class FedProxClient(PartialSharing):
    """FedProx (Li et al., MLSys 2020) as a method: local CE + mu/2 ||w - w_global||^2.

    The same client as FedAvg's; only mu comes from `method.mu` instead of the
    FedProx strategy (the two are the same algorithm, so a run names one of them).
    """

    evaluates = "global"

    def proximal_mu(self, info: RoundInfo) -> float:
        return self.settings.mu


@dataclass
class FedPerSettings:
    name: str = "fedper"
    personal_layers: list[str] = field(default_factory=lambda: ["head"])  # modules kept local


class FedPerClient(PartialSharing):
    """FedPer (Arivazhagan et al., 2019): shared base, personal head, trained jointly."""

    def is_personal(self, key: str) -> bool:
        return under(key, self.settings.personal_layers)


@dataclass
class FedRepSettings:
    name: str = "fedrep"
    personal_layers: list[str] = field(default_factory=lambda: ["head"])
    head_epochs: int = setting(1, min=0)  # PFLlib's plocal_epochs; the paper uses many (e.g. 10)


class FedRepClient(FedPerClient):
    """FedRep (Collins et al., ICML 2021): head first with the body frozen, then the body
    (`train.local_epochs`) with the head frozen, each with its own SGD; the body is shared."""

    def local_update(self, model: FedModel, state: dict[str, Any], data: ClientData,
                     info: RoundInfo, anchor: Arrays) -> dict[str, float]:
        names = [n for n, _ in model.named_parameters()]
        head = [n for n in names if self.is_personal(n)]
        body = [n for n in names if not self.is_personal(n)]
        generator = info.generator()
        head_metrics = train_epochs(model, data, self.cfg, generator, epochs=self.settings.head_epochs,
                                    trainable=head, state=state, optimizer_key="optimizer-head")
        prox = proximal_term(model, anchor, self.proximal_mu(info))
        metrics = train_epochs(model, data, self.cfg, generator, trainable=body,
                               regularizers=(prox,), state=state, optimizer_key="optimizer-body")
        return {**metrics, "head-loss": head_metrics["loss"]}


@dataclass
class FedBNSettings:
    name: str = "fedbn"
    match: str = setting("type", choices=("type", "name_bn"))  # how BN layers are found


class FedBNClient(PartialSharing):
    """FedBN (Li et al., ICLR 2021): BatchNorm layers (affine parameters and running
    statistics) stay local, everything else is shared. BN is found by module type;
    `match: name_bn` is PFLlib's rule ("bn" in the key), which misses unnamed BN layers.
    On a model without BN (the plain CNN) FedBN is FedAvg evaluated per client; use `cnn_bn`."""

    def is_personal(self, key: str) -> bool:
        if self.settings.match == "name_bn":
            return "bn" in key
        if not hasattr(self, "_bn_keys"):
            self._bn_keys = set(batchnorm_keys(self.model))
        return key in self._bn_keys


@dataclass
class LGFedAvgSettings:
    name: str = "lgfedavg"
    global_layers: list[str] = field(default_factory=lambda: ["head"])  # modules shared


class LGFedAvgClient(PartialSharing):
    """LG-FedAvg (Liang et al., 2020): local representation, global head (PFLlib's split;
    `global_layers` moves more top layers into the shared part)."""

    def is_personal(self, key: str) -> bool:
        return not under(key, self.settings.global_layers)
