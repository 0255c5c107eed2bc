"""PSE's personalized predictor (spec `../shared/specs/pse.md` c.5, c.7, d): the cross-model
attention block that lets the local feature attend to the frozen global one, and the modules that
put local backbone, attention, personal head and frozen global model together for training
(`PSEModel`) and for inference with everything in one state_dict (`PSEPredictor`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fedkd.clients.pse_excitation import channel_gates, excited_features
from fedkd.models import FedModel

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


class PSEOutputs(NamedTuple):
    logits: Tensor  # h(A(z_l, z_g)): the personalized prediction
    local_logits: Tensor  # h_l(z_l): the auxiliary head
    global_features: Tensor | None  # z_g (no gradient), when anything needed it


class PSEModel(nn.Module):
    """The personalized predictor x -> h(A(f_l(x), f_g(x))) (spec c.7).

    Trainable parts are submodules (`local`, `head`, `attention` when on); the frozen global model
    is held outside the module tree, so `train()`, `parameters()` and the optimizer never reach it
    and it always runs in eval mode under no_grad. Excitation at every forward, when given:
    `feature_alpha` (conv name -> alpha, excite_on: features) adds alpha_c A^g_c to the local conv
    outputs; `gate_alpha` (gated module name -> alpha, excite_on: gate) multiplies the local
    module outputs by (1 + alpha_c).
    """

    def __init__(self, local: FedModel, head: nn.Module, global_model: FedModel,
                 attention: CrossModelAttention | None = None,
                 feature_alpha: Mapping[str, Tensor] | None = None,
                 needs_global: bool = False,
                 gate_alpha: Mapping[str, Tensor] | None = None) -> None:
        super().__init__()
        self.local, self.head = local, head
        self.attention: CrossModelAttention | None = attention
        self._frozen = (global_model,)  # a tuple: not registered as a submodule
        self.feature_alpha = dict(feature_alpha) if feature_alpha else None
        self.gate_alpha = dict(gate_alpha) if gate_alpha else None
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
            with channel_gates(self.local, self.gate_alpha or {}):
                z_local = self.local.features(x)
        fused = z_local if self.attention is None else self.attention(z_local, z_global)
        return PSEOutputs(self.head(fused), self.local.head(z_local), z_global)

    def forward(self, x: Tensor) -> Tensor:
        return self.parts(x).logits


class PSEPredictor(nn.Module):
    """A PSEModel with everything it reads in its own state_dict: the frozen global model
    (registered here, as `global_model`) and, with excitation at every forward (`excited`: the
    module names alpha acts on; `on`: "features" or "gate"), the excitation weights as buffers
    (zeros, i.e. no excitation, for a client that never trained)."""

    def __init__(self, fused: PSEModel, excited: Sequence[str] | None = None,
                 on: str = "features") -> None:
        super().__init__()
        if on not in ("features", "gate"):
            raise ValueError(f"unknown per-forward excitation {on!r}; expected features or gate")
        self.fused = fused
        self.global_model = fused.global_model
        if excited is not None:
            given = (fused.feature_alpha if on == "features" else fused.gate_alpha) or {}
            alpha = {}
            for i, name in enumerate(excited):
                module = fused.local.get_submodule(name)
                channels = getattr(module, "out_channels", None) or module.num_features
                a = given[name].detach().clone() if name in given else torch.zeros(channels)
                self.register_buffer(f"excitation_{i}", a)
                alpha[name] = getattr(self, f"excitation_{i}")
            if on == "features":
                fused.feature_alpha, fused.needs_global = alpha, True
            else:
                fused.gate_alpha = alpha

    def forward(self, x: Tensor) -> Tensor:
        return self.fused(x)
