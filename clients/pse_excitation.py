"""PSE's excitation (spec `../shared/specs/pse.md` c.3-c.4, B2-B5): which conv layers are
"low-level", how strongly CE pulls on each of their output channels in the global and the local
model, the excitation weights alpha from the two profiles, and the three ways alpha acts on the
local model (weight interpolation once per round, feature-level addition or a multiplicative
channel gate at every forward).

Pure functions over modules and tensors, no client state: `fedkd.clients.pse` composes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedkd.clients.base import Arrays
from fedkd.models import FedModel, under

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
                       eps: float = 1e-8, alpha_max: float = 1.0) -> Tensor:
    """alpha_{l,c} in [0, alpha_max] from one layer's differentiation D (spec c.3.5-c.3.6).

    "sigmoid": alpha_max * sigmoid(beta * (D - mean D) / (std D + eps)), std over channels
    (population; a constant D gives alpha = alpha_max / 2 everywhere, never NaN). "topk":
    alpha_max on the round(rho * C) channels with the largest D (at least one), 0 elsewhere.
    `alpha_max` bounds how far a channel moves, because the z-score removes D's scale (v1's mean
    alpha was ~0.4 whatever the two models' disagreement); 1 is v1 exactly (x * 1.0 is exact).
    """
    if not 0.0 < alpha_max <= 1.0:
        raise ValueError(f"alpha_max must lie in (0, 1], got {alpha_max}")
    if mode == "sigmoid":
        z = (d - d.mean()) / (d.std(unbiased=False) + eps)
        return alpha_max * torch.sigmoid(beta * z)
    if mode == "topk":
        k = min(d.numel(), max(1, round(rho * d.numel())))
        alpha = torch.zeros_like(d)
        alpha[d.topk(k).indices] = alpha_max
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


def gate_module(layer: ConvLayer) -> str:
    """The module whose output `excite_on: gate` scales: the BatchNorm after the conv when there
    is one (a gain on the conv output would be normalised away by it), else the conv; either
    way before the ReLU (spec c.4, v2)."""
    return layer.norm or layer.conv


@contextmanager
def channel_gates(model: nn.Module, alpha: Mapping[str, Tensor]) -> Iterator[None]:
    """While active, the output of each module `name` of `model` in `alpha` is multiplied
    channel-wise by (1 + alpha[name]) (excite_on: gate, spec c.4 v2): the global model only
    chooses which channels to emphasise, and no local weight moves. alpha 0 is the plain
    forward exactly (x * 1.0)."""
    def scale(name: str) -> Callable[[nn.Module, Any, Tensor], Tensor]:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
            gain = 1.0 + alpha[name].to(output)
            return output * gain.view(1, -1, *([1] * (output.dim() - 2)))
        return hook

    handles = [model.get_submodule(n).register_forward_hook(scale(n)) for n in alpha]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
