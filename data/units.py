"""Speech units for the nano model: k-means clusters of 20 ms log-mel frames, 50 per second.

The reference's units are mHuBERT layer-11 k-means-1000 clusters; mHuBERT is not available offline. Here a frame
is two consecutive 10 ms frames of Whisper's own 80-bin log-mel (the features the speech tower reads, from
`WhisperFeatureExtractor`), standardised per dimension, and its unit is one of K centroids: the nearest, or, with
a switch cost (the shipped vocoder's), the one on the cheapest path through the utterance, where each change of
unit costs extra. Nearest centroids flicker between neighbouring clusters inside one sound (1.2 frames per
collapsed unit with 512 units of Piper speech; 1.7 with the recipe's cost), and every flicker is a unit the speech
generator would have to guess.

Why log-mel and not Whisper tiny.en encoder states (measured while building the recipe, on its held-out
espeak-ng sentences; the experiment scripts are not kept): speech rebuilt from the mean envelope of each unit was
transcribed by Whisper tiny.en at 13 % WER from 128 log-mel units (the original audio: 16 %) but at 32 % from 256
units of the encoder's first layer, and the trained nano vocoder on units of its last layer gave over 100 % (those
states carry sentence context; units fitted on them do not generalise to new words). Log-mel units also need no
encoder pass.

The centroids and standardisation ship with the nano vocoder (`kmeans.*` in
lyra/checkpoints/nano_vocoder/model.safetensors); `python -m lyra.data.vocoder_recipe` fits them.

    extractor = UnitExtractor.from_pretrained()
    units = extractor.units(samples)          # collapsed: what the speech generator is trained to emit
    frames = extractor.frame_units(samples)   # one unit per 20 ms frame, repeats kept
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lyra.constants import SAMPLE_RATE

FRAME_SAMPLES = 320  # one unit frame: 20 ms (two 10 ms mel frames)
WINDOW_SAMPLES = 30 * SAMPLE_RATE  # Whisper's feature extractor works on 30 s windows
CENTROIDS_KEY = "kmeans.centroids"  # tensor names inside the vocoder's model.safetensors
MEAN_KEY = "kmeans.mean"
STD_KEY = "kmeans.std"
SWITCH_COST_KEY = "kmeans.switch_cost"  # optional (absent: 0, plain nearest centroid)
FEATURES_KEY = "unit_features"  # metadata key there
FEATURES = "whisper-log-mel-2x80"  # what the centroids cluster


def dedup(units: Sequence[int]) -> tuple[list[int], list[int]]:
    """Collapse runs: [5, 5, 7, 5] -> ([5, 7, 5], [2, 1, 1]) (units, run lengths in frames)."""
    out: list[int] = []
    counts: list[int] = []
    for u in units:
        u = int(u)
        if out and out[-1] == u:
            counts[-1] += 1
        else:
            out.append(u)
            counts.append(1)
    return out, counts


def smooth_path(distances: torch.Tensor, switch_cost: float) -> torch.Tensor:
    """The unit sequence (F,) minimising the summed (F, K) frame-to-centroid `distances` plus `switch_cost` per change
    of unit (Viterbi over K states). With 0 it is the nearest centroid of each frame."""
    if switch_cost <= 0 or distances.shape[0] < 2:
        return distances.argmin(1)
    n, k = distances.shape
    states = torch.arange(k)
    cost = distances[0].clone()
    back = torch.empty(n, k, dtype=torch.long)
    for t in range(1, n):
        best, arg = cost.min(0)
        switch = best + switch_cost < cost  # cheaper to arrive from the best unit than to stay
        back[t] = torch.where(switch, arg, states)
        cost = torch.where(switch, best + switch_cost, cost) + distances[t]
    path = torch.empty(n, dtype=torch.long)
    path[-1] = cost.argmin()
    for t in range(n - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    return path


def fit_kmeans(features: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 40) -> torch.Tensor:
    """Plain k-means (k-means++ start, Lloyd iterations) of (N, D) features; returns (k, D) centroids.

    Deterministic for a seed. Empty clusters are re-seeded with the points farthest from their centroid.
    """
    x = features.float()
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} frames, got {n}")
    g = torch.Generator().manual_seed(seed)
    centroids = torch.empty(k, x.shape[1])
    centroids[0] = x[torch.randint(n, (1,), generator=g)]
    nearest = torch.cdist(x, centroids[:1]).squeeze(1) ** 2
    for i in range(1, k):
        centroids[i] = x[torch.multinomial(nearest / nearest.sum(), 1, generator=g)]
        nearest = torch.minimum(nearest, torch.cdist(x, centroids[i:i + 1]).squeeze(1) ** 2)
    for _ in range(iterations):
        dist = torch.cdist(x, centroids)
        assign = dist.argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
        if bool(empty.any()):
            far = dist.gather(1, assign[:, None]).squeeze(1).topk(int(empty.sum())).indices
            centroids[empty] = x[far]
    return centroids


class UnitExtractor:
    """20 ms log-mel frames -> k-means centroids, nearest or along the cheapest smooth path.

    Args:
        centroids: (K, 160) cluster centres of standardised features.
        mean, std: (160,) the standardisation fitted with them.
        whisper_dir: a Whisper folder for its feature extractor (default: the offline tiny.en asset).
        switch_cost: what a change of unit between two frames costs, in squared standardised distance (0: each
            frame takes its nearest centroid). Frames near a cluster border otherwise flicker between two units,
            which makes the collapsed sequence long and the speech generator's target noisy.
    """

    def __init__(self, centroids: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 whisper_dir: str | Path | None = None, switch_cost: float = 0.0):
        self.feature_extractor = feature_extractor(whisper_dir)
        self.centroids = centroids.float()
        self.mean = mean.float()
        self.std = std.float()
        self.switch_cost = float(switch_cost)
        width = 2 * self.feature_extractor.feature_size
        if self.centroids.shape[1] != width or self.mean.shape != (width,) or self.std.shape != (width,):
            raise ValueError(f"unit centroids and standardisation must be {width} wide (two {width // 2}-bin mel frames)")

    @property
    def num_units(self) -> int:
        return int(self.centroids.shape[0])

    @classmethod
    def from_pretrained(cls, folder: str | Path | None = None, whisper_dir: str | Path | None = None) -> UnitExtractor:
        """The units stored with a nano vocoder (default: the embedded one)."""
        from safetensors import safe_open

        from lyra.vocoder import EMBEDDED_VOCODER

        path = Path(folder or EMBEDDED_VOCODER) / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; build the nano vocoder with `python -m lyra.data.vocoder_recipe`")
        with safe_open(str(path), framework="pt") as f:
            stored = set(f.keys())
            missing = [k for k in (CENTROIDS_KEY, MEAN_KEY, STD_KEY) if k not in stored]
            if missing:
                raise KeyError(f"{path} holds no {missing}: not a nano vocoder with its unit inventory")
            kind = (f.metadata() or {}).get(FEATURES_KEY)
            if kind != FEATURES:
                raise ValueError(f"{path}: its units cluster {kind!r} features, this extractor computes {FEATURES!r}")
            tensors = [f.get_tensor(k).float() for k in (CENTROIDS_KEY, MEAN_KEY, STD_KEY)]
            switch_cost = float(f.get_tensor(SWITCH_COST_KEY).float()) if SWITCH_COST_KEY in stored else 0.0
        return cls(*tensors, whisper_dir, switch_cost=switch_cost)

    def features(self, samples: np.ndarray) -> torch.Tensor:
        """16 kHz mono audio (N,) -> (ceil(N / 320), 160) raw features: pairs of Whisper log-mel frames."""
        return log_mel_frames(self.feature_extractor, samples)

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """(F, 160) raw features -> (F, K) squared distances to the centroids (standardised)."""
        return torch.cdist((features.float() - self.mean) / self.std, self.centroids) ** 2

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """(F, 160) raw features of one utterance -> (F,) units: the nearest centroids, smoothed by `switch_cost`."""
        return smooth_path(self.distances(features), self.switch_cost)

    def frame_units(self, samples: np.ndarray) -> torch.Tensor:
        """One unit per 20 ms frame, (ceil(N / 320),)."""
        return self.assign(self.features(samples))

    def units(self, samples: np.ndarray) -> list[int]:
        """Collapsed units (runs merged): the speech generator's CTC targets, the vocoder's input."""
        return dedup(self.frame_units(samples).tolist())[0]


def feature_extractor(whisper_dir: str | Path | None = None):
    """Whisper's log-mel feature extractor (default: the offline tiny.en asset's, 80 bins)."""
    from transformers import WhisperFeatureExtractor

    from lyra import assets

    return WhisperFeatureExtractor.from_pretrained(whisper_dir if whisper_dir is not None else assets.whisper_tiny_en())


def log_mel_frames(extractor, samples: np.ndarray) -> torch.Tensor:
    """(N,) audio -> (ceil(N / 320), 2 * n_mels): each row two consecutive 10 ms log-mel frames, as Whisper
    computes them per 30 s window (its normalisation is relative to the window's loudest frame)."""
    samples = np.asarray(samples, dtype=np.float32)
    n_frames = math.ceil(len(samples) / FRAME_SAMPLES)
    out = []
    for start in range(0, max(len(samples), 1), WINDOW_SAMPLES):
        window = samples[start:start + WINDOW_SAMPLES]
        n = max(1, math.ceil(len(window) / FRAME_SAMPLES))
        mel = extractor(window, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features[0]  # (n_mels, 3000)
        out.append(mel[:, : 2 * n].T.reshape(n, -1))
    return torch.cat(out)[:n_frames]


__all__ = [
    "CENTROIDS_KEY", "FEATURES", "FEATURES_KEY", "FRAME_SAMPLES", "MEAN_KEY", "STD_KEY", "SWITCH_COST_KEY",
    "UnitExtractor", "dedup", "feature_extractor", "fit_kmeans", "log_mel_frames", "smooth_path",
]
