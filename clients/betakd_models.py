"""Beta-KD's models and side-by-side student variants (split from `clients/betakd.py`, behaviour
unchanged): the image / audio / multimodal teachers, the two-branch MLP student, and `Variant`,
one student with its channel losses and its weighting (`equal`, `task`, `instance`, `mt-*`;
`../shared/specs/centralized.md` section 5.2). The staged client lives in `clients/betakd.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedkd.kd import clamp_log_vars, combine_channels, feature_distance, kd_loss
from fedkd.models import FedModel
from fedkd.taskdata.avmnist import AUDIO_BANDS, AUDIO_DIM, AUDIO_FRAMES, IMAGE_DIM, INPUT_DIM

if TYPE_CHECKING:
    from fedkd.clients.betakd import BetaKDSettings

TEACHERS = ("image", "audio", "multimodal")
TEACHER_FEATURE_DIM = 128


# --------------------------------------------------------------------------- models

def split_modalities(x: Tensor) -> tuple[Tensor, Tensor]:
    """Packed (B, 1784) -> image (B, 784) and audio (B, 1000) (layout: fedkd.taskdata.avmnist)."""
    return x[:, :IMAGE_DIM], x[:, IMAGE_DIM:INPUT_DIM]


class ImageEncoder(nn.Module):
    """Image CNN: conv 32-64 (3x3, ReLU, 2x2 max-pool), FC 128 (spec 5.2)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, TEACHER_FEATURE_DIM), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(split_modalities(x)[0].reshape(-1, 1, 28, 28))


class AudioEncoder(nn.Module):
    """Audio CNN on the pooled 40 x 25 log-mel: conv 32-64, FC 128 (spec 5.2)."""

    def __init__(self) -> None:
        super().__init__()
        h, w = AUDIO_BANDS // 4, AUDIO_FRAMES // 4
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * h * w, TEACHER_FEATURE_DIM), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(split_modalities(x)[1].reshape(-1, 1, AUDIO_BANDS, AUDIO_FRAMES))


