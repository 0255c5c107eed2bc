"""FedKD (Wu et al., Nat. Commun. 13:2032, 2022): a private mentor, a shared mentee, SVD-compressed.

PFLlib's reading (`../shared/specs/local-kd.md` section 2.2, TsingZ0/PFLlib clientkd.py/serverkd.py):

- Each client keeps a **mentor** (the run's `model.name`, the model it evaluates) and a projection
  W_h = Linear(mentee.feature_dim -> mentor.feature_dim, bias=False) in its state; neither ever
  leaves the client. The **mentee** (by default the same architecture as the mentor, as PFLlib;
  `mentee_model` picks a smaller one) is the shared model: the server averages it, uniformly by
  default (PFLlib's 1/|S|; `aggregation: examples` weighs by train examples). Every round the
  received mentee overwrites the client's copy (PFLlib pushes it to all clients).
- Per mini-batch, `fedkd.kd.fedkd_losses` gives the adaptive mutual-distillation losses (KL and
  hidden MSE divided by CE_mentor + CE_mentee, nothing detached); the step minimizes
  mentor loss + mentee loss (PFLlib's two accumulated backward passes), clips each of mentor,
  mentee and W_h at gradient norm 10, and uses `mentee_lr` for the mentee, `train.lr` for the rest.
  `kl_reduction: elementwise_mean` is PFLlib's `nn.KLDivLoss()` default (KL / C).
- Evaluation: the mentor on the client's own test split; the mentee's accuracy and loss are logged
  beside it (`mentee-accuracy`, `mentee-loss`), never mixed into the headline.

SVD compression (spec 2.3; off by default: `compress: false` isolates the KD effect). fedkd's server
averages tensors and never sees factors, so the codec is **simulated on the client**, losslessly
equivalent to the real protocol. `share` picks what is compressed:
- `params` (PFLlib, default): (a) what the client receives is replaced by
  reconstruct(compress(received)) before use (the server's compressed broadcast); (b) what it
  returns is reconstruct(compress(trained mentee)) (what the server would reconstruct before
  averaging).
- `update` (the official code): the client keeps its last-synced mentee M in `state["synced-mentee"]`.
  (a) It uses M + reconstruct(compress(received - M)) (the server's compressed mean update added to
  M) and stores that as the new M; (b) it returns M + reconstruct(compress(trained - M)), so the
  server's average is M + the mean of the reconstructed updates, the official server's mean update.
  Exact when every client trains every round (all hold the same M, as the official code's single
  global mentee); a client that skipped rounds receives the compressed difference from its older M
  (the seeded init if it never synced): a catch-up delta, one compression instead of one per round.
  The official code tests the energy with ">=" on the server and ">" on the client; fedkd uses ">"
  on both.
`wire_bytes` reports the factors' size (float32), so `bytes-sent` / `bytes-received` show the real
communication cost.
Energy of Flower round r (1-based, R = `train.rounds`): t_start + (r / R) * (t_end - t_start), so the
last round uses t_end. A client uploads with the energy of its round; a broadcast is compressed with
the energy of the round that aggregated it (a train message of round r carries round r-1's
aggregate, an evaluate message of round r carries round r's). The round-1 train broadcast is the
seeded initial mentee, which PFLlib never sends (every client builds it), so it is used raw.
Rank rule: keep the smallest k with sum_{j<k} s_j^2 > energy * sum_j s_j^2; tensors with fewer than 2
dims, a first dim of 1, an all-zero spectrum, or "embeddings" in their name are sent raw.
`svd_mode: pfllib` factorizes each trailing 2-D slice (a conv's kh x kw kernels, one rank pooled over
the layer, as numpy's batched SVD in PFLlib); `matrix` reshapes to out x (in*kh*kw) (paper-style).

Known PFLlib behaviour worth knowing (measured on a seeded init): PFLlib's rank loop only tries
k < K, so when the top K-1 singular values hold <= energy of the spectrum it keeps **zero** factors
and the parameter arrives as zeros - e.g. a 10x512 random-init head at energy 0.95. fedkd keeps all K
factors there; `pfllib_rank_loop: true` reproduces PFLlib. Factors also cost more than the raw tensor
whenever k * (m + n + 1) > m * n (5x5 conv kernels at k >= 3; a 512x1024 init at energy 0.95);
PFLlib sends them anyway and so does fedkd (the byte counts show it).

Not implemented: the transformer attention-map losses (fedkd's models are not transformers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fedkd.clients.base import (Arrays, ClientAlgorithm, ClientData, EvalResult, RoundInfo,
                                TrainResult, copy_state, evaluate_model, train_epochs)
from fedkd.config import ConfigError, FedkdConfig, setting
from fedkd.kd import fedkd_losses
from fedkd.models import MODELS, FedModel, build_model

MENTOR, MENTEE, W_H = "mentor", "mentee", "w_h"  # ModuleDict keys; MENTOR and W_H also state keys
SYNCED = "synced-mentee"  # state key: the last-synced mentee of `share: update`
FACTOR_BYTES = 4  # factors travel as float32


@dataclass
class FedKDMentorSettings:
    name: str = "fedkd_mentor"
    mentee_model: str = ""  # "" = the run's model.name (PFLlib: same architecture); else a model name
    mentee_lr: float = setting(0.005, gt=0.0)  # PFLlib -mlr; mentor and W_h use train.lr
    kl_reduction: str = setting("elementwise_mean", choices=("elementwise_mean", "batchmean"))
    max_grad_norm: float = setting(10.0, gt=0.0)  # PFLlib clips mentor, mentee, W_h separately
    aggregation: str = setting("uniform", choices=("uniform", "examples"))  # PFLlib: uniform 1/|S|
    compress: bool = False  # simulate the SVD codec (off: full mentee, isolates the KD effect)
    share: str = setting("params", choices=("params", "update"))  # codec input: PFLlib / official
    t_start: float = setting(0.95, gt=0.0, max=1.0)  # SVD energy at round 0 (PFLlib -Ts)
    t_end: float = setting(0.98, gt=0.0, max=1.0)  # SVD energy at the last round (PFLlib -Te)
    svd_mode: str = setting("pfllib", choices=("pfllib", "matrix"))
    pfllib_rank_loop: bool = False  # reproduce PFLlib's rank loop (may keep 0 factors, see docstring)


def check_settings(cfg: FedkdConfig, settings: FedKDMentorSettings) -> None:
    """Cross-field checks (usable as `MethodSpec.check`): a known mentee model, t_start <= t_end."""
    if settings.mentee_model and settings.mentee_model not in MODELS:
        raise ConfigError("method.mentee_model", settings.mentee_model,
                          f"unknown model; expected one of {sorted(MODELS)} or '' (the run's model)")
    if settings.t_start > settings.t_end:
        raise ConfigError("method.t_start", settings.t_start,
                          f"must be <= method.t_end ({settings.t_end}): the energy only rises")


# ---- SVD codec: pure functions ----------------------------------------------------------------


@dataclass(frozen=True)
class SVDFactors:
    """One tensor as it travels: truncated SVD factors (u, s, vh), or the tensor itself (raw)."""

    shape: tuple[int, ...]  # the original tensor's shape
    dtype: torch.dtype
    raw: Tensor | None = None
    u: Tensor | None = None  # (..., m, k)
    s: Tensor | None = None  # (..., k)
    vh: Tensor | None = None  # (..., k, n)

    @property
    def rank(self) -> int | None:
        """Kept factors (None when sent raw)."""
        return None if self.s is None else int(self.s.shape[-1])

    def nbytes(self) -> int:
        """Bytes on the wire: the raw tensor's own size, or the float32 factors."""
        if self.raw is not None:
            return self.raw.numel() * self.raw.element_size()
        assert self.u is not None and self.s is not None and self.vh is not None
        return (self.u.numel() + self.s.numel() + self.vh.numel()) * FACTOR_BYTES


