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

ASSUMED (spec section g; each a setting, the spec's suggested default first):
- B1 `upload`: "global_copy" (Ditto-like dual training) | "local" (no global-copy pass; the
  trained local model is uploaded instead).
- B2 `grad_stat`: "weight" (L2 norm of each output filter's weight gradient) | "activation"
  (Grad-CAM style mean_{b,h,w} |mean_hw(dL/dA_c) * A_c| on the conv output A).
- B3 `diff`: "abs" |g_g - g_l| | "global_lower" relu(g_l - g_g) | "local_lower" relu(g_g - g_l);
  `mode` "sigmoid" (alpha = sigmoid(beta * zscore(D)), beta 5) | "topk" (alpha 1 on the top rho
  fraction of channels, at least one, else 0).
- B4 `excite_on`: "weights" (interpolation once per round) | "features" (every forward pass adds
  alpha_c * A^g_c to the local conv output A^l_c; the last round's alpha is kept in the state).
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

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedkd.clients.base import (Arrays, ClientData, EvalResult, PartialSharing, PrivateModel,
                                RoundInfo, TrainResult, batches, copy_state, evaluate_model,
                                proximal_term, train_epochs)
from fedkd.config import ConfigError, FedkdConfig, setting
from fedkd.kd import kd_loss
from fedkd.models import FedModel, build_model, check_prefixes, under

# state keys (all private to the client)
LOCAL_MODEL = "local-model"  # f_l + h_l
ATTENTION = "attention"  # A
PERSONAL_HEAD = "personal-head"  # h
EXCITATION = "excitation"  # the last round's alpha per low-level conv (used by excite_on: features)
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
    excite_on: str = setting("weights", choices=("weights", "features"))  # B4 (ASSUMED)
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


# ---- pure pieces ------------------------------------------------------------------------------


class ConvLayer(NamedTuple):
    """A low-level conv layer (module name) and the BatchNorm right after it, if any."""

    conv: str
    norm: str | None


def low_level_convs(model: nn.Module, blocks: Sequence[str]) -> list[ConvLayer]:
    """The Conv2d modules under the module prefixes `blocks`, in forward-registration order, each
    paired with the BatchNorm that follows it before the next conv (matching its channel count)."""
    layers: list[ConvLayer] = []
    pending: nn.Conv2d | None = None
    pending_name = ""
    for name, module in model.named_modules():
        if not name or not under(name, blocks):
            continue
        if isinstance(module, nn.Conv2d):
            if pending is not None:
                layers.append(ConvLayer(pending_name, None))
            pending, pending_name = module, name
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and pending is not None:
            norm = name if module.num_features == pending.out_channels else None
            layers.append(ConvLayer(pending_name, norm))
            pending = None
    if pending is not None:
        layers.append(ConvLayer(pending_name, None))
    return layers


def channel_gradient_norms(model: nn.Module, convs: Sequence[str],
                           data: Iterable[tuple[Tensor, Tensor]], stat: str = "weight",
                           ) -> dict[str, Tensor]:
    """G_{l,c}: mean over batches of how strongly CE(model(x), y) pulls on output channel c of
    each conv `l` (spec c.3.2), one (C_out,) vector per conv.

    "weight": ||dCE/dW_l[c]||_2; "activation": mean_{b,h,w} |mean_hw(dCE/dA_bc) * A_bc| on the
    conv output A. The model is read, never changed: BN runs in eval mode (no running-stat
    update), gradients come from `torch.autograd.grad` on detached copies of the conv weights,
    so no `.grad` is written and a frozen model (requires_grad False) works as well.
    """
    if stat not in ("weight", "activation"):
        raise ValueError(f"unknown gradient statistic {stat!r}; expected weight or activation")
    params = dict(model.named_parameters())
    captured: dict[str, Tensor] = {}

    def capture(name: str) -> Callable[[nn.Module, Any, Tensor], Tensor]:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
            captured[name] = output
            return output.clone()  # later in-place ops (ReLU) must not touch the captured tensor
        return hook

    handles = ([model.get_submodule(n).register_forward_hook(capture(n)) for n in convs]
               if stat == "activation" else [])
    was_training = model.training
    model.eval()
    sums: dict[str, Tensor] = {}
    count = 0
    try:
        for x, y in data:
            weights = {f"{n}.weight": params[f"{n}.weight"].detach().requires_grad_(True)
                       for n in convs}
            loss = F.cross_entropy(torch.func.functional_call(model, weights, (x,)), y)
            if stat == "weight":
                grads = torch.autograd.grad(loss, list(weights.values()))
                per = [g.flatten(1).norm(dim=1) for g in grads]
            else:
                outputs = [captured[n] for n in convs]
                grads = torch.autograd.grad(loss, outputs)
                per = [(g.mean(dim=(2, 3), keepdim=True) * a.detach()).abs().mean(dim=(0, 2, 3))
                       for g, a in zip(grads, outputs)]
            for n, v in zip(convs, per):
                sums[n] = sums[n] + v if n in sums else v
            count += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("channel_gradient_norms needs at least one batch")
    return {n: v / count for n, v in sums.items()}


def normalized_differentiation(g_global: Tensor, g_local: Tensor, diff: str = "abs",
                               eps: float = 1e-8) -> Tensor:
    """D_{l,c} from one layer's channel statistics (spec c.3.3-c.3.4): each profile normalized to
    sum 1, then |g - l| ("abs"), relu(l - g) ("global_lower": the global model already fits these
    channels better) or relu(g - l) ("local_lower")."""
    gg = g_global / (g_global.sum() + eps)
    gl = g_local / (g_local.sum() + eps)
    if diff == "abs":
        return (gg - gl).abs()
    if diff == "global_lower":
        return (gl - gg).clamp(min=0)
    if diff == "local_lower":
        return (gg - gl).clamp(min=0)
    raise ValueError(f"unknown differentiation {diff!r}; expected abs, global_lower or local_lower")


def excitation_weights(d: Tensor, *, mode: str = "sigmoid", beta: float = 5.0, rho: float = 0.2,
                       eps: float = 1e-8) -> Tensor:
    """alpha_{l,c} in [0, 1] from one layer's differentiation D (spec c.3.5).

    "sigmoid": sigmoid(beta * (D - mean D) / (std D + eps)), std over channels (population; a
    constant D gives alpha = 0.5 everywhere, never NaN). "topk": 1 on the round(rho * C) channels
    with the largest D (at least one), 0 elsewhere.
    """
    if mode == "sigmoid":
        z = (d - d.mean()) / (d.std(unbiased=False) + eps)
        return torch.sigmoid(beta * z)
    if mode == "topk":
        k = min(d.numel(), max(1, round(rho * d.numel())))
        alpha = torch.zeros_like(d)
        alpha[d.topk(k).indices] = 1.0
        return alpha
    raise ValueError(f"unknown excitation mode {mode!r}; expected sigmoid or topk")


def excited_keys(layer: ConvLayer) -> list[str]:
    """The state_dict keys whose channel c the excitation moves: conv weight/bias, BN affine."""
    keys = [f"{layer.conv}.weight", f"{layer.conv}.bias"]
    if layer.norm is not None:
        keys += [f"{layer.norm}.weight", f"{layer.norm}.bias"]
    return keys


def interpolate_channels(local: Mapping[str, Tensor], global_: Mapping[str, Tensor],
                         alpha: Mapping[str, Tensor], layers: Sequence[ConvLayer]) -> Arrays:
    """W^l[c] <- (1 - alpha_c) W^l[c] + alpha_c W^g[c] on the `layers`' excited keys (spec c.4);
    every other entry is passed through untouched. `torch.lerp` is exact at alpha 0 and 1 and
    when both sides are equal (the round-1 no-op)."""
    out = dict(local)
    for layer in layers:
        a = alpha[layer.conv]
        for key in excited_keys(layer):
            if key not in local:
                continue  # a conv without bias
            w = local[key]
            weight = a.to(device=w.device, dtype=w.dtype).view(-1, *([1] * (w.dim() - 1)))
            out[key] = torch.lerp(w, global_[key].to(w), weight)
    return out


# ---- modules ----------------------------------------------------------------------------------


class CrossModelAttention(nn.Module):
    """The local feature attends to itself and to the frozen global feature (spec c.5.2):

    T = [z_l; z_g], Q = z_l W_q, K = T W_k, V = T W_v, a = softmax(Q K^T / sqrt(d_h)) per head,
    u = z_l + W_o(a V), z = LN(u + MLP(LN(u))). Width d = the backbone's feature_dim.
    """

    def __init__(self, dim: int, heads: int = 4, mlp_ratio: float = 2.0,
                 final_norm: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention heads ({heads}) must divide the feature width ({dim})")
        self.dim, self.heads = dim, heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)
        hidden = max(1, round(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm2: nn.Module = nn.LayerNorm(dim) if final_norm else nn.Identity()

    def attend(self, z_local: Tensor, z_global: Tensor | None) -> tuple[Tensor, Tensor]:
        """(fused feature (B, d), attention weights (B, heads, tokens)); `z_global` None masks the
        global token out (the block is then a function of z_l only)."""
        tokens = z_local.unsqueeze(1) if z_global is None else torch.stack((z_local, z_global), 1)
        b, t, d = tokens.shape
        dh = d // self.heads
        q = self.q(z_local).view(b, self.heads, 1, dh)
        k = self.k(tokens).view(b, t, self.heads, dh).transpose(1, 2)  # (B, h, T, dh)
        v = self.v(tokens).view(b, t, self.heads, dh).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dh), dim=-1)  # (B, h, 1, T)
        u = z_local + self.out((weights @ v).reshape(b, d))
        return self.norm2(u + self.mlp(self.norm1(u))), weights.squeeze(2)

    def forward(self, z_local: Tensor, z_global: Tensor | None) -> Tensor:
        return self.attend(z_local, z_global)[0]


def excited_features(local: FedModel, global_model: FedModel, convs: Sequence[str],
                     alpha: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """(z_l, z_g) with feature-level excitation (excite_on: features, spec B4): the local conv
    output A^l_c becomes A^l_c + alpha_c A^g_c, A^g from the frozen global model (no gradient)."""
    captured: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[[nn.Module, Any, Tensor], None]:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            captured[name] = output.detach().clone()  # before the in-place ReLU
        return hook

    def add(name: str) -> Callable[[nn.Module, Any, Tensor], Tensor]:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
            return output + alpha[name].to(output).view(1, -1, 1, 1) * captured[name]
        return hook

    handles = [global_model.get_submodule(n).register_forward_hook(keep(n)) for n in convs]
    try:
        with torch.no_grad():
            z_global = global_model.features(x)
    finally:
        for h in handles:
            h.remove()
    handles = [local.get_submodule(n).register_forward_hook(add(n)) for n in convs]
    try:
        z_local = local.features(x)
    finally:
        for h in handles:
            h.remove()
    return z_local, z_global


class PSEOutputs(NamedTuple):
    logits: Tensor  # h(A(z_l, z_g)): the personalized prediction
    local_logits: Tensor  # h_l(z_l): the auxiliary head
    global_features: Tensor | None  # z_g (no gradient), when anything needed it


class PSEModel(nn.Module):
    """The personalized predictor x -> h(A(f_l(x), f_g(x))) (spec c.7).

    Trainable parts are submodules (`local`, `head`, `attention` when on); the frozen global model
    is held outside the module tree, so `train()`, `parameters()` and the optimizer never reach it
    and it always runs in eval mode under no_grad.
    """

    def __init__(self, local: FedModel, head: nn.Module, global_model: FedModel,
                 attention: CrossModelAttention | None = None,
                 feature_alpha: Mapping[str, Tensor] | None = None,
                 needs_global: bool = False) -> None:
        super().__init__()
        self.local, self.head = local, head
        self.attention: CrossModelAttention | None = attention
        self._frozen = (global_model,)  # a tuple: not registered as a submodule
        self.feature_alpha = dict(feature_alpha) if feature_alpha else None
        self.needs_global = needs_global or attention is not None or self.feature_alpha is not None

    @property
    def global_model(self) -> FedModel:
        return self._frozen[0]

    def parts(self, x: Tensor) -> PSEOutputs:
        z_global: Tensor | None = None
        if self.feature_alpha is not None:
            z_local, z_global = excited_features(self.local, self.global_model,
                                                 list(self.feature_alpha), self.feature_alpha, x)
        else:
            if self.needs_global:
                with torch.no_grad():
                    z_global = self.global_model.features(x)
            z_local = self.local.features(x)
        fused = z_local if self.attention is None else self.attention(z_local, z_global)
        return PSEOutputs(self.head(fused), self.local.head(z_local), z_global)

    def forward(self, x: Tensor) -> Tensor:
        return self.parts(x).logits


class PSEPredictor(nn.Module):
    """A PSEModel with everything it reads in its own state_dict: the frozen global model
    (registered here, as `global_model`) and, with feature-level excitation (`convs` given), the
    excitation weights as buffers (zeros, i.e. no excitation, for a client that never trained)."""

    def __init__(self, fused: PSEModel, convs: Sequence[str] | None = None) -> None:
        super().__init__()
        self.fused = fused
        self.global_model = fused.global_model
        if convs is not None:
            given = fused.feature_alpha or {}
            alpha = {}
            for i, conv in enumerate(convs):
                channels = fused.local.get_submodule(conv).out_channels
                a = given[conv].detach().clone() if conv in given else torch.zeros(channels)
                self.register_buffer(f"excitation_{i}", a)
                alpha[conv] = getattr(self, f"excitation_{i}")
            fused.feature_alpha, fused.needs_global = alpha, True

    def forward(self, x: Tensor) -> Tensor:
        return self.fused(x)


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

    def personalized_model(self, local: FedModel, snapshot: FedModel,
                           state: dict[str, Any]) -> PSEModel:
        """PSEModel over `local`, the snapshot and this client's A and h (from the state)."""
        s: PSESettings = self.settings
        self.personal_head.load_state_dict(state.get(PERSONAL_HEAD)
                                           or self._init_private[PERSONAL_HEAD])
        if self.attention is not None:
            self.attention.load_state_dict(state.get(ATTENTION) or self._init_private[ATTENTION])
        alpha = (state.get(EXCITATION) if s.excitation and s.excite_on == "features" else None)
        return PSEModel(local, self.personal_head, snapshot, self.attention, alpha,
                        needs_global=s.lambda_kd > 0)

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
                    mode=s.mode, beta=s.beta, rho=s.rho, eps=s.eps).detach()
                for n in convs}

    def excite(self, local: FedModel, snapshot: FedModel, alpha: Mapping[str, Tensor]) -> None:
        """Weight-level excitation of `local` in place (spec c.4)."""
        with torch.no_grad():
            local.load_state_dict(interpolate_channels(local.state_dict(), snapshot.state_dict(),
                                                       alpha, self.layers))

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
        local = self.load_local(state, snapshot)
        metrics: dict[str, float] = {}
        if s.excitation:
            alpha = self.excitation(local, snapshot, data, info)
            state[EXCITATION] = {n: a.cpu() for n, a in alpha.items()}
            if s.excite_on == "weights":
                self.excite(local, snapshot, alpha)
            metrics["excitation-mean"] = float(torch.cat(list(alpha.values())).mean())
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
        features = s.excitation and s.excite_on == "features"
        return PSEPredictor(self.personalized_model(local, globals_[chosen], state),
                            [layer.conv for layer in self.layers] if features else None)

    def evaluate(self, received: Arrays, state: dict[str, Any], data: ClientData,
                 info: RoundInfo) -> EvalResult:
        """The fused personalized model on the test split, reading the global model that
        `eval_global` names; the received global model alone and the fused model with the other
        global model beside it."""
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
        return own
