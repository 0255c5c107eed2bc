"""Mix-CLAP (NEC Labs): clean and noisy distilled audio students, fused at test time by entropy.

`../shared/specs/centralized.md` section 4, offline substitute (no CLAP, no text encoder, no
ESC-50): a CNN teacher on log-mel FSDD digits gives L2-normalized 128-d embeddings t(x); class
"text" prototypes P_c = normalize(mean t(x) over clean training clips of class c) stand in for the
CLAP text embeddings (ASSUMED, nearest-prototype rather than zero-shot). Two tiny MobileNetV3-style
students are distilled from t(x) with 1 - cos: S_c on clean clips, then S_n (initialized from S_c)
on noisy clips x~ against the teacher embedding of the CLEAN clip. At test time, per test
condition (a batch of one condition), lambda* = argmin over the grid {0, 0.05, .., 1} of the mean
entropy of softmax(cos(normalize(lambda S_c + (1 - lambda) S_n), P) / tau); no labels are used.

v2 (spec 4.2 "(v2)", v1 values in brackets): `lambda_select: infomax` [entropy] picks lambda* by
mean entropy MINUS the entropy of the batch-mean prediction (`mixclap_fusion.select_fusion`),
so a student that collapses every clip onto one prototype (confident, hence v1's pick) no longer
wins; every run logs both rules at `tau` and at every tau of `fusion_taus` (selection only: no
training depends on them). `teacher_noise_aug: true` [false] replaces each teacher training clip,
with probability 0.5, by a noisy version drawn like the noisy student's training noise, from its
own seeded stream (prototypes still from clean clips, the noisy student's target still t(clean)).

Stages (a round is an epoch): teacher (15), clean student (15), noisy student (15) -> 45 rounds.
Noise (section 4.3) is added to waveforms before the features, by the client, with numpy
generators seeded from (run seed, purpose, epoch / condition name) only, so changing a setting of
the models never changes the data. The platform's ClientData carries the clean features of the
`fsdd` dataset (`fedkd.taskdata.audio`); the client reads the matching waveforms from the data dir
for the noisy versions and checks that rows line up.

ASSUMED choices (all settings unless noted): the two KD stages read as "clean student, then noisy
student initialized from it" (`init_noisy_from_clean`); tau = 0.05; the teacher's classifier head
acts on the unnormalized embedding (not a setting); student inverted-residual widths 16/64/96
(`student_hidden`); babble pools split at take 28 (`babble_split_take`: train noise from takes
5-27, test noise from takes 28-49) with talkers of other speakers than the clip; fresh training
noise every epoch (seeded by the round); SNRs measured over the recording's span inside the 1 s
window; "device" = zero-phase Butterworth magnitude low-pass (see `fedkd.taskdata.audio.lowpass`)
then white noise at the condition's SNR relative to the filtered clip; 10% validation carved from
the official training split inside the client, stratified by digit (`val_fraction`); the noisy
student's validation set gets one fixed noise draw; a fresh Adam state for each stage; per-band
feature statistics of the whole clean official training split (validation clips included).
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedkd.clients.base import Arrays, ClientData, EvalResult, RoundInfo, train_epochs
from fedkd.clients.staged import StagedMethod, Stages, stage_of
# re-exported: the audio side and the fusion functions lived here before the split
from fedkd.clients.mixclap_audio import (  # noqa: F401
    _NOISE_DOMAIN, _TEST_NOISE, _TRAIN_NOISE, _VAL_NOISE, _VAL_SPLIT, NOISE_KINDS, Condition,
    MixAudio, Split, WaveRows, parse_condition, seeded_rng, validation_split)
from fedkd.clients.mixclap_fusion import (  # noqa: F401
    SELECTION_RULES, TIE_RTOL, FusionResult, argmin_prefer_larger, class_prototypes, entropy_fusion,
    fuse, fusion_grid, grid_accuracies, grid_entropies, infomax_objective, prototype_logits,
    select_fusion, unit)
from fedkd.config import ConfigError, FedkdConfig, data_dir, setting
from fedkd.kd import embed_cosine_loss

DESCRIPTION = ("centralized (1 client): Mix-CLAP, teacher -> clean and noisy distilled students, "
               "entropy-minimizing test-time fusion (FSDD)")


@dataclass
class MixCLAPSettings:
    name: str = "mixclap"
    teacher_epochs: int = setting(15, min=1)
    clean_epochs: int = setting(15, min=1)
    noisy_epochs: int = setting(15, min=1)
    teacher_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    embed_dim: int = setting(128, min=1)
    student_channels: list[int] = field(default_factory=lambda: [16, 24, 40])  # stem = first
    student_hidden: list[int] = field(default_factory=lambda: [16, 64, 96])  # ASSUMED IR widths
    tau: float = setting(0.05, gt=0.0)  # ASSUMED cosine-logit temperature
    fusion: str = setting("per_condition", choices=("per_condition", "per_clip"))
    fusion_steps: int = setting(20, min=1)  # grid {0, 1/steps, ..., 1}
    #: (v2) the rule that picks lambda* for the served model: infomax (v2, ASSUMED) or entropy
    #: (v1); every run logs both rules at every tau in `fusion_taus`
    lambda_select: str = setting("infomax", choices=("entropy", "infomax"))
    #: (v2, ASSUMED values) temperatures at which both rules are also evaluated (no training)
    fusion_taus: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    #: (v2, ASSUMED) the teacher stage replaces each clip with probability 0.5 by a noisy version
    #: drawn like the noisy student's training noise (false = v1)
    teacher_noise_aug: bool = False
    init_noisy_from_clean: bool = True  # ASSUMED reading of "two-stage KD"
    train_snrs: list[float] = field(default_factory=lambda: [20.0, 10.0, 5.0, 0.0])
    babble_prob: float = setting(0.5, min=0.0, max=1.0)  # share of babble vs white training noise
    babble_talkers: int = setting(3, min=1)
    babble_split_take: int = setting(28, min=6, max=49)  # ASSUMED: train pool < it <= test pool
    lowpass_hz: float = setting(1500.0, gt=0.0)
    lowpass_order: int = setting(4, min=1)
    conditions: list[str] = field(default_factory=lambda: [
        "clean", "white:20", "white:10", "white:5", "white:0", "babble:10", "babble:0", "device:10"])
    val_fraction: float = setting(0.1, min=0.0, lt=1.0)  # ASSUMED: carved in the client
    timing_clips: int = setting(64, min=1)  # clips timed for the CPU ms/clip metrics


def check_settings(cfg: FedkdConfig, settings: MixCLAPSettings) -> None:
    """Cross-section checks for the registry (`MethodSpec.check`)."""
    if cfg.data.dataset != "fsdd" or cfg.data.num_clients != 1:
        raise ConfigError("data.dataset", cfg.data.dataset,
                          "mixclap is centralized on FSDD: use data.dataset=fsdd, data.num_clients=1")
    try:
        labels = [parse_condition(c).label for c in settings.conditions]
    except ValueError as exc:
        raise ConfigError("method.conditions", settings.conditions, str(exc)) from None
    if not labels or len(set(labels)) != len(labels):
        raise ConfigError("method.conditions", settings.conditions, "need distinct conditions")
    if len(settings.student_channels) != 3 or len(settings.student_hidden) != 3:
        raise ConfigError("method.student_channels", settings.student_channels,
                          "students have 3 inverted-residual blocks: give 3 channels and 3 hidden")
    if not settings.train_snrs:
        raise ConfigError("method.train_snrs", settings.train_snrs, "need at least one SNR")
    if settings.lambda_select == "infomax" and settings.fusion != "per_condition":
        raise ConfigError("method.fusion", settings.fusion,
                          "per_condition with method.lambda_select=infomax (it needs a batch of "
                          "several classes)")
    if any(not t > 0 for t in settings.fusion_taus):
        raise ConfigError("method.fusion_taus", list(settings.fusion_taus), "positive temperatures")


# --- models ------------------------------------------------------------------------------------

class TeacherCNN(nn.Module):
    """4 x (conv3x3, BN, ReLU, maxpool 2), global average pool, linear embedding, linear head.

    The head (on the unnormalized embedding, ASSUMED) only serves the teacher's own CE training;
    t(x) = normalize(embed(x)).
    """

    def __init__(self, channels: list[int], embed_dim: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.project = nn.Linear(c_in, embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.project(self.features(x.contiguous(memory_format=torch.channels_last)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        squeeze = max(4, channels // 4)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, squeeze, 1), nn.ReLU(),
                                  nn.Conv2d(squeeze, channels, 1), nn.Hardsigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expand (when widths differ), depthwise 3x3, SE, 1x1 project."""

    def __init__(self, c_in: int, hidden: int, c_out: int, stride: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if hidden != c_in:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.Hardswish(), SqueezeExcite(hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class StudentEncoder(nn.Module):
    """Tiny MobileNetV3-style encoder (~24k params): stem conv stride 2, 3 IR blocks (strides
    1, 2, 2), global pool, linear to the embedding. Output unnormalized (callers normalize).
    Runs channels_last (depthwise convolutions are about twice as fast that way on CPU)."""

    def __init__(self, channels: list[int], hidden: list[int], embed_dim: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels[0], 3, 2, 1, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.Hardswish())
        blocks, c_in = [], channels[0]
        for i, (h, c) in enumerate(zip(hidden, channels)):
            blocks.append(InvertedResidual(c_in, h, c, 1 if i == 0 else 2))
            c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.project = nn.Linear(c_in, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return self.project(self.pool(self.blocks(self.stem(x))))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the client --------------------------------------------------------------------------------

Objective = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@torch.no_grad()
def embed_all(model: Callable[[Tensor], Tensor], x: Tensor, batch: int = 500) -> Tensor:
    """model(x) in eval-sized chunks, no gradient."""
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def distill_objective(student: nn.Module, inputs: Tensor, targets: Tensor, prototypes: Tensor,
                      tau: float, tally: list[float] | None = None) -> Objective:
    """The step of both student stages for `train_epochs` over ROW INDICES: the batch's "x" holds
    row numbers, so the student input (clean or noisy clip) and the teacher target (always the
    embedding of the CLEAN clip) are looked up with the same rows. Reports prototype logits."""

    def objective(idx: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        e = student(inputs[idx])
        loss = embed_cosine_loss(e, targets[idx])
        if tally is not None:
            tally[0] += loss.item() * len(idx)
            tally[1] += len(idx)
        return loss, prototype_logits(e.detach(), prototypes, tau)

    return objective


class PrototypeStudent(nn.Module):
    """A student served alone (the clean stage): cosine logits / tau against the prototypes."""

    def __init__(self, student: nn.Module, prototypes: Tensor, tau: float) -> None:
        super().__init__()
        self.student, self.tau = student, tau
        self.register_buffer("prototypes", prototypes)

    def logits(self, embeddings: Tensor) -> Tensor:
        return prototype_logits(embeddings, self.prototypes, self.tau)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(embed_all(self.student, x))


class FusedStudents(nn.Module):
    """The model Mix-CLAP serves: both students, fused by entropy minimization over the batch it
    is given (`fusion: per_condition`: one batch = one test condition; `per_clip`: per clip), as
    cosine logits / tau against the class prototypes. tau and the fusion mode are its non-tensor
    state (`get_extra_state`)."""

    def __init__(self, clean: nn.Module, noisy: nn.Module, prototypes: Tensor, grid: Tensor,
                 tau: float, mode: str, rule: str = "entropy") -> None:
        super().__init__()
        self.clean, self.noisy, self.tau, self.mode, self.rule = clean, noisy, tau, mode, rule
        self.register_buffer("prototypes", prototypes)
        self.register_buffer("grid", grid)

    def fuse(self, e_clean: Tensor, e_noisy: Tensor) -> FusionResult:
        return select_fusion(e_clean, e_noisy, self.prototypes, self.tau, self.grid, self.mode,
                             self.rule)

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(embed_all(self.clean, x), embed_all(self.noisy, x)).logits

    def get_extra_state(self) -> dict[str, Any]:
        return {"tau": self.tau, "fusion": self.mode, "lambda_select": self.rule}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.tau, self.mode = float(state["tau"]), str(state["fusion"])
        self.rule = str(state.get("lambda_select", "entropy"))  # models saved before v2: entropy


def _fingerprint(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha1()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class MixCLAPClient(StagedMethod):
    """Teacher, clean student and noisy student in the client state; fused at evaluation."""

    MODELS = ("teacher", "student_clean", "student_noisy")
    score = "accuracy"  # mean over test conditions of the stage's serving model (fused at the end)

    @classmethod
    def stages(cls, settings: MixCLAPSettings) -> Stages:
        return [("teacher", settings.teacher_epochs), ("clean", settings.clean_epochs),
                ("noisy", settings.noisy_epochs)]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s, seed = self.settings, self.cfg.experiment.seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            teacher = TeacherCNN(list(s.teacher_channels), s.embed_dim, self.num_classes)
            torch.manual_seed(seed + 1)
            clean = StudentEncoder(list(s.student_channels), list(s.student_hidden), s.embed_dim)
            torch.manual_seed(seed + 2)  # used only when init_noisy_from_clean is off
            noisy = StudentEncoder(list(s.student_channels), list(s.student_hidden), s.embed_dim)
        # channels_last: about 2x faster depthwise convolutions on CPU (measured), same results
        self.nets = nn.ModuleDict({"teacher": teacher, "student_clean": clean, "student_noisy": noisy}
                                  ).to(self.device, memory_format=torch.channels_last)
        self._init = {k: copy.deepcopy(m.state_dict()) for k, m in self.nets.items()}
        self.conditions = [parse_condition(c) for c in s.conditions]
        self.grid = fusion_grid(s.fusion_steps).to(self.device)
        self.audio: MixAudio | None = None  # built on first use (tests may inject a small one)
        self._split: Split | None = None
        self._cond_features: dict[str, Tensor] = {}
        self._noisy_val: Tensor | None = None
        self._teacher_eval: tuple[str, dict[str, float]] | None = None

    # state store helpers (as in HintonKDClient)
    def _load(self, name: str, state: dict[str, Any], source: str | None = None) -> nn.Module:
        model = self.nets[name]
        model.load_state_dict(state.get(source or name) or self._init[name])
        return model

    def _save(self, name: str, state: dict[str, Any]) -> Arrays:
        state[name] = {k: v.detach().clone(memory_format=torch.contiguous_format)
                       for k, v in self.nets[name].state_dict().items()}
        return state[name]

    def _frozen_teacher(self, state: dict[str, Any]) -> TeacherCNN:
        return self._load("teacher", state).eval().requires_grad_(False)  # type: ignore[return-value]

    # data
    def split(self, data: ClientData) -> Split:
        if self._split is None or len(self._split.train) + len(self._split.val) != len(data.y_train):
            self._split = validation_split(data.y_train.cpu().numpy(), self.settings.val_fraction,
                                           self.cfg.experiment.seed)
        return self._split

    def source(self, data: ClientData) -> MixAudio:
        """The waveforms behind `data`, checked to line up with its rows."""
        if self.audio is None:
            self.audio = MixAudio.from_data_dir(data_dir(self.cfg.data), self.settings,
                                                self.cfg.experiment.seed)
        a = self.audio
        if not (np.array_equal(a.train.labels, data.y_train.cpu().numpy())
                and np.array_equal(a.test.labels, data.y_test.cpu().numpy())):
            raise RuntimeError("mixclap: the waveforms do not line up with the client's rows; "
                               "it needs data.dataset=fsdd (fedkd.taskdata.audio)")
        return a

    def condition_features(self, data: ClientData) -> dict[str, Tensor]:
        """Test features per condition, built once per process ("clean" is the dataset's own)."""
        missing = [c for c in self.conditions if c.label not in self._cond_features]
        for c in missing:
            self._cond_features[c.label] = (data.x_test if c.kind == "clean" else
                                            self.source(data).features(
                                                self.source(data).condition_waves(c)).to(self.device))
        return {c.label: self._cond_features[c.label] for c in self.conditions}

    def teacher_products(self, state: dict[str, Any], data: ClientData) -> tuple[Tensor, Tensor]:
        """(prototypes (C, D), unit teacher embeddings of every training row (N, D)), computed
        once from the final teacher and stored in the state."""
        if "prototypes" not in state:
            teacher = self._frozen_teacher(state)
            emb = unit(embed_all(teacher.embed, data.x_train))
            tr = self.split(data).train
            state["teacher-embeddings"] = emb
            state["prototypes"] = class_prototypes(emb[tr], data.y_train[tr], self.num_classes)
        return state["prototypes"].to(self.device), state["teacher-embeddings"].to(self.device)

    # training
    def train_stage(self, stage: str, state: dict[str, Any], data: ClientData,
                    info: RoundInfo) -> tuple[dict[str, float], Arrays]:
        sp = self.split(data)
        tr, val = sp.train.to(self.device), sp.val.to(self.device)
        y_tr, y_val = data.y_train[tr], data.y_train[val]
        if stage == "teacher":
            teacher = self._load("teacher", state).requires_grad_(True)
            x_teacher, replaced = data.x_train[tr], None
            if self.settings.teacher_noise_aug:  # (v2) its own noise stream, fresh each epoch
                x_teacher, replaced = self.source(data).teacher_augmented(
                    info.server_round, sp.train, x_teacher)
            metrics = train_epochs(teacher, ClientData(x_teacher, y_tr, data.x_train[val], y_val),
                                   self.cfg, info.generator(), epochs=1, state=state,
                                   optimizer_key="optimizer-teacher")
            if replaced is not None:
                metrics["teacher-augmented-share"] = float(replaced.float().mean())
            if len(val):
                metrics["val-accuracy"] = _accuracy(embed_all(teacher.eval(), data.x_train[val]), y_val)
            return metrics, dict(self._save("teacher", state))
        prototypes, targets = self.teacher_products(state, data)
        if stage == "clean":
            name, key = "student_clean", "optimizer-clean"
            student = self._load(name, state)
            inputs, val_inputs = data.x_train[tr], data.x_train[val]
        else:
            name, key = "student_noisy", "optimizer-noisy"
            first = "student_noisy" not in state and self.settings.init_noisy_from_clean
            student = self._load(name, state, "student_clean" if first else None)
            inputs = self.source(data).noisy_train(info.server_round, sp.train).to(self.device)
            if self._noisy_val is None:
                self._noisy_val = self.source(data).noisy_val(sp.val).to(self.device)
            val_inputs = self._noisy_val
        tally = [0.0, 0]
        objective = distill_objective(student, inputs, targets[tr], prototypes, self.settings.tau, tally)
        rows = torch.arange(len(tr), device=self.device)
        metrics = train_epochs(student, ClientData(rows, y_tr, rows[:0], y_tr[:0]), self.cfg,
                               info.generator(), epochs=1, objective=objective, state=state,
                               optimizer_key=key)
        metrics["distill-loss"] = tally[0] / max(tally[1], 1)
        if len(val):
            e_val = embed_all(student.eval(), val_inputs)
            metrics["val-accuracy"] = _accuracy(prototype_logits(e_val, prototypes, self.settings.tau),
                                                y_val)
            metrics["val-distill-loss"] = float(embed_cosine_loss(e_val, targets[val]))
        return metrics, dict(self._save(name, state))

    # evaluation
    def inference_model(self, received: Arrays, state: dict[str, Any], partition_id: int,
                        server_round: int | None = None) -> nn.Module:
        """The stage's serving model: the teacher (its head), the clean student against the
        prototypes (PrototypeStudent), then both students fused (FusedStudents). The prototypes
        come from the state (zeros in a skeleton built before any)."""
        stage, s = self.stage_at(server_round), self.settings
        if stage == "teacher":
            return self._load("teacher", state)
        prototypes = state.get("prototypes")
        prototypes = (torch.zeros(self.num_classes, s.embed_dim) if prototypes is None
                      else prototypes.clone()).to(self.device)
        clean = self._load("student_clean", state)
        if stage == "clean":
            return PrototypeStudent(clean, prototypes, s.tau)
        return FusedStudents(clean, self._load("student_noisy", state), prototypes,
                             self.grid.clone(), s.tau, s.fusion, s.lambda_select)

    @torch.no_grad()
    def evaluate(self, received: Arrays, state: dict[str, Any], data: ClientData,
                 info: RoundInfo) -> EvalResult:
        _, stage = stage_of(self.stages(self.settings), info.server_round)
        conds = self.condition_features(data)
        y, s, n = data.y_test, self.settings, len(data.y_test)
        extra: dict[str, float] = {"teacher-params": float(num_params(self.nets["teacher"])),
                                   "student-params": float(num_params(self.nets["student_clean"]))}
        if stage == "teacher":
            teacher = self.inference_model(received, state, info.partition_id,
                                           info.server_round).eval()
            accs, nlls = [], []
            for label, x in conds.items():
                z = embed_all(teacher, x)
                accs.append(_accuracy(z, y))
                nlls.append(float(F.cross_entropy(z, y)))
                extra[f"teacher-head-accuracy-{label}"] = accs[-1]
            extra["teacher-head-accuracy-mean"] = float(np.mean(accs))
            return EvalResult(float(np.mean(nlls)), float(np.mean(accs)), n, extra)
        prototypes, _ = self.teacher_products(state, data)
        served = self.inference_model(received, state, info.partition_id, info.server_round).eval()
        extra.update(self._teacher_metrics(state, conds, y, prototypes))
        clean = self._load("student_clean", state).eval()
        e_clean = {label: embed_all(clean, x) for label, x in conds.items()}
        if stage == "clean":
            accs, nlls = [], []
            for label, e in e_clean.items():
                z = served.logits(e)
                accs.append(_accuracy(z, y))
                nlls.append(float(F.cross_entropy(z, y)))
                extra[f"clean-student-accuracy-{label}"] = accs[-1]
            extra["clean-student-accuracy-mean"] = float(np.mean(accs))
            return EvalResult(float(np.mean(nlls)), float(np.mean(accs)), n, extra)
        noisy = self._load("student_noisy", state).eval()
        fused_nll = []
        per: dict[str, list[float]] = {}
        for label, x in conds.items():
            e_c, e_n = e_clean[label], embed_all(noisy, x)
            fusion = served.fuse(e_c, e_n)
            oracle = grid_accuracies(e_c, e_n, prototypes, s.tau, self.grid, y)
            best = int(oracle.numel() - 1 - torch.argmax(oracle.flip(0)))
            row = {"fused": _accuracy(fusion.logits, y),
                   "clean-student": _accuracy(prototype_logits(e_c, prototypes, s.tau), y),
                   "noisy-student": _accuracy(prototype_logits(e_n, prototypes, s.tau), y),
                   "fixed-half": _accuracy(prototype_logits(fuse(e_c, e_n, 0.5), prototypes, s.tau), y),
                   "oracle": float(oracle[best])}
            for model, acc in row.items():
                extra[f"{model}-accuracy-{label}"] = acc
                per.setdefault(model, []).append(acc)
            extra[f"fusion-weight-{label}"] = float(fusion.weights.mean())
            extra[f"oracle-weight-{label}"] = float(self.grid[best])
            for key, value in self._all_rules(e_c, e_n, prototypes, y, label).items():
                extra[key] = value
                if key.startswith("fused-"):  # "fused-<rule>[-tau<t>]-accuracy-<cond>"
                    per.setdefault(key.removesuffix(f"-accuracy-{label}"), []).append(value)
            for lam, h in zip(self.grid.tolist(), fusion.entropies.tolist()):
                extra[f"fusion-entropy-{label}-{round(100 * lam):03d}"] = h
            fused_nll.append(float(F.cross_entropy(fusion.logits, y)))
        for model, accs in per.items():
            extra[f"{model}-accuracy-mean"] = float(np.mean(accs))
        extra["fused-minus-best-student"] = extra["fused-accuracy-mean"] - max(
            extra["clean-student-accuracy-mean"], extra["noisy-student-accuracy-mean"])
        if "fusion-weight-clean" in extra and "fusion-weight-white0" in extra:
            extra["fusion-weight-clean-above-white0"] = float(
                extra["fusion-weight-clean"] > extra["fusion-weight-white0"])
        extra.update(self._timings(state, conds, prototypes))
        return EvalResult(float(np.mean(fused_nll)), extra["fused-accuracy-mean"], n, extra)

    def _all_rules(self, e_c: Tensor, e_n: Tensor, prototypes: Tensor, y: Tensor,
                   label: str) -> dict[str, float]:
        """(v2) Both selection rules at the headline tau and at every tau of `fusion_taus`
        (per condition): `fused-<rule>[-tau<t>]-accuracy-<cond>` and `fusion-weight-<rule>[-tau<t>]-
        <cond>`; the unsuffixed names are the headline tau. No labels reach a selection."""
        s = self.settings
        out: dict[str, float] = {}
        taus = [(s.tau, "")] + [(t, f"-tau{t:g}") for t in s.fusion_taus]
        for rule in SELECTION_RULES:
            if rule == "infomax" and s.fusion != "per_condition":
                continue
            for tau, suffix in taus:
                r = select_fusion(e_c, e_n, prototypes, tau, self.grid, s.fusion, rule)
                out[f"fused-{rule}{suffix}-accuracy-{label}"] = _accuracy(r.logits, y)
                out[f"fusion-weight-{rule}{suffix}-{label}"] = float(r.weights.mean())
        return out

    def _teacher_metrics(self, state: dict[str, Any], conds: dict[str, Tensor], y: Tensor,
                         prototypes: Tensor) -> dict[str, float]:
        """The frozen teacher's prototype accuracy per condition, computed once per teacher."""
        key = _fingerprint(state["teacher"])
        if self._teacher_eval is None or self._teacher_eval[0] != key:
            teacher = self._frozen_teacher(state)
            out, accs = {}, []
            for label, x in conds.items():
                accs.append(_accuracy(prototype_logits(embed_all(teacher.embed, x), prototypes,
                                                       self.settings.tau), y))
                out[f"teacher-accuracy-{label}"] = accs[-1]
            out["teacher-accuracy-mean"] = float(np.mean(accs))
            self._teacher_eval = (key, out)
        return dict(self._teacher_eval[1])

    def _timings(self, state: dict[str, Any], conds: dict[str, Tensor],
                 prototypes: Tensor) -> dict[str, float]:
        """CPU ms per clip of the teacher and of the fused student pair (wall clock, not exact)."""
        x = next(iter(conds.values()))[:self.settings.timing_clips]
        teacher = self._frozen_teacher(state)
        clean, noisy = self.nets["student_clean"].eval(), self.nets["student_noisy"].eval()
        s = self.settings
        start = time.perf_counter()
        prototype_logits(teacher.embed(x), prototypes, s.tau)
        mid = time.perf_counter()
        select_fusion(clean(x), noisy(x), prototypes, s.tau, self.grid, s.fusion, s.lambda_select)
        end = time.perf_counter()
        return {"teacher-ms-per-clip": 1000 * (mid - start) / len(x),
                "students-ms-per-clip": 1000 * (end - mid) / len(x)}


def _accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())
