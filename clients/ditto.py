"""Ditto (Li et al., ICML 2021): a FedAvg global model plus a personal model pulled toward it.

Per round, as in `../shared/specs/pfl-baselines.md` section 7 (PFLlib's order):
1. personal phase: `personal_epochs` of CE + mu/2 ||v - w^t||^2 on the personal model v,
   with w^t the global model just received;
2. global phase: exactly FedAvg's local update of w^t, which is what is sent back.
The personal model lives in the client state store and never leaves the client.
Clients evaluate the personal model; the global model's accuracy is logged beside it
(`global_accuracy`), never mixed into the headline (PFLlib's best-of-both is a quirk).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from fedkd.clients.base import (Arrays, ClientData, EvalResult, PartialSharing, PrivateModel,
                                RoundInfo, TrainResult, evaluate_model, proximal_term, train_epochs)
from fedkd.config import setting

PERSONAL_MODEL = "personal-model"


@dataclass
class DittoSettings:
    name: str = "ditto"
    mu: float = setting(0.01, min=0.0)  # the paper's lambda: pull of the personal model toward w^t
    personal_epochs: int = setting(1, min=0)  # PFLlib's plocal_epochs


class DittoClient(PartialSharing):
    """Global model: FedAvg's (everything shared). Personal model: `state["personal-model"]`."""

    evaluates = "personalized"
    second_model = ("global", "global-accuracy")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.personal = PrivateModel(self.build_model, PERSONAL_MODEL)

    def train(self, received: Arrays, state: dict[str, Any], data: ClientData,
              info: RoundInfo) -> TrainResult:
        personal = self.personal.load(state, self.cfg.model.name)
        pull = proximal_term(personal, received, self.settings.mu)
        # salt 1: the global phase keeps FedAvg's exact batch order (salt 0)
        personal_metrics = train_epochs(personal, data, self.cfg, info.generator(1),
                                        epochs=self.settings.personal_epochs, regularizers=(pull,),
                                        state=state, optimizer_key="optimizer-personal")
        self.personal.save(state)
        result = super().train(received, state, data, info)
        result.metrics.update({f"personal-{k}": v for k, v in personal_metrics.items()})
        return result

    def inference_model(self, received: Arrays, state: dict[str, Any], partition_id: int,
                        server_round: int | None = None) -> nn.Module:
        """The personal model (the global model is `global_model`)."""
        return self.personal.load(state, self.cfg.model.name)

    def evaluate(self, received: Arrays, state: dict[str, Any], data: ClientData,
                 info: RoundInfo) -> EvalResult:
        personal = self.inference_model(received, state, info.partition_id, info.server_round)
        own = evaluate_model(personal, data.x_test, data.y_test)
        shared = evaluate_model(self.load(received, state), data.x_test, data.y_test)
        own.metrics = {"global-accuracy": shared.accuracy, "global-loss": shared.loss}
        return own
