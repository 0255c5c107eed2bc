"""MH-pFLID (Xie et al., ICML 2024, arXiv 2405.06822): model-heterogeneous personalized FL via
injection and distillation (`../shared/specs/mhpflid.md`).

Every client keeps a private **local model** (its own architecture, `model.per_client`, the model
it evaluates) plus a private **receiver** R and **transmitter** T; a small **messenger** model
(`messenger_model`, identical on all clients) is the only thing that travels. Per round
(spec section c):

1. the received messenger overwrites the client's copy;
2. **injection** (`injection_epochs`): messenger frozen (eval mode, BN running stats untouched);
   local model + R learn with  lambda_local_inj * CE(L_h(L_b(x)), y)
   + lambda_messenger_inj * CE(M_h(R(M_b(x), L_b(x))), y): the frozen aggregated messenger head
   is a fixed classifier the local body must become compatible with (through R);
3. **distillation** (`distillation_epochs`): local model frozen (eval mode); messenger + T learn
   with  lambda_messenger_dis * CE(M_h(T(M_b(x), L_b(x))), y)
   + lambda_con_dis * KL(softmax(z_local / tau) || softmax(z_messenger / tau)), the KL being
   `fedkd.kd.kd_loss` with the local logits detached as the teacher;
4. only the messenger's state_dict goes back; the server averages it with the strategy (FedAvg,
   weighted by train examples, `aggregation: examples`; spec b, A8).

Evaluation: the local model on the client's test split (the headline); the messenger as the
client sees it, M_h(T(M_b(x), L_b(x))), is logged beside it (`messenger-accuracy`,
`messenger-loss`). There is no central evaluation: the messenger's head is trained only on R/T
outputs, so the messenger alone is not a classifier of the method (spec d).

Receiver / transmitter: both work on pooled feature vectors (`FedModel.features`, B x dim). W_d
(Linear) maps the local vector to the messenger width D; both vectors are then projected (W_q,
W_k, W_v: Linear D -> D) and read as `num_tokens` tokens of D / num_tokens dims, and attention
runs over the tokens of each sample (never across the batch). R: queries from the messenger,
keys/values from the local features; T: the other way round. Output B x D, what the messenger's
head consumes. One R and one T per local architecture, seeded so clients of one architecture
start alike; persistent in the client state, never uploaded (spec A2).

ASSUMED (the paper's body was not available; spec section g), each a setting where it has a
choice:
- A1 messenger internals: a registry model (`messenger_model`, "" = `model.name`; a small CNN
  is recommended, e.g. `cnn_narrow`); the optional information-bases (soft codebook) layer is
  not implemented.
- A3 attention axis: within-sample token attention, `num_tokens` = 8 tokens (the spec's choice
  for vector features); S3's batch-axis attention (batch-dependent predictions) is not offered.
  The scale is 1/sqrt(token width) (standard scaled dot-product; the report's 1/sqrt(D_mes)
  refers to whole vectors).
- A4 W_d: one Linear on the pooled local feature vector (fedkd models end in a flat vector).
- A5 KL target = the local prediction, KL(p_local || p_messenger), tau = 1, batch mean; no tau^2
  factor (the spec's formula; identical at tau = 1).
- A6 frozen models are in eval mode during the stage that freezes them.
- A7 the reported metric is the local model on the client's own test split.
- A8 messengers averaged weighted by train examples (`aggregation: uniform` gives 1/|S|).
- Optimizer: the run's `train.optimizer` (the protocol's SGD; S3 used Adam), with per-module
  learning rates `local_lr`, `messenger_lr`, `rt_lr` (0 = `train.lr`; S3: 1e-4, 1e-5, 1e-4 with
  Adam) and gradient norms clipped per trainable module at `max_grad_norm` (0 = off, the
  default). S3 clips at 1.0, a reproduction choice made with Adam, whose step barely depends on
  the gradient's scale. Under the protocol's plain SGD the clip is a brake on the local model
  alone: on std-mnist one client trained by itself for 20 rounds reached 0.912 with the clip
  against 0.944 without it and 0.952 for local training (client 1; client 4: 0.908 / 0.958 /
  0.963), so a clip of 1.0 made "MH-pFLID vs local" a comparison of optimizers.
  Optimizer state (e.g. Adam moments) persists per stage in the client state.
- Budget: 1 injection + 1 distillation epoch per round (the benchmark protocol's one local
  epoch; S3 used 4 + 1). S3's clamp of the injection messenger CE is not reproduced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from fedkd.clients.base import (Arrays, ClientData, EvalResult, PartialSharing, PrivateModel,
                                RoundInfo, evaluate_model, train_epochs)
from fedkd.config import ConfigError, FedkdConfig, setting
from fedkd.kd import kd_loss
from fedkd.models import MODELS, FedModel, feature_dim, under

# state keys (and ModuleDict keys of one client's round)
LOCAL_MODEL, RECEIVER, TRANSMITTER, MESSENGER = "local-model", "receiver", "transmitter", "messenger"
OPT_INJECTION, OPT_DISTILLATION = "optimizer-injection", "optimizer-distillation"
_RECEIVER_SALT, _TRANSMITTER_SALT = 1, 2  # seed offsets of the R / T initializations


@dataclass
class MHPFLIDSettings:
    name: str = "mhpflid"
    messenger_model: str = ""  # the shared messenger's architecture; "" = model.name
    injection_epochs: int = setting(1, min=0)  # epochs of the injection stage per round (S3: 4)
    distillation_epochs: int = setting(1, min=0)  # epochs of the distillation stage (S3: 1)
    lambda_local_inj: float = setting(0.9, min=0.0)  # lambda_l^inj: local model's CE
    lambda_messenger_inj: float = setting(0.1, min=0.0)  # lambda_m^inj: CE through R + frozen messenger
    lambda_messenger_dis: float = setting(0.9, min=0.0)  # lambda_m^dis: messenger's CE through T
    lambda_con_dis: float = setting(0.1, min=0.0)  # lambda_con^dis: KL(local || messenger)
    tau: float = setting(1.0, gt=0.0)  # KL temperature (ASSUMED A5)
    num_tokens: int = setting(8, min=1)  # tokens per feature vector in R/T attention (ASSUMED A3)
    local_lr: float = setting(0.0, min=0.0)  # local model's lr; 0 = train.lr (S3: 1e-4, Adam)
    messenger_lr: float = setting(0.0, min=0.0)  # messenger's lr; 0 = train.lr (S3: 1e-5, Adam)
    rt_lr: float = setting(0.0, min=0.0)  # receiver's and transmitter's lr; 0 = train.lr (S3: 1e-4)
    max_grad_norm: float = setting(0.0, min=0.0)  # per-module clip; 0 = none (S3: 1.0 with Adam)
    aggregation: str = setting("examples", choices=("examples", "uniform"))  # spec: n_k-weighted


def check_settings(cfg: FedkdConfig, settings: MHPFLIDSettings) -> None:
    """Cross-field checks (usable as `MethodSpec.check`): a known messenger model whose feature
    width splits into `num_tokens` tokens."""
    name = settings.messenger_model or cfg.model.name
    if settings.messenger_model and settings.messenger_model not in MODELS:
        raise ConfigError("method.messenger_model", settings.messenger_model,
                          f"unknown model; expected one of {sorted(MODELS)} or '' (the run's model)")
    width = feature_dim(name)
    if width % settings.num_tokens:
        raise ConfigError("method.num_tokens", settings.num_tokens,
                          f"must divide the messenger's feature width ({name}: {width})")


class TokenCrossAttention(nn.Module):
    """Cross-attention between two B x D vectors of one sample, read as `num_tokens` tokens.

    Attention never mixes samples of a batch (spec A3), so a prediction does not depend on what
    else is in the batch. `w_d` brings the local feature vector to the messenger width D."""

    def __init__(self, local_dim: int, messenger_dim: int, num_tokens: int) -> None:
        super().__init__()
        if messenger_dim % num_tokens:
            raise ValueError(f"num_tokens={num_tokens} does not divide messenger_dim={messenger_dim}")
        self.num_tokens = num_tokens
        self.w_d = nn.Linear(local_dim, messenger_dim)
        self.w_q = nn.Linear(messenger_dim, messenger_dim)
        self.w_k = nn.Linear(messenger_dim, messenger_dim)
        self.w_v = nn.Linear(messenger_dim, messenger_dim)

    def attend(self, query_source: Tensor, key_source: Tensor) -> Tensor:
        """softmax(Q K^T / sqrt(d)) V per sample; Q from `query_source`, K and V from `key_source`."""
        b, n = query_source.shape[0], self.num_tokens
        q = self.w_q(query_source).view(b, n, -1)
        k = self.w_k(key_source).view(b, n, -1)
        v = self.w_v(key_source).view(b, n, -1)
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return (weights @ v).reshape(b, -1)


class InformationReceiver(TokenCrossAttention):
    """R (injection): messenger features query the local ones, so the messenger's head reads
    local information and its fixed classifier shapes the local body."""

    def forward(self, messenger_features: Tensor, local_features: Tensor) -> Tensor:
        return self.attend(messenger_features, self.w_d(local_features))


class InformationTransmitter(TokenCrossAttention):
    """T (distillation): local features query the messenger's, so the messenger learns what the
    local model attends to without the local model's weights ever leaving the client."""

    def forward(self, messenger_features: Tensor, local_features: Tensor) -> Tensor:
        return self.attend(self.w_d(local_features), messenger_features)


