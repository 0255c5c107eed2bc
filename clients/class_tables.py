"""Methods that share per-class knowledge instead of weights: FedDistill (FD) and FedProto.

The whole model is personal (client state); what travels is a per-class table: the
mean logit vector (FedDistill, Jeong et al. 2018) or the mean feature vector, the
prototype (FedProto, Tan et al., AAAI 2022), of the client's training samples of each
class, recorded during local training as PFLlib does (`../shared/specs/local-kd.md`
sections 4-5). Classes a client lacks are absent from its upload. The server combines
each class over the clients that have it (`fedkd.strategies.class_means`, uniform by
default) and every client regularizes toward the global table from the next round on.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fedkd.clients.base import (Arrays, ClientData, EvalResult, ExpectedArrays, PersonalModelOnly,
                                RoundInfo, TrainResult, evaluate_model, train_epochs)
from fedkd.config import setting
from fedkd.kd import class_means, feature_distance, gather_class_rows, kd_loss, soft_cross_entropy
from fedkd.models import FedModel
from fedkd.strategies.class_means import (CLIENT_ID, COUNT, MEAN, decode_class_table,
                                          encode_class_table, leave_own_out, sums_round)

TABLE = "class-table"  # state key: the table recorded in the client's last training pass
UPLOADS = "uploads"  # state key (exclude_self): round -> the class table sent in that round


class ClassTableSharing(PersonalModelOnly):
    """Everything personal (any architecture per client); uploads the per-class means of the
    vectors each `step` records over the training pass."""

    aggregation = "class-means"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._vector_specs: dict[str, tuple[int, torch.dtype]] = {}  # architecture -> (D, dtype)

    def global_table(self, received: Arrays) -> tuple[Tensor, Tensor] | None:
        """The server's (C, D) table and the mask of classes it has, on this client's device."""
        decoded = decode_class_table(received, self.num_classes)
        return None if decoded is None else tuple(t.to(self.device) for t in decoded)  # type: ignore[return-value]

    @abstractmethod
    def step(self, model: FedModel, x: Tensor, y: Tensor,
             table: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        """(objective, logits, vectors to record per class) of one batch."""

    def teacher(self, received: Arrays, state: dict[str, Any],
                info: RoundInfo) -> tuple[Tensor, Tensor] | None:
        """The table this client regularizes toward: the server's (FedDistill's exclude_self
        overrides it)."""
        return self.global_table(received)

    def local_update(self, model: FedModel, received: Arrays, state: dict[str, Any],
                     data: ClientData, info: RoundInfo) -> dict[str, float]:
        table = self.teacher(received, state, info)
        sums: list[Tensor] = []
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=self.device)

        def objective(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            loss, logits, vectors = self.step(model, x, y, table)
            means, n = class_means(vectors.detach(), y, self.num_classes)
            sums.append(means * n.unsqueeze(-1))
            counts.add_(n)
            return loss, logits

        metrics = train_epochs(model, data, self.cfg, info.generator(), objective=objective, state=state)
        total = torch.stack(sums).sum(0) if sums else torch.zeros(self.num_classes, 1)
        state[TABLE] = (total / counts.clamp(min=1).unsqueeze(-1), counts)
        return metrics

    def vector_dim(self, model: FedModel) -> int:
        """Length of the vectors a table holds per class (FedDistill: logits)."""
        return self.num_classes

    def expected_arrays(self, info: RoundInfo) -> ExpectedArrays:
        """`mean.<c>` (D,) and `count.<c>` (1,) int64 for any subset of the classes: a client
        sends only the classes it saw in training, so no class is required."""
        name = self.model_name(info.partition_id)
        if name not in self._vector_specs:  # one throwaway build per architecture and process
            model = self.build_model(name)
            self._vector_specs[name] = (self.vector_dim(model), next(model.parameters()).dtype)
        dim, dtype = self._vector_specs[name]
        arrays: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for c in range(self.num_classes):
            arrays[f"{MEAN}{c}"], arrays[f"{COUNT}{c}"] = ((dim,), dtype), ((1,), torch.int64)
        groups = tuple((f"{MEAN}{c}", f"{COUNT}{c}") for c in range(self.num_classes))
        return ExpectedArrays(arrays, groups)

    def upload(self, state: dict[str, Any]) -> Arrays:
        means, counts = state.pop(TABLE)  # not kept: the next round records a fresh table
        return encode_class_table(means, counts)


@dataclass
class FedDistillSettings:
    name: str = "feddistill"
    lam: float = setting(1.0, min=0.0)  # weight of the distillation term (protocol: 1)
    target: str = setting("pfllib", choices=("pfllib", "kl", "raw"))
    temperature: float = setting(1.0, gt=0.0)  # only for target=kl
    missing_class: str = setting("self", choices=("self", "skip"))  # PFLlib: the sample's own logits
    weighting: str = setting("uniform", choices=("uniform", "count"))  # server, per class
    exclude_self: bool = False  # (v2) the paper's leave-own-out teacher (spec 4.3); PFLlib: false


class FedDistillClient(ClassTableSharing):
    """FD: CE + lam * distance to the global mean logits g_y of the sample's class.

    `target: pfllib` is PFLlib's code (TsingZ0/PFLlib clientfd.py as stored at commit
    3f5141b): soft cross-entropy to softmax(g_y). The spec read it as raw logits used as
    "probabilities" (`raw`, kept for the record): that loss is unbounded below whenever g_y
    has a negative entry and diverged to NaN within 3 rounds in our check. `kl` is the
    textbook T^2 KL to softmax(g_y / T) (same gradient as `pfllib` at T = 1).

    `exclude_self` (local-kd.md 4.3): client k's teacher for class c leaves k's own upload out
    (the other contributors' mean, weighted as `weighting` says). The upload then carries the
    partition id, the server broadcasts per-class sums and weights with the contributors' ids
    and round (`fedkd.strategies.class_means`), and the client keeps its uploads (C x C each)
    until a broadcast from a later round arrives, so it subtracts exactly the table that
    entered the sum. A class only k reported has no teacher for k (`missing_class` applies);
    a client that did not report c gets the plain mean over those who did.
    """

    def expected_arrays(self, info: RoundInfo) -> ExpectedArrays:
        """The class table, plus the partition id with exclude_self."""
        table = super().expected_arrays(info)
        if not self.settings.exclude_self:
            return table
        return ExpectedArrays({**table.arrays, CLIENT_ID: ((1,), torch.int64)}, table.optional)

    def teacher(self, received: Arrays, state: dict[str, Any],
                info: RoundInfo) -> tuple[Tensor, Tensor] | None:
        """With exclude_self: the leave-own-out table of the broadcast's round (uploads older
        than it are dropped from the state; a later broadcast never needs them)."""
        if not self.settings.exclude_self:
            return super().teacher(received, state, info)
        tagged = sums_round(received)
        if tagged is None:
            return None  # round 1: nothing aggregated yet
        server_round, contributors = tagged
        uploads = {r: t for r, t in state.get(UPLOADS, {}).items() if int(r) >= server_round}
        state[UPLOADS] = uploads
        own = None
        if info.partition_id in contributors:
            own = uploads.get(str(server_round))
            if own is None:
                raise ValueError(f"client {info.partition_id} is among the contributors of round "
                                 f"{server_round} but holds no upload of that round in its state")
        table = leave_own_out(received, self.num_classes, own, self.settings.weighting)
        return None if table is None else (table[0].to(self.device), table[1].to(self.device))

    def train(self, received: Arrays, state: dict[str, Any], data: ClientData,
              info: RoundInfo) -> TrainResult:
        """PersonalModelOnly's round; with exclude_self the upload carries the partition id and a
        copy of it stays in the state under its round."""
        result = super().train(received, state, data, info)
        if self.settings.exclude_self:
            state.setdefault(UPLOADS, {})[str(info.server_round)] = {
                k: v.detach().clone() for k, v in result.arrays.items()}
            result.arrays[CLIENT_ID] = torch.tensor([info.partition_id], dtype=torch.int64)
        return result

    def step(self, model: FedModel, x: Tensor, y: Tensor,
             table: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        s = self.settings
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        if table is not None and s.lam > 0:
            rows, mask = gather_class_rows(*table, y, fallback=logits.detach())
            keep = mask if s.missing_class == "skip" else None
            if s.target == "kl":
                per = kd_loss(logits, rows, s.temperature, reduction="none")
                loss = loss + s.lam * (per if keep is None else per * keep).mean()
            else:
                targets = rows.softmax(-1) if s.target == "pfllib" else rows
                loss = loss + s.lam * soft_cross_entropy(logits, targets, keep)
        return loss, logits, logits


@dataclass
class FedProtoSettings:
    name: str = "fedproto"
    lam: float = setting(1.0, min=0.0)  # weight of the prototype distance (protocol: 1)
    weighting: str = setting("uniform", choices=("uniform", "count"))  # PFLlib uniform; paper: count


class FedProtoClient(ClassTableSharing):
    """FedProto: CE + lam * MSE(feature, global prototype of its class); prediction = the
    nearest global prototype (squared distance). Before any prototype exists a client
    predicts with its head (PFLlib reports 0 there); the head's accuracy is logged beside."""

    second_model = ("own head", "head-accuracy")

    def vector_dim(self, model: FedModel) -> int:
        return model.feature_dim

    def step(self, model: FedModel, x: Tensor, y: Tensor,
             table: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        features = model.features(x)
        logits = model.head(features)
        loss = nn.functional.cross_entropy(logits, y)
        if table is not None and self.settings.lam > 0:
            rows, mask = gather_class_rows(*table, y)
            loss = loss + self.settings.lam * feature_distance(features, rows, mask)
        return loss, logits, features

    def inference_model(self, received: Arrays, state: dict[str, Any], partition_id: int,
                        server_round: int | None = None) -> nn.Module:
        """The personal model with the received global prototypes (NearestPrototype)."""
        model = self.personal.load(state, self.model_name(partition_id))
        table = self.global_table(received)
        if table is None:
            table = (torch.zeros(self.num_classes, model.feature_dim, device=self.device),
                     torch.zeros(self.num_classes, dtype=torch.bool, device=self.device))
        return NearestPrototype(model, *table)

    @torch.no_grad()
    def evaluate(self, received: Arrays, state: dict[str, Any], data: ClientData,
                 info: RoundInfo) -> EvalResult:
        predictor = self.inference_model(received, state, info.partition_id, info.server_round)
        head = evaluate_model(predictor.model, data.x_test, data.y_test)
        if not predictor.has_prototypes:
            head.metrics = {"head-accuracy": head.accuracy}
            return head
        predictor.eval()
        correct = 0
        for start in range(0, len(data.y_test), 1000):
            predicted = predictor(data.x_test[start:start + 1000]).argmax(1)
            correct += int((predicted == data.y_test[start:start + 1000]).sum())
        n = len(data.y_test)
        return EvalResult(head.loss, correct / max(n, 1), n, {"head-accuracy": head.accuracy})

    @staticmethod
    def predict(model: FedModel, x: Tensor, protos: Tensor, present: Tensor) -> Tensor:
        """The class of the nearest global prototype (mean squared distance); absent classes never."""
        return prototype_logits(model.features(x), protos, present).argmax(1)


def prototype_logits(features: Tensor, protos: Tensor, present: Tensor) -> Tensor:
    """Minus the mean squared distance of each feature to each global prototype, -inf for the
    classes without one: the argmax is the nearest prototype's class."""
    dist = (features.unsqueeze(1) - protos.unsqueeze(0)).pow(2).mean(-1)
    return (-dist).masked_fill(~present, float("-inf"))


class NearestPrototype(nn.Module):
    """FedProto's predictor as one module: the personal model plus the global prototypes it
    reads (buffers); logits `prototype_logits`, or the model's head before any prototype exists."""

    def __init__(self, model: FedModel, prototypes: Tensor, present: Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("prototypes", prototypes)
        self.register_buffer("present", present)

    @property
    def has_prototypes(self) -> bool:
        return bool(self.present.any())

    def forward(self, x: Tensor) -> Tensor:
        if not self.has_prototypes:
            return self.model(x)
        return prototype_logits(self.model.features(x), self.prototypes, self.present)
