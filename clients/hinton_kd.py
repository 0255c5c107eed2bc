"""Classic knowledge distillation (Hinton, Vinyals, Dean, 2015) as a one-client staged method.

Stages (a round is an epoch): `teacher_epochs` of the teacher alone, then
`student_epochs` in which the KD student learns from the frozen teacher with
(1 - alpha) CE + alpha T^2 KL(p_t^T || p_s^T) (`fedkd.kd.soft_hard_loss`) while a baseline
student (same architecture, same init, same batches, alpha = 0) trains beside it,
so one run gives both numbers (`../shared/specs/centralized.md` section 1).
Models are MLPs scaled down from the paper for the CPU budget (teacher 256-256 with
dropout 0.2, student 32); T = 4 and alpha = 0.9 are ASSUMED (the paper has no single
default; it used T = 20 on MNIST), both settings. Data: the run's dataset, e.g.
`mnist5k` with `data.num_clients: 1` (the spec's stratified 80/20 + validation split is
replaced by the platform's seeded 80/20 split: `data.test_fraction: 0.2`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fedkd.clients.base import (Arrays, ClientData, EvalResult, RoundInfo, copy_state,
                                evaluate_model, train_epochs)
from fedkd.clients.staged import StagedMethod, Stages, stage_of
from fedkd.config import setting
from fedkd.kd import soft_hard_loss
from fedkd.metrics import agreement, expected_calibration_error
from fedkd.models import FedModel, mlp


@dataclass
class KDSettings:
    name: str = "kd"
    teacher_hidden: list[int] = field(default_factory=lambda: [256, 256])
    teacher_dropout: float = setting(0.2, min=0.0, lt=1.0)
    student_hidden: list[int] = field(default_factory=lambda: [32])
    temperature: float = setting(4.0, gt=0.0)  # ASSUMED (paper: 20 on MNIST with a large student)
    alpha: float = setting(0.9, min=0.0, max=1.0)  # weight of the soft term; ASSUMED
    teacher_epochs: int = setting(10, min=1)
    student_epochs: int = setting(20, min=1)


class HintonKDClient(StagedMethod):
    """Teacher, KD student and baseline student, all kept in the client state."""

    MODELS = ("teacher", "student", "baseline")

    @classmethod
    def stages(cls, settings: KDSettings) -> Stages:
        return [("teacher", settings.teacher_epochs), ("student", settings.student_epochs)]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s, seed = self.settings, self.cfg.experiment.seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            teacher = mlp(self.input_shape, tuple(s.teacher_hidden), self.num_classes, s.teacher_dropout)
            torch.manual_seed(seed + 1)
            student = mlp(self.input_shape, tuple(s.student_hidden), self.num_classes)
        self.nets = nn.ModuleDict({"teacher": teacher, "student": student,
                                   "baseline": copy.deepcopy(student)}).to(self.device)
        self._init = {k: copy.deepcopy(m.state_dict()) for k, m in self.nets.items()}

    def _load(self, name: str, state: dict[str, Any]) -> FedModel:
        model = self.nets[name]
        model.load_state_dict(state.get(name) or self._init[name])
        return model  # type: ignore[return-value]

    def _save(self, name: str, state: dict[str, Any]) -> Arrays:
        state[name] = copy_state(self.nets[name])
        return state[name]

    def train_stage(self, stage: str, state: dict[str, Any], data: ClientData,
                    info: RoundInfo) -> tuple[dict[str, float], Arrays]:
        if stage == "teacher":
            teacher = self._load("teacher", state)
            metrics = train_epochs(teacher, data, self.cfg, info.generator(), epochs=1,
                                   state=state, optimizer_key="optimizer-teacher")
            return metrics, dict(self._save("teacher", state))
        teacher = self._load("teacher", state).eval().requires_grad_(False)
        student, baseline = self._load("student", state), self._load("baseline", state)
        s = self.settings
        baseline_loss = [0.0, 0]

        def objective(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            with torch.no_grad():
                z_t = teacher(x)
            z_s, z_b = student(x), baseline(x)
            kd = soft_hard_loss(z_s, z_t, y, s.temperature, s.alpha)
            plain = nn.functional.cross_entropy(z_b, y)
            baseline_loss[0] += plain.item() * len(y)
            baseline_loss[1] += len(y)
            return kd + plain, z_s  # disjoint parameters: each student gets its own gradient

        pair = nn.ModuleDict({"student": student, "baseline": baseline})
        metrics = train_epochs(pair, data, self.cfg, info.generator(), epochs=1, objective=objective,
                               state=state, optimizer_key="optimizer-students")
        teacher.requires_grad_(True)
        self._save("baseline", state)
        metrics["baseline-loss"] = baseline_loss[0] / max(baseline_loss[1], 1)
        return metrics, dict(self._save("student", state))

    def inference_model(self, received: Arrays, state: dict[str, Any], partition_id: int,
                        server_round: int | None = None) -> nn.Module:
        """The stage's model: the teacher, then the KD student."""
        teacher_stage = self.stage_at(server_round) == "teacher"
        return self._load("teacher" if teacher_stage else "student", state)

    @torch.no_grad()
    def evaluate(self, received: Arrays, state: dict[str, Any], data: ClientData,
                 info: RoundInfo) -> EvalResult:
        _, stage = stage_of(self.stages(self.settings), info.server_round)
        names = ("teacher",) if stage == "teacher" else self.MODELS
        logits = {n: self._load(n, state).eval()(data.x_test) for n in names}
        extra: dict[str, float] = {}
        for n, z in logits.items():
            extra[f"{n}-accuracy"] = float((z.argmax(-1) == data.y_test).float().mean())
            extra[f"{n}-nll"] = float(nn.functional.cross_entropy(z, data.y_test))
            extra[f"{n}-ece"] = expected_calibration_error(z, data.y_test)
        if stage != "teacher":
            extra["teacher-student-agreement"] = agreement(logits["teacher"], logits["student"])
        headline = evaluate_model(self.inference_model(received, state, info.partition_id,
                                                       info.server_round), data.x_test, data.y_test)
        headline.metrics = extra
        return headline