class Fused(nn.Module):
    """Both encoders (own weights), concatenated -> 256 -> 128 (the multimodal teacher's h_t)."""

    def __init__(self) -> None:
        super().__init__()
        self.image, self.audio = ImageEncoder(), AudioEncoder()
        self.fuse = nn.Sequential(nn.Linear(2 * TEACHER_FEATURE_DIM, TEACHER_FEATURE_DIM), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(torch.cat([self.image(x), self.audio(x)], dim=-1))


class StudentFeatures(nn.Module):
    """Image MLP 784-h and audio MLP 1000-h, concatenated (h_s, 2h = 64 by default)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(IMAGE_DIM, hidden), nn.ReLU())
        self.audio = nn.Sequential(nn.Linear(AUDIO_DIM, hidden), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        image, audio = split_modalities(x)
        return torch.cat([self.image(image), self.audio(audio)], dim=-1)


def build_teacher(kind: str, num_classes: int) -> FedModel:
    """Teacher `kind` as features (-> 128-d) + linear head, so h_t = model.features(x)."""
    features: nn.Module = {"image": ImageEncoder, "audio": AudioEncoder, "multimodal": Fused}[kind]()
    return FedModel(features, nn.Linear(TEACHER_FEATURE_DIM, num_classes), TEACHER_FEATURE_DIM)


def build_student(hidden: int, num_classes: int) -> FedModel:
    """The ~60k-parameter two-branch MLP student."""
    return FedModel(StudentFeatures(hidden), nn.Linear(2 * hidden, num_classes), 2 * hidden)


# --------------------------------------------------------------------------- variants

#: teacher name -> (logits (B, C), penultimate features (B, 128))
TeacherOutputs = dict[str, tuple[Tensor, Tensor]]


class VariantOutput(NamedTuple):
    loss: Tensor  # the variant's scalar objective
    logits: Tensor  # student logits (B, C)
    losses: Tensor  # per-sample channel losses (B, K), detached
    log_vars: Tensor | None  # clamped s: (K,) task, (B, K) instance, None otherwise (detached)


class Variant(nn.Module):
    """One side-by-side student: its model, projector and weight parameters, and its channels.

    Channels: `ce_only` -> (ce); single-teacher modes -> (ce, kd, fd) against the multimodal
    teacher; `mt-*` -> (ce, kd-<teacher> for each listed teacher). Teacher outputs are detached
    here, whatever the caller passes, so no gradient can reach a teacher.
    """

    def __init__(self, name: str, student: FedModel, projector: nn.Module | None,
                 teachers: tuple[str, ...], num_classes: int, settings: BetaKDSettings) -> None:
        super().__init__()
        self.variant = name
        base = name.removeprefix("mt-")
        self.mode: str = "equal" if base == "ce_only" else base
        self.multi = name.startswith("mt-")
        self.teachers = teachers if self.multi else ("multimodal",)
        if name == "ce_only":
            self.channels: tuple[str, ...] = ("ce",)
        elif self.multi:
            self.channels = ("ce",) + tuple(f"kd-{t}" for t in teachers)
        else:
            self.channels = ("ce", "kd", "fd")
        self.temperature, self.bound = settings.temperature, settings.clamp
        self.batch_mean = settings.instance_losses == "batch_mean"
        self.straight_through = settings.instance_clamp == "straight_through"
        self.student = student
        if "fd" in self.channels:
            assert projector is not None
            self.projector = projector
        k = len(self.channels)
        if self.mode == "task":
            self.log_vars = nn.Parameter(torch.zeros(k))
        elif self.mode == "instance":
            last = nn.Linear(settings.instance_hidden, k)
            if settings.instance_zero_init:
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)
            self.weighter = nn.Sequential(
                nn.Linear(TEACHER_FEATURE_DIM * len(self.teachers), settings.instance_hidden),
                nn.ReLU(), last)

    def weight_prefixes(self) -> list[str]:
        """Parameter names (under this module) that take the weight learning rate."""
        return {"task": ["log_vars"], "instance": ["weighter"]}.get(self.mode, [])

    def instance_log_vars(self, teacher: TeacherOutputs) -> Tensor:
        """s(x) from the DETACHED teacher features, clamped (B, K)."""
        feats = torch.cat([teacher[t][1].detach() for t in self.teachers], dim=-1)
        return clamp_log_vars(self.weighter(feats), self.bound,
                              straight_through=self.straight_through)

    def forward(self, x: Tensor, y: Tensor, teacher: TeacherOutputs) -> VariantOutput:
        h_s = self.student.features(x)
        z_s = self.student.head(h_s)
        cols = [F.cross_entropy(z_s, y, reduction="none")]
        if self.variant != "ce_only":
            for t in self.teachers:
                cols.append(kd_loss(z_s, teacher[t][0].detach(), self.temperature, reduction="none"))
            if "fd" in self.channels:
                h_t = teacher["multimodal"][1].detach()
                cols.append(feature_distance(self.projector(h_s), h_t, reduction="none"))
        losses = torch.stack(cols, dim=-1)  # (B, K)
        log_vars: Tensor | None = None
        if self.mode == "equal":
            loss = combine_channels("equal", losses)
        elif self.mode == "task":
            with torch.no_grad():  # keep the raw parameter inside the clamp (where it has gradient)
                self.log_vars.clamp_(-self.bound, self.bound)
            log_vars = clamp_log_vars(self.log_vars, self.bound)
            loss = combine_channels("task", losses, log_vars, self.bound)
        else:
            log_vars = self.instance_log_vars(teacher)
            used = losses.mean(dim=0, keepdim=True).expand_as(losses) if self.batch_mean else losses
            loss = combine_channels("instance", used, log_vars, self.bound)
        return VariantOutput(loss, z_s, losses.detach(),
                             None if log_vars is None else log_vars.detach())


def teacher_fingerprint(teachers: nn.Module) -> tuple[float, ...]:
    """Cheap identity of the teachers' weights (they are frozen after their stage)."""
    return tuple(float(v.double().sum()) for v in teachers.state_dict().values())


def accuracy_nll(logits: Tensor, y: Tensor) -> tuple[float, float]:
    return float((logits.argmax(-1) == y).float().mean()), float(F.cross_entropy(logits, y))