class BridgedMessenger(nn.Module):
    """x -> M_h(bridge(M_b(x), L_b(x))): the messenger's prediction as a client computes it
    (through its R or T), as one module for `evaluate_model`."""

    def __init__(self, messenger: FedModel, local: FedModel, bridge: TokenCrossAttention) -> None:
        super().__init__()
        self.messenger, self.local, self.bridge = messenger, local, bridge

    def forward(self, x: Tensor) -> Tensor:
        return self.messenger.head(self.bridge(self.messenger.features(x), self.local.features(x)))


def injection_loss(local_logits: Tensor, messenger_logits: Tensor, targets: Tensor,
                   lambda_local: float, lambda_messenger: float) -> Tensor:
    """L_inj = lambda_l CE(local) + lambda_m CE(frozen messenger head through R) (spec Eq. 1-3)."""
    ce = nn.functional.cross_entropy
    return lambda_local * ce(local_logits, targets) + lambda_messenger * ce(messenger_logits, targets)


def distillation_loss(messenger_logits: Tensor, local_logits: Tensor, targets: Tensor,
                      lambda_messenger: float, lambda_con: float, tau: float) -> Tensor:
    """L_dis = lambda_m CE(messenger through T) + lambda_con KL(p_local || p_messenger) (Eq. 4-5);
    the local logits are detached here: the local model is the teacher, never a student."""
    kl = kd_loss(messenger_logits, local_logits.detach(), tau, scale_t2=False)
    return lambda_messenger * nn.functional.cross_entropy(messenger_logits, targets) + lambda_con * kl


