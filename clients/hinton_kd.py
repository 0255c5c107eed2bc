"""Classic knowledge distillation (Hinton, Vinyals, Dean, 2015) as a one-client staged method.

Stages (a round is an epoch): `teacher_epochs` of the teacher alone, then `student_epochs` in
which the KD student learns from the frozen teacher with
(1 - alpha) CE + alpha T^2 KL(p_t^T || p_s^T) (`fedkd.kd.soft_hard_loss`) while a baseline
student (same architecture, same init, same batches, alpha = 0) trains beside it, so one run
gives both numbers (`../shared/specs/centralized.md` section 1).

v2 (spec 1.2-1.3 "(v2)"; every v1 behaviour stays reachable through its v1 value):
- `teacher_model: cnn` (v2) is PFLlib's FedAvgCNN (`fedkd.models`, 582,026 parameters on
  MNIST); `mlp` with `teacher_hidden` / `teacher_dropout` is v1's MLP teacher. ASSUMED: the
  paper's teacher is an MLP 784-1200-1200-10; a CNN is the cheapest teacher clearly above the
  students on 4,000 digits within the CPU budget.
- `val_fraction: 0.1` (v2; v1 0) carves a stratified validation split from the client's
  training part, seeded from the run seed (`kd_training.stratified_holdout`). It serves
  checkpoint choice and early stopping only; no choice reads the test split.
- `teacher_keep: best_val` (v2, ASSUMED; v1 `last`): the teacher kept for the student stage is
  its lowest-validation-CE epoch.
- `patience: 10` (v2, ASSUMED; v1 0 = off): after every student epoch each student's
  validation CE (hard labels, the same yardstick for both students) is logged; each keeps its
  lowest-validation weights, and one whose loss has not improved for `patience` epochs stops
  updating (its remaining rounds are no-ops, so the schedule stays fixed). Test metrics use
  the kept weights and report their `best-epoch`. With patience 0 the last epoch's weights
  are used. The bookkeeping lives in the client state, so the one-client reduction is exact.
- `jitter_px: 0 | 2` (default 0): every training image is shifted by an integer offset uniform
  in [-2, 2]^2 with zero fill, fresh each epoch from its own seeded generator (the batch order
  does not depend on it). The teacher trains on jittered images (as the paper's did); both
  students see the same jittered batch and the KD targets are the teacher's logits on it
  (jittering the students is ASSUMED).
- Without jitter the frozen teacher's logits on the training rows are computed once per round
  (in eval mode, deterministic), not per batch.

- `teacher_from: RUN_DIR` (default "": train the teacher): take the kept teacher of a finished kd
  run instead of training one, e.g. for a T x alpha grid, whose cells all distill the same teacher.
  That run must have trained exactly the teacher this run would (the same seed, data, train and
  teacher settings; checked before the run, naming the first key that differs), so the student
  stage starts from the state a run training its own teacher reaches, and its results are that
  run's. The teacher-stage rounds then only load the teacher (and evaluate it); `${experiment.seed}`
  in the path picks each seed's run in a sweep.

T = 4 and alpha = 0.9 are ASSUMED (the paper has no single default; it used T = 20 on MNIST).
Data: the run's dataset, e.g. `mnist5k` with `data.num_clients: 1` and `data.test_fraction:
0.2` (the platform's seeded 80/20 split; validation is carved from the 80%).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from fedkd.clients.base import (Arrays, ClientData, EvalResult, RoundInfo, batches, copy_state,
                                evaluate_model, make_optimizer)
from fedkd.clients.kd_training import (EarlyStop, jitter_offsets, shift_images,
                                       stratified_holdout)
from fedkd.clients.staged import StagedMethod, Stages, stage_of
from fedkd.config import ConfigError, FedkdConfig, first_difference, from_yaml, setting
from fedkd.kd import soft_hard_loss
from fedkd.metrics import agreement, expected_calibration_error
from fedkd.models import FedModel, build_model, mlp
from fedkd.state import ClientStateStore

DESCRIPTION = "centralized (1 client): Hinton KD, teacher then KD + baseline students"
STUDENTS = ("student", "baseline")


@dataclass
class KDSettings:
    name: str = "kd"
    #: v2: PFLlib's CNN; v1: "mlp" (teacher_hidden, teacher_dropout)
    teacher_model: str = setting("cnn", choices=("cnn", "mlp"))
    teacher_hidden: list[int] = field(default_factory=lambda: [256, 256])  # mlp teacher only
    teacher_dropout: float = setting(0.2, min=0.0, lt=1.0)  # mlp teacher only
    student_hidden: list[int] = field(default_factory=lambda: [32])  # v2 runs: [32] and [100]
    temperature: float = setting(4.0, gt=0.0)  # ASSUMED (paper: 20 on MNIST with a large student)
    alpha: float = setting(0.9, min=0.0, max=1.0)  # weight of the soft term; ASSUMED
    teacher_epochs: int = setting(15, min=1)  # v2 (ASSUMED); v1 10
    student_epochs: int = setting(60, min=1)  # v2 (ASSUMED); v1 20
    val_fraction: float = setting(0.1, min=0.0, lt=1.0)  # v2; v1 0 (no validation split)
    patience: int = setting(10, min=0)  # v2 (ASSUMED); 0 = no early stopping (v1)
    teacher_keep: str = setting("best_val", choices=("best_val", "last"))  # v2 ASSUMED; v1 last
    jitter_px: int = setting(0, min=0, max=4)  # v2 option: 2 = the paper's input jitter
    teacher_from: str = ""  # a finished kd run whose kept teacher this run takes ("": train one)


#: the keys a run may differ in from the run it takes its teacher from (the teacher depends on none)
NOT_TEACHER = ("data.data_dir", "train.rounds", "train.fraction_clients", "method.temperature",
               "method.alpha", "method.student_hidden", "method.student_epochs", "method.patience",
               "method.teacher_from")
#: the state entries that are the teacher: its current and kept weights and its validation record
TEACHER_STATE = ("teacher", "teacher-best", "teacher-stop")


def check_settings(cfg: FedkdConfig, settings: KDSettings) -> None:
    """Early stopping and the best-validation teacher need a validation split."""
    if settings.val_fraction == 0 and settings.patience > 0:
        raise ConfigError("method.patience", settings.patience,
                          "0 when method.val_fraction is 0 (early stopping needs validation)")
    if settings.val_fraction == 0 and settings.teacher_keep == "best_val":
        raise ConfigError("method.teacher_keep", settings.teacher_keep,
                          "'last' when method.val_fraction is 0 (no validation to pick from)")
    if settings.teacher_from:  # absolute: Ray workers and a later --resume may run elsewhere
        cfg.method["teacher_from"] = str(check_teacher_source(cfg, settings.teacher_from))


def check_teacher_source(cfg: FedkdConfig, teacher_from: str) -> Path:
    """The finished kd run `teacher_from` names, if it trained exactly the teacher `cfg` would."""
    from fedkd.rundir import run_status  # driver side only: keeps flwr out of the client module

    source = Path(teacher_from).expanduser().resolve()
    if run_status(source) != "complete" or not ClientStateStore(source / "state").path(0).is_file():
        raise ConfigError("method.teacher_from", teacher_from,
                          "a finished kd run's directory (run.json status complete, state/0.pt); "
                          "run the teacher's experiment first")
    changed = first_difference(cfg, from_yaml((source / "config.yaml").read_text()), teacher_key)
    if changed:
        key, mine, theirs = changed
        raise ConfigError("method.teacher_from", teacher_from, f"a kd run that trained this run's "
                          f"teacher; it has {key}={theirs!r}, this run {mine!r}")
    return source


def teacher_key(key: str) -> bool:
    """A dotted config key the teacher's training depends on."""
    return key not in NOT_TEACHER and (key == "experiment.seed"
                                       or key.startswith(("data.", "train.", "method.")))


