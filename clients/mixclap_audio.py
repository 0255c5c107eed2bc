"""Mix-CLAP's audio side: test conditions, the validation carve-out, waveforms and noise recipes.

Split from `clients/mixclap.py` (behaviour unchanged): everything here turns FSDD waveforms into
features under a noise recipe (`../shared/specs/centralized.md` section 4.3), with numpy
generators seeded from (run seed, purpose, epoch / condition name) only, so no model setting ever
changes the data. The method (teacher, students, fusion) lives in `clients/mixclap.py`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

from fedkd.taskdata import audio

if TYPE_CHECKING:
    from fedkd.clients.mixclap import MixCLAPSettings

NOISE_KINDS = ("clean", "white", "babble", "device")


class Condition(NamedTuple):
    kind: str
    snr: float | None
    label: str  # metric suffix, e.g. "white0"


def parse_condition(text: str) -> Condition:
    """'clean' or '<white|babble|device>:<snr dB>' -> Condition (ValueError otherwise)."""
    kind, _, snr = text.partition(":")
    if kind not in NOISE_KINDS or (kind == "clean") != (snr == ""):
        raise ValueError(f"test condition {text!r}: expected 'clean' or '<white|babble|device>:<snr>'")
    if kind == "clean":
        return Condition("clean", None, "clean")
    value = float(snr)
    return Condition(kind, value, f"{kind}{value:g}")


# --- data: validation split, waveforms and noise ---------------------------------------------------

_NOISE_DOMAIN = 0x6D697863  # "mixc": keeps these streams apart from every other seeded stream
_TRAIN_NOISE, _VAL_NOISE, _TEST_NOISE, _VAL_SPLIT = 1, 2, 3, 4
_TEACHER_NOISE = 5  # (v2) teacher_noise_aug: its own stream, so the students' noise is unchanged


def seeded_rng(seed: int, *key: int) -> np.random.Generator:
    """numpy generator from (run seed, purpose, ...): independent of model settings and order."""
    return np.random.default_rng(np.random.SeedSequence([seed, _NOISE_DOMAIN, *key]))


class Split(NamedTuple):
    train: Tensor  # row indices into ClientData.x_train
    val: Tensor


def validation_split(labels: np.ndarray, fraction: float, seed: int) -> Split:
    """round(fraction * n_c) clips of every digit c held out, chosen by a seeded generator."""
    rng = seeded_rng(seed, _VAL_SPLIT)
    val = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        val.extend(rng.permutation(rows)[:int(round(fraction * len(rows)))].tolist())
    mask = np.zeros(len(labels), bool)
    mask[val] = True
    return Split(torch.from_numpy(np.flatnonzero(~mask)), torch.from_numpy(np.flatnonzero(mask)))


class WaveRows(NamedTuple):
    waves: np.ndarray  # (n, L) fitted waveforms
    spans: np.ndarray  # (n, 2) where the recording lies in the window
    labels: np.ndarray  # (n,)
    speakers: np.ndarray  # (n,) str
    takes: np.ndarray  # (n,)


@dataclass
class MixAudio:
    """Waveforms of the official train / test rows (same order as the `fsdd` dataset's features)
    and the noise recipes of centralized.md 4.3. Everything random comes from `seeded_rng`."""

    train: WaveRows
    test: WaveRows
    stats: audio.BandStats
    settings: MixCLAPSettings
    seed: int
    params: audio.FeatureParams = field(default_factory=audio.FeatureParams)

    @classmethod
    def from_data_dir(cls, root: Path | str, settings: MixCLAPSettings, seed: int) -> "MixAudio":
        w = audio.fsdd_waveforms(str(root))

        def rows(mask: np.ndarray) -> WaveRows:
            return WaveRows(w.waves[mask], w.spans[mask], w.labels[mask], w.speakers[mask],
                            w.takes[mask])

        return cls(rows(w.split == "train"), rows(w.split == "test"), audio.fsdd_band_stats(root),
                   settings, seed)

    def features(self, waves: np.ndarray) -> Tensor:
        return torch.from_numpy(audio.waveform_features(waves, self.stats, self.params))

    def babble_choices(self, rng: np.random.Generator, speakers: np.ndarray,
                       for_test: bool) -> np.ndarray:
        """(n, talkers) train-row indices: other speakers only, from the train or test half of
        the training takes (disjoint, split at `babble_split_take`)."""
        s = self.settings
        late = self.train.takes >= s.babble_split_take
        half = late if for_test else ~late
        out = np.zeros((len(speakers), s.babble_talkers), np.int64)
        for i, speaker in enumerate(speakers):
            pool = np.flatnonzero(half & (self.train.speakers != speaker))
            if len(pool) < s.babble_talkers:
                raise ValueError(f"babble pool for speaker {speaker!r} has {len(pool)} clips "
                                 f"< {s.babble_talkers} talkers")
            out[i] = rng.choice(pool, s.babble_talkers, replace=False)
        return out

    def training_mix(self, rng: np.random.Generator, rows: np.ndarray) -> np.ndarray:
        """Training recipe: SNR uniform over `train_snrs`, babble with `babble_prob`, else white."""
        s, tr = self.settings, self.train
        use_babble = rng.random(len(rows)) < s.babble_prob
        snr = rng.choice(np.asarray(s.train_snrs, np.float64), len(rows))
        noise = rng.standard_normal((len(rows), tr.waves.shape[1]), dtype=np.float32)
        choices = self.babble_choices(rng, tr.speakers[rows], for_test=False)
        if use_babble.any():
            noise[use_babble] = audio.babble(tr.waves, choices[use_babble])
        return audio.mix_at_snr(tr.waves[rows], noise, snr, tr.spans[rows])

    def noisy_train(self, epoch: int, rows: Tensor) -> Tensor:
        """Features of a fresh noisy draw of training rows `rows` (seeded by the epoch)."""
        r = rows.numpy()
        return self.features(self.training_mix(seeded_rng(self.seed, _TRAIN_NOISE, epoch), r))

    def teacher_augmented(self, epoch: int, rows: Tensor, clean: Tensor, prob: float = 0.5
                          ) -> tuple[Tensor, Tensor]:
        """(v2) The teacher's epoch inputs with `teacher_noise_aug`: each training row replaced,
        with probability `prob`, by a noisy version drawn exactly like the noisy student's
        training noise (`training_mix`: SNR from train_snrs, white or babble from the training
        pool), fresh each epoch from its own seeded stream. Returns (inputs, replaced mask);
        `clean` are the rows' clean features (kept where not replaced)."""
        rng = seeded_rng(self.seed, _TEACHER_NOISE, epoch)
        r = rows.numpy()
        replaced = rng.random(len(r)) < prob
        out = clean.clone()
        if replaced.any():
            noisy = self.features(self.training_mix(rng, r[replaced])).to(out.device, out.dtype)
            out[torch.as_tensor(replaced, device=out.device)] = noisy.contiguous(
                memory_format=torch.contiguous_format)
        return out, torch.as_tensor(replaced)

    def noisy_val(self, rows: Tensor) -> Tensor:
        """One fixed noisy draw of the validation rows (the noisy student's validation set)."""
        r = rows.numpy()
        return self.features(self.training_mix(seeded_rng(self.seed, _VAL_NOISE), r))

    def condition_waves(self, condition: Condition) -> np.ndarray:
        """Test waveforms under one condition; the generator is keyed by the condition's name."""
        te, s = self.test, self.settings
        if condition.kind == "clean":
            return te.waves.copy()
        rng = seeded_rng(self.seed, _TEST_NOISE, zlib.crc32(condition.label.encode()))
        white = rng.standard_normal(te.waves.shape, dtype=np.float32)
        if condition.kind == "white":
            return audio.mix_at_snr(te.waves, white, condition.snr, te.spans)
        if condition.kind == "babble":
            noise = audio.babble(self.train.waves, self.babble_choices(rng, te.speakers, for_test=True))
            return audio.mix_at_snr(te.waves, noise, condition.snr, te.spans)
        filtered = audio.lowpass(te.waves, s.lowpass_hz, s.lowpass_order)
        return audio.mix_at_snr(filtered, white, condition.snr, te.spans)