def energy_at(server_round: int, rounds: int, t_start: float, t_end: float) -> float:
    """FedKD's dynamic precision: t_start + (r / R) * (t_end - t_start), r clamped to [0, R]."""
    r = min(max(server_round, 0), rounds)
    return t_start + (r / rounds) * (t_end - t_start)


def svd_rank(singular_values: Tensor, energy: float, *, pfllib_loop: bool = False) -> int:
    """Smallest k with sum_{j<k} s_j^2 > energy * total (all K when no prefix exceeds it).

    `singular_values` is (..., K), descending along the last dim; leading dims (PFLlib's per-kernel
    SVDs of a conv layer) are pooled per index, so one k serves the whole tensor. `pfllib_loop`
    reproduces PFLlib, which only tries k < K and returns 0 when none qualifies.
    """
    if not 0.0 <= energy <= 1.0:
        raise ValueError(f"energy must be in [0, 1], got {energy}")
    power = singular_values.double().pow(2).reshape(-1, singular_values.shape[-1]).sum(0)
    cumulative = power.cumsum(0)  # cumulative[k-1] = sum_{j<k} s_j^2
    full = power.numel()
    k = int((cumulative <= energy * power.sum()).sum()) + 1
    if k > full:
        return 0 if pfllib_loop else full
    if pfllib_loop and k == full:  # PFLlib's loop never reaches k = K
        return 0
    return k


