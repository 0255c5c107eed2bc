"""FedNTD (Lee et al., NeurIPS 2022): FedAvg plus not-true distillation from the global model.

Local objective: CE(z, y) + beta * T^2 KL(softmax(z_g~/T) || softmax(z~/T)) where ~ drops the
true-class column and z_g comes from the frozen global model just received
(`../shared/specs/local-kd.md` section 6). The loss is `fedkd.kd.not_true_kd`. The server
averages full models uniformly (1/|S|, PFLlib) unless `aggregation: examples`.
Clients evaluate the global model, as PFLlib does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedkd.clients.base import (Arrays, ClientData, PartialSharing, RoundInfo, proximal_term,
                                train_epochs)
from fedkd.config import setting
from fedkd.kd import not_true_kd
from fedkd.models import FedModel


@dataclass
class FedNTDSettings:
    name: str = "fedntd"
    beta: float = setting(1.0, min=0.0)  # weight of the not-true distillation (paper/protocol: 1)
    tau: float = setting(1.0, gt=0.0)  # temperature (paper/protocol: 1)
    tau_sq_scaling: bool = True  # PFLlib multiplies by tau^2; the official code does not
    aggregation: str = setting("uniform", choices=("uniform", "examples"))  # PFLlib: uniform


class FedNTDClient(PartialSharing):
    """The whole model is shared; a frozen copy of the received global model is the teacher."""

    evaluates = "global"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = self.build_model().eval().requires_grad_(False)

    def local_update(self, model: FedModel, state: dict[str, Any], data: ClientData,
                     info: RoundInfo, anchor: Arrays) -> dict[str, float]:
        self.teacher.load_state_dict({**self._init_state, **anchor})
        s = self.settings

        def not_true(x: Tensor, y: Tensor, logits: Tensor) -> Tensor:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            return s.beta * not_true_kd(logits, teacher_logits, y, s.tau, scale_t2=s.tau_sq_scaling)

        terms = (not_true if s.beta > 0 else None, proximal_term(model, anchor, self.proximal_mu(info)))
        return train_epochs(model, data, self.cfg, info.generator(), regularizers=terms, state=state)