def _parts(nets: nn.ModuleDict) -> tuple[FedModel, FedModel, TokenCrossAttention, TokenCrossAttention]:
    """(local model, messenger, receiver, transmitter) of a round's ModuleDict, typed."""
    return (cast(FedModel, nets[LOCAL_MODEL]), cast(FedModel, nets[MESSENGER]),
            cast(TokenCrossAttention, nets[RECEIVER]), cast(TokenCrossAttention, nets[TRANSMITTER]))


class MHPFLIDClient(PartialSharing):
    """The shared model is the messenger; local model, R and T live in the client state
    (`state["local-model"]`, `state["receiver"]`, `state["transmitter"]`)."""

    evaluates = "personalized"
    second_model = ("messenger via T", "messenger-accuracy")
    heterogeneous = True  # local models (and so R/T) may differ per client; the messenger is shared

    def __init__(self, cfg: FedkdConfig, settings: MHPFLIDSettings, input_shape: tuple[int, ...],
                 num_classes: int, device: torch.device) -> None:
        check_settings(cfg, settings)
        super().__init__(cfg, settings, input_shape, num_classes, device)
        self.local = PrivateModel(self.build_model, LOCAL_MODEL)
        self.receivers = PrivateModel(lambda name: self._bridge(InformationReceiver, name,
                                                                _RECEIVER_SALT), RECEIVER)
        self.transmitters = PrivateModel(lambda name: self._bridge(InformationTransmitter, name,
                                                                   _TRANSMITTER_SALT), TRANSMITTER)

    def build_model(self, name: str | None = None) -> FedModel:
        """Model `name`; by default the messenger, so PartialSharing's shared model is it."""
        return super().build_model(name or self.settings.messenger_model or None)

    def _bridge(self, kind: type[TokenCrossAttention], local_name: str, salt: int) -> nn.Module:
        """R or T for local architecture `local_name`, seeded alike on every client (global RNG
        untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.experiment.seed + salt)
            bridge = kind(feature_dim(local_name), self.model.feature_dim, self.settings.num_tokens)
        return bridge.to(self.device)

    def global_model(self, received: Arrays) -> nn.Module | None:
        """None: the messenger's head only ever sees R/T outputs, so alone it is no classifier."""
        return None

    def modules(self, received: Arrays, state: dict[str, Any], info: RoundInfo) -> nn.ModuleDict:
        """This client's four modules for a round: the received messenger, and its own local
        model, R and T (from the state; seeded initializations before its first round)."""
        return self._with_private(self.load(received, state), state, info)

    def _with_private(self, messenger: FedModel, state: dict[str, Any],
                      info: RoundInfo) -> nn.ModuleDict:
        arch = self.model_name(info.partition_id)
        return nn.ModuleDict({MESSENGER: messenger, LOCAL_MODEL: self.local.load(state, arch),
                              RECEIVER: self.receivers.load(state, arch),
                              TRANSMITTER: self.transmitters.load(state, arch)})

    def _stage_options(self, nets: nn.ModuleDict, learners: dict[str, float]) -> dict[str, Any]:
        """train_epochs keywords for a stage whose trainable modules are `learners` (name -> lr)."""
        rates = {k: lr or self.cfg.train.lr for k, lr in learners.items()}
        clip = {k: self.settings.max_grad_norm for k in learners} if self.settings.max_grad_norm else None
        trainable = [n for n, _ in nets.named_parameters() if under(n, list(learners))]
        return {"trainable": trainable, "lr": rates, "max_grad_norm": clip}

    def injection(self, nets: nn.ModuleDict, state: dict[str, Any], data: ClientData,
                  info: RoundInfo) -> dict[str, float]:
        """Injection stage: local model + R learn, the messenger is frozen (eval mode). Returns
        the local model's train CE ("loss") and accuracy."""
        s = self.settings
        local, messenger, receiver, _ = _parts(nets)

        def inject(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            messenger.eval()  # train_epochs put everything in train mode
            local_features = local.features(x)
            local_logits = local.head(local_features)
            with torch.no_grad():
                messenger_features = messenger.features(x)
            messenger_logits = messenger.head(receiver(messenger_features, local_features))
            loss = injection_loss(local_logits, messenger_logits, y, s.lambda_local_inj,
                                  s.lambda_messenger_inj)
            return loss, local_logits

        return train_epochs(nets, data, self.cfg, info.generator(), epochs=s.injection_epochs,
                            objective=inject, state=state, optimizer_key=OPT_INJECTION,
                            **self._stage_options(nets, {LOCAL_MODEL: s.local_lr, RECEIVER: s.rt_lr}))

    def distillation(self, nets: nn.ModuleDict, state: dict[str, Any], data: ClientData,
                     info: RoundInfo) -> dict[str, float]:
        """Distillation stage: messenger + T learn, the local model is frozen (eval mode). Returns
        the messenger's (through T) train CE ("loss") and accuracy."""
        s = self.settings
        local, messenger, _, transmitter = _parts(nets)

        def distill(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            local.eval()
            with torch.no_grad():
                local_features = local.features(x)
                local_logits = local.head(local_features)
            messenger_logits = messenger.head(transmitter(messenger.features(x), local_features))
            loss = distillation_loss(messenger_logits, local_logits, y, s.lambda_messenger_dis,
                                     s.lambda_con_dis, s.tau)
            return loss, messenger_logits

        # salt 1: the distillation stage's batch order differs from the injection stage's
        return train_epochs(nets, data, self.cfg, info.generator(1), epochs=s.distillation_epochs,
                            objective=distill, state=state, optimizer_key=OPT_DISTILLATION,
                            **self._stage_options(nets, {MESSENGER: s.messenger_lr,
                                                         TRANSMITTER: s.rt_lr}))

    def local_update(self, model: FedModel, state: dict[str, Any], data: ClientData,
                     info: RoundInfo, anchor: Arrays) -> dict[str, float]:
        """Injection then distillation on the messenger PartialSharing loaded (`model`); saves
        the private modules. PartialSharing then uploads the messenger only."""
        nets = self._with_private(model, state, info)
        injected = self.injection(nets, state, data, info)
        distilled = self.distillation(nets, state, data, info)
        for private in (self.local, self.receivers, self.transmitters):
            private.save(state)
        return {**injected, **{f"messenger-{k}": v for k, v in distilled.items()}}

    def inference_model(self, received: Arrays, state: dict[str, Any], partition_id: int,
                        server_round: int | None = None) -> nn.Module:
        """The local model: the headline (the messenger through T is a side metric)."""
        return self.local.load(state, self.model_name(partition_id))

    def evaluate(self, received: Arrays, state: dict[str, Any], data: ClientData,
                 info: RoundInfo) -> EvalResult:
        _, messenger, _, transmitter = _parts(self.modules(received, state, info))
        local = self.inference_model(received, state, info.partition_id, info.server_round)
        own = evaluate_model(local, data.x_test, data.y_test)
        seen = evaluate_model(BridgedMessenger(messenger, local, transmitter), data.x_test, data.y_test)
        own.metrics = {"messenger-accuracy": seen.accuracy, "messenger-loss": seen.loss}
        return own