def svd_compress(tensor: Tensor, energy: float, mode: str = "pfllib", *,
                 pfllib_loop: bool = False) -> SVDFactors:
    """Truncated SVD of `tensor` keeping `svd_rank` factors, or the tensor raw (ndim < 2, first dim
    1, or an all-zero spectrum). mode "pfllib": batched SVD of the trailing 2-D slices; "matrix":
    SVD of tensor.reshape(shape[0], -1). Computed in float64, factors cast to float32 (the wire)."""
    if mode not in ("pfllib", "matrix"):
        raise ValueError(f"unknown svd mode {mode!r}; expected pfllib or matrix")
    shape, dtype = tuple(tensor.shape), tensor.dtype
    if tensor.ndim < 2 or shape[0] <= 1:
        return SVDFactors(shape, dtype, raw=tensor)
    matrix = tensor.detach().double()
    if mode == "matrix":
        matrix = matrix.reshape(shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if not bool(s.pow(2).sum() > 0):
        return SVDFactors(shape, dtype, raw=tensor)
    k = svd_rank(s, energy, pfllib_loop=pfllib_loop)
    return SVDFactors(shape, dtype, u=u[..., :k].float(), s=s[..., :k].float(),
                      vh=vh[..., :k, :].float())


def svd_reconstruct(factors: SVDFactors) -> Tensor:
    """The tensor the receiver rebuilds: u diag(s) vh, reshaped and cast back (raw as sent)."""
    if factors.raw is not None:
        return factors.raw
    assert factors.u is not None and factors.s is not None and factors.vh is not None
    product = (factors.u.double() * factors.s.double().unsqueeze(-2)) @ factors.vh.double()
    return product.reshape(factors.shape).to(factors.dtype)


def compress_arrays(arrays: Arrays, energy: float, mode: str = "pfllib", *,
                    pfllib_loop: bool = False) -> dict[str, SVDFactors]:
    """`svd_compress` per entry; names containing "embeddings" go raw (as in PFLlib/official)."""
    return {name: (SVDFactors(tuple(t.shape), t.dtype, raw=t) if "embeddings" in name
                   else svd_compress(t, energy, mode, pfllib_loop=pfllib_loop))
            for name, t in arrays.items()}


def reconstruct_arrays(factors: dict[str, SVDFactors]) -> Arrays:
    """`svd_reconstruct` per entry."""
    return {name: svd_reconstruct(f) for name, f in factors.items()}


def wire_size(factors: dict[str, SVDFactors]) -> int:
    """Total bytes of a compressed message."""
    return sum(f.nbytes() for f in factors.values())


def _raw_bytes(arrays: Arrays) -> int:
    return sum(t.numel() * t.element_size() for t in arrays.values())


def _same(a: Arrays, b: Arrays) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.equal(a[k].detach().cpu(), b[k].detach().cpu()) for k in a)


