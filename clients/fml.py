"""FML, Federated Mutual Learning (Shen et al., 2020): a private local model and a shared meme
model learn from labels and from each other (`../shared/specs/local-kd.md` section 3).

Per batch, as PFLlib does it: loss_local = alpha CE(z_l) + (1 - alpha) KL(p_m || p_l),
loss_meme = beta CE(z_m) + (1 - beta) KL(p_l || p_m), T = 1, nothing detached (the summed
backward also moves each teacher), each model's gradient norm clipped at 10. The KL is
`fedkd.kd.mutual_kd`; `kl_reduction: elementwise_mean` is PFLlib's (KL / C). Defaults
alpha = beta = 0.5 (the paper; PFLlib's argparse pair 1.0/0.0 is reproducible by config).
The local model may differ in architecture per client (`model.per_client`); the meme is
`model.name` everywhere. Only the meme model travels; the server averages memes uniformly (PFLlib) unless
`aggregation: examples`. Clients evaluate their local model; the meme's accuracy is logged beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from fedkd.clients.base import (Arrays, ClientData, EvalResult, PartialSharing, PrivateModel,
                                RoundInfo, evaluate_model, train_epochs)
from fedkd.config import setting
from fedkd.kd import mutual_kd
from fedkd.models import FedModel

LOCAL_MODEL = "local-model"


@dataclass
class FMLSettings:
    name: str = "fml"
    alpha: float = setting(0.5, min=0.0, max=1.0)  # local model: weight of CE (1 - alpha on KL)
    beta: float = setting(0.5, min=0.0, max=1.0)  # meme model: weight of CE (1 - beta on KL)
    kl_reduction: str = setting("elementwise_mean", choices=("elementwise_mean", "batchmean"))
    max_grad_norm: float = setting(10.0, gt=0.0)  # PFLlib clips each model at 10
    aggregation: str = setting("uniform", choices=("uniform", "examples"))  # PFLlib: uniform


class FMLClient(PartialSharing):
    """The shared model is the meme; the local model lives in `state["local-model"]`."""

    evaluates = "personalized"
    second_model = ("meme", "meme-accuracy")
    heterogeneous = True  # the local model's architecture may differ per client; memes are shared

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.local = PrivateModel(self.build_model, LOCAL_MODEL)

    def local_update(self, model: FedModel, state: dict[str, Any], data: ClientData,
                     info: RoundInfo, anchor: Arrays) -> dict[str, float]:
        s, local = self.settings, self.local.load(state, self.model_name(info.partition_id))
        pair = nn.ModuleDict({"local": local, "meme": model})

        def mutual(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            z_local, z_meme = local(x), model(x)
            kl_local, kl_meme = mutual_kd(z_local, z_meme, reduction=s.kl_reduction, detach=False)
            ce = nn.functional.cross_entropy
            loss_local = s.alpha * ce(z_local, y) + (1 - s.alpha) * kl_local
            loss_meme = s.beta * ce(z_meme, y) + (1 - s.beta) * kl_meme
            return loss_local + loss_meme, z_local

        metrics = train_epochs(pair, data, self.cfg, info.generator(), objective=mutual,
                               max_grad_norm={"local": s.max_grad_norm, "meme": s.max_grad_norm},
                               state=state)
        self.local.save(state)
        return metrics

    def inference_model(self, received: Arrays, state: dict[str, Any], partition_id: int,
                        server_round: int | None = None) -> nn.Module:
        """The local model (the meme is `global_model`)."""
        return self.local.load(state, self.model_name(partition_id))

    def evaluate(self, received: Arrays, state: dict[str, Any], data: ClientData,
                 info: RoundInfo) -> EvalResult:
        local = self.inference_model(received, state, info.partition_id, info.server_round)
        own = evaluate_model(local, data.x_test, data.y_test)
        meme = evaluate_model(self.load(received, state), data.x_test, data.y_test)
        own.metrics = {"meme-accuracy": meme.accuracy}
        return own
