"""stkd: unsupervised anomaly detection with self-training + knowledge distillation, centralized.

Source: H. Liu, K. Li, X. Li, Y. Zhang, ICIP 2022 (abstract only); the algorithm below is
`../shared/specs/centralized.md` section 3.2, every gap filled there or here is marked ASSUMED.

Why each part:
- Detector: MLP autoencoder d-64-16-64-d (ReLU, linear code; ASSUMED), encoder f, decoder g,
  anomaly score s(x) = ||x - g(f(x))||^2 / d. Training labels are never read by the algorithm.
- Self-training: the training set contains anomalies, so every `rescore_every` rounds the
  whole training set is re-scored and the next purified set S excludes the top rho_j
  fraction, rho_j = rho_max * min(1, j / J_ramp) after the j-th rescoring (round 1 trains on
  everything). Exclusion is recomputed from scratch each time (samples may come back).
- KD regularizer: anomalies that survive purification are countered by pulling the code
  toward a teacher never trained on the noisy data: `teacher: init` (default) = the frozen
  encoder at initialization, i.e. of the random encoder every variant starts from, so its KD
  term is a regulariser (a function-space anchor at the init), not a transfer of knowledge
  learned from data (spec 3.2 v2); `teacher: warmup` = the frozen encoder of a copy trained for
  `warmup_epochs` (v1: 1; v2 runs: 10, ASSUMED) on the 50% of samples with the lowest robust
  z-score distance (median/MAD), the closest offline reading of "a teacher that has not been
  trained on the noisy data"; `teacher: random` (tier-2 control, ASSUMED) = an independently
  seeded random encoder, which tells "stay near your own init" from "match any fixed random
  projection".
  L = mean_{x in S} [ s(x) + lambda_kd * ||f(x) - sg(f_T(x))||^2 ].
- Variants `ae` (no exclusion, no KD), `st` (exclusion), `kd` (KD), `stkd` (both) train side
  by side in one `train_epochs` call over an nn.ModuleDict: same init, same batches, disjoint
  parameters (one Adam over all of them = one Adam per variant: Adam is elementwise).
  The purified set is a per-sample mask inside the objective; the loop gives the objective
  the batch's sample indices through an extra input column (the loop reports classification
  metrics, so the objective returns dummy logits and the method reports its own metrics).

A round is one epoch; one stage ("detect", `epochs`, default 30). Test metrics per variant:
AUROC, AUPRC (average precision), F1@k (k = number of test anomalies); the headline
(`EvalResult.accuracy`, `score = "auroc"`) is the stkd variant's AUROC.

Contamination (spec 3.3) belongs to the data, but a dataset cannot see method settings, so
the `contamination` setting is applied here, before the algorithm sees the data: training
anomalies are subsampled (never duplicated, seeded by the run seed) to reach the rate; the test
split is untouched; a rate above the split's natural rate is an error (the sweep skips it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import fedkd.taskdata.anomaly  # noqa: F401  (registers the adbench:* / odds:* datasets)
from fedkd.clients.base import Arrays, ClientData, EvalResult, RoundInfo, train_epochs
from fedkd.clients.staged import StagedMethod, Stages
# re-exported: the pure pieces lived here before the split
from fedkd.clients.stkd_core import (  # noqa: F401
    AutoEncoder, _clone, anomaly_score, auroc, average_precision, contaminate, exclusion_mask,
    f1_at_k, num_excluded, rho_schedule, robust_distance, score_all, top_order)
from fedkd.config import ConfigError, FedkdConfig, setting
from fedkd.kd import feature_distance

VARIANTS: tuple[str, ...] = ("ae", "st", "kd", "stkd")
EXCLUDES: dict[str, bool] = {"ae": False, "st": True, "kd": False, "stkd": True}
DISTILLS: dict[str, bool] = {"ae": False, "st": False, "kd": True, "stkd": True}
DESCRIPTION = ("stkd: unsupervised anomaly detection, autoencoder with self-training (exclude top "
               "scores) + KD toward a frozen init encoder; ae/st/kd/stkd side by side (centralized)")


@dataclass
class STKDSettings:
    name: str = "stkd"
    hidden: int = setting(64, min=1)  # ASSUMED: d-64-16-64-d
    code_dim: int = setting(16, min=1)
    lambda_kd: float = setting(0.1, min=0.0)  # ASSUMED (spec 3.2)
    #: ASSUMED: init = the frozen initial encoder (a regulariser toward the init, spec 3.2 v2);
    #: warmup = frozen encoder of a copy trained on the cleanest share; random = an independently
    #: seeded random encoder (the spec's tier-2 control)
    teacher: str = setting("init", choices=("init", "warmup", "random"))
    warmup_fraction: float = setting(0.5, gt=0.0, max=1.0)  # teacher: warmup trains on this cleanest share
    #: epochs of the warm-up teacher (v1: 1; v2 runs: 10; ASSUMED)
    warmup_epochs: int = setting(1, min=1)
    rescore_every: int = setting(5, min=1)  # rounds between rescorings (ASSUMED, spec 3.2)
    ramp_rescorings: int = setting(3, min=1)  # J_ramp: rho reaches rho_max at the J_ramp-th rescoring
    #: contamination estimate in [0, 1), or "oracle" (true train contamination; analysis only)
    rho_max: float | str = 0.10
    #: "natural" or a training anomaly rate in [0, 1) (spec sweep: 0.01 0.02 0.05 0.10 0.20)
    contamination: float | str = "natural"
    epochs: int = setting(30, min=1)  # rounds (= epochs) of the one stage


def parse_rate(key: str, value: float | str, word: str) -> float | None:
    """A rate in [0, 1) or the special `word` (-> None); ConfigError otherwise."""
    if isinstance(value, str):
        if value == word:
            return None
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(key, value, f"a rate in [0, 1) or {word!r}") from None
    if not 0.0 <= float(value) < 1.0:
        raise ConfigError(key, value, f"a rate in [0, 1) or {word!r}")
    return float(value)


def check_settings(cfg: FedkdConfig, settings: STKDSettings) -> None:
    """Registry hook (MethodSpec.check): the two union-typed settings parse."""
    parse_rate("method.rho_max", settings.rho_max, "oracle")
    parse_rate("method.contamination", settings.contamination, "natural")


class STKDClient(StagedMethod):
    """The four variants, their purified-set masks and the frozen teacher, all in the client state.

    State keys: `ae`, `st`, `kd`, `stkd` (autoencoders), `teacher` (encoder; written once in
    round 1, never rewritten), `masks` ({st, stkd}: kept-masks over the training view),
    `rescorings` (j), `rho` (the rho of the current masks), `optimizer-variants`.
    """

    score = "auroc"

    @classmethod
    def stages(cls, settings: STKDSettings) -> Stages:
        return [("detect", settings.epochs)]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s: STKDSettings = self.settings
        self.rate = parse_rate("method.contamination", s.contamination, "natural")
        self.rho_max = parse_rate("method.rho_max", s.rho_max, "oracle")
        dim = int(np.prod(self.input_shape))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.experiment.seed)
            ae = AutoEncoder(dim, s.hidden, s.code_dim)
        self.nets = nn.ModuleDict({v: copy.deepcopy(ae) for v in VARIANTS}).to(self.device)
        self.warmup = copy.deepcopy(ae).to(self.device)
        self.teacher = copy.deepcopy(ae.encoder).to(self.device).requires_grad_(False).eval()
        self._init = _clone(ae.state_dict())
        self._init_encoder = _clone(ae.encoder.state_dict())

    # -- data ---------------------------------------------------------------------------------

    def keep_indices(self, data: ClientData) -> Tensor:
        """Training samples in use after contamination control; reads labels only when a rate is
        set (data preparation, before the algorithm)."""
        if self.rate is None:
            return torch.arange(len(data.x_train), device=data.x_train.device)
        y = data.y_train.detach().cpu().numpy()
        keep = contaminate(y, self.rate, self.cfg.experiment.seed)
        return torch.as_tensor(keep, dtype=torch.long, device=data.x_train.device)

    def _rho_max(self, data: ClientData, keep: Tensor) -> float:
        """rho_max, or with `rho_max: oracle` the true contamination (reads labels; analysis only)."""
        if self.rho_max is not None:
            return self.rho_max
        return float(data.y_train[keep].float().mean())

    # -- models -------------------------------------------------------------------------------

    def _load(self, name: str, state: dict[str, Any]) -> AutoEncoder:
        model = self.nets[name]
        model.load_state_dict(state.get(name) or self._init)
        return model  # type: ignore[return-value]

    def _masked_objective(self, models: dict[str, AutoEncoder], masks: dict[str, Tensor],
                          lambdas: dict[str, float], sums: dict[str, list[Tensor]]) -> Any:
        """The step of every model in `models`: its masked mean of s(x) (+ lambda KD). Input rows
        carry their sample index in the last column; dummy logits go back to the loop."""
        code_dim = self.settings.code_dim
        teacher = self.teacher

        def objective(xi: Tensor, _: Tensor) -> tuple[Tensor, Tensor]:
            idx, x = xi[:, -1].long(), xi[:, :-1]
            code_t = None
            if any(lam > 0 for lam in lambdas.values()):
                with torch.no_grad():
                    code_t = teacher(x)
            total: Tensor | float = 0.0
            for v, model in models.items():
                m = masks[v][idx].to(x.dtype)
                code = model.encoder(x)
                recon = (x - model.decoder(code)).pow(2).mean(-1)
                per = recon
                if lambdas[v] > 0:
                    assert code_t is not None
                    # ||f(x) - sg(f_T(x))||^2 (feature_distance is the per-dim mean: x code_dim)
                    dist = feature_distance(code, code_t, reduction="none") * code_dim
                    per = recon + lambdas[v] * dist
                loss = (per * m).sum() / m.sum().clamp(min=1.0)
                total = total + loss
                with torch.no_grad():
                    acc = sums[v]
                    acc[0] += (per * m).sum()
                    acc[1] += (recon * m).sum()
                    acc[2] += m.sum()
            assert isinstance(total, Tensor)
            return total, x.new_zeros(len(x), 2)

        return objective

    def _indexed(self, x: Tensor) -> ClientData:
        """The training view for `train_epochs`: x plus an index column, dummy labels (the loop
        never sees a training label)."""
        if len(x) >= 2 ** 24:
            raise ValueError("sample indices must be exact in float32 (< 2^24 samples)")
        idx = torch.arange(len(x), dtype=x.dtype, device=x.device).unsqueeze(1)
        zeros = torch.zeros(len(x), dtype=torch.long, device=x.device)
        return ClientData(torch.cat([x, idx], 1), zeros, x[:0], zeros[:0])

    def _teacher(self, state: dict[str, Any], x: Tensor, info: RoundInfo) -> nn.Module:
        """The frozen teacher encoder: from the state, or made once (init copy / warmup epoch)."""
        if "teacher" not in state:
            if self.settings.teacher == "init":
                state["teacher"] = _clone(self._init_encoder)
            elif self.settings.teacher == "random":
                state["teacher"] = _clone(self._random_encoder())
            else:
                self.warmup.load_state_dict(self._init)
                keep = exclusion_mask(robust_distance(x), 1.0 - self.settings.warmup_fraction)
                sums = {"warmup": [torch.zeros((), device=x.device) for _ in range(3)]}
                objective = self._masked_objective({"warmup": self.warmup}, {"warmup": keep},
                                                   {"warmup": 0.0}, sums)
                # own generator salt: the variants' batch order does not depend on this option
                train_epochs(nn.ModuleDict({"warmup": self.warmup}), self._indexed(x), self.cfg,
                             info.generator(salt=1), epochs=self.settings.warmup_epochs,
                             objective=objective)
                state["teacher"] = _clone(self.warmup.encoder.state_dict())
        self.teacher.load_state_dict(state["teacher"])
        return self.teacher.eval().requires_grad_(False)

    def _random_encoder(self) -> dict[str, Tensor]:
        """An encoder of the same architecture from an independent seed (teacher: random)."""
        s = self.settings
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.experiment.seed + 0x5EED)
            return AutoEncoder(int(np.prod(self.input_shape)), s.hidden, s.code_dim).encoder.state_dict()

    # -- rounds -------------------------------------------------------------------------------

    def train_stage(self, stage: str, state: dict[str, Any], data: ClientData,
                    info: RoundInfo) -> tuple[dict[str, float], Arrays]:
        s: STKDSettings = self.settings
        keep = self.keep_indices(data)
        x = data.x_train[keep]
        n = len(x)
        self._teacher(state, x, info)
        everything = torch.ones(n, dtype=torch.bool, device=x.device)
        kept = state.get("masks") or {}
        masks = {v: kept[v].to(x.device) if EXCLUDES[v] and v in kept else everything
                 for v in VARIANTS}
        lambdas = {v: s.lambda_kd if DISTILLS[v] else 0.0 for v in VARIANTS}
        models = {v: self._load(v, state) for v in VARIANTS}
        sums = {v: [torch.zeros((), device=x.device) for _ in range(3)] for v in VARIANTS}
        objective = self._masked_objective(models, masks, lambdas, sums)
        train_epochs(self.nets, self._indexed(x), self.cfg, info.generator(), epochs=1,
                     objective=objective, state=state, optimizer_key="optimizer-variants")
        for v in VARIANTS:
            state[v] = _clone(self.nets[v].state_dict())

        metrics: dict[str, float] = {}
        for v in VARIANTS:
            loss_sum, recon_sum, count = (float(t) for t in sums[v])
            metrics[f"{v}-loss"] = loss_sum / max(count, 1.0)
            metrics[f"{v}-recon"] = recon_sum / max(count, 1.0)
        metrics["rho"] = float(state.get("rho", 0.0))  # the rho of the sets this round trained on
        metrics["purified"] = float(masks["stkd"].sum())
        total_rounds = sum(r for _, r in self.stages(s))
        if info.server_round % s.rescore_every == 0 and info.server_round < total_rounds:
            j = int(state.get("rescorings", 0)) + 1
            rho = rho_schedule(j, self._rho_max(data, keep), s.ramp_rescorings)
            state["masks"] = {v: exclusion_mask(score_all(models[v], x), rho)
                              for v in VARIANTS if EXCLUDES[v]}
            state["rescorings"], state["rho"] = j, rho
        metrics["rescorings"] = float(state.get("rescorings", 0))
        # no labels in training: "loss" is the stkd objective, "accuracy" (higher is better) its
        # negated reconstruction score on the purified set
        metrics["loss"], metrics["accuracy"] = metrics["stkd-loss"], -metrics["stkd-recon"]
        return metrics, _clone(self.nets["stkd"].state_dict())

    def inference_model(self, received: Arrays, state: dict[str, Any], partition_id: int,
                        server_round: int | None = None) -> nn.Module:
        """The headline detector: the stkd variant's autoencoder (anomaly score:
        `anomaly_score(model, x)`, the reconstruction error)."""
        return self._load("stkd", state)

    @torch.no_grad()
    def evaluate(self, received: Arrays, state: dict[str, Any], data: ClientData,
                 info: RoundInfo) -> EvalResult:
        y_test = data.y_test.detach().cpu().numpy()
        metrics: dict[str, float] = {}
        mean_score = 0.0
        for v in VARIANTS:
            model = (self.inference_model(received, state, info.partition_id, info.server_round)
                     if v == "stkd" else self._load(v, state))
            scores = score_all(model, data.x_test)
            s_np = scores.cpu().numpy()
            metrics[f"{v}-auroc"] = auroc(s_np, y_test)
            metrics[f"{v}-auprc"] = average_precision(s_np, y_test)
            metrics[f"{v}-f1"] = f1_at_k(s_np, y_test)
            if v == "stkd":
                mean_score = float(scores.mean())
        # diagnostics from the hidden training labels (reporting only, never fed back)
        keep = self.keep_indices(data)
        y_view = data.y_train[keep]
        metrics["train-contamination"] = float(y_view.float().mean())
        metrics["rescorings"] = float(state.get("rescorings", 0))
        metrics["rho"] = float(state.get("rho", 0.0))
        for v, mask in (state.get("masks") or {}).items():
            excluded = ~mask.to(y_view.device)
            if bool(excluded.any()):
                metrics[f"{v}-excluded-precision"] = float(y_view[excluded].float().mean())
        return EvalResult(mean_score, metrics["stkd-auroc"], len(y_test), metrics)