# ---- the client -------------------------------------------------------------------------------


class FedKDMentorClient(ClientAlgorithm):
    """Mentor + W_h personal (`state["mentor"]`, `state["w_h"]`); the mentee is what is shared."""

    evaluates = "personalized"
    second_model = ("mentee", "mentee-accuracy")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_settings(self.cfg, self.settings)
        seed = self.cfg.experiment.seed
        mentor = self.build_model()
        mentee = build_model(self.settings.mentee_model or self.cfg.model.name, self.input_shape,
                             self.num_classes, seed).to(self.device)
        with torch.random.fork_rng(devices=[]):  # same W_h init on every client, global RNG untouched
            torch.manual_seed(seed + 1)
            w_h = nn.Linear(mentee.feature_dim, mentor.feature_dim, bias=False).to(self.device)
        self.nets = nn.ModuleDict({MENTOR: mentor, MENTEE: mentee, W_H: w_h})
        self._init = {name: copy_state(net) for name, net in self.nets.items()}
        # (arrays, bytes) of the last codec round trips, for wire_bytes (see there)
        self._sizes: list[tuple[Arrays, int]] = []

    @property
    def mentor(self) -> FedModel:
        return self.nets[MENTOR]  # type: ignore[return-value]

    @property
    def mentee(self) -> FedModel:
        return self.nets[MENTEE]  # type: ignore[return-value]

    def initial_arrays(self) -> Arrays:
        return dict(self._init[MENTEE])

    def global_model(self, received: Arrays) -> nn.Module | None:
        """The server's (uncompressed) mentee, for central evaluation."""
        self.mentee.load_state_dict({**self._init[MENTEE], **received})
        return self.mentee

    # -- codec bookkeeping

    def energy(self, server_round: int) -> float:
        s = self.settings
        return energy_at(server_round, self.cfg.train.rounds, s.t_start, s.t_end)

    def round_trip(self, arrays: Arrays, energy: float | None, base: Arrays | None = None) -> Arrays:
        """What the other side ends up with: reconstruct(compress(arrays)), or with a `base` (`share:
        update`) base + reconstruct(compress(arrays - base)); `energy` None = raw. Identity when
        compression is off. Records the wire size for `wire_bytes`."""
        if not self.settings.compress:
            return arrays
        if energy is None:
            out, size = arrays, _raw_bytes(arrays)
        else:
            delta = arrays if base is None else {k: t - base[k] for k, t in arrays.items()}
            factors = compress_arrays(delta, energy, self.settings.svd_mode,
                                      pfllib_loop=self.settings.pfllib_rank_loop)
            out, size = reconstruct_arrays(factors), wire_size(factors)
            if base is not None:
                out = {k: base[k] + t for k, t in out.items()}
        # both sides of the trip: wire_bytes sees the received message before the codec and the
        # returned one after it
        self._sizes = [*self._sizes[-2:], (arrays, size), (out, size)]
        return out

    def wire_bytes(self, arrays: Arrays, info: RoundInfo) -> int | None:
        """Factor bytes of `arrays` (None when compression is off: the raw size).

        The runtime asks right after train/evaluate, about the message received (pre-codec) and the
        one returned (already round-tripped: re-compressing it could pick a smaller rank), so the
        sizes recorded by `round_trip` are looked up by content; anything else is compressed with
        the round's energy.
        """
        if not self.settings.compress:
            return None
        for seen, size in reversed(self._sizes):
            if _same(arrays, seen):
                return size
        return wire_size(compress_arrays(arrays, self.energy(info.server_round), self.settings.svd_mode,
                                         pfllib_loop=self.settings.pfllib_rank_loop))

    # -- state

    @property
    def shares_updates(self) -> bool:
        """The codec compresses updates against the last-synced mentee (`share: update`)."""
        return self.settings.compress and self.settings.share == "update"

    def load(self, received: Arrays, state: dict[str, Any], broadcast_round: int) -> nn.ModuleDict:
        """Mentor and W_h from the state (seeded init before the first round), mentee from the
        server's broadcast (aggregated in `broadcast_round`; 0 = the initial mentee, used raw)."""
        self.mentor.load_state_dict(state.get(MENTOR) or self._init[MENTOR])
        self.nets[W_H].load_state_dict(state.get(W_H) or self._init[W_H])
        energy = self.energy(broadcast_round) if broadcast_round > 0 else None
        base = (state.get(SYNCED) or self._init[MENTEE]) if self.shares_updates else None
        mentee = self.round_trip(received, energy, base)
        self.mentee.load_state_dict({**self._init[MENTEE], **mentee})
        return self.nets

    # -- the method

    def train(self, received: Arrays, state: dict[str, Any], data: ClientData,
              info: RoundInfo) -> TrainResult:
        nets = self.load(received, state, info.server_round - 1)
        base = None  # the update's base: the mentee just synced
        if self.shares_updates:
            base = state[SYNCED] = copy_state(self.mentee)
        reduction = self.settings.kl_reduction
        mentee_sums = {"loss": 0.0, "correct": 0.0, "seen": 0}

        def objective(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            h_t, h_s = self.mentor.features(x), self.mentee.features(x)
            z_t, z_s = self.mentor.head(h_t), self.mentee.head(h_s)
            losses = fedkd_losses(z_t, z_s, y, h_t, nets[W_H](h_s), reduction=reduction)
            mentee_sums["loss"] += losses.ce_mentee.detach().item() * len(y)
            mentee_sums["correct"] += int((z_s.detach().argmax(1) == y).sum())
            mentee_sums["seen"] += len(y)
            return losses.mentor + losses.mentee, z_t

        clip = self.settings.max_grad_norm
        metrics = train_epochs(nets, data, self.cfg, info.generator(), objective=objective,
                               lr={MENTEE: self.settings.mentee_lr},
                               max_grad_norm={MENTOR: clip, MENTEE: clip, W_H: clip}, state=state)
        for name in (MENTOR, W_H):
            state[name] = copy_state(nets[name])
        seen = max(int(mentee_sums["seen"]), 1)
        metrics.update({"mentee-loss": mentee_sums["loss"] / seen,
                        "mentee-accuracy": mentee_sums["correct"] / seen})
        trained = copy_state(self.mentee)
        arrays = self.round_trip(trained, self.energy(info.server_round), base)
        if self.settings.compress:
            metrics["svd-energy"] = self.energy(info.server_round)
        return TrainResult(arrays, metrics, len(data.y_train),
                           self.aggregation_weight(len(data.y_train)))

    def inference_model(self, received: Arrays, state: dict[str, Any], partition_id: int,
                        server_round: int | None = None) -> nn.Module:
        """The mentor (the mentee is `global_model`)."""
        self.mentor.load_state_dict(state.get(MENTOR) or self._init[MENTOR])
        return self.mentor

    def evaluate(self, received: Arrays, state: dict[str, Any], data: ClientData,
                 info: RoundInfo) -> EvalResult:
        self.load(received, state, info.server_round)
        mentee = evaluate_model(self.mentee, data.x_test, data.y_test)
        mentor = self.inference_model(received, state, info.partition_id, info.server_round)
        result = evaluate_model(mentor, data.x_test, data.y_test)
        result.metrics = {"mentee-accuracy": mentee.accuracy, "mentee-loss": mentee.loss}
        return result
