"""Model zoo: every model is `features` (input -> flat vector) + `head` (vector -> logits).

The split is what personalized / KD methods work with: FedPer/FedRep/LG-FedAvg share or
keep the head, FedProto/FedDistill use the feature vector, and `low_level_blocks` names
the early conv blocks for methods that share only low-level layers.
Init is seeded locally so every client and the server build bit-identical models
without touching the global torch RNG.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn

from fedkd.config import ConfigError, suggest

MODELS: dict[str, str] = {
    "cnn": "PFLlib FedAvgCNN: 2x(conv5x5+pool) -> fc 512 -> head (582,026 params on MNIST)",
    "cnn_bn": "the CNN with BatchNorm after each conv (for FedBN; FedBN on the plain CNN is FedAvg)",
    "cnn_narrow": "the CNN at half width: 2x(conv5x5 16/32 + pool) -> fc 256 -> head (147,146 params)",
    "mlp": "FedAvg 2NN: flatten -> 200 -> 200 -> head",
    "resnet8": "CIFAR-style ResNet-8: BasicBlocks, widths 16/32/64, BatchNorm, global avg pool",
    "resnet10": "ResNet-10: ResNet-18 layout with 1 BasicBlock/stage, widths 64-512, BatchNorm",
}


class FedModel(nn.Module):
    """Every model = feature extractor + head, so personalized methods can share or keep either part."""

    def __init__(
        self,
        features: nn.Module,
        head: nn.Module,
        feature_dim: int,
        low_level_blocks: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.feature_dim = feature_dim
        self.low_level_blocks = low_level_blocks

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def head_keys(self) -> list[str]:
        """state_dict keys of the head (buffers included), in state_dict order."""
        return [k for k in self.state_dict() if k.startswith("head.")]


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ConfigError(
            "model.name", name, f"needs a CxHxW image input, got input_shape={tuple(input_shape)}"
        )
    c, h, w = input_shape
    return c, h, w


def _cnn_out(size: int, pad: int) -> int:
    """Spatial size after two (conv5x5 with `pad`, maxpool 2) stages; <= 0 if it collapses."""
    for _ in range(2):
        size = size + 2 * pad - 4
        if size < 2:
            return 0
        size //= 2
    return size


def _cnn(name: str, input_shape: tuple[int, ...], num_classes: int) -> FedModel:
    """FedAvgCNN (`cnn_bn`: BatchNorm after each conv, before ReLU, as in FedBN's CNN;
    `cnn_narrow`: half the channels, 16/32, and fc 256, a small client or messenger).
    Inputs too small for unpadded 5x5 convs (e.g. 8x8) get padding=2 ('same') so the net
    still runs; 28x28 and 32x32 keep PFLlib's exact unpadded layout."""
    c, h, w = _image_shape(name, input_shape)
    pad = 0 if min(_cnn_out(h, 0), _cnn_out(w, 0)) >= 1 else 2
    oh, ow = _cnn_out(h, pad), _cnn_out(w, pad)
    if min(oh, ow) < 1:
        raise ConfigError(
            "model.name", name, f"input {h}x{w} too small for the CNN (needs at least 4x4)"
        )
    c1, c2, fc = (16, 32, 256) if name == "cnn_narrow" else (32, 64, 512)
    dim = c2 * oh * ow

    def conv(cin: int, cout: int) -> nn.Sequential:
        norm = [nn.BatchNorm2d(cout)] if name == "cnn_bn" else []
        return nn.Sequential(nn.Conv2d(cin, cout, 5, padding=pad), *norm, nn.ReLU(inplace=True),
                             nn.MaxPool2d(2))

    features = nn.Sequential(
        OrderedDict(
            conv1=conv(c, c1),
            conv2=conv(c1, c2),
            flatten=nn.Flatten(),
            fc1=nn.Sequential(nn.Linear(dim, fc), nn.ReLU(inplace=True)),
        )
    )
    return FedModel(features, nn.Linear(fc, num_classes), fc, ("features.conv1", "features.conv2"))


