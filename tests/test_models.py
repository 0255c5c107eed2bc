"""fedkd.models: shapes, the features/head split, seeded init and name errors."""

from __future__ import annotations

import pytest
import torch

from fedkd.config import ConfigError
from fedkd.models import MODELS, FedModel, batchnorm_keys, build_model, check_prefixes

SHAPES = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]
FEATURE_DIM = {"cnn": 512, "cnn_bn": 512, "cnn_narrow": 256, "mlp": 200, "resnet8": 64, "resnet10": 512}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_and_split(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, shape, 10, seed=0).eval()
    assert isinstance(model, FedModel)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        feats = model.features(x)
        out = model(x)
        assert torch.equal(out, model.head(feats))
    assert out.shape == (2, 10)
    assert feats.shape == (2, model.feature_dim) and model.feature_dim == FEATURE_DIM[name]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_low_level_blocks_and_head_keys(name: str) -> None:
    model = build_model(name, (1, 28, 28), 10, seed=0)
    modules = dict(model.named_modules())
    assert all(b in modules for b in model.low_level_blocks)
    assert (model.low_level_blocks == ()) == (name == "mlp")
    keys = list(model.state_dict())
    head = model.head_keys()
    assert head == [f"head.{k}" for k in model.head.state_dict()] and head
    assert [k for k in keys if k not in head] == [f"features.{k}" for k in model.features.state_dict()]


def test_cnn_matches_pfllib() -> None:
    mnist = build_model("cnn", (1, 28, 28), 10, seed=0)
    assert sum(p.numel() for p in mnist.parameters()) == 582_026
    assert mnist.features.fc1[0].in_features == 1024
    assert build_model("cnn", (3, 32, 32), 10, seed=0).features.fc1[0].in_features == 1600
    # 8x8 is too small for unpadded 5x5 convs: padding=2 keeps it working (64*2*2).
    small = build_model("cnn", (1, 8, 8), 10, seed=0)
    assert small.features.conv1[0].padding == (2, 2) and small.features.fc1[0].in_features == 256
    assert mnist.features.conv1[0].padding == (0, 0)


def test_too_small_or_flat_input_rejected() -> None:
    with pytest.raises(ConfigError, match="model.name"):
        build_model("cnn", (1, 3, 3), 10, seed=0)
    with pytest.raises(ConfigError, match="model.name"):
        build_model("resnet8", (784,), 10, seed=0)
    assert build_model("mlp", (784,), 10, seed=0)(torch.randn(2, 784)).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_seeded_init_is_deterministic_and_local(name: str) -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_model(name, (3, 32, 32), 10, seed=7).state_dict()
    b = build_model(name, (3, 32, 32), 10, seed=7).state_dict()
    c = build_model(name, (3, 32, 32), 10, seed=8).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_unknown_name_suggests() -> None:
    with pytest.raises(ConfigError) as err:
        build_model("cnnn", (1, 28, 28), 10, seed=0)
    assert "model.name" in str(err.value) and "did you mean 'cnn'" in str(err.value)
    assert err.value.key == "model.name"


def test_batchnorm_keys_are_found_by_module_type() -> None:
    assert batchnorm_keys(build_model("cnn", (1, 28, 28), 10, 0)) == []
    bn = batchnorm_keys(build_model("cnn_bn", (1, 28, 28), 10, 0))
    assert bn == [f"features.conv{i}.1.{k}" for i in (1, 2)
                  for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    resnet = batchnorm_keys(build_model("resnet8", (3, 32, 32), 10, 0))
    # a shortcut's BN is unnamed ("shortcut.1"): a name rule like PFLlib's "bn" in key misses it
    assert "features.layer2.shortcut.1.running_var" in resnet
    assert not [k for k in resnet if "bn" not in k and "shortcut" not in k and "stem" not in k]


def test_unknown_layer_prefix_is_rejected_with_the_modules_named() -> None:
    check_prefixes("method.personal_layers", ["head", "features.fc1"], "cnn")
    with pytest.raises(ConfigError, match=r"method.personal_layers.*'haed'.*did you mean 'head'"):
        check_prefixes("method.personal_layers", ["haed"], "cnn")
