"""PSE, Personalized Semantics Excitation (Xia, Li, Ding, ICCV 2023), as `../shared/specs/pse.md`.

Only the paper's abstract was retrievable, so everything below the abstract's facts is the spec's
reconstruction (its section c); choices marked ASSUMED are settings (`PSESettings`). Every client
keeps two networks of the run's architecture:

- the **global copy** (shared, averaged by the server's strategy): trained `global_epochs` with
  plain CE on the local data (spec c.2, FedAvg's local update) and uploaded (`upload: global_copy`);
- the **local model** (private: backbone f_l + auxiliary head h_l) plus the **cross-model
  attention** A and the **personalized classifier** h, all kept in the client state.

Per round (spec c.1-c.6): keep a frozen snapshot g of the received global model; train and upload
the global copy; measure per-output-channel gradient magnitudes of CE on both g and the local model
in the low-level conv layers (`channel_gradient_norms`, no update, BN in eval mode), turn their
per-layer-normalized difference into excitation weights alpha (`normalized_differentiation`,
`excitation_weights`) and pull the local model's low-level channels toward g by alpha
(`interpolate_channels`: conv weight/bias and the following BN's affine parameters); then train
{f_l, h_l, A, h} for `local_epochs` on CE(h(A(f_l(x), g_f(x))), y) + lambda_aux CE(h_l(f_l(x)), y)
[+ lambda_kd kd_loss(student, g(x), tau)], g frozen. In round 1 the local model starts as a copy of
g (spec c.4), which makes the excitation a no-op. Clients evaluate the personalized fused model
`PSEModel` (it needs a global model too); the global model's accuracy is logged beside it
("global-accuracy").

The pure excitation pieces live in `fedkd.clients.pse_excitation`, the attention block and the
fused predictor in `fedkd.clients.pse_attention`; this module holds the settings and the client.

ASSUMED (spec section g; each a setting, the spec's suggested default first):
- B1 `upload`: "global_copy" (Ditto-like dual training) | "local" (no global-copy pass; the
  trained local model is uploaded instead).
- B2 `grad_stat`: "weight" (L2 norm of each output filter's weight gradient) | "activation"
  (Grad-CAM style mean_{b,h,w} |mean_hw(dL/dA_c) * A_c| on the conv output A).
- B3 `diff`: "abs" |g_g - g_l| | "global_lower" relu(g_l - g_g) | "local_lower" relu(g_g - g_l);
  `mode` "sigmoid" (alpha = alpha_max * sigmoid(beta * zscore(D)), beta 5) | "topk" (alpha_max on
  the top rho fraction of channels, at least one, else 0).
- (v2, c.3.6) `alpha_max` in (0, 1] bounds alpha. The method config keeps 1.0, v1 exactly (spec
  k: "the method config keeps its v1 values"); the v2 tables pass `method.alpha_max=0.2` (and
  rho 0.1 in topk runs).
- B4 `excite_on`: "weights" (interpolation once per round) | "features" (every forward pass adds
  alpha_c * A^g_c to the local conv output A^l_c) | (v2) "gate" (every forward pass of the local
  backbone multiplies the output of each low-level conv, after its BN when it has one and before
  the ReLU, by 1 + alpha_c; no local weight moves). For features and gate this round's alpha is
  kept in the state; the gradient statistics (c.3) read the local model without it, in both.
  The spec's round-1 rule is literal here: alpha of the round-1 statistics (local = snapshot, so
  D = 0 and alpha = alpha_max / 2 everywhere in sigmoid mode) acts from round 1 on.
- (v2, c.4b) `log_excitation` (default true, logging only): on every round in which the client
  already had a local model (round 2 on when all clients train every round) and excitation is on,
  the fused model h(A(f_l, g_f)) and the local head h_l(f_l) are scored on the test split right
  before and right after step c.4, with the round-start snapshot: train metrics
  "pre-excitation-accuracy", "post-excitation-accuracy", "pre-excitation-local-accuracy",
  "post-excitation-local-accuracy", plus "alpha-mean-<conv>" per low-level conv. The four
  accuracies of the round a client trained are repeated in its evaluation metrics of that round,
  where the report's per-method extras read them; summary.json adds "post_minus_pre_excitation_
  accuracy" (and _local_), the mean over clients and rounds the v2 tables report. The passes use no
  RNG and change no parameter or BN statistic, so a run is bit-identical with the diagnostic off.
- B5 `low_level`: [] = the model's `low_level_blocks` (CNN: conv1+conv2; ResNets: stem+layer1);
  FC layers are never excited. The conv layers and their BN are found by module type.
- B6 tokens: the two pooled feature vectors (the spec's "spatial" token variant is not
  implemented: FedModel exposes no spatial feature map).
- Attention block: no LN before the attention (the spec's formula), GELU MLP, dropout 0, no bias
  on the Q/K/V projections; `attention_lr` 0.001 (spec e; 0 = train.lr). `final_norm` true is the
  spec's output LN: h then sees features of norm sqrt(d), so plain SGD on h diverges from lr ~0.05
  (or lr 0.01 with momentum 0.9) on; `final_norm: false` (z = u + MLP(LN(u)), z_l's scale) is
  stable there but learns slower at the protocol's lr 0.005.
- `eval_global`: which frozen global model the fused model reads at evaluation. "received" (spec
  c.7: the latest received, i.e. this round's aggregate, which the personalized parts never trained
  with) | "round_start" (spec c.6's metric: the snapshot the personalized parts were trained
  against this round, kept in the client state). The other one's accuracy is logged beside the
  headline ("fused-with-round_start-accuracy" / "fused-with-received-accuracy"), so one run shows
  how much the fused model suffers from the global model moving under it.
- Ablations: `excitation: false` skips steps c.3-c.4 ("attention only"); `attention: false`
  replaces A by the identity, h classifies z_l ("excitation only"; h_l's auxiliary loss stays).
- A client evaluated before it ever trained uses a copy of the received global model as its local
  model and the seeded initial A and h (like Ditto's untrained personal model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedkd.clients.base import (Arrays, ClientData, EvalResult, PartialSharing, PrivateModel,
                                RoundInfo, TrainResult, batches, copy_state, evaluate_model,
                                proximal_term, train_epochs)
from fedkd.clients.pse_attention import CrossModelAttention, PSEModel, PSEPredictor
from fedkd.clients.pse_excitation import (ConvLayer, channel_gradient_norms, excitation_weights,
                                          gate_module, interpolate_channels, low_level_convs,
                                          normalized_differentiation)
from fedkd.config import ConfigError, FedkdConfig, setting
from fedkd.kd import kd_loss
from fedkd.models import FedModel, build_model, check_prefixes

# state keys (all private to the client)
LOCAL_MODEL = "local-model"  # f_l + h_l
ATTENTION = "attention"  # A
PERSONAL_HEAD = "personal-head"  # h
EXCITATION = "excitation"  # the last round's alpha per conv (read by excite_on: features, gate)
DIAGNOSTIC = "excitation-diagnostic"  # the last trained round's pre/post-excitation accuracies
ROUND_START_GLOBAL = "round-start-global"  # the snapshot the personalized parts last trained with
PERSONAL_OPTIMIZER = "optimizer-personal"


@dataclass
class PSESettings:
    name: str = "pse"
    # ablations
    excitation: bool = True  # False: "attention only" (no gradient differentiation / excitation)
    attention: bool = True  # False: "excitation only" (A = identity, h classifies z_l)
    # channel-wise gradient differentiation and excitation (spec c.3-c.4)
    beta: float = setting(5.0, gt=0.0)  # sigmoid sharpness (ASSUMED)
    mode: str = setting("sigmoid", choices=("sigmoid", "topk"))  # soft weights or hard top-rho
    rho: float = setting(0.2, gt=0.0, max=1.0)  # topk: fraction of channels excited (ASSUMED)
    diff: str = setting("abs", choices=("abs", "global_lower", "local_lower"))  # B3 (ASSUMED)
    grad_stat: str = setting("weight", choices=("weight", "activation"))  # B2 (ASSUMED)
    excite_on: str = setting("weights", choices=("weights", "features", "gate"))  # B4 (ASSUMED)
    alpha_max: float = setting(1.0, gt=0.0, max=1.0)  # (v2) bound on alpha; 1 = v1 (ASSUMED)
    log_excitation: bool = True  # (v2) pre/post-excitation accuracies (logging only, c.4b)
    low_level: list[str] = field(default_factory=list)  # module prefixes; [] = low_level_blocks
    grad_batches: int = setting(0, min=0)  # N_s batches for the statistics; 0 = all
    eps: float = setting(1e-8, gt=0.0)  # guards the normalization and the z-score
    # cross-model attention (spec c.5.2, d)
    heads: int = setting(4, min=1)  # must divide the model's feature_dim
    mlp_ratio: float = setting(2.0, gt=0.0)
    final_norm: bool = True  # spec: z = LN(u + MLP(LN(u))); false: z = u + MLP(LN(u)) (ASSUMED)
    attention_lr: float = setting(0.001, min=0.0)  # lr of A (ASSUMED, spec e); 0 = train.lr
    # personalized loss (spec c.5.4)
    lambda_aux: float = setting(0.5, min=0.0)  # CE of the local head h_l on z_l
    lambda_kd: float = setting(0.0, min=0.0)  # KD from the frozen global model (off by default)
    tau: float = setting(2.0, gt=0.0)  # KD temperature
    # schedule
    local_epochs: int = setting(1, min=0)  # E_l: personalized phase
    global_epochs: int = setting(1, min=0)  # E_g: global-copy phase
    upload: str = setting("global_copy", choices=("global_copy", "local"))  # B1 (ASSUMED)
    # evaluation: the global model the fused model reads (c.7 "received" vs c.6 "round_start")
    eval_global: str = setting("received", choices=("received", "round_start"))  # (ASSUMED)


# ---- settings checks ------------------------------------------------------------------------


def _check_model(model: FedModel, settings: PSESettings, model_name: str) -> list[ConvLayer]:
    """The excited conv layers of `model`; a ConfigError when the settings cannot work on it."""
    blocks = list(settings.low_level) or list(model.low_level_blocks)
    layers = low_level_convs(model, blocks)
    if settings.excitation and not layers:
        raise ConfigError("model.name", model_name,
                          f"pse excites low-level conv layers and finds none under {blocks}; use a "
                          f"conv model (cnn, cnn_bn, resnet8, resnet10), set method.low_level, or "
                          f"method.excitation=false")
    if settings.attention and model.feature_dim % settings.heads:
        raise ConfigError("method.heads", settings.heads,
                          f"must divide the model's feature width {model.feature_dim}")
    return layers


def check_settings(cfg: FedkdConfig, settings: PSESettings) -> None:
    """Cross-section checks (usable as `MethodSpec.check`): `low_level` names modules of the
    model and holds conv layers (when excitation is on), `heads` divides the feature width, one
    architecture for all (the interpolation is channel by channel)."""
    if cfg.model.per_client:
        raise ConfigError("model.per_client", list(cfg.model.per_client),
                          "pse interpolates the local model toward the global one channel by "
                          "channel, so both use model.name")
    if settings.low_level:
        check_prefixes("method.low_level", list(settings.low_level), cfg.model.name)
    _check_model(build_model(cfg.model.name, (3, 32, 32), 10, 0), settings, cfg.model.name)


# ---- the client -------------------------------------------------------------------------------


class PSEClient(PartialSharing):
    """The shared model is the global copy (everything shared); the local model, A and h live in
    the client state (`local-model`, `attention`, `personal-head`, `excitation`)."""

    evaluates = "personalized"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s: PSESettings = self.settings
        self.layers = _check_model(self.model, s, self.cfg.model.name)
        self.snapshot: FedModel = self.build_model().eval().requires_grad_(False)
        self.round_start: FedModel = self.build_model().eval().requires_grad_(False)
        self.local = PrivateModel(self.build_model, LOCAL_MODEL)
        dim = self.model.feature_dim
        with torch.random.fork_rng(devices=[]):  # same A and h init on every client, RNG untouched
            torch.manual_seed(self.cfg.experiment.seed + 1)
            self.personal_head = nn.Linear(dim, self.num_classes).to(self.device)
            self.attention = (CrossModelAttention(dim, s.heads, s.mlp_ratio, s.final_norm)
                              .to(self.device) if s.attention else None)
        self._init_private = {PERSONAL_HEAD: copy_state(self.personal_head)}
        if self.attention is not None:
            self._init_private[ATTENTION] = copy_state(self.attention)

    # -- loading

    def load_snapshot(self, received: Arrays) -> FedModel:
        """The frozen global model of this round: exactly the received weights, eval mode."""
        self.snapshot.load_state_dict({**self._init_state, **received})
        return self.snapshot.eval()

    def load_local(self, state: dict[str, Any], snapshot: FedModel) -> FedModel:
        """The local model from the state; before its first round, a copy of the snapshot (c.4)."""
        first = LOCAL_MODEL not in state
        local = self.local.load(state, self.cfg.model.name)
        if first:
            local.load_state_dict(snapshot.state_dict())
        return local

    def personalized_model(self, local: FedModel, snapshot: FedModel, state: dict[str, Any],
                           alpha: Mapping[str, Tensor] | None = None) -> PSEModel:
        """PSEModel over `local`, the snapshot and this client's A and h (from the state); with
        excite_on features or gate, alpha per conv (default: the state's, the last round's)
        acts at every forward."""
        s: PSESettings = self.settings
        self.personal_head.load_state_dict(state.get(PERSONAL_HEAD)
                                           or self._init_private[PERSONAL_HEAD])
        if self.attention is not None:
            self.attention.load_state_dict(state.get(ATTENTION) or self._init_private[ATTENTION])
        alpha = (alpha if alpha is not None else state.get(EXCITATION)) if s.excitation else None
        features = alpha if s.excite_on == "features" else None
        gates = ({gate_module(layer): alpha[layer.conv] for layer in self.layers
                  if layer.conv in alpha} if alpha and s.excite_on == "gate" else None)
        return PSEModel(local, self.personal_head, snapshot, self.attention, features,
                        needs_global=s.lambda_kd > 0, gate_alpha=gates)

    # -- excitation (spec c.3-c.4)

    def statistics_batches(self, data: ClientData,
                           info: RoundInfo) -> list[tuple[Tensor, Tensor]]:
        """The N_s batches of the gradient statistics (own seed salt: training order unchanged)."""
        out: list[tuple[Tensor, Tensor]] = []
        for idx in batches(len(data.y_train), self.cfg.train.batch_size, info.generator(2)):
            out.append((data.x_train[idx], data.y_train[idx]))
            if self.settings.grad_batches and len(out) >= self.settings.grad_batches:
                break
        return out

    def excitation(self, local: FedModel, snapshot: FedModel, data: ClientData,
                   info: RoundInfo) -> dict[str, Tensor]:
        """alpha per low-level conv, from the two models' channel-gradient profiles."""
        s: PSESettings = self.settings
        convs = [layer.conv for layer in self.layers]
        stats = self.statistics_batches(data, info)
        g_global = channel_gradient_norms(snapshot, convs, stats, s.grad_stat)
        g_local = channel_gradient_norms(local, convs, stats, s.grad_stat)
        return {n: excitation_weights(
                    normalized_differentiation(g_global[n], g_local[n], s.diff, s.eps),
                    mode=s.mode, beta=s.beta, rho=s.rho, eps=s.eps, alpha_max=s.alpha_max).detach()
                for n in convs}

    def excite(self, local: FedModel, snapshot: FedModel, alpha: Mapping[str, Tensor]) -> None:
        """Weight-level excitation of `local` in place (spec c.4)."""
        with torch.no_grad():
            local.load_state_dict(interpolate_channels(local.state_dict(), snapshot.state_dict(),
                                                       alpha, self.layers))

    @torch.no_grad()
    def excitation_diagnostic(self, local: FedModel, snapshot: FedModel, state: dict[str, Any],
                              data: ClientData, alpha: Mapping[str, Tensor] | None = None
                              ) -> tuple[float, float]:
        """(fused accuracy h(A(f_l, g_f)), local-head accuracy h_l(f_l)) on the test split, both
        read from one pass of each backbone (spec c.4b). Logging only: eval mode, no RNG, no
        parameter or BN statistic changes, the test split never feeds a choice."""
        model = self.personalized_model(local, snapshot, state, alpha).eval()
        fused = own = 0
        for start in range(0, len(data.y_test), 1000):
            out = model.parts(data.x_test[start:start + 1000])
            y = data.y_test[start:start + 1000]
            fused += int((out.logits.argmax(1) == y).sum())
            own += int((out.local_logits.argmax(1) == y).sum())
        n = max(len(data.y_test), 1)
        return fused / n, own / n

    # -- the method

    def local_update(self, model: FedModel, state: dict[str, Any], data: ClientData,
                     info: RoundInfo, anchor: Arrays) -> dict[str, float]:
        """The global copy: `global_epochs` of plain CE, FedAvg's update (spec c.2)."""
        prox = proximal_term(model, anchor, self.proximal_mu(info))
        return train_epochs(model, data, self.cfg, info.generator(),
                            epochs=self.settings.global_epochs, regularizers=(prox,), state=state)

    def personalize(self, snapshot: FedModel, state: dict[str, Any], data: ClientData,
                    info: RoundInfo) -> dict[str, float]:
        """Excitation, then `local_epochs` on {f_l, h_l, A, h} with the snapshot frozen (c.3-c.5);
        the private parts go back into the state."""
        s: PSESettings = self.settings
        diagnose = s.excitation and s.log_excitation and LOCAL_MODEL in state  # c.4b: round 2 on
        local = self.load_local(state, snapshot)
        metrics: dict[str, float] = {}
        if s.excitation:
            alpha = self.excitation(local, snapshot, data, info)
            if diagnose:  # the models as the previous round left them (and its alpha)
                pre = self.excitation_diagnostic(local, snapshot, state, data)
            state[EXCITATION] = {n: a.cpu() for n, a in alpha.items()}
            if s.excite_on == "weights":
                self.excite(local, snapshot, alpha)
            if diagnose:
                post = self.excitation_diagnostic(local, snapshot, state, data, alpha)
                diagnostic = {"pre-excitation-accuracy": pre[0], "post-excitation-accuracy": post[0],
                              "pre-excitation-local-accuracy": pre[1],
                              "post-excitation-local-accuracy": post[1]}
                metrics.update(diagnostic)
                state[DIAGNOSTIC] = {"round": info.server_round, **diagnostic}
            metrics["excitation-mean"] = float(torch.cat(list(alpha.values())).mean())
            if s.log_excitation:
                metrics.update({f"alpha-mean-{n}": float(a.mean()) for n, a in alpha.items()})
        model = self.personalized_model(local, snapshot, state)

        def objective(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            out = model.parts(x)
            loss = F.cross_entropy(out.logits, y)
            if s.lambda_aux > 0:
                loss = loss + s.lambda_aux * F.cross_entropy(out.local_logits, y)
            if s.lambda_kd > 0:
                assert out.global_features is not None
                with torch.no_grad():
                    teacher = snapshot.head(out.global_features)
                loss = loss + s.lambda_kd * kd_loss(out.logits, teacher, s.tau)
            return loss, out.logits

        own_lr = self.attention is not None and s.attention_lr > 0
        lr = {"attention": s.attention_lr} if own_lr else None
        trained = train_epochs(model, data, self.cfg, info.generator(1), epochs=s.local_epochs,
                               objective=objective, lr=lr, state=state,
                               optimizer_key=PERSONAL_OPTIMIZER)
        self.local.save(state)
        state[ROUND_START_GLOBAL] = copy_state(snapshot)
        state[PERSONAL_HEAD] = copy_state(self.personal_head)
        if self.attention is not None:
            state[ATTENTION] = copy_state(self.attention)
        metrics.update({f"personal-{k}": v for k, v in trained.items()})
        return metrics

    def train(self, received: Arrays, state: dict[str, Any], data: ClientData,
              info: RoundInfo) -> TrainResult:
        """Global-copy pass (uploaded), then excitation and the personalized pass (kept)."""
        s: PSESettings = self.settings
        snapshot = self.load_snapshot(received)
        if s.upload == "global_copy":
            result = super().train(received, state, data, info)  # global copy: trained, uploaded
            result.metrics.update(self.personalize(snapshot, state, data, info))
            return result
        metrics = self.personalize(snapshot, state, data, info)
        local = {k: v.detach().clone() for k, v in state[LOCAL_MODEL].items()}
        metrics.update({"loss": metrics["personal-loss"], "accuracy": metrics["personal-accuracy"]})
        return TrainResult({k: local[k] for k in self.shared_keys}, metrics, len(data.y_train),
                           self.aggregation_weight(len(data.y_train)))

    def eval_globals(self, snapshot: FedModel, state: dict[str, Any]
                     ) -> tuple[dict[str, FedModel], str]:
        """The global models the fused model can read at evaluation ("received": `snapshot`;
        "round_start" once trained) and the one `eval_global` names."""
        globals_ = {"received": snapshot}
        if ROUND_START_GLOBAL in state:  # trained at least once
            self.round_start.load_state_dict(state[ROUND_START_GLOBAL])
            globals_["round_start"] = self.round_start
        chosen = self.settings.eval_global if self.settings.eval_global in globals_ else "received"
        return globals_, chosen

    def inference_model(self, received: Arrays, state: dict[str, Any], partition_id: int,
                        server_round: int | None = None) -> nn.Module:
        """The fused personalized model evaluate scores: local model, A and h over the global
        model `eval_global` names, all in one PSEPredictor."""
        s: PSESettings = self.settings
        snapshot = self.load_snapshot(received)
        local = self.load_local(state, snapshot)
        globals_, chosen = self.eval_globals(snapshot, state)
        model = self.personalized_model(local, globals_[chosen], state)
        if not s.excitation or s.excite_on == "weights":
            return PSEPredictor(model)
        excited = [layer.conv if s.excite_on == "features" else gate_module(layer)
                   for layer in self.layers]
        return PSEPredictor(model, excited, s.excite_on)

    def evaluate(self, received: Arrays, state: dict[str, Any], data: ClientData,
                 info: RoundInfo) -> EvalResult:
        """The fused personalized model on the test split, reading the global model that
        `eval_global` names; the received global model alone and the fused model with the other
        global model beside it; the pre/post-excitation accuracies of this round's training."""
        own = evaluate_model(self.inference_model(received, state, info.partition_id,
                                                  info.server_round), data.x_test, data.y_test)
        snapshot = self.load_snapshot(received)
        local = self.load_local(state, snapshot)
        globals_, chosen = self.eval_globals(snapshot, state)
        fused = {name: evaluate_model(self.personalized_model(local, model, state),
                                      data.x_test, data.y_test)
                 for name, model in globals_.items() if name != chosen}
        shared = evaluate_model(snapshot, data.x_test, data.y_test)
        own.metrics = {"global-accuracy": shared.accuracy, "global-loss": shared.loss,
                       **{f"fused-with-{name}-accuracy": r.accuracy for name, r in fused.items()}}
        diagnostic = state.get(DIAGNOSTIC) or {}
        if diagnostic.get("round") == info.server_round:
            own.metrics.update({k: v for k, v in diagnostic.items() if k != "round"})
        return own