def mlp(input_shape: tuple[int, ...], hidden: tuple[int, ...], num_classes: int,
        dropout: float = 0.0) -> FedModel:
    """flatten -> (Linear, ReLU[, Dropout]) per hidden width -> head; any input shape."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = math.prod(input_shape)
    for i, h in enumerate(hidden):
        block = [nn.Linear(width, h), nn.ReLU(inplace=True)] + ([nn.Dropout(dropout)] if dropout else [])
        layers[f"fc{i + 1}"] = nn.Sequential(*block)
        width = h
    return FedModel(nn.Sequential(layers), nn.Linear(width, num_classes), width, ())


def _mlp(name: str, input_shape: tuple[int, ...], num_classes: int) -> FedModel:
    """FedAvg paper's 2NN; accepts any input shape (flattened)."""
    if not input_shape or min(input_shape) < 1:
        raise ConfigError("model.name", name, f"bad input_shape={tuple(input_shape)}")
    return mlp(tuple(input_shape), (200, 200), num_classes)


class BasicBlock(nn.Module):
    """ResNet BasicBlock: two 3x3 conv-BN, identity or 1x1-conv-BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _resnet(widths: tuple[int, ...]) -> Callable[[str, tuple[int, ...], int], FedModel]:
    """CIFAR-style ResNet, 1 BasicBlock per stage: 3x3 stride-1 stem, stride 2 from stage 2,
    global average pooling (so any HxW >= 1 works, e.g. 28x28 and 32x32)."""

    def build(name: str, input_shape: tuple[int, ...], num_classes: int) -> FedModel:
        c, _, _ = _image_shape(name, input_shape)
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            stem=nn.Sequential(
                nn.Conv2d(c, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
            )
        )
        cin = widths[0]
        for i, cout in enumerate(widths):
            layers[f"layer{i + 1}"] = BasicBlock(cin, cout, 1 if i == 0 else 2)
            cin = cout
        layers["pool"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten()
        features = nn.Sequential(layers)
        for m in features.modules():  # torchvision-style init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        return FedModel(features, nn.Linear(cin, num_classes), cin, ("features.stem", "features.layer1"))

    return build


_BUILDERS: dict[str, Callable[[str, tuple[int, ...], int], FedModel]] = {
    "cnn": _cnn,
    "cnn_bn": _cnn,
    "cnn_narrow": _cnn,
    "mlp": _mlp,
    "resnet8": _resnet((16, 32, 64)),
    "resnet10": _resnet((64, 128, 256, 512)),
}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> FedModel:
    """Build `name` with a seeded init: same arguments -> bit-identical state_dict.

    The seed is applied inside `torch.random.fork_rng`, so the caller's global RNG is untouched.
    """
    if name not in _BUILDERS:
        raise ConfigError("model.name", name, suggest(name, MODELS))
    if num_classes < 1:
        raise ConfigError("model.name", name, f"num_classes must be >= 1, got {num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _BUILDERS[name](name, tuple(input_shape), num_classes)


def batchnorm_keys(model: nn.Module) -> list[str]:
    """state_dict keys owned by BatchNorm layers (affine params and running statistics).

    Found by module type, not by name: names miss e.g. a ResNet shortcut's BN (`shortcut.1`).
    """
    return [f"{name}.{key}" if name else key
            for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for key in module.state_dict(keep_vars=True)]


def under(key: str, prefixes: list[str] | tuple[str, ...]) -> bool:
    """Whether state_dict `key` lies under one of the module `prefixes` (e.g. "head")."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def check_prefixes(option: str, prefixes: list[str], model_name: str) -> None:
    """Reject module prefixes that name nothing in `model_name` (before any simulation starts)."""
    keys = list(build_model(model_name, (3, 32, 32), 10, 0).state_dict())
    modules = sorted({k.rsplit(".", 1)[0] for k in keys})
    for prefix in prefixes:
        if not any(under(k, [prefix]) for k in keys):
            raise ConfigError(option, prefix, f"no such module in {model_name}; {suggest(prefix, modules)}")


def client_model_name(name: str, per_client: list[str] | tuple[str, ...], partition_id: int) -> str:
    """The architecture of client `partition_id`'s own model: `per_client` cycled over partition
    ids (client k gets per_client[k % len]), or the run's model when the list is empty."""
    return per_client[partition_id % len(per_client)] if per_client else name


def feature_dim(name: str) -> int:
    """Size of model `name`'s feature vector (the same for any input shape)."""
    return build_model(name, (3, 32, 32), 10, 0).feature_dim
