"""FSDD (Free Spoken Digit Dataset) loader, log-mel features and waveform noise primitives.

Used by Mix-CLAP (`centralized.md` section 4) and by Beta-KD's audio half (section 5.3), so
everything here is method-neutral: the official split, the log-mel front end of section 4.3
and noise mixing helpers. Which noise a method uses, at which SNR, is the method's business.

Files: `<data dir>/fsdd/recordings/<digit>_<speaker>_<index>.wav` (8 kHz mono 16-bit, 3,000
clips). Official split: index 0-4 test, 5-49 train. Read with the stdlib `wave` module.

Features (section 4.3): pad/crop to 1.0 s (8,000 samples, centred), power STFT (Hann window
256, hop 80, centred frames with reflect padding -> 101 frames), 40 HTK-mel triangular bands
over 0-4 kHz (no area normalization), log(mel + 1e-6), then per-band z-scoring with the
statistics of the clean training split. These are torchaudio's `MelSpectrogram` defaults;
torchaudio is not installed in this project's environment (and not a dependency), so the mel
filterbank is built here (`mel_filterbank`, same formula as `torchaudio.functional.
melscale_fbanks(norm=None, mel_scale="htk")`) and the STFT is `torch.stft`.

Caching: the raw (un-normalized) log-mel of all 3,000 clean clips is cached in a file under
`$FEDKD_CACHE_DIR` (default `$XDG_CACHE_HOME/fedkd` or `~/.cache/fedkd`), keyed by the file
listing (names, sizes, mtimes) and the feature parameters, and in-process with lru_cache.
Waveforms are cached in-process only (reading 3,000 small wavs takes about a second).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import wave
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from fedkd.data import ClientSplit, DataError, FederatedData, TaskDataset, register_task_dataset

SAMPLE_RATE = 8000
RECORDINGS = "fsdd/recordings"
TEST_TAKES = range(0, 5)  # official split: take index 0-4 test, 5-49 train
_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")
_CACHE_VERSION = 1


@dataclass(frozen=True)
class FeatureParams:
    """The log-mel front end of centralized.md 4.3 (defaults = the spec)."""

    clip_samples: int = 8000  # 1.0 s at 8 kHz
    n_fft: int = 256
    hop: int = 80
    n_mels: int = 40
    f_min: float = 0.0
    f_max: float = SAMPLE_RATE / 2
    eps: float = 1e-6  # log(mel + eps)

    @property
    def frames(self) -> int:
        return 1 + self.clip_samples // self.hop  # centred frames


class Clip(NamedTuple):
    path: Path
    digit: int
    speaker: str
    take: int  # the <index> of the file name

    @property
    def split(self) -> str:
        return "test" if self.take in TEST_TAKES else "train"


def fsdd_clips(data_dir: Path | str) -> list[Clip]:
    """Every recording, sorted by (digit, speaker, take): the row order of all arrays here."""
    root = Path(data_dir) / RECORDINGS
    if not root.is_dir():
        raise DataError(f"missing FSDD recordings: {root} (the data dir is set by data.data_dir "
                        f"or $FEDKD_DATA_DIR)")
    clips = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m:
            clips.append(Clip(p, int(m.group(1)), m.group(2), int(m.group(3))))
    if not clips:
        raise DataError(f"no <digit>_<speaker>_<index>.wav files in {root}")
    return sorted(clips, key=lambda c: (c.digit, c.speaker, c.take))


def read_wav(path: Path | str) -> np.ndarray:
    """Mono 16-bit PCM -> float32 in [-1, 1) (the data README's recipe)."""
    with wave.open(str(path)) as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise DataError(f"{path}: expected mono 16-bit PCM")
        raw = w.readframes(w.getnframes())
    return np.frombuffer(raw, np.int16).astype(np.float32) / 32768.0


def fit_clip(signal: np.ndarray, n: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Centred zero-pad or crop to `n` samples; also the [start, end) span the clip occupies
    (SNRs are measured over that span, so padding silence does not inflate them)."""
    out = np.zeros(n, np.float32)
    if len(signal) >= n:
        start = (len(signal) - n) // 2
        out[:] = signal[start:start + n]
        return out, (0, n)
    start = (n - len(signal)) // 2
    out[start:start + len(signal)] = signal
    return out, (start, start + len(signal))


class FsddWaves(NamedTuple):
    """All clips fitted to the feature window, in `fsdd_clips` order."""

    waves: np.ndarray  # float32 (n, clip_samples)
    spans: np.ndarray  # int64 (n, 2): [start, end) of the recording inside the window
    labels: np.ndarray  # int64 (n,)
    speakers: np.ndarray  # str (n,)
    takes: np.ndarray  # int64 (n,)
    split: np.ndarray  # str (n,): "train" / "test"


@functools.lru_cache(maxsize=2)
def fsdd_waveforms(data_dir: Path | str, clip_samples: int = 8000) -> FsddWaves:
    """Read and fit every recording once per process (treat the arrays as read-only)."""
    clips = fsdd_clips(data_dir)
    waves = np.zeros((len(clips), clip_samples), np.float32)
    spans = np.zeros((len(clips), 2), np.int64)
    for i, c in enumerate(clips):
        waves[i], spans[i] = fit_clip(read_wav(c.path), clip_samples)
    return FsddWaves(waves, spans, np.array([c.digit for c in clips], np.int64),
                     np.array([c.speaker for c in clips]), np.array([c.take for c in clips], np.int64),
                     np.array([c.split for c in clips]))


# --- log-mel front end -------------------------------------------------------------------------

def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int = SAMPLE_RATE,
                   f_min: float = 0.0, f_max: float | None = None) -> np.ndarray:
    """(n_freqs, n_mels) triangular HTK-mel filters, peak 1, no area normalization.

    The formula of torchaudio.functional.melscale_fbanks(norm=None, mel_scale="htk"), written out
    because torchaudio is not available here: band m rises from mel point m to m+1 and falls to
    m+2, over n_mels + 2 points equally spaced in mel between f_min and f_max.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = np.linspace(0, sample_rate // 2, n_freqs)
    f_pts = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    f_diff = np.diff(f_pts)  # (n_mels + 1,)
    slopes = f_pts[None, :] - freqs[:, None]  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return np.maximum(0.0, np.minimum(down, up)).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _filterbank(params: FeatureParams) -> torch.Tensor:
    return torch.from_numpy(mel_filterbank(params.n_fft // 2 + 1, params.n_mels, SAMPLE_RATE,
                                           params.f_min, params.f_max))


def log_mel(waves: np.ndarray | torch.Tensor, params: FeatureParams = FeatureParams(),
            chunk: int = 512) -> np.ndarray:
    """(n, samples) waveforms -> float32 (n, n_mels, frames) log-mel power (not normalized)."""
    x = torch.as_tensor(np.asarray(waves, np.float32))
    if x.ndim == 1:
        x = x[None]
    window = torch.hann_window(params.n_fft)
    fb = _filterbank(params)
    out = []
    for start in range(0, len(x), chunk):  # bounded memory for the whole dataset
        spec = torch.stft(x[start:start + chunk], params.n_fft, params.hop, params.n_fft, window,
                          center=True, pad_mode="reflect", return_complex=True)
        power = spec.real.square() + spec.imag.square()  # (b, n_freqs, frames)
        mel = torch.einsum("bft,fm->bmt", power, fb)
        out.append(torch.log(mel + params.eps))
    return torch.cat(out).numpy().astype(np.float32, copy=False)


class BandStats(NamedTuple):
    mean: np.ndarray  # (n_mels,)
    std: np.ndarray  # (n_mels,)


def band_stats(logmel: np.ndarray) -> BandStats:
    """Per-band mean and std over clips and frames (computed on the clean training split)."""
    return BandStats(logmel.mean(axis=(0, 2)).astype(np.float32),
                     np.maximum(logmel.std(axis=(0, 2)), 1e-5).astype(np.float32))


def normalize(logmel: np.ndarray, stats: BandStats) -> np.ndarray:
    """(n, n_mels, frames) -> float32 (n, 1, n_mels, frames), z-scored per band."""
    z = (logmel - stats.mean[None, :, None]) / stats.std[None, :, None]
    return z[:, None].astype(np.float32)


def cache_dir() -> Path:
    """$FEDKD_CACHE_DIR, else $XDG_CACHE_HOME/fedkd, else ~/.cache/fedkd."""
    env = os.environ.get("FEDKD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "fedkd"


def _cache_key(clips: list[Clip], params: FeatureParams) -> str:
    h = hashlib.sha1(json.dumps([_CACHE_VERSION, asdict(params)]).encode())
    for c in clips:
        st = c.path.stat()
        h.update(f"{c.path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=2)
def _raw_logmel(data_dir: str, params: FeatureParams) -> np.ndarray:
    """Clean log-mel of every clip, from the file cache when its key matches."""
    clips = fsdd_clips(data_dir)
    path = cache_dir() / f"fsdd-logmel-{_cache_key(clips, params)}.npy"
    if path.is_file():
        try:
            cached = np.load(path)
            if cached.shape == (len(clips), params.n_mels, params.frames):
                return cached
        except (OSError, ValueError):
            pass  # unreadable cache: recompute and overwrite
    logmel = log_mel(fsdd_waveforms(data_dir, params.clip_samples).waves, params)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, logmel)
        os.replace(tmp, path)  # atomic: concurrent workers never read half a file
    except OSError:
        pass  # a read-only cache dir only costs recomputation
    return logmel


def fsdd_band_stats(data_dir: Path | str, params: FeatureParams = FeatureParams()) -> BandStats:
    """Normalization statistics of the clean official training split (index 5-49)."""
    waves = fsdd_waveforms(str(data_dir), params.clip_samples)
    return band_stats(_raw_logmel(str(data_dir), params)[waves.split == "train"])


class FsddFeatures(NamedTuple):
    features: np.ndarray  # float32 (n, 1, n_mels, frames), band-normalized with train statistics
    labels: np.ndarray  # int64 (n,) digits
    speakers: np.ndarray  # str (n,)
    split: np.ndarray  # str (n,): "train" (take 5-49) / "test" (take 0-4)


def fsdd_features(data_dir: Path | str, params: FeatureParams = FeatureParams(),
                  normalized: bool = True) -> FsddFeatures:
    """Clean log-mel features of all 3,000 clips in `fsdd_clips` order, with their metadata.

    `normalized=False` gives the raw log-mel as (n, 1, n_mels, frames). Shared by Mix-CLAP and
    Beta-KD; file-cached, so only the first call in a fresh cache reads the wavs.
    """
    waves = fsdd_waveforms(str(data_dir), params.clip_samples)
    raw = _raw_logmel(str(data_dir), params)
    feats = normalize(raw, fsdd_band_stats(data_dir, params)) if normalized else raw[:, None].copy()
    return FsddFeatures(feats, waves.labels, waves.speakers, waves.split)


def waveform_features(waves: np.ndarray, stats: BandStats,
                      params: FeatureParams = FeatureParams()) -> np.ndarray:
    """Features of arbitrary (e.g. noisy) fitted waveforms, normalized with `stats`."""
    return normalize(log_mel(waves, params), stats)


# --- noise primitives (waveform domain) ---------------------------------------------------------

def span_power(x: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Mean square of each row over its [start, end) span: (n, L), (n, 2) -> (n,) float64."""
    out = np.zeros(len(x), np.float64)
    for i, (a, b) in enumerate(spans):  # row by row: no (n, L) float64 temporaries
        if b > a:
            row = x[i, a:b].astype(np.float64)
            out[i] = float(row @ row) / (b - a)
    return out


def mix_at_snr(signal: np.ndarray, noise: np.ndarray, snr_db: np.ndarray | float,
               spans: np.ndarray | None = None) -> np.ndarray:
    """signal + g * noise with g set so that 10 log10(P_signal / P_g*noise) = snr_db exactly,
    both powers measured over each clip's span (the whole row when `spans` is None)."""
    if spans is None:
        spans = np.tile(np.array([[0, signal.shape[-1]]]), (len(signal), 1))
    p_s, p_n = span_power(signal, spans), span_power(noise, spans)
    snr = np.broadcast_to(np.asarray(snr_db, np.float64), p_s.shape)
    gain = np.sqrt(p_s / (np.maximum(p_n, 1e-20) * 10.0 ** (snr / 10.0))).astype(np.float32)
    return (signal + gain[:, None] * noise).astype(np.float32, copy=False)


def lowpass(waves: np.ndarray, cutoff_hz: float, order: int = 4,
            sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Zero-phase Butterworth magnitude response |H(f)| = 1 / sqrt(1 + (f/fc)^(2 order)),
    applied in the frequency domain (ASSUMED realization of the spec's "4th-order low-pass":
    same magnitude as the IIR filter, no phase distortion, no scipy dependency)."""
    spec = np.fft.rfft(waves, axis=-1)
    f = np.fft.rfftfreq(waves.shape[-1], 1.0 / sample_rate)
    gain = 1.0 / np.sqrt(1.0 + (f / cutoff_hz) ** (2 * order))
    return np.fft.irfft(spec * gain, n=waves.shape[-1], axis=-1).astype(np.float32)


def babble(pool: np.ndarray, choices: np.ndarray) -> np.ndarray:
    """Babble-like noise: per row, the sum of the time-reversed pool waveforms it names.

    pool (m, L), choices (n, k) indices into pool -> (n, L). Reversal keeps a speech-like
    spectrum while destroying the digit's identity.
    """
    out = np.zeros((len(choices), pool.shape[-1]), np.float32)
    for k in range(choices.shape[1]):  # one talker at a time: never materialize (n, k, L)
        out += pool[choices[:, k], ::-1]
    return out


# --- the registered dataset ---------------------------------------------------------------------

def load_fsdd(data_dir: Path, seed: int) -> FederatedData:
    """One client holding FSDD's official split as clean (n, 1, 40, 101) log-mel features.

    The split is fixed (take index), so `seed` does not change the data; validation, noise and
    pairing are the methods' own, with their own seeded generators.
    """
    f = fsdd_features(data_dir)
    tr, te = f.split == "train", f.split == "test"
    split = ClientSplit(f.features[tr], f.labels[tr], f.features[te], f.labels[te])
    return FederatedData("fsdd", 10, tuple(f.features.shape[1:]), [split], None)


register_task_dataset("fsdd", TaskDataset(
    "Free Spoken Digit Dataset: 3,000 8 kHz clips, official split (take 0-4 test), "
    "40-band log-mel 1 s features (one client)", (RECORDINGS,), load_fsdd))
