"""The client-algorithm seam: plain PyTorch over one client's data and state, no Flower types.

A method's client side gets what the server sent (named tensors), the client's
persistent state (a dict the store keeps between rounds), its data and the
config; it returns what goes back to the server, metrics and an example count.
`PartialSharing` is the common case: a model whose parameters are split into
shared ones (sent and aggregated) and personal ones (kept in the state).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from fedkd.config import FedkdConfig
from fedkd.models import FedModel, build_model, client_model_name, under

Arrays = dict[str, Tensor]


@dataclass
class ClientData:
    """One client's own train and test split, as tensors on the client's device."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass
class RoundInfo:
    """Who and when: the seed of everything random in this client's round derives from it."""

    partition_id: int
    server_round: int
    seed: int
    server_config: dict[str, Any] = field(default_factory=dict)  # e.g. FedProx's "proximal-mu"

    def generator(self, salt: int = 0) -> torch.Generator:
        """A torch generator seeded by (seed, round, client, salt): data order is reproducible."""
        entropy = np.random.SeedSequence([self.seed, self.server_round, self.partition_id, salt])
        return torch.Generator().manual_seed(int(entropy.generate_state(1)[0]))


@dataclass(frozen=True)
class ExpectedArrays:
    """What a train update holds in one round, as its method declares it (checked on the node
    before the update enters any sum): name -> (shape, dtype). Every name is required except the
    `optional` groups, each of which is sent whole or not at all (a class table's `mean.c` and
    `count.c` for a class the client does not hold)."""

    arrays: dict[str, tuple[tuple[int, ...], torch.dtype]]
    optional: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def like(cls, arrays: Arrays) -> "ExpectedArrays":
        """Exactly the names, shapes and dtypes of `arrays`."""
        return cls({k: (tuple(v.shape), v.dtype) for k, v in arrays.items()})


@dataclass
class TrainResult:
    arrays: Arrays  # what goes back to the server (only what the method shares)
    metrics: dict[str, float]  # at least "loss" and "accuracy" of the training pass
    num_examples: int
    weight: float | None = None  # weight in the server's mean; None = num_examples


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)  # extras, e.g. Ditto's global-model accuracy


class ClientAlgorithm(ABC):
    """One method's client side. Subclasses are registered in `fedkd.registry`."""

    #: which model a client evaluates: "global" or "personalized" (shown in the report)
    evaluates: str = "global"
    #: what `EvalResult.accuracy` holds: a higher-is-better score (e.g. "auroc" for an anomaly
    #: detector, "neg-mse" for a forecaster); reports name the headline after it
    score: str = "accuracy"
    #: whether clients may use different architectures for the models they keep (`model.per_client`)
    heterogeneous: bool = False
    #: how the server combines what clients send: "strategy" (the Flower strategy named in
    #: `strategy.name`, over model tensors) or "class-means" (per-class tables, fedkd's own rule)
    aggregation: str = "strategy"
    #: whether the client's model comes from `model.name` / `model.per_client` (False: the method
    #: builds its own architectures from its settings, e.g. a centralized teacher and student)
    uses_model_config: bool = True
    #: the method's second model, scored beside the headline in every table (benchmark protocol
    #: v2): (its name, the evaluate metric that holds its accuracy), e.g. Ditto's
    #: ("global", "global-accuracy"); None for one-model methods
    second_model: tuple[str, str] | None = None

    def __init__(self, cfg: FedkdConfig, settings: Any, input_shape: tuple[int, ...],
                 num_classes: int, device: torch.device) -> None:
        self.cfg, self.settings, self.device = cfg, settings, device
        self.input_shape, self.num_classes = input_shape, num_classes

    def aggregation_weight(self, num_examples: int) -> float:
        """A client's weight in the server's mean: its train examples, or 1 for methods whose
        settings say `aggregation: uniform` (PFLlib's FedNTD, FML, FedKD average uniformly)."""
        return 1.0 if getattr(self.settings, "aggregation", "examples") == "uniform" else num_examples

    def wire_bytes(self, arrays: Arrays, info: RoundInfo) -> int | None:
        """Bytes `arrays` take on the wire when the method compresses them (None: their raw size).

        A compressing method (FedKD's SVD) applies the lossy round trip itself, to what it
        returns and to what it receives, and reports the compressed size here.
        """
        return None

    def build_model(self, name: str | None = None) -> FedModel:
        """Model `name` (default: the run's) with the run's seeded initialization, identical on
        the server and every client."""
        return build_model(name or self.cfg.model.name, self.input_shape, self.num_classes,
                           self.cfg.experiment.seed).to(self.device)

    def model_name(self, partition_id: int) -> str:
        """The architecture of this client's own model (`model.per_client`, else `model.name`)."""
        return client_model_name(self.cfg.model.name, self.cfg.model.per_client, partition_id)

    @abstractmethod
    def initial_arrays(self) -> Arrays:
        """What the server starts from (the shared part of a freshly initialized model)."""

    def global_model(self, received: Arrays) -> nn.Module | None:
        """The global model built from what the server holds, if the method has one (central eval)."""
        return None

    def expected_arrays(self, info: RoundInfo) -> ExpectedArrays | None:
        """What this client's train update must hold in `info`'s round (validated before
        aggregation; None: not declared, only the values are checked). Default: the arrays of
        `initial_arrays`, for methods that send one fixed set (class tables and staged methods
        override it)."""
        return ExpectedArrays.like(self.initial_arrays())

    def inference_model(self, received: Arrays, state: dict[str, Any], partition_id: int,
                        server_round: int | None = None) -> nn.Module:
        """Exactly the model `evaluate` scores for this client: one module whose `state_dict`
        holds every part it needs (frozen or auxiliary parts included), so the saved model
        (`fedkd.saved_model`) is the evaluated one. Built from `received` and `state`; with an
        empty state it is the seeded skeleton that saved weights load into. `server_round`
        picks the stage of a staged method (None: its last)."""
        raise NotImplementedError(f"{type(self).__name__} does not build an inference model")

    @abstractmethod
    def train(self, received: Arrays, state: dict[str, Any], data: ClientData,
              info: RoundInfo) -> TrainResult:
        """One round of local work; may read and update `state` in place."""

    @abstractmethod
    def evaluate(self, received: Arrays, state: dict[str, Any], data: ClientData,
                 info: RoundInfo) -> EvalResult:
        """Test accuracy of the model this client actually uses, on its own test split."""


def batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = False) -> Iterator[Tensor]:
    """Shuffled mini-batch indices (a DataLoader is slower than this for in-memory tensors).

    `drop_last` skips an incomplete last batch, as PFLlib's train loader does, unless it is the only
    batch (PFLlib would then not train the client at all)."""
    order = torch.randperm(n, generator=generator)
    end = n - n % batch_size if drop_last and n > batch_size else n
    for start in range(0, end, batch_size):
        yield order[start:start + batch_size]


def make_optimizer(params: Any, cfg: FedkdConfig) -> torch.optim.Optimizer:
    """The optimizer named in `train.optimizer` with the run's lr, momentum, weight decay."""
    t = cfg.train
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


@torch.no_grad()
def evaluate_model(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> EvalResult:
    """Mean cross-entropy and accuracy of `model` on (x, y)."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(1) == target).sum())
    n = len(y)
    return EvalResult(loss_sum / max(n, 1), correct / max(n, 1), n)


#: extra loss terms of a training step: (inputs, targets, logits) -> scalar tensor
Regularizer = Callable[[Tensor, Tensor, Tensor], Tensor]


def proximal_term(model: nn.Module, anchor: Arrays, mu: float) -> Regularizer | None:
    """mu/2 * ||w - anchor||^2 over the parameters present in `anchor` (FedProx, Ditto's pull)."""
    pairs = [(p, anchor[name].to(p.device)) for name, p in model.named_parameters() if name in anchor]
    if mu <= 0 or not pairs:
        return None
    return lambda x, y, logits: mu / 2 * sum((p - a).pow(2).sum() for p, a in pairs)


#: a whole training step's loss: (inputs, targets) -> (objective to minimize, logits to report)
Objective = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def train_epochs(model: nn.Module, data: ClientData, cfg: FedkdConfig, generator: torch.Generator,
                 *, epochs: int | None = None, trainable: list[str] | None = None,
                 regularizers: tuple[Regularizer | None, ...] = (), objective: Objective | None = None,
                 lr: dict[str, float] | None = None, max_grad_norm: dict[str, float] | None = None,
                 state: dict[str, Any] | None = None, optimizer_key: str = "optimizer",
                 ) -> dict[str, float]:
    """Mini-batch training over the client's data; the one loop every method uses.

    The default step minimizes cross-entropy of `model(x)` plus `regularizers`; `objective`
    replaces the whole step (e.g. mutual learning of several models held in one ModuleDict,
    `model`). `trainable` names the parameters that learn (the rest are frozen for this call, as
    in FedRep's head/body phases); `lr` gives some submodules (by name prefix) their own learning
    rate and `max_grad_norm` clips the gradient norm per submodule (PFLlib's FML/FedKD clip each
    model at 10). `epochs` defaults to `train.local_epochs`. The optimizer's state (e.g. momentum)
    persists in `state[optimizer_key]` when it has any. Returns the reported logits'
    cross-entropy "loss" and "accuracy" (regularizers excluded).
    """
    names = set(trainable) if trainable is not None else None
    named = list(model.named_parameters())
    frozen = [p for n, p in named if names is not None and n not in names]
    learning = [(n, p) for n, p in named if names is None or n in names]
    groups: dict[float, list[Tensor]] = {}
    for n, p in learning:
        rate = next((r for prefix, r in (lr or {}).items() if under(n, [prefix])), cfg.train.lr)
        groups.setdefault(rate, []).append(p)
    clip = [([p for n, p in learning if under(n, [prefix])], norm)
            for prefix, norm in (max_grad_norm or {}).items()]
    terms = [r for r in regularizers if r is not None]
    model.train()
    for p in frozen:
        p.requires_grad_(False)
    optimizer = make_optimizer([{"params": ps, "lr": rate} for rate, ps in groups.items()], cfg)
    if state is not None and state.get(optimizer_key):
        optimizer.load_state_dict(state[optimizer_key])
    loss_sum, correct, seen = 0.0, 0, 0
    try:
        for _ in range(cfg.train.local_epochs if epochs is None else epochs):
            for idx in batches(len(data.y_train), cfg.train.batch_size, generator, cfg.train.drop_last):
                x, y = data.x_train[idx], data.y_train[idx]
                if objective is None:
                    logits = model(x)
                    loss = nn.functional.cross_entropy(logits, y)
                    total = loss + sum(term(x, y, logits) for term in terms) if terms else loss
                else:
                    total, logits = objective(x, y)
                    loss = nn.functional.cross_entropy(logits.detach(), y)
                # keep .grad buffers allocated: the model object serves client after client, and
                # re-allocating them every step fragments the heap (~3 MB/client retained)
                optimizer.zero_grad(set_to_none=False)
                total.backward()
                for params, norm in clip:
                    nn.utils.clip_grad_norm_(params, norm)
                optimizer.step()
                loss_sum += loss.item() * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    opt_state = optimizer.state_dict()
    if state is not None and opt_state["state"]:
        state[optimizer_key] = opt_state
    return {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1)}


def copy_state(module: nn.Module) -> Arrays:
    """A copy of `module`'s state dict that later training steps leave unchanged (to keep in the
    client state, send, or restore from)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class PrivateModel:
    """A model that only ever lives in the client state (Ditto's personal model, FML's local
    model, FedKD's mentor, a local/FedProto client's whole model): loaded from `state[key]`,
    or the run's seeded initialization of its architecture before the client's first round;
    saved back after training. One module per architecture is built lazily and reused, so
    model-heterogeneous clients (`model.per_client`) run side by side in one process."""

    def __init__(self, build: Callable[[str], nn.Module], key: str) -> None:
        self.build, self.key = build, key
        self._models: dict[str, nn.Module] = {}
        self._inits: dict[str, dict[str, Tensor]] = {}
        self._current: nn.Module | None = None

    def load(self, state: dict[str, Any], name: str) -> Any:
        """This client's model of architecture `name` (returned as the FedModel it is)."""
        if name not in self._models:
            self._models[name] = self.build(name)
            self._inits[name] = copy_state(self._models[name])
        model = self._current = self._models[name]
        model.load_state_dict(state.get(self.key) or self._inits[name])
        return model

    def save(self, state: dict[str, Any]) -> None:
        """Store the model last loaded (after training it) in `state[key]`."""
        assert self._current is not None, "load() before save()"
        state[self.key] = copy_state(self._current)


class PersonalModelOnly(ClientAlgorithm):
    """Clients whose whole model is their own (local training, FedDistill, FedProto): it lives
    in `state["personal"]`, may differ in architecture per client, and never travels."""

    evaluates = "personalized"
    heterogeneous = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.personal = PrivateModel(self.build_model, "personal")

    def initial_arrays(self) -> Arrays:
        return {}

    def own_model(self, state: dict[str, Any], info: RoundInfo) -> FedModel:
        return self.personal.load(state, self.model_name(info.partition_id))

    def train(self, received: Arrays, state: dict[str, Any], data: ClientData,
              info: RoundInfo) -> TrainResult:
        model = self.own_model(state, info)
        metrics = self.local_update(model, received, state, data, info)
        self.personal.save(state)
        return TrainResult(self.upload(state), metrics, len(data.y_train),
                           self.aggregation_weight(len(data.y_train)))

    def local_update(self, model: FedModel, received: Arrays, state: dict[str, Any],
                     data: ClientData, info: RoundInfo) -> dict[str, float]:
        """`train.local_epochs` of plain cross-entropy training (methods add their terms)."""
        return train_epochs(model, data, self.cfg, info.generator(), state=state)

    def upload(self, state: dict[str, Any]) -> Arrays:
        """What goes to the server after training (nothing, for local training)."""
        return {}

    def inference_model(self, received: Arrays, state: dict[str, Any], partition_id: int,
                        server_round: int | None = None) -> nn.Module:
        return self.personal.load(state, self.model_name(partition_id))

    def evaluate(self, received: Arrays, state: dict[str, Any], data: ClientData,
                 info: RoundInfo) -> EvalResult:
        model = self.inference_model(received, state, info.partition_id, info.server_round)
        return evaluate_model(model, data.x_test, data.y_test)


class PartialSharing(ClientAlgorithm):
    """A model split into shared parameters (aggregated by the server) and personal ones.

    The personal ones live in `state["personal"]` between rounds; a client seeing
    no personal state yet starts from the run's seeded initialization, as every
    client of a FedAvg run starts from the same global model. Subclasses choose the
    split with `is_personal` and may override `local_update` (the training loop).
    FedAvg's client applies FedProx's proximal term when the server sends
    `proximal-mu`.
    """

    evaluates = "personalized"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model = self.build_model()
        self._init_state = copy_state(self.model)
        self.personal_keys = [k for k in self._init_state if self.is_personal(k)]
        self.shared_keys = [k for k in self._init_state if k not in set(self.personal_keys)]

    def is_personal(self, key: str) -> bool:
        """Whether state_dict entry `key` stays on the client (default: nothing does)."""
        return False

    def initial_arrays(self) -> Arrays:
        return {k: self._init_state[k] for k in self.shared_keys}

    def global_model(self, received: Arrays) -> nn.Module | None:
        return self.load(received, {}) if not self.personal_keys else None

    def load(self, received: Arrays, state: dict[str, Any]) -> FedModel:
        """The model this client uses: received shared parameters + its own personal ones."""
        personal = state.get("personal") or {k: self._init_state[k] for k in self.personal_keys}
        shared = {k: received.get(k, self._init_state[k]) for k in self.shared_keys}
        self.model.load_state_dict({**shared, **personal})
        return self.model

    def train(self, received: Arrays, state: dict[str, Any], data: ClientData,
              info: RoundInfo) -> TrainResult:
        model = self.load(received, state)
        metrics = self.local_update(model, state, data, info, anchor=received)
        sd = model.state_dict()
        if self.personal_keys:
            state["personal"] = {k: sd[k].detach().clone() for k in self.personal_keys}
        return TrainResult(self.upload(model, state), metrics, len(data.y_train),
                           self.aggregation_weight(len(data.y_train)))

    def upload(self, model: FedModel, state: dict[str, Any]) -> Arrays:
        """What goes back to the server after `local_update`: by default the shared parameters
        (clones: the model object is reused for the next client of this process)."""
        sd = model.state_dict()
        return {k: sd[k].detach().clone() for k in self.shared_keys}

    def local_update(self, model: FedModel, state: dict[str, Any], data: ClientData,
                     info: RoundInfo, anchor: Arrays) -> dict[str, float]:
        """`train.local_epochs` of mini-batch training (with the proximal term when mu > 0)."""
        prox = proximal_term(model, anchor, self.proximal_mu(info))
        return train_epochs(model, data, self.cfg, info.generator(), regularizers=(prox,),
                            state=state)

    def proximal_mu(self, info: RoundInfo) -> float:
        """FedProx's mu: sent by the FedProx strategy as `proximal-mu` (0 otherwise)."""
        return float(info.server_config.get("proximal-mu", 0.0))

    def inference_model(self, received: Arrays, state: dict[str, Any], partition_id: int,
                        server_round: int | None = None) -> nn.Module:
        return self.load(received, state)

    def evaluate(self, received: Arrays, state: dict[str, Any], data: ClientData,
                 info: RoundInfo) -> EvalResult:
        model = self.inference_model(received, state, info.partition_id, info.server_round)
        return evaluate_model(model, data.x_test, data.y_test)