class HintonKDClient(StagedMethod):
    """Teacher, KD student and baseline student (and their kept checkpoints) in the client state.

    State keys: `teacher`, `student`, `baseline` (current weights); `teacher-best`,
    `student-best`, `baseline-best` (lowest-validation weights) with their `*-stop` records;
    `optimizer-teacher`, `optimizer-student`, `optimizer-baseline` (one Adam per model: Adam
    is elementwise, so this equals v1's one Adam over both students)."""

    MODELS = ("teacher", "student", "baseline")

    @classmethod
    def stages(cls, settings: KDSettings) -> Stages:
        return [("teacher", settings.teacher_epochs), ("student", settings.student_epochs)]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s, seed = self.settings, self.cfg.experiment.seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if s.teacher_model == "mlp":
                teacher = mlp(self.input_shape, tuple(s.teacher_hidden), self.num_classes,
                              s.teacher_dropout)
            else:
                teacher = build_model("cnn", self.input_shape, self.num_classes, seed)
            torch.manual_seed(seed + 1)
            student = mlp(self.input_shape, tuple(s.student_hidden), self.num_classes)
        self.nets = nn.ModuleDict({"teacher": teacher, "student": student,
                                   "baseline": copy.deepcopy(student)}).to(self.device)
        self._init = {k: copy.deepcopy(m.state_dict()) for k, m in self.nets.items()}
        self._split: tuple[Tensor, Tensor] | None = None

    # --- state ---------------------------------------------------------------------------------

    def _load(self, name: str, state: dict[str, Any], key: str | None = None) -> FedModel:
        model = self.nets[name]
        model.load_state_dict(state.get(key or name) or self._init[name])
        return model  # type: ignore[return-value]

    def _save(self, name: str, state: dict[str, Any], key: str | None = None) -> Arrays:
        state[key or name] = copy_state(self.nets[name])
        return state[key or name]

    def kept_key(self, name: str, state: dict[str, Any]) -> str:
        """Where the weights a model is judged by live: its best-validation checkpoint when one is
        kept (teacher: `teacher_keep: best_val`; students: `patience` > 0), else its current."""
        s = self.settings
        keeps = s.teacher_keep == "best_val" if name == "teacher" else s.patience > 0
        return f"{name}-best" if keeps and f"{name}-best" in state else name

    # --- data ----------------------------------------------------------------------------------

    def split(self, data: ClientData) -> tuple[Tensor, Tensor]:
        """(train rows, validation rows) of the client's training part (all rows, none, when
        `val_fraction` is 0)."""
        n = len(data.y_train)
        if self._split is None or len(self._split[0]) + len(self._split[1]) != n:
            if self.settings.val_fraction > 0:
                self._split = stratified_holdout(data.y_train.cpu().numpy(),
                                                 self.settings.val_fraction, self.cfg.experiment.seed)
            else:
                self._split = (torch.arange(n), torch.arange(0))
        return self._split

    def _batches(self, x: Tensor, y: Tensor, info: RoundInfo) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The epoch's batches (x, y): order from `info.generator()` (as `train_epochs`), jitter
        from its own generator (salt 1), so toggling jitter never changes the order."""
        jitter = info.generator(salt=1)
        for idx in batches(len(y), self.cfg.train.batch_size, info.generator(), self.cfg.train.drop_last):
            xb = x[idx]
            if self.settings.jitter_px:
                offsets = jitter_offsets(len(idx), self.settings.jitter_px, jitter)
                xb = shift_images(xb, offsets.to(xb.device))
            yield idx, xb, y[idx]

    def _optimizer(self, name: str, state: dict[str, Any]) -> torch.optim.Optimizer:
        opt = make_optimizer(self.nets[name].parameters(), self.cfg)
        if state.get(f"optimizer-{name}"):
            opt.load_state_dict(state[f"optimizer-{name}"])
        return opt

    # --- training ------------------------------------------------------------------------------

    def train_stage(self, stage: str, state: dict[str, Any], data: ClientData,
                    info: RoundInfo) -> tuple[dict[str, float], Arrays]:
        tr, val = (i.to(self.device) for i in self.split(data))
        x, y = data.x_train[tr], data.y_train[tr]
        x_val, y_val = data.x_train[val], data.y_train[val]
        epoch = info.server_round - (0 if stage == "teacher" else self.settings.teacher_epochs)
        if stage == "teacher":
            return self._teacher_epoch(state, x, y, x_val, y_val, epoch, info)
        return self._student_epoch(state, x, y, x_val, y_val, epoch, info)

    def _teacher_epoch(self, state: dict[str, Any], x: Tensor, y: Tensor, x_val: Tensor,
                       y_val: Tensor, epoch: int, info: RoundInfo
                       ) -> tuple[dict[str, float], Arrays]:
        if self.settings.teacher_from:
            return self._taken_teacher(state)
        teacher = self._load("teacher", state).train()
        opt = self._optimizer("teacher", state)
        sums = _Tally()
        for _, xb, yb in self._batches(x, y, info):
            logits = teacher(xb)
            loss = nn.functional.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
            sums.add(logits.detach(), yb, loss)
        state["optimizer-teacher"] = opt.state_dict()
        metrics = sums.report()
        arrays = self._save("teacher", state)
        if len(y_val):
            v = evaluate_model(teacher, x_val, y_val)
            metrics.update({"val-loss": v.loss, "val-accuracy": v.accuracy})
            record = EarlyStop.load(state.get("teacher-stop"))
            if record.update(v.loss, epoch, patience=0):
                self._save("teacher", state, "teacher-best")
            state["teacher-stop"] = record.dump()
            metrics["teacher-best-epoch"] = float(record.best_epoch)
        return metrics, dict(arrays)

    def _taken_teacher(self, state: dict[str, Any]) -> tuple[dict[str, float], Arrays]:
        """A teacher-stage round with `teacher_from`: the first copies the source run's teacher
        into this client's state, every one reports it; nothing trains."""
        if "teacher" not in state:
            source = ClientStateStore(Path(self.settings.teacher_from) / "state").load(0)
            if "teacher" not in source:
                raise ValueError(f"{self.settings.teacher_from}: its client state holds no teacher")
            state.update({k: source[k] for k in TEACHER_STATE if k in source})
        metrics = {"teacher-taken": 1.0}
        if state.get("teacher-stop"):
            metrics["teacher-best-epoch"] = float(state["teacher-stop"]["best_epoch"])
        return metrics, dict(state["teacher"])

    def _student_epoch(self, state: dict[str, Any], x: Tensor, y: Tensor, x_val: Tensor,
                       y_val: Tensor, epoch: int, info: RoundInfo
                       ) -> tuple[dict[str, float], Arrays]:
        s = self.settings
        teacher = self._load("teacher", state, self.kept_key("teacher", state)).eval()
        teacher.requires_grad_(False)
        records = {n: EarlyStop.load(state.get(f"{n}-stop")) for n in STUDENTS}
        active = [n for n in STUDENTS if not records[n].stopped]
        models = {n: self._load(n, state).train() for n in active}
        opts = {n: self._optimizer(n, state) for n in active}
        cached = None
        if not s.jitter_px and active:
            with torch.no_grad():
                cached = torch.cat([teacher(x[i:i + 1000]) for i in range(0, len(x), 1000)])
        losses: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
            "student": lambda z, z_t, t: soft_hard_loss(z, z_t, t, s.temperature, s.alpha),
            "baseline": lambda z, z_t, t: nn.functional.cross_entropy(z, t)}
        sums = {n: _Tally() for n in active}
        try:
            for idx, xb, yb in (self._batches(x, y, info) if active else ()):
                if cached is not None:
                    z_t = cached[idx]
                else:
                    with torch.no_grad():
                        z_t = teacher(xb)
                for n in active:
                    z = models[n](xb)
                    loss = losses[n](z, z_t, yb)
                    opts[n].zero_grad(set_to_none=False)
                    loss.backward()
                    opts[n].step()
                    sums[n].add(z.detach(), yb, loss)
        finally:
            teacher.requires_grad_(True)
        metrics: dict[str, float] = {}
        for n in active:
            state[f"optimizer-{n}"] = opts[n].state_dict()
            self._save(n, state)
            report = sums[n].report()
            if n == "student":
                metrics.update({"loss": report["ce"], "accuracy": report["accuracy"],
                                "kd-objective": report["loss"]})
            else:
                metrics["baseline-loss"] = report["loss"]
            if len(y_val):
                v = evaluate_model(models[n], x_val, y_val)
                metrics[f"{n}-val-loss"], metrics[f"{n}-val-accuracy"] = v.loss, v.accuracy
                if records[n].update(v.loss, epoch, s.patience):
                    self._save(n, state, f"{n}-best")
                state[f"{n}-stop"] = records[n].dump()
        for n in STUDENTS:
            metrics[f"{n}-stopped"] = float(records[n].stopped)
            metrics[f"{n}-best-epoch"] = float(records[n].best_epoch)
        return metrics, dict(state.get("student") or self._init["student"])

    # --- evaluation ----------------------------------------------------------------------------

    def inference_model(self, received: Arrays, state: dict[str, Any], partition_id: int,
                        server_round: int | None = None) -> nn.Module:
        """The stage's model: the teacher (as it trains), then the KD student's kept weights."""
        if self.stage_at(server_round) == "teacher":
            return self._load("teacher", state)
        return self._load("student", state, self.kept_key("student", state))

    @torch.no_grad()
    def evaluate(self, received: Arrays, state: dict[str, Any], data: ClientData,
                 info: RoundInfo) -> EvalResult:
        _, stage = stage_of(self.stages(self.settings), info.server_round)
        names = ("teacher",) if stage == "teacher" else self.MODELS
        logits = {}
        for n in names:
            key = "teacher" if stage == "teacher" else self.kept_key(n, state)
            logits[n] = self._load(n, state, key).eval()(data.x_test)
        extra: dict[str, float] = {}
        for n, z in logits.items():
            extra[f"{n}-accuracy"] = float((z.argmax(-1) == data.y_test).float().mean())
            extra[f"{n}-nll"] = float(nn.functional.cross_entropy(z, data.y_test))
            extra[f"{n}-ece"] = expected_calibration_error(z, data.y_test)
            if state.get(f"{n}-stop"):
                extra[f"{n}-best-epoch"] = float(state[f"{n}-stop"]["best_epoch"])
        if stage != "teacher":
            extra["teacher-student-agreement"] = agreement(logits["teacher"], logits["student"])
            extra["kd-minus-baseline"] = extra["student-accuracy"] - extra["baseline-accuracy"]
            extra["teacher-minus-baseline"] = extra["teacher-accuracy"] - extra["baseline-accuracy"]
        headline = evaluate_model(self.inference_model(received, state, info.partition_id,
                                                       info.server_round), data.x_test, data.y_test)
        headline.metrics = extra
        return headline


class _Tally:
    """Example-weighted training loss, CE and accuracy of one model over an epoch."""

    def __init__(self) -> None:
        self.loss, self.ce, self.correct, self.seen = 0.0, 0.0, 0, 0

    def add(self, logits: Tensor, y: Tensor, loss: Tensor) -> None:
        self.loss += loss.item() * len(y)
        self.ce += nn.functional.cross_entropy(logits, y).item() * len(y)
        self.correct += int((logits.argmax(1) == y).sum())
        self.seen += len(y)

    def report(self) -> dict[str, float]:
        n = max(self.seen, 1)
        return {"loss": self.loss / n, "ce": self.ce / n, "accuracy": self.correct / n}
