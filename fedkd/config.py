"""Structured run configuration: YAML + `key=value` overrides, validated before any simulation.

OmegaConf checks keys and types against the dataclasses below; ranges and names
are checked here from each field's metadata (`min`, `max`, `gt`, `lt`, `choices`),
so every error names the key, the value and what is allowed, in one line.
The `method` and `strategy` sections are open dicts here: each is validated
against its own schema (the method's dataclass, the Flower strategy's signature)
by `fedkd.registry`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

#: the bundled configs: `fedkd/configs` in an installed wheel (package data), `configs/` at the top
#: of a checkout (editable installs: setuptools maps `fedkd.configs` to that folder)
CONFIG_DIR = next((d for d in (Path(__file__).resolve().parent / "configs",
                               Path(__file__).resolve().parent.parent / "configs")
                   if (d / "defaults.yaml").is_file()), Path(__file__).resolve().parent / "configs")
DATA_DIR_ENV = "FEDKD_DATA_DIR"


class ConfigError(ValueError):
    """A bad configuration value: names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: {allowed}")


def suggest(name: str, options: Iterable[str]) -> str:
    """'allowed: a, b, c' plus the closest option for a typo."""
    options = sorted(options)
    close = difflib.get_close_matches(name, options, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"allowed: {', '.join(options)}{hint}"


def check_choice(key: str, value: str, options: Iterable[str]) -> None:
    """Raise a ConfigError if `value` is not one of `options`."""
    options = list(options)
    if value not in options:
        raise ConfigError(key, value, f"unknown name; {suggest(value, options)}")


def setting(default: Any, **meta: Any) -> Any:
    """A config field with its checks as metadata: min/max/gt/lt bounds, choices (see check_fields)."""
    return field(default=default, metadata=meta)


@dataclass
class ExperimentConfig:
    name: str = "quickstart"
    seed: int = setting(0, min=0)
    output_dir: str = "runs"


@dataclass
class PartitionerConfig:
    """How a pooled dataset is split over clients (flwr-datasets partitioners; `scarce` is
    `fedkd.partitioners.scarce_draw`: classes_per_client classes per client, balanced over the
    classes, train_per_class training samples of each and test_per_client test samples in all,
    drawn directly, so data.test_fraction does not apply to it). `sample` draws clients WITH
    replacement from the pool (`fedkd.population`): each client gets samples_per_client distinct
    samples (0: pool size / num_clients, at least 2), at least one train and one test, so any
    population works (100,000 clients from pfllib-mnist's 70,000 images); `iid` and `sample`
    keep clients as index arrays, each built only when it trains."""

    name: str = setting("iid", choices=("iid", "dirichlet", "pathological", "shard", "given", "scarce",
                                        "sample"))
    alpha: float = setting(0.5, gt=0.0)
    classes_per_client: int = setting(2, min=1)  # pathological, scarce
    shards_per_client: int = setting(2, min=1)
    min_partition_size: int = setting(10, min=0)
    train_per_class: int = setting(100, min=1)  # scarce
    test_per_client: int = setting(100, min=1)  # scarce
    samples_per_client: int = setting(0, min=0)  # sample (0: pool size / num_clients, >= 2)


@dataclass
class TransformConfig:
    """Per-client transforms, applied once when the data is loaded (train and test alike).

    resolution_factors: client k's images are down-sampled by F_k (area interpolation, to
    floor(size / F_k)) and up-sampled back (bilinear); [] = off. resolution_assign picks F_k:
    diagonal = factors[(k + k // n) % n] (the benchmark protocol's, so that resolution does not
    follow a model.per_client list of the same length), cyclic = factors[k % n]."""

    resolution_factors: list[int] = field(default_factory=list)
    resolution_assign: str = setting("diagonal", choices=("diagonal", "cyclic"))

    def __post_init__(self) -> None:
        bad = [f for f in self.resolution_factors if f < 1]
        if bad:
            raise ConfigError("data.transform.resolution_factors", list(self.resolution_factors),
                              f"integers >= 1 (found {bad[0]}); 1 keeps a client's images as they are")


@dataclass
class DataConfig:
    dataset: str = "mnist5k"
    data_dir: str = ""  # "" -> $FEDKD_DATA_DIR -> ./data
    num_clients: int = setting(10, min=1)
    partitioner: PartitionerConfig = field(default_factory=PartitionerConfig)
    test_fraction: float = setting(0.25, gt=0.0, lt=1.0)
    hf_image_key: str = "image"  # for `hf:<name>` datasets
    hf_label_key: str = "label"
    transform: TransformConfig = field(default_factory=TransformConfig)


@dataclass
class ModelConfig:
    name: str = "cnn"
    #: model-heterogeneous runs: client k uses per_client[k % len(per_client)] for the models it
    #: keeps to itself (methods that allow it: see `fedkd list`); shared models stay `name`
    per_client: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    rounds: int = setting(5, min=1)
    local_epochs: int = setting(1, min=1)
    batch_size: int = setting(10, min=1)
    optimizer: str = setting("sgd", choices=("sgd", "adam"))
    # upper bound: SGD/Adam diverge to NaN long before lr 10 on any model here; a larger value is a
    # typo (1e30, 1e3 for 1e-3), caught now instead of after a run of NaN losses
    lr: float = setting(0.01, gt=0.0, max=10.0)
    momentum: float = setting(0.0, min=0.0, lt=1.0)
    weight_decay: float = setting(0.0, min=0.0)
    fraction_clients: float = setting(1.0, gt=0.0, max=1.0)
    # PFLlib's train loader drops the incomplete last batch (the pFL specs); false keeps it, which is
    # what every benchmark so far ran with. A last batch of 1-2 samples is a full-weight SGD step on
    # them right before evaluation: on std-mnist it dents skewed clients' accuracy (bench/results/std-mnist/README.md).
    drop_last: bool = False


@dataclass
class EvaluationConfig:
    every: int = setting(1, min=1)
    fraction_clients: float = setting(1.0, gt=0.0, max=1.0)
    central: bool = True  # evaluate the global model on the dataset's global test set


@dataclass
class SimulationConfig:
    client_cpus: float = setting(1.0, gt=0.0)
    client_gpus: float = setting(0.0, min=0.0, max=1.0)
    num_nodes: int = setting(0, min=0)  # Flower nodes; 0 = one per Ray actor, num_clients = plain mapping
    ray_address: str = ""  # join an existing Ray cluster instead of starting one
    timeout: float = setting(3600.0, gt=0.0)


@dataclass
class DeviceConfig:
    type: str = setting("cpu", choices=("cpu", "cuda", "auto"))
    threads_per_client: int = setting(1, min=1)


@dataclass
class FaultConfig:
    """Deliberate client faults, for tests and demos of failure handling (none while `clients` is
    empty). A listed client misbehaves in the listed `rounds` (every round when empty) of `phase`,
    each time with `probability`, drawn from (experiment.seed, round, client): a run repeats exactly.

    kind         what the client does
    raise        raises InjectedFailure: recorded `failed` with its traceback (the default)
    nan, inf     one value of every float array of its train update becomes NaN / +inf
    shape        its first float array keeps only its first row (a wrong shape that broadcasts)
    missing_key  its first array (by name) is left out of its train update
    scale        its update is multiplied by `factor`: received + factor * (sent - received), or
                 factor * sent where nothing was received (-10: a simple Byzantine client)
    kill         its Ray worker process exits (os._exit) mid-round, as under the OOM killer; every
                 client of that worker's group fails this round. Outside a Ray worker (in-process
                 runs, tests) it raises InjectedFailure instead, so it never ends the driver/pytest
    slow         sleeps `seconds` first, then works normally (to exercise simulation.timeout)

    nan, inf, shape, missing_key and scale corrupt a train update: they need phase train.

    What each strategy family does with each kind (updates are validated on the node first, see
    ValidationConfig):

    - raise, kill: the client fails (kill: every client of that worker's group); the round goes on
      with the others, or is skipped when fewer than validation.min_clients updates are valid.
    - nan, inf, shape, missing_key: rejected by validation in every family (recorded `rejected`
      with the reason); the round goes on without that client.
    - scale: mean-based strategies (fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad) and the
      class tables (fedproto, feddistill) fold it in (poisoned) unless validation.norm_check
      rejects it; krum, multikrum and bulyan leave it out, fedmedian and fedtrimmedavg bound it.
    - slow: same results; a group that misses simulation.timeout is recorded failed.
    """

    clients: list[int] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    phase: str = setting("train", choices=("train", "evaluate"))
    kind: str = setting("raise", choices=("raise", "nan", "inf", "shape", "missing_key", "scale",
                                          "kill", "slow"))
    probability: float = setting(1.0, min=0.0, max=1.0)
    factor: float = -10.0  # kind scale
    seconds: float = setting(5.0, min=0.0)  # kind slow

    def __post_init__(self) -> None:
        if self.phase == "evaluate" and self.kind in UPDATE_FAULTS:
            raise ConfigError("faults.kind", self.kind, "corrupts a train update: needs "
                                                        "faults.phase=train (evaluate allows raise, kill, slow)")


#: fault kinds that corrupt what a client sends after training
UPDATE_FAULTS = ("nan", "inf", "shape", "missing_key", "scale")


@dataclass
class ValidationConfig:
    """Checks of every client's train update on its node, before it enters any sum.

    Non-finite values and arrays that differ from what the method declares for the round (keys,
    shapes, dtypes) are always rejected. `norm_check` also rejects an update whose norm
    ||sent - received|| exceeds `norm_factor` times the median norm of the updates accepted in the
    previous round (the server sends it with the round's config; round 1 has none). A round with
    fewer valid updates than `min_clients` keeps the previous global model and is recorded skipped.
    """

    min_clients: int = setting(1, min=1)
    norm_check: bool = False
    norm_factor: float = setting(5.0, gt=1.0)


@dataclass
class CheckpointConfig:
    """When a run writes its checkpoint (see `fedkd.checkpoint`): at every evaluation round,
    and also every `every` rounds when set (0: evaluation rounds only)."""

    every: int = setting(0, min=0)


@dataclass
class LoggingConfig:
    """Experiment trackers besides metrics.jsonl (`fedkd.sinks`): `tensorboard` writes round
    aggregates and per-client scalars as event files under RUN_DIR/tensorboard."""

    tensorboard: bool = False


@dataclass
class FedkdConfig:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "fedavg"})
    strategy: dict[str, Any] = field(default_factory=lambda: {"name": "fedavg"})
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _check_finite(key: str, value: Any) -> None:
    """nan/inf pass OmegaConf's float type and every `min`/`max` test that nan fails silently."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(key, value, "must be a finite number")


def _check_ranges(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_ranges(value, key + ".")
            continue
        _check_finite(key, value)
        meta = f.metadata
        if "choices" in meta:
            check_choice(key, value, meta["choices"])
        bounds = [("min", lambda v, b: v >= b, ">="), ("max", lambda v, b: v <= b, "<="),
                  ("gt", lambda v, b: v > b, ">"), ("lt", lambda v, b: v < b, "<")]
        broken = [f"{sym} {meta[k]}" for k, ok, sym in bounds if k in meta and not ok(value, meta[k])]
        if broken:
            limits = " and ".join(f"{sym} {meta[k]}" for k, _, sym in bounds if k in meta)
            raise ConfigError(key, value, f"must be {limits}")


def check_fields(obj: Any, prefix: str) -> None:
    """Range/choice checks for any dataclass instance built with `setting` metadata (methods use it too)."""
    _check_ranges(obj, prefix)


def _omegaconf_error(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    if isinstance(exc, ConfigKeyError):
        parent_key, _, leaf = key.rpartition(".")
        node = _schema_node(parent_key)
        options = list(node.keys()) if isinstance(node, DictConfig) else []
        return ConfigError(key, leaf, f"unknown key; {suggest(leaf, options)}")
    if isinstance(exc, ValidationError):
        expected = getattr(exc, "ref_type", None) or getattr(exc, "object_type", None)
        msg = str(exc).splitlines()[0]
        return ConfigError(key, getattr(exc, "value", None) if hasattr(exc, "value") else "?",
                           f"wrong type ({msg})" if expected is None else f"wrong type: {msg}")
    return ConfigError(key, "?", str(exc).splitlines()[0])


def _schema_node(key: str) -> Any:
    node: Any = OmegaConf.structured(FedkdConfig)
    for part in filter(None, key.split(".")):
        node = node.get(part) if isinstance(node, DictConfig) else None
    return node


def _parse_overrides(overrides: Iterable[str]) -> DictConfig:
    items = list(overrides)
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError(item, item, "overrides are written key=value, e.g. data.num_clients=20")
        try:
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as exc:  # e.g. model.per_client=[cnn
            key, _, value = item.partition("=")
            raise ConfigError(key, value, f"not a valid value ({_yaml_problem(exc)})") from None
    return OmegaConf.from_dotlist(items)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: what is wrong and where."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def _read_yaml(path: Path) -> DictConfig:
    """One YAML file as a DictConfig; unreadable files, bad YAML and a non-mapping top level are
    ConfigErrors naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:  # permissions, ...
        raise ConfigError("config", str(path), f"cannot read the file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("config", str(path), "not a YAML file (not UTF-8 text)") from None
    try:
        top = yaml.compose(text, Loader=yaml.SafeLoader)
        if top is not None and not isinstance(top, yaml.MappingNode):
            kind = "a list" if isinstance(top, yaml.SequenceNode) else f"the value {top.value!r}"
            raise ConfigError("config", str(path), f"the top level must be a mapping of sections "
                                                   f"(experiment:, data:, ...), found {kind}")
        raw = OmegaConf.create(text) if top is not None else OmegaConf.create()
    except yaml.YAMLError as exc:
        raise ConfigError("config", str(path), f"not valid YAML: {_yaml_problem(exc)}") from None
    assert isinstance(raw, DictConfig)
    return raw


def load_yaml(path: str | Path) -> DictConfig:
    """Load a YAML file, following `defaults: [other.yaml, ...]` (paths relative to `configs/`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config", str(path), "file not found")
    raw = _read_yaml(path)
    parents = raw.pop("defaults", [])
    if not isinstance(parents, (ListConfig, list)) or not all(isinstance(p, str) for p in parents):
        raise ConfigError("defaults", parents, f"in {path}: a list of YAML files, e.g. [defaults.yaml]")
    merged = OmegaConf.create()
    for parent in parents:
        parent_path = CONFIG_DIR / parent
        if not parent_path.is_file():
            parent_path = path.parent / parent
        merged = OmegaConf.merge(merged, load_yaml(parent_path))
    return OmegaConf.merge(merged, raw)  # type: ignore[return-value]


def experiments() -> dict[str, Path]:
    """The bundled experiments by name (`configs/experiment/<name>.yaml`, see `fedkd list`)."""
    return {p.stem: p for p in sorted((CONFIG_DIR / "experiment").glob("*.yaml"))}


def resolve_config(config: str | Path) -> Path:
    """A YAML path as given, else the bundled experiment of that name (`fedkd run quickstart`)."""
    path = Path(config)
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path  # a path: load_yaml names it if it is missing
    known = experiments()
    if path.name in known:
        return known[path.name]
    raise ConfigError("config", str(config), f"neither a YAML file nor a bundled experiment; "
                                             f"{suggest(str(config), known)}")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> FedkdConfig:
    """YAML file (or a bundled experiment's name) + overrides -> validated FedkdConfig
    (method/strategy checked by `fedkd.registry`)."""
    from fedkd import registry  # local import: registry imports this module

    schema = OmegaConf.structured(FedkdConfig)
    try:
        layers = [OmegaConf.load(CONFIG_DIR / "defaults.yaml")]
        if path is not None:
            layers.append(load_yaml(resolve_config(path)))
        overrides_cfg = _parse_overrides(overrides)
        user = OmegaConf.merge(*layers)
        user = registry.apply_section_defaults(user, overrides_cfg)
        merged = OmegaConf.merge(schema, user, overrides_cfg)
        cfg: FedkdConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc) from None
    _check_ranges(cfg)
    for section in ("method", "strategy"):  # open dicts: their schemas live elsewhere
        for key, value in getattr(cfg, section).items():
            _check_finite(f"{section}.{key}", value)
    _check_run_name(cfg.experiment.name)
    registry.validate(cfg)
    return cfg


def _check_run_name(name: str) -> None:
    """The name becomes a directory under experiment.output_dir: it must not lead outside it."""
    if not name or any(bad in name for bad in ("/", "\\", "..", "\0")):
        raise ConfigError("experiment.name", name, "a plain name without '/', '\\' or '..' "
                                                   "(it names the run directory under experiment.output_dir)")


def to_yaml(cfg: FedkdConfig) -> str:
    """The resolved config as YAML (saved with every run, sent to clients)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted key: value}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    return {key: value for k, v in tree.items() for key, value in flatten(v, f"{prefix}{k}.").items()}


def flat_config(cfg: FedkdConfig) -> dict[str, Any]:
    """The config as {dotted key: value}, lists as values."""
    return flatten(OmegaConf.to_container(OmegaConf.create(to_yaml(cfg))))


def first_difference(ours: FedkdConfig, theirs: FedkdConfig,
                     counts: Callable[[str], bool]) -> tuple[str, Any, Any] | None:
    """(key, our value, their value) of the first dotted key, in key order, that `counts` and whose
    values differ; None when none does. The one comparison of two configs (a resumed run against its
    saved config; a kd run against its teacher's)."""
    a, b = flat_config(ours), flat_config(theirs)
    return next(((key, a.get(key), b.get(key)) for key in sorted(set(a) | set(b))
                 if counts(key) and a.get(key) != b.get(key)), None)


def from_yaml(text: str) -> FedkdConfig:
    """Inverse of `to_yaml` for an already validated config (no registry checks)."""
    merged = OmegaConf.merge(OmegaConf.structured(FedkdConfig), OmegaConf.create(text))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def data_dir(cfg: DataConfig) -> Path:
    """Where data files are read from: config key, then $FEDKD_DATA_DIR, then ./data."""
    return Path(cfg.data_dir or os.environ.get(DATA_DIR_ENV, "") or "data").expanduser()
