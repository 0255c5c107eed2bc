"""Beta-KD (Sun et al., "Uncertainty-Aware Knowledge Distillation for Multimodal Large Language
Models", CVPR 2026, arXiv:2603.21426) as a one-client staged method (`shared/specs/centralized.md`
section 5).

Why: a student learns from three signals (data CE, logit KD, feature KD) whose reliability varies
per task and per sample. Beta-KD reads teacher supervision as a Gibbs prior exp(-beta * l) over the
student's activations; the Laplace-approximated objective beta * l - (d/2) log beta is, in the
log-variance parameterization s = -log beta of the official code, `0.5 exp(-s) L + 0.5 s` per
channel: the precision exp(-s) becomes a learned, uncertainty-aware weight whose optimum is 1 / L
(large loss -> small weight).

Stages (a round is an epoch):
- `teachers` (`teacher_epochs`, default 8): image CNN, audio CNN and a multimodal teacher (its own
  copies of both encoders, concatenated -> MLP 256-128-10; its 128-d penultimate vector is h_t),
  trained together with CE on the (noisy) training pairs.
- `students` (`student_epochs`, default 20): the variants in `variants` train side by side from the
  frozen teachers, with identical init and batch order (one `train_epochs` call over a ModuleDict):
  `ce_only` (no teacher), `equal` (plain sum of CE, KD, FD), `task` (one learned s per channel),
  `instance` (an MLP on the detached h_t predicts s(x) per sample). With `teachers` set (the spec's
  marked multi-teacher extension, ASSUMED, not in the source) the variants `mt-equal`, `mt-task` and
  `mt-instance` train too, with channels CE plus one KD channel per listed teacher.

v2 (spec 5.2-5.3 "(v2)", every v1 value still a setting): the half-width student
(`student_hidden: 16`, v1 32; ASSUMED), the official weight learning rates (`weight_lr_mode:
official`: task log-variances at the student lr x 1000, the instance MLP at x 10, as the
official `create_optimizer`; `fixed` = v1's `weight_lr` for both; weight decay is
`train.weight_decay`, 0 in every config), and the wider-gap data `data.dataset: avmnist-v2`
(50% of training pairs corrupted, half of them image-replaced; `fedkd.taskdata.avmnist`), whose
instance diagnostics report audio-replaced, image-replaced and clean pairs apart.

Inputs are the packed AV-MNIST vectors of `fedkd.taskdata.avmnist` (784 image pixels, then 40 x 25
log-mel values); every model splits them itself. The evaluation reads the three stacked test sets
(clean, audio-corrupted, image-corrupted) and reports every variant and teacher on each.

ASSUMED choices: the headline variant (setting `headline`, default `task`); the instance weight
MLP's last layer starts at zero so s(x) = 0 at init, the spec's "s init 0" (setting
`instance_zero_init`); the instance clamp passes the gradient straight through (setting
`instance_clamp`; the official hard clamp left s(x) stuck at the bound in our runs); the
multi-teacher extension as a whole (setting `teachers`), whose weight MLP reads the concatenated
detached penultimate features of the listed teachers. Implementation details (not choices of
substance): the raw task log-variances are clamped in place before every
step as well as in the forward pass, so they cannot drift beyond the clamp where it has no
gradient; teacher outputs are computed once and cached (teachers are frozen). From the official
code: the scale of `exp(-s) L + s` is 0.5 in task mode and 1 in instance mode (`MODE_SCALE`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fedkd.taskdata.avmnist  # noqa: F401  (registers the "avmnist" dataset)
from fedkd.clients.base import Arrays, ClientData, EvalResult, RoundInfo, copy_state, train_epochs
from fedkd.clients.staged import StagedMethod, Stages, stage_of
# re-exported: the models and variants lived here before the split
from fedkd.clients.betakd_models import (  # noqa: F401
    TEACHER_FEATURE_DIM, TEACHERS, AudioEncoder, Fused, ImageEncoder, StudentFeatures,
    TeacherOutputs, Variant, VariantOutput, accuracy_nll, build_student, build_teacher,
    split_modalities, teacher_fingerprint)
from fedkd.config import ConfigError, FedkdConfig, data_dir, setting
from fedkd.kd import clamp_log_vars, normalized_weights
from fedkd.taskdata.avmnist import INPUT_DIM, load_named, split_test
from fedkd.taskdata.avmnist import VARIANTS as AVMNIST_VARIANTS

SINGLE_VARIANTS = ("ce_only", "equal", "task", "instance")
#: official code's weight learning rates as multiples of the student lr, per weighting mode
OFFICIAL_LR_MULTIPLIER = {"task": 1000.0, "instance": 10.0}
MULTI_VARIANTS = ("mt-equal", "mt-task", "mt-instance")
# --------------------------------------------------------------------------- settings

@dataclass
class BetaKDSettings:
    name: str = "betakd"
    teacher_epochs: int = setting(8, min=1)
    student_epochs: int = setting(20, min=1)
    temperature: float = setting(2.0, gt=0.0)  # official code's KD default
    #: side-by-side single-teacher variants (subset of ce_only, equal, task, instance)
    variants: list[str] = field(default_factory=lambda: list(SINGLE_VARIANTS))
    #: the variant whose clean-test accuracy is the run's headline (ASSUMED: task)
    headline: str = "task"
    #: instance mode: true per-sample channel losses, or the code's batch means broadcast per sample
    instance_losses: str = setting("per_sample", choices=["per_sample", "batch_mean"])
    #: (v2) official = the code's multipliers of the student lr (task x1000, instance x10);
    #: fixed = `weight_lr` for both modes (v1)
    weight_lr_mode: str = setting("official", choices=["official", "fixed"])
    weight_lr: float = setting(1e-2, gt=0.0)  # own Adam group for s / the weight MLP (fixed mode)
    clamp: float = setting(5.0, gt=0.0)  # |s| <= clamp
    instance_hidden: int = setting(128, min=1)  # weight MLP: feature_dim -> hidden -> channels
    #: ASSUMED: straight_through keeps the weight MLP's gradient beyond the clamp; hard = the
    #: official clamp, under which s(x) overshot to +5 in the first student round and stayed
    #: there (weights frozen at 1/3, every loss scaled by e^-5: the student barely trained)
    instance_clamp: str = setting("straight_through", choices=["straight_through", "hard"])
    instance_zero_init: bool = True  # ASSUMED: last layer zero, so s(x) = 0 at init ("s init 0")
    #: per-modality MLP width (concat = 2x); v2 16 (half width, ASSUMED), v1 32
    student_hidden: int = setting(16, min=1)
    #: multi-teacher extension (ASSUMED, project addition): [] = off; e.g. [image, audio, multimodal]
    teachers: list[str] = field(default_factory=list)
    #: which multi-teacher variants to train when `teachers` is set
    multi_variants: list[str] = field(default_factory=lambda: list(MULTI_VARIANTS))


def check_settings(cfg: FedkdConfig, settings: BetaKDSettings) -> None:
    """List-valued settings against their allowed names (the `setting` metadata checks scalars)."""
    for key, values, allowed in (("variants", settings.variants, SINGLE_VARIANTS),
                                 ("teachers", settings.teachers, TEACHERS),
                                 ("multi_variants", settings.multi_variants, MULTI_VARIANTS)):
        bad = [v for v in values if v not in allowed]
        if bad or len(set(values)) != len(values):
            raise ConfigError(f"method.{key}", list(values),
                              f"distinct names from {', '.join(allowed)}")
    if not settings.variants and not (settings.teachers and settings.multi_variants):
        raise ConfigError("method.variants", list(settings.variants), "train at least one variant")
    enabled = active_variants(settings)
    if settings.headline not in enabled:
        raise ConfigError("method.headline", settings.headline,
                          f"one of the trained variants: {', '.join(enabled)}")


def active_variants(settings: BetaKDSettings) -> list[str]:
    """The variants a run trains, in a fixed order (single-teacher first)."""
    multi = [v for v in MULTI_VARIANTS if v in settings.multi_variants] if settings.teachers else []
    return [v for v in SINGLE_VARIANTS if v in settings.variants] + multi


# --------------------------------------------------------------------------- client

class BetaKDClient(StagedMethod):
    """Teachers, then Beta-KD student variants side by side; all models kept in the client state."""

    @classmethod
    def stages(cls, settings: BetaKDSettings) -> Stages:
        return [("teachers", settings.teacher_epochs), ("students", settings.student_epochs)]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s: BetaKDSettings = self.settings
        check_settings(self.cfg, s)
        if tuple(self.input_shape) != (INPUT_DIM,):
            raise ConfigError("data.dataset", self.cfg.data.dataset,
                              f"betakd needs packed AV-MNIST inputs ({INPUT_DIM},), "
                              f"got {tuple(self.input_shape)}; use data.dataset=avmnist")
        seed, k = self.cfg.experiment.seed, self.num_classes
        self.variant_names = active_variants(s)
        self.multi_teachers = tuple(t for t in TEACHERS if t in s.teachers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            teachers = nn.ModuleDict({t: build_teacher(t, k) for t in TEACHERS})
            torch.manual_seed(seed + 1)
            student = build_student(s.student_hidden, k)
            projector = nn.Linear(2 * s.student_hidden, TEACHER_FEATURE_DIM)
            variants: dict[str, Variant] = {}
            for name in self.variant_names:
                torch.manual_seed(seed + 2)  # the same weight-network init for every instance variant
                variants[name] = Variant(name, copy.deepcopy(student), copy.deepcopy(projector),
                                         self.multi_teachers, k, s)
        self.teachers = teachers.to(self.device)
        self.variants = nn.ModuleDict(variants).to(self.device)
        self._init = {"teachers": copy.deepcopy(self.teachers.state_dict()),
                      **{f"variant-{n}": copy.deepcopy(v.state_dict()) for n, v in variants.items()}}
        self._cache: dict[tuple[Any, ...], TeacherOutputs] = {}

    # -- state -------------------------------------------------------------------------------
    def _load_teachers(self, state: dict[str, Any]) -> nn.ModuleDict:
        self.teachers.load_state_dict(state.get("teachers") or self._init["teachers"])
        return self.teachers

    def _load_variants(self, state: dict[str, Any]) -> nn.ModuleDict:
        for name, v in self.variants.items():
            v.load_state_dict(state.get(f"variant-{name}") or self._init[f"variant-{name}"])
        return self.variants

    # -- teacher outputs -----------------------------------------------------------------------
    @torch.no_grad()
    def teacher_outputs(self, x: Tensor, batch_size: int = 500) -> TeacherOutputs:
        """Frozen teachers' (logits, features) on `x`, cached per (tensor, teacher weights).

        Teachers are fixed after their stage and deterministic in eval mode, so a student round
        reuses the outputs of the round before (saves ~all of the student stage's CPU time).
        """
        key = (x.data_ptr(), tuple(x.shape), float(x.sum()), teacher_fingerprint(self.teachers))
        if key not in self._cache:
            self.teachers.eval()
            out: dict[str, tuple[list[Tensor], list[Tensor]]] = {t: ([], []) for t in TEACHERS}
            for start in range(0, len(x), batch_size):
                xb = x[start:start + batch_size]
                for t, model in self.teachers.items():
                    h = model.features(xb)
                    out[t][0].append(model.head(h))
                    out[t][1].append(h)
            if len(self._cache) >= 4:
                self._cache.clear()
            self._cache[key] = {t: (torch.cat(z), torch.cat(h)) for t, (z, h) in out.items()}
        return self._cache[key]

    @staticmethod
    def pack(x: Tensor, teacher: TeacherOutputs) -> Tensor:
        """Inputs with the teacher outputs appended as columns: `train_epochs` then slices
        them with the same batch indices (its batch order depends only on n and the seed)."""
        return torch.cat([x] + [a for t in TEACHERS for a in teacher[t]], dim=-1)

    def unpack(self, packed: Tensor) -> tuple[Tensor, TeacherOutputs]:
        x, rest = packed[:, :INPUT_DIM], packed[:, INPUT_DIM:]
        teacher: TeacherOutputs = {}
        for t in TEACHERS:
            z, h, rest = (rest[:, :self.num_classes],
                          rest[:, self.num_classes:self.num_classes + TEACHER_FEATURE_DIM],
                          rest[:, self.num_classes + TEACHER_FEATURE_DIM:])
            teacher[t] = (z, h)
        return x, teacher

    # -- training ------------------------------------------------------------------------------
    def train_stage(self, stage: str, state: dict[str, Any], data: ClientData,
                    info: RoundInfo) -> tuple[dict[str, float], Arrays]:
        if stage == "teachers":
            return self._train_teachers(state, data, info)
        return self._train_students(state, data, info)

    def _train_teachers(self, state: dict[str, Any], data: ClientData,
                        info: RoundInfo) -> tuple[dict[str, float], Arrays]:
        teachers = self._load_teachers(state)
        ce_sums = {t: 0.0 for t in TEACHERS}

        def objective(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            logits = {t: m(x) for t, m in teachers.items()}
            losses = {t: F.cross_entropy(z, y) for t, z in logits.items()}
            for t, value in losses.items():
                ce_sums[t] += value.item() * len(y)
            return sum(losses.values()), logits["multimodal"]  # type: ignore[return-value]

        metrics = train_epochs(teachers, data, self.cfg, info.generator(), epochs=1,
                               objective=objective, state=state, optimizer_key="optimizer-teachers")
        n = max(len(data.y_train), 1)
        metrics.update({f"teacher-{t}-loss": v / n for t, v in ce_sums.items()})
        state["teachers"] = copy_state(teachers)
        return metrics, dict(state["teachers"])

    def student_objective(self, logs: dict[str, list[Tensor]]) -> Any:
        """The side-by-side step: every variant's loss summed (disjoint parameters, so each
        variant gets exactly its own gradient); reports the headline variant's logits. Channel
        losses and s of each variant are appended to `logs` for the round's metrics."""
        headline = self.settings.headline

        def objective(packed: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            x, teacher = self.unpack(packed)
            total: Tensor | None = None
            logits = None
            for name, variant in self.variants.items():
                out = variant(x, y, teacher)
                total = out.loss if total is None else total + out.loss
                logs.setdefault(f"{name}/losses", []).append(out.losses.mean(0))
                if out.log_vars is not None:
                    s = out.log_vars if out.log_vars.ndim == 2 else out.log_vars.unsqueeze(0)
                    logs.setdefault(f"{name}/s", []).append(s.mean(0))
                    logs.setdefault(f"{name}/w", []).append(normalized_weights(s).mean(0))
                if name == headline:
                    logits = out.logits
            assert total is not None and logits is not None
            return total, logits

        return objective

    def _train_students(self, state: dict[str, Any], data: ClientData,
                        info: RoundInfo) -> tuple[dict[str, float], Arrays]:
        self._load_teachers(state)  # frozen: only ever run under no_grad (teacher_outputs)
        packed = self.pack(data.x_train, self.teacher_outputs(data.x_train))
        variants = self._load_variants(state)
        lr = self.weight_lrs()
        logs: dict[str, list[Tensor]] = {}
        train = ClientData(packed, data.y_train, data.x_test, data.y_test)
        metrics = train_epochs(variants, train, self.cfg, info.generator(), epochs=1,
                               objective=self.student_objective(logs), lr=lr, state=state,
                               optimizer_key="optimizer-students")
        metrics.update(self._round_logs(logs))
        metrics.update(self._instance_split(data))
        for name, v in variants.items():
            state[f"variant-{name}"] = copy_state(v)
        return metrics, dict(state[f"variant-{self.settings.headline}"])

    def _round_logs(self, logs: dict[str, list[Tensor]]) -> dict[str, float]:
        """Per variant and channel: mean loss, mean s and mean normalized weight of the round."""
        out: dict[str, float] = {}
        for key, values in logs.items():
            name, what = key.split("/")
            channels = self.variants[name].channels
            mean = torch.stack(values).mean(0)
            label = {"losses": "loss", "s": "s", "w": "weight"}[what]
            out.update({f"{name}-{label}-{c}": float(v) for c, v in zip(channels, mean)})
        for name, v in self.variants.items():
            if v.multi and v.mode != "equal" and f"{name}/s" in logs:
                s = torch.stack(logs[f"{name}/s"]).mean(0)[1:]  # teacher channels only
                out.update({f"{name}-teacher-weight-{t}": float(w)
                            for t, w in zip(v.teachers, normalized_weights(s))})
        return out

    @torch.no_grad()
    def _instance_split(self, data: ClientData) -> dict[str, float]:
        """Instance variants' mean normalized weights on corrupted vs clean training pairs (after
        the round), when the run's data is AV-MNIST and its corruption mask is known."""
        names = [n for n, v in self.variants.items() if v.mode == "instance"]
        masks = self._train_corruption_masks(len(data.y_train))
        if not names or masks is None:
            return {}
        audio, image = masks
        mask = audio | image
        parts = [("corrupted", mask), ("clean", ~mask)]
        if image.any():  # (v2) `either`: the two kinds apart
            parts += [("audio-replaced", audio), ("image-replaced", image)]
        teacher = self.teacher_outputs(data.x_train)
        out: dict[str, float] = {}
        for name in names:
            v: Variant = self.variants[name]  # type: ignore[assignment]
            w = normalized_weights(v.instance_log_vars(teacher))
            for part, rows in parts:
                if rows.any():
                    out.update({f"{name}-weight-{c}-train-{part}": float(x)
                                for c, x in zip(v.channels, w[rows].mean(0))})
        return out

    def _train_corruption_masks(self, n: int) -> tuple[Tensor, Tensor] | None:
        """(audio-replaced, image-replaced) masks of the training pairs, when the run's data is a
        registered AV-MNIST variant (diagnostics only)."""
        if self.cfg.data.dataset not in AVMNIST_VARIANTS:
            return None
        try:
            d = load_named(self.cfg.data.dataset, data_dir(self.cfg.data), self.cfg.experiment.seed)
        except Exception:  # diagnostic only: never fail a round for it
            return None
        if len(d.train_audio_noise) != n:
            return None
        return (torch.as_tensor(d.train_audio_noise, device=self.device),
                torch.as_tensor(d.train_image_noise, device=self.device))

    def weight_lrs(self) -> dict[str, float]:
        """Learning rate of every variant's weight parameters (spec 5.2 v2): `official` = the
        student's lr x 1000 for task log-variances and x 10 for the instance MLP (Jingchensun/
        beta-kd `trainer.py` `create_optimizer`: type2 -> lr * 1000, type3 -> lr * 10; mt-*
        follow their modes); `fixed` = `weight_lr` for both (v1)."""
        s: BetaKDSettings = self.settings
        out: dict[str, float] = {}
        for n, v in self.variants.items():
            for p in v.weight_prefixes():
                rate = s.weight_lr
                if s.weight_lr_mode == "official":
                    rate = self.cfg.train.lr * OFFICIAL_LR_MULTIPLIER[v.mode]
                out[f"{n}.{p}"] = rate
        return out

    # -- evaluation ----------------------------------------------------------------------------
    def inference_model(self, received: Arrays, state: dict[str, Any], partition_id: int,
                        server_round: int | None = None) -> nn.Module:
        """The stage's headline model: the multimodal teacher, then the `headline` variant's
        student (packed AV-MNIST inputs -> logits)."""
        if self.stage_at(server_round) == "teachers":
            return self._load_teachers(state)["multimodal"]
        return self._load_variants(state)[self.settings.headline].student

    @torch.no_grad()
    def evaluate(self, received: Arrays, state: dict[str, Any], data: ClientData,
                 info: RoundInfo) -> EvalResult:
        """Teachers (and, in the student stage, every variant) on each test set; headline: the
        multimodal teacher in the teacher stage, then the `headline` variant, on clean pairs."""
        _, stage = stage_of(self.stages(self.settings), info.server_round)
        self._load_teachers(state).eval()  # teacher_outputs reads the loaded teachers
        sets = split_test(data.x_test, data.y_test)
        extra: dict[str, float] = {}
        variants = self._load_variants(state).eval() if stage != "teachers" else None
        for test_name, (x, y) in sets.items():
            teacher = self.teacher_outputs(x)
            for t in TEACHERS:
                acc, nll = accuracy_nll(teacher[t][0], y)
                extra[f"teacher-{t}-accuracy-{test_name}"] = acc
                extra[f"teacher-{t}-nll-{test_name}"] = nll
            if variants is None:
                continue
            for name, v in variants.items():
                logits = v.student(x)
                acc, nll = accuracy_nll(logits, y)
                extra[f"{name}-accuracy-{test_name}"] = acc
                extra[f"{name}-nll-{test_name}"] = nll
                if v.mode == "instance":
                    w = normalized_weights(v.instance_log_vars(teacher)).mean(0)
                    extra.update({f"{name}-weight-{c}-{test_name}": float(a)
                                  for c, a in zip(v.channels, w)})
        if variants is not None:
            for name, v in variants.items():
                if v.mode == "task":
                    s = clamp_log_vars(v.log_vars, v.bound)
                    extra.update({f"{name}-s-{c}": float(a) for c, a in zip(v.channels, s)})
                    extra.update({f"{name}-weight-{c}": float(a)
                                  for c, a in zip(v.channels, normalized_weights(s))})
                    if v.multi:
                        extra.update({f"{name}-teacher-weight-{t}": float(a)
                                      for t, a in zip(v.teachers, normalized_weights(s[1:]))})
        model = self.inference_model(received, state, info.partition_id, info.server_round).eval()
        acc, nll = accuracy_nll(model(sets["clean"][0]), sets["clean"][1])
        return EvalResult(nll, acc, len(sets["clean"][1]), extra)

