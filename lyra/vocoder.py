"""Unit vocoders: discrete speech units -> 16 kHz audio, whole or in chunks that join without clicks.

Units arrive CTC-collapsed (no repeats); a vocoder first gives each unit a duration in 20 ms frames, then turns
the frame sequence into samples. Two vocoders share that interface (`UnitVocoder`):

- `CodeHiFiGAN`: the reference's unit HiFi-GAN (facebookresearch/speech-resynthesis `CodeGenerator`, used by
  LLaMA-Omni and Lyra through fairseq's `CodeHiFiGANVocoder`): unit embedding `dict` -> HiFi-GAN generator
  (conv_pre, transposed-conv upsamplers, multi-receptive-field residual blocks, conv_post, tanh), plus the
  duration predictor (`dur_predictor`) for deduplicated units. `load_code_hifigan` reads the published layout:
  a torch file whose "generator" entry holds weight-normed weights (weight_g / weight_v) and its JSON config.
- `NanoVocoder`: small enough to train on a CPU in minutes and ship in git (lyra/checkpoints/nano_vocoder). A
  duration predictor and a dilated conv stack map units to a spectral envelope and a voicing degree per 10 ms;
  a fixed source-filter stage shapes a pulse train (monotone pitch) and noise with them (STFT filtering and
  weighted overlap-add). Its excitation is a function of the absolute sample index, so any stretch of audio can
  be rendered on its own and equals the same stretch of the whole.

`ChunkedSynthesis` streams: units go in as the generator emits them, audio chunks come out. Each chunk is
rendered from a window that overlaps its neighbours by the vocoder's receptive radius on both sides and is cut
out of it, so the joined chunks equal the offline audio; a short raised-cosine crossfade over the overlap hides
what is left when a smaller lookahead is chosen for latency.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lyra.constants import SAMPLE_RATE

SAMPLES_PER_FRAME = 320  # one unit frame: 20 ms at 16 kHz (50 frames per second)
LRELU_SLOPE = 0.1  # HiFi-GAN's leaky ReLU slope inside the generator
NANO_MODEL_TYPE = "lyra-nano-vocoder"


class UnitVocoder(Protocol):
    """What `ChunkedSynthesis` needs from a vocoder."""

    sample_rate: int  # Hz
    samples_per_frame: int  # audio samples per unit frame
    num_units: int  # unit inventory

    @property
    def frame_radius(self) -> int:
        """Frames on each side an output frame's samples depend on."""

    @property
    def duration_radius(self) -> int:
        """Units on each side a unit's duration depends on (0 without a duration predictor)."""

    def durations(self, units: torch.Tensor) -> torch.Tensor:
        """(N,) unit ids -> (N,) frames per unit (>= 1)."""

    def synthesize_frames(self, frames: torch.Tensor, first_frame: int = 0) -> torch.Tensor:
        """(F,) frame-level unit ids, starting at absolute frame `first_frame` -> (F * samples_per_frame,) audio."""


@torch.inference_mode()
def synthesize_units(vocoder: UnitVocoder, units: Sequence[int] | torch.Tensor) -> np.ndarray:
    """Offline: the whole audio of collapsed `units`, float32 in [-1, 1]."""
    units = torch.as_tensor(list(units) if not isinstance(units, torch.Tensor) else units, dtype=torch.long)
    if units.numel() == 0:
        return np.zeros(0, dtype=np.float32)
    frames = torch.repeat_interleave(units, vocoder.durations(units).cpu())
    return vocoder.synthesize_frames(frames, 0).float().cpu().numpy()


def _check_units(units: torch.Tensor, num_units: int) -> None:
    if units.numel() and (int(units.min()) < 0 or int(units.max()) >= num_units):
        raise ValueError(
            f"units must lie in [0, {num_units}) for this vocoder, got [{int(units.min())}, {int(units.max())}]; "
            "the speech generator and the vocoder must use the same unit inventory"
        )


# ---- code HiFi-GAN ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DurationPredictorConfig:
    """The reference's `dur_predictor_params` (fairseq VariancePredictor)."""

    encoder_embed_dim: int = 128  # input width (the unit embedding)
    var_pred_hidden_dim: int = 128  # conv width
    var_pred_kernel_size: int = 3  # conv kernel (the published second conv pads by 1: only 3 fits)
    var_pred_dropout: float = 0.5  # training only


@dataclass(frozen=True)
class CodeHiFiGANConfig:
    """The keys of a published code HiFi-GAN config.json that shape the model (training keys are ignored)."""

    num_embeddings: int = 1000  # unit inventory
    embedding_dim: int = 128  # unit embedding width
    model_in_dim: int = 128  # conv_pre input width (= embedding_dim without speaker or f0 inputs)
    upsample_rates: tuple[int, ...] = (5, 4, 4, 2, 2)  # their product is code_hop_size
    upsample_kernel_sizes: tuple[int, ...] = (11, 8, 8, 4, 4)
    upsample_initial_channel: int = 512  # halves after every upsampler
    resblock: str = "1"  # "1": three dilated conv pairs per block; "2": two dilated convs
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    sampling_rate: int = SAMPLE_RATE  # Hz
    code_hop_size: int = SAMPLES_PER_FRAME  # samples per unit frame
    dur_predictor_params: DurationPredictorConfig | None = None  # None: units are frames (no durations)

    _UNSUPPORTED = ("f0", "multispkr", "embedder_params", "lambda_commit", "lambda_commit_code", "f0_quantizer_path")

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> CodeHiFiGANConfig:
        for key in cls._UNSUPPORTED:
            if data.get(key):
                raise ValueError(f"{where}: '{key}' is set; only unit-only code HiFi-GANs (no f0, no speaker input) are supported")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        if "resblock_dilation_sizes" in kwargs:
            kwargs["resblock_dilation_sizes"] = tuple(tuple(d) for d in kwargs["resblock_dilation_sizes"])
        if "resblock" in kwargs:
            kwargs["resblock"] = str(kwargs["resblock"])
        dur = kwargs.get("dur_predictor_params")
        if dur is not None:
            kwargs["dur_predictor_params"] = DurationPredictorConfig(**{k: dur[k] for k in dur if k in
                                                                      {f.name for f in fields(DurationPredictorConfig)}})
        else:
            kwargs["dur_predictor_params"] = None
        config = cls(**kwargs)
        if math.prod(config.upsample_rates) != config.code_hop_size:
            raise ValueError(f"{where}: upsample_rates {config.upsample_rates} multiply to "
                             f"{math.prod(config.upsample_rates)}, not code_hop_size {config.code_hop_size}")
        if config.dur_predictor_params is not None and config.dur_predictor_params.var_pred_kernel_size != 3:
            raise ValueError(f"{where}: var_pred_kernel_size must be 3 (the published predictor pads its second conv by 1)")
        return config

    def to_dict(self) -> dict:
        return asdict(self)


def _padding(kernel: int, dilation: int = 1) -> int:
    return (kernel * dilation - dilation) // 2


class _ResBlock1(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: Sequence[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, 1, dilation=d, padding=_padding(kernel, d))
                                    for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, 1, dilation=1, padding=_padding(kernel))
                                    for _ in dilations)

    def radius(self) -> int:
        return sum(c1.padding[0] + c2.padding[0] for c1, c2 in zip(self.convs1, self.convs2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class _ResBlock2(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: Sequence[int]):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, kernel, 1, dilation=d, padding=_padding(kernel, d))
                                   for d in dilations)

    def radius(self) -> int:
        return sum(c.padding[0] for c in self.convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.convs:
            x = x + c(F.leaky_relu(x, LRELU_SLOPE))
        return x


class _DurationPredictor(nn.Module):
    """fairseq's VariancePredictor: two conv+ReLU+LayerNorm blocks and a projection to log(duration + 1)."""

    def __init__(self, in_dim: int, hidden: int, kernel: int = 3, dropout: float = 0.5):
        super().__init__()
        self.dropout = dropout  # training only, after each LayerNorm (as published)
        self.conv1 = nn.Sequential(nn.Conv1d(in_dim, hidden, kernel, padding=(kernel - 1) // 2), nn.ReLU())
        self.ln1 = nn.LayerNorm(hidden)
        self.conv2 = nn.Sequential(nn.Conv1d(hidden, hidden, kernel, padding=(kernel - 1) // 2), nn.ReLU())
        self.ln2 = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, 1)

    @property
    def radius(self) -> int:
        """Units on each side a prediction depends on (two convs)."""
        return 2 * ((self.conv1[0].kernel_size[0] - 1) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T) predicted log(duration + 1)."""
        x = F.dropout(self.ln1(self.conv1(x.transpose(1, 2)).transpose(1, 2)), self.dropout, self.training)
        x = F.dropout(self.ln2(self.conv2(x.transpose(1, 2)).transpose(1, 2)), self.dropout, self.training)
        return self.proj(x).squeeze(-1)

    @staticmethod
    def frames(log_duration: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """The reference's rounding: clamp(round(exp(d) - 1), min=1) (times `scale` before rounding)."""
        return torch.clamp(torch.round((torch.exp(log_duration) - 1) * scale).long(), min=1)


class CodeHiFiGAN(nn.Module):
    """Unit HiFi-GAN with the published parameter names (`dict`, `conv_pre`, `ups`, `resblocks`, `conv_post`,
    `dur_predictor`); weight norm is folded into plain weights at load time (as `remove_weight_norm` does)."""

    def __init__(self, config: CodeHiFiGANConfig):
        super().__init__()
        c = config
        self.config = c
        self.sample_rate = c.sampling_rate
        self.samples_per_frame = c.code_hop_size
        self.num_units = c.num_embeddings
        self.dict = nn.Embedding(c.num_embeddings, c.embedding_dim)
        self.conv_pre = nn.Conv1d(c.model_in_dim, c.upsample_initial_channel, 7, 1, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(c.upsample_initial_channel // 2**i, c.upsample_initial_channel // 2 ** (i + 1), k, u,
                               padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes))
        )
        block = _ResBlock1 if c.resblock == "1" else _ResBlock2
        self.resblocks = nn.ModuleList(
            block(c.upsample_initial_channel // 2 ** (i + 1), k, d)
            for i in range(len(self.ups))
            for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes)
        )
        channels = c.upsample_initial_channel // 2 ** len(self.ups)
        self.conv_post = nn.Conv1d(channels, 1, 7, 1, padding=3)
        d = c.dur_predictor_params
        self.dur_predictor = (
            _DurationPredictor(d.encoder_embed_dim, d.var_pred_hidden_dim, d.var_pred_kernel_size, d.var_pred_dropout)
            if d else None
        )

    @property
    def frame_radius(self) -> int:
        """Receptive radius in frames, summed stage by stage (each stage's radius over its sample rate)."""
        c = self.config
        n_kernels = len(c.resblock_kernel_sizes)
        radius, rate = 3.0, 1  # conv_pre
        for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)):
            radius += math.ceil(k / u) / rate  # transposed conv, in its input samples
            rate *= u
            blocks = self.resblocks[i * n_kernels:(i + 1) * n_kernels]
            radius += max(b.radius() for b in blocks) / rate
        radius += 3 / rate  # conv_post
        return math.ceil(radius) + 1

    @property
    def duration_radius(self) -> int:
        return self.dur_predictor.radius if self.dur_predictor is not None else 0

    @torch.inference_mode()
    def durations(self, units: torch.Tensor) -> torch.Tensor:
        units = units.to(self.dict.weight.device)
        _check_units(units, self.num_units)
        if self.dur_predictor is None:
            return torch.ones_like(units)
        return _DurationPredictor.frames(self.dur_predictor(self.dict(units)[None]))[0]

    @torch.inference_mode()
    def synthesize_frames(self, frames: torch.Tensor, first_frame: int = 0) -> torch.Tensor:
        frames = frames.to(self.dict.weight.device)
        _check_units(frames, self.num_units)
        x = self.conv_pre(self.dict(frames)[None].transpose(1, 2))
        n = len(self.config.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            x = sum(self.resblocks[i * n + j](x) for j in range(n)) / n
        x = torch.tanh(self.conv_post(F.leaky_relu(x)))  # default slope (0.01) here, as published
        return x.reshape(-1)

    def synthesize(self, units: Sequence[int] | torch.Tensor) -> np.ndarray:
        """Offline: the whole audio of collapsed units."""
        return synthesize_units(self, units)


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace `X.weight_g` / `X.weight_v` pairs (torch.nn.utils.weight_norm, dim 0) by `X.weight`."""
    out = {}
    for key, value in state.items():
        if key.endswith(".weight_v"):
            continue
        if key.endswith(".weight_g"):
            stem = key[: -len(".weight_g")]
            v = state[f"{stem}.weight_v"].float()
            norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))
            out[f"{stem}.weight"] = value.float() * v / norm
        else:
            out[key] = value
    return out


def load_code_hifigan(checkpoint: str | Path, config: str | Path | dict, *, device: str | torch.device = "cpu") -> CodeHiFiGAN:
    """A code HiFi-GAN from the published files: the generator checkpoint (torch file with a "generator" entry,
    e.g. `g_00500000`) and its config.json (or the config as a dict)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"vocoder checkpoint {checkpoint} does not exist")
    if isinstance(config, dict):
        data, where = config, "config"
    else:
        where = str(config)
        if not Path(config).is_file():
            raise FileNotFoundError(f"vocoder config {config} does not exist (the JSON next to the generator checkpoint)")
        data = json.loads(Path(config).read_text())
    model = CodeHiFiGAN(CodeHiFiGANConfig.from_dict(data, where))
    if checkpoint.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(checkpoint))
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("generator", state)
    state = fold_weight_norm(state)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint} does not fit the config {where}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            " (dur_predictor.* must be present exactly when the config has dur_predictor_params)"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"{checkpoint}: {key} has shape {tuple(value.shape)}, the config needs {tuple(own[key].shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device).eval()


# ---- nano vocoder ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class NanoVocoderConfig:
    """The embedded nano vocoder: unit embedding + dilated convs -> envelope and voicing, then source-filter."""

    num_units: int = 128  # unit inventory (k-means clusters of 20 ms log-mel frames, lyra/data/units.py)
    sample_rate: int = SAMPLE_RATE  # Hz
    samples_per_frame: int = SAMPLES_PER_FRAME  # one unit frame: 20 ms
    embedding_dim: int = 64  # unit embedding width (conv stack and duration predictor each have one)
    channels: int = 128  # conv stack width
    kernel_size: int = 3  # conv stack kernel (frames)
    dilations: tuple[int, ...] = (1, 2, 4, 1)  # residual convs of the stack
    duration_channels: int = 64  # duration predictor width
    duration_kernel: int = 3  # duration predictor kernel (units); it sees (kernel - 1) units on each side
    duration_dropout: float = 0.5  # duration predictor dropout (training only)
    duration_scale: float = 1.0  # predicted frames are scaled by this before rounding (fitted so totals match)
    n_fft: int = 512  # synthesis window (32 ms)
    hop: int = 160  # envelope frames: 10 ms, two per unit frame
    linear_bands: int = 8  # envelope bands spaced evenly below `linear_limit_hz` (wider than a harmonic)
    linear_limit_hz: float = 1000.0
    log_bands: int = 24  # envelope bands spaced geometrically from `linear_limit_hz` to Nyquist
    f0: float = 120.0  # pitch of the voiced excitation (Hz); monotone
    noise_seed: int = 1234  # seed of the unvoiced excitation (noise is a function of the absolute sample)
    log_floor: float = -18.0  # floor of log band power (natural log)
    model_type: str = NANO_MODEL_TYPE

    @property
    def n_bands(self) -> int:
        return self.linear_bands + self.log_bands

    @property
    def subframes(self) -> int:
        """Envelope frames per unit frame."""
        return self.samples_per_frame // self.hop

    @classmethod
    def from_dict(cls, data: dict) -> NanoVocoderConfig:
        data = dict(data)
        if data.get("model_type", NANO_MODEL_TYPE) != NANO_MODEL_TYPE:
            raise ValueError(f"not a nano vocoder config (model_type {data.get('model_type')!r})")
        if "dilations" in data:
            data["dilations"] = tuple(data["dilations"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def band_centers(config: NanoVocoderConfig) -> np.ndarray:
    """Centre frequencies (Hz) of the envelope bands: linear below the limit, geometric above."""
    linear = np.linspace(0.0, config.linear_limit_hz, config.linear_bands, endpoint=False)
    log = np.geomspace(config.linear_limit_hz, config.sample_rate / 2, config.log_bands)
    return np.concatenate([linear, log])


def band_matrices(config: NanoVocoderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(analysis, synthesis): triangular band weights (bands, bins), each row summing to 1, and the linear
    interpolation (bins, bands) from band values back to FFT bins (flat beyond the outer centres)."""
    centers = band_centers(config)
    bins = np.fft.rfftfreq(config.n_fft, 1.0 / config.sample_rate)
    analysis = np.zeros((len(centers), len(bins)))
    for b, c in enumerate(centers):
        lo = centers[b - 1] if b > 0 else c - (centers[1] - centers[0])
        hi = centers[b + 1] if b + 1 < len(centers) else c + (c - centers[b - 1])
        rise = (bins - lo) / (c - lo)
        fall = (hi - bins) / (hi - c)
        analysis[b] = np.clip(np.minimum(rise, fall), 0.0, None)
    if (analysis.sum(1) <= 0).any():
        raise ValueError("an envelope band holds no FFT bin: fewer bands or a larger n_fft")
    analysis /= analysis.sum(1, keepdims=True)
    synthesis = np.zeros((len(bins), len(centers)))
    for k, f in enumerate(bins):
        j = int(np.searchsorted(centers, f))
        if j == 0:
            synthesis[k, 0] = 1.0
        elif j >= len(centers):
            synthesis[k, -1] = 1.0
        else:
            t = (f - centers[j - 1]) / (centers[j] - centers[j - 1])
            synthesis[k, j - 1], synthesis[k, j] = 1.0 - t, t
    return torch.tensor(analysis, dtype=torch.float32), torch.tensor(synthesis, dtype=torch.float32)


@dataclass
class Envelope:
    """Per 10 ms envelope frame (J = 2 per unit frame): log band power and voicing degree."""

    log_power: torch.Tensor  # (J, n_bands) natural log of the mean power per band, per unit-power excitation
    voicing: torch.Tensor  # (J,) in [0, 1]: share of the pulse excitation (1) versus noise (0)


class NanoVocoder(nn.Module):
    """Units -> envelope (learned) -> audio (fixed source-filter). See the module docstring."""

    def __init__(self, config: NanoVocoderConfig):
        super().__init__()
        c = config
        self.config = c
        self.sample_rate = c.sample_rate
        self.samples_per_frame = c.samples_per_frame
        self.num_units = c.num_units
        if c.samples_per_frame % c.hop:
            raise ValueError("samples_per_frame must be a multiple of hop")
        if c.duration_kernel < 1 or c.duration_kernel % 2 == 0:
            raise ValueError(f"duration_kernel must be odd (same-length convs), got {c.duration_kernel}")
        self.duration = _DurationPredictor(c.embedding_dim, c.duration_channels, c.duration_kernel, c.duration_dropout)
        self.duration_embed = nn.Embedding(c.num_units, c.embedding_dim)
        self.embed = nn.Embedding(c.num_units, c.embedding_dim)
        pad = (c.kernel_size - 1) // 2
        self.conv_in = nn.Conv1d(c.embedding_dim, c.channels, c.kernel_size, padding=pad)
        self.convs = nn.ModuleList(nn.Conv1d(c.channels, c.channels, c.kernel_size, dilation=d, padding=pad * d)
                                   for d in c.dilations)
        self.conv_out = nn.Conv1d(c.channels, c.subframes * (c.n_bands + 1), 1)
        analysis, synthesis = band_matrices(c)
        self.register_buffer("band_analysis", analysis, persistent=False)
        self.register_buffer("band_synthesis", synthesis, persistent=False)
        self.register_buffer("window", torch.hann_window(c.n_fft, periodic=True), persistent=False)

    # ---- learned part --------------------------------------------------------------------------
    @property
    def frame_radius(self) -> int:
        c = self.config
        conv = (c.kernel_size - 1) // 2 * (1 + sum(c.dilations))
        overlap = math.ceil(c.n_fft / 2 / c.samples_per_frame)  # an envelope frame reaches n_fft / 2 samples out
        return conv + overlap + 1

    @property
    def duration_radius(self) -> int:
        return self.duration.radius

    def predict_log_durations(self, units: torch.Tensor) -> torch.Tensor:
        """(B, N) units -> (B, N) predicted log(frames + 1)."""
        return self.duration(self.duration_embed(units))

    @torch.inference_mode()
    def durations(self, units: torch.Tensor) -> torch.Tensor:
        units = units.to(self.embed.weight.device)
        _check_units(units, self.num_units)
        return _DurationPredictor.frames(self.predict_log_durations(units[None]), self.config.duration_scale)[0]

    def envelope_logits(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F) frame units -> log band power (B, 2F, n_bands) and voicing logits (B, 2F)."""
        c = self.config
        x = self.conv_in(self.embed(frames).transpose(1, 2))
        for conv in self.convs:
            x = x + conv(F.leaky_relu(x, LRELU_SLOPE))
        y = self.conv_out(F.leaky_relu(x, LRELU_SLOPE))  # (B, S * (bands + 1), F)
        b, _, n = y.shape
        y = y.reshape(b, c.subframes, c.n_bands + 1, n).permute(0, 3, 1, 2).reshape(b, n * c.subframes, c.n_bands + 1)
        return y[..., :-1], y[..., -1]

    @torch.inference_mode()
    def synthesize_frames(self, frames: torch.Tensor, first_frame: int = 0) -> torch.Tensor:
        frames = frames.to(self.embed.weight.device)
        _check_units(frames, self.num_units)
        log_power, voicing = self.envelope_logits(frames[None])
        return self.render(Envelope(log_power[0], torch.sigmoid(voicing[0])), first_frame)

    def synthesize(self, units: Sequence[int] | torch.Tensor) -> np.ndarray:
        """Offline: the whole audio of collapsed units."""
        return synthesize_units(self, units)

    # ---- fixed part: analysis and source-filter synthesis --------------------------------------
    def analyze(self, samples: torch.Tensor) -> Envelope:
        """The training targets of 16 kHz audio (N,) padded to whole unit frames: 2 envelope frames per unit
        frame, frame j centred on sample hop * j (as `render` places them)."""
        c = self.config
        n_frames = math.ceil(samples.shape[0] / c.samples_per_frame)
        j = n_frames * c.subframes
        padded = F.pad(samples.float(), (c.n_fft // 2, c.n_fft // 2 + n_frames * c.samples_per_frame - samples.shape[0]))
        frames = padded.unfold(0, c.n_fft, c.hop)[:j]  # (J, n_fft), frame j centred on hop * j
        spectrum = torch.fft.rfft(frames * self.window).abs() ** 2 / self.window.pow(2).sum()
        log_power = torch.log(spectrum @ self.band_analysis.T + 1e-12).clamp(min=c.log_floor)
        return Envelope(log_power=log_power, voicing=self._periodicity(frames, log_power))

    def _periodicity(self, frames: torch.Tensor, log_power: torch.Tensor) -> torch.Tensor:
        """Voicing degree per frame: the peak of the window-corrected normalised autocorrelation at pitch lags
        (70-400 Hz), mapped from [0.35, 0.75] to [0, 1]; quiet frames (40 dB under the loudest) are unvoiced."""
        c = self.config
        w = self.window
        x = frames * w
        size = 2 * c.n_fft
        ac = torch.fft.irfft(torch.fft.rfft(x, size).abs() ** 2, size)[:, : c.n_fft]
        wac = torch.fft.irfft(torch.fft.rfft(w, size).abs() ** 2, size)[: c.n_fft]
        lo, hi = int(c.sample_rate / 400), int(c.sample_rate / 70)
        r = (ac[:, lo:hi] / ac[:, :1].clamp(min=1e-12)) / (wac[lo:hi] / wac[0])
        voicing = ((r.max(1).values - 0.35) / 0.4).clamp(0.0, 1.0)
        energy = log_power.exp().mean(1)
        return torch.where(energy > energy.max() * 1e-4, voicing, torch.zeros_like(voicing))

    def excitation(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pulse train (unit power, period round(sr / f0)) and white noise for absolute samples [start, start+length)."""
        c = self.config
        device = self.window.device
        n = torch.arange(start, start + length, device=device)
        period = round(c.sample_rate / c.f0)
        pulses = torch.where(n % period == 0, math.sqrt(period), 0.0)
        block = 4096
        first, last = start // block, (start + length - 1) // block
        noise = []
        for b in range(first, last + 1):
            g = torch.Generator().manual_seed(c.noise_seed * (1 << 24) + (b + (1 << 23)))
            noise.append(torch.randn(block, generator=g))
        noise = torch.cat(noise).to(device)[start - first * block: start - first * block + length]
        return pulses.float(), noise

    def render(self, envelope: Envelope, first_frame: int = 0) -> torch.Tensor:
        """Envelope frames (J = 2F) starting at absolute unit frame `first_frame` -> (F * samples_per_frame,) audio.

        Frame j shapes both excitations under a 512-sample Hann window centred on its absolute sample, the two
        are mixed by its voicing, and windowed overlap-add (divided by the periodic window-square sum) joins the
        frames; frames outside the given range count as silent.
        """
        c = self.config
        j_count = envelope.log_power.shape[0]
        half = c.n_fft // 2
        first = first_frame * c.subframes  # absolute index of the first envelope frame
        start = first * c.hop - half
        length = (j_count - 1) * c.hop + c.n_fft
        pulses, noise = self.excitation(start, length)
        w = self.window
        spec_p = torch.fft.rfft(pulses.unfold(0, c.n_fft, c.hop) * w)
        spec_n = torch.fft.rfft(noise.unfold(0, c.n_fft, c.hop) * w)
        log_bins = envelope.log_power.float() @ self.band_synthesis.T  # (J, bins)
        amplitude = torch.exp(0.5 * log_bins)
        v = envelope.voicing.float()[:, None]
        spec = amplitude * (v.sqrt() * spec_p + (1 - v).sqrt() * spec_n)
        pieces = torch.fft.irfft(spec, c.n_fft) * w  # (J, n_fft)
        out = F.fold(pieces.T[None], output_size=(1, length), kernel_size=(1, c.n_fft), stride=(1, c.hop)).reshape(-1)
        # The window-square sum of an endless row of frames, periodic in the hop: the same wherever we start.
        phase = (torch.arange(length, device=w.device) + start) % c.hop
        norm = self._window_square_sum()[phase]
        audio = out / norm
        return audio[half: half + j_count * c.hop].clamp(-1.0, 1.0)

    def _window_square_sum(self) -> torch.Tensor:
        c = self.config
        w2 = self.window.pow(2)
        table = torch.zeros(c.hop, device=w2.device)
        for r in range(c.hop):
            # Sample n = hop * q + r sits at window index n - hop * j + n_fft / 2 of frame j (centred on hop * j).
            idx = (r + c.n_fft // 2) % c.hop + torch.arange(0, c.n_fft, c.hop, device=w2.device)
            table[r] = w2[idx[idx < c.n_fft]].sum()
        return table

    # ---- files ---------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, extra: dict[str, torch.Tensor] | None = None,
                        metadata: dict[str, str] | None = None) -> Path:
        """config.json + model.safetensors (fp16); `extra` tensors go to the same file under their own names,
        `metadata` into its header."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = asdict(self.config)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in self.state_dict().items()}
        for k, v in (extra or {}).items():
            state[k] = v.detach().to(torch.float16).contiguous()
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt", **(metadata or {})})
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str | torch.device = "cpu") -> NanoVocoder:
        from safetensors.torch import load_file

        folder = Path(folder)
        config_path, weights_path = folder / "config.json", folder / "model.safetensors"
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist: not a nano vocoder folder (build one with "
                                        "`python -m lyra.data.vocoder_recipe`)")
        model = cls(NanoVocoderConfig.from_dict(json.loads(config_path.read_text())))
        state = load_file(str(weights_path))
        own = model.state_dict()
        model.load_state_dict({k: state[k].float() for k in own})
        return model.to(device).eval()


# ---- loading any vocoder -----------------------------------------------------------------------------
CODE_HIFIGAN_CHECKPOINT_NAMES = ("g_00500000", "generator.pt", "generator.pth", "model.pt", "model.pth")


def load_vocoder(path: str | Path, *, device: str | torch.device = "cpu") -> CodeHiFiGAN | NanoVocoder:
    """A vocoder folder: the nano vocoder's (config.json model_type "lyra-nano-vocoder") or a code HiFi-GAN's
    (config.json + a generator checkpoint such as g_00500000), or a code HiFi-GAN checkpoint file whose
    config.json lies beside it."""
    path = Path(path)
    if path.is_file():
        return load_code_hifigan(path, path.with_name("config.json"), device=device)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} holds no config.json: not a vocoder folder")
    data = json.loads(config_path.read_text())
    if data.get("model_type") == NANO_MODEL_TYPE:
        return NanoVocoder.from_pretrained(path, device=device)
    candidates = [path / n for n in CODE_HIFIGAN_CHECKPOINT_NAMES if (path / n).is_file()]
    candidates += sorted(p for p in path.glob("g_*") if p.is_file() and p not in candidates)
    if not candidates:
        raise FileNotFoundError(f"{path}: no generator checkpoint (g_XXXXXXXX, generator.pt) next to config.json")
    return load_code_hifigan(candidates[0], config_path, device=device)


EMBEDDED_VOCODER = Path(__file__).parent / "checkpoints" / "nano_vocoder"  # shipped in the repository


# ---- chunked synthesis -------------------------------------------------------------------------------
@dataclass
class AudioChunk:
    """One piece of a streamed spoken answer."""

    samples: np.ndarray  # (N,) float32 in [-1, 1]
    units_done: int  # units (since the start of the answer) whose audio is complete once this chunk has played


@dataclass
class SynthesisState:
    """Where a chunked synthesis stands; every list is trimmed to what later windows still need."""

    units: list[int] = field(default_factory=list)  # received units from index `unit_offset` on
    unit_offset: int = 0
    durations_final: int = 0  # units whose duration is known for good (their right context has arrived)
    unit_ends: list[int] = field(default_factory=list)  # per final unit (from unit_offset): its end frame
    frames: list[int] = field(default_factory=list)  # frame-level unit ids from frame `frame_offset` on
    frame_offset: int = 0
    emitted_frames: int = 0  # frames whose audio has been handed out
    tail: np.ndarray | None = None  # audio just after the last chunk, rendered with it, crossfaded into the next
    chunks: int = 0  # chunks handed out
    finished: bool = False

    @property
    def final_frames(self) -> int:
        return self.frame_offset + len(self.frames)


class ChunkedSynthesis:
    """Stream units in, audio chunks out, for one answer (start another, or `reset`, for the next).

    Args:
        vocoder: a `UnitVocoder`.
        first_chunk_frames: frames in the first chunk (small: it sets the time to first audio).
        chunk_frames: frames in every later chunk.
        lookahead_frames: frames of context each side of a chunk; the vocoder's receptive radius (default) makes
            the chunks equal the offline audio, fewer trade a small mismatch for latency.
        crossfade_samples: raised-cosine crossfade between a chunk's rendered tail and the next chunk's start.
    """

    def __init__(self, vocoder: UnitVocoder, *, first_chunk_frames: int = 10, chunk_frames: int = 40,
                 lookahead_frames: int | None = None, crossfade_samples: int = 160):
        if first_chunk_frames < 1 or chunk_frames < 1:
            raise ValueError("chunk sizes must be at least one frame")
        self.vocoder = vocoder
        self.first_chunk_frames = first_chunk_frames
        self.chunk_frames = chunk_frames
        self.lookahead = vocoder.frame_radius if lookahead_frames is None else lookahead_frames
        self.crossfade = min(crossfade_samples, self.lookahead * vocoder.samples_per_frame)
        self.state = SynthesisState()

    def reset(self) -> None:
        self.state = SynthesisState()

    @property
    def sample_rate(self) -> int:
        return self.vocoder.sample_rate

    def push(self, units: Sequence[int]) -> list[AudioChunk]:
        """Add collapsed units; returns the chunks that became ready (possibly none)."""
        s = self.state
        if s.finished:
            raise RuntimeError("this synthesis has finished; reset() it for a new answer")
        s.units.extend(int(u) for u in units)
        self._finalize_durations(last=False)
        return self._emit(final=False)

    def finish(self) -> list[AudioChunk]:
        """No more units: render the rest."""
        s = self.state
        if s.finished:
            return []
        self._finalize_durations(last=True)
        chunks = self._emit(final=True)
        s.finished = True
        return chunks

    # ---- internals ---------------------------------------------------------------------------------
    def _finalize_durations(self, last: bool) -> None:
        s = self.state
        known = s.unit_offset + len(s.units)
        radius = self.vocoder.duration_radius
        upto = known if last else known - radius
        if upto <= s.durations_final:
            return
        lo = max(s.unit_offset, s.durations_final - radius)
        window = torch.tensor(s.units[lo - s.unit_offset: min(known, upto + radius) - s.unit_offset], dtype=torch.long)
        durations = self.vocoder.durations(window).cpu().tolist()[s.durations_final - lo: upto - lo]
        new_units = s.units[s.durations_final - s.unit_offset: upto - s.unit_offset]
        end = s.final_frames
        for unit, d in zip(new_units, durations):
            s.frames.extend([unit] * int(d))
            end += int(d)
            s.unit_ends.append(end)
        s.durations_final = upto

    def _emit(self, final: bool) -> list[AudioChunk]:
        s = self.state
        out = []
        spf = self.vocoder.samples_per_frame
        while True:
            size = self.first_chunk_frames if s.chunks == 0 else self.chunk_frames
            end = s.emitted_frames + size
            if end + self.lookahead > s.final_frames:
                if not final or s.emitted_frames >= s.final_frames:
                    break
                end = s.final_frames
            w0 = max(s.frame_offset, s.emitted_frames - self.lookahead)
            w1 = min(s.final_frames, end + self.lookahead)
            frames = torch.tensor(s.frames[w0 - s.frame_offset: w1 - s.frame_offset], dtype=torch.long)
            audio = self.vocoder.synthesize_frames(frames, w0).float().cpu().numpy()
            cut0, cut1 = (s.emitted_frames - w0) * spf, (end - w0) * spf
            chunk = audio[cut0:cut1].copy()
            if s.tail is not None:
                n = min(len(s.tail), len(chunk))
                ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)
                chunk[:n] = s.tail[:n] * (1.0 - ramp) + chunk[:n] * ramp
            s.tail = audio[cut1: cut1 + self.crossfade].copy() if self.crossfade and end < s.final_frames else None
            s.emitted_frames = end
            s.chunks += 1
            out.append(AudioChunk(samples=chunk.astype(np.float32), units_done=self._units_done()))
            self._trim()
        return out

    def _units_done(self) -> int:
        s = self.state
        done = int(np.searchsorted(np.asarray(s.unit_ends), s.emitted_frames, side="right"))
        return s.unit_offset + done

    def _trim(self) -> None:
        """Drop frames and units no later window or duration can reach."""
        s = self.state
        keep_from = s.emitted_frames - self.lookahead
        if keep_from - s.frame_offset > 256:
            cut = keep_from - s.frame_offset
            del s.frames[:cut]
            s.frame_offset += cut
        done = self._units_done() - s.unit_offset
        radius = self.vocoder.duration_radius
        drop = min(done, s.durations_final - s.unit_offset - radius) - 1
        if drop > 256:
            del s.units[:drop]
            del s.unit_ends[:drop]
            s.unit_offset += drop


__all__ = [
    "EMBEDDED_VOCODER",
    "SAMPLES_PER_FRAME",
    "SAMPLE_RATE",
    "AudioChunk",
    "ChunkedSynthesis",
    "CodeHiFiGAN",
    "CodeHiFiGANConfig",
    "DurationPredictorConfig",
    "Envelope",
    "NanoVocoder",
    "NanoVocoderConfig",
    "SynthesisState",
    "UnitVocoder",
    "band_centers",
    "band_matrices",
    "fold_weight_norm",
    "load_code_hifigan",
    "load_vocoder",
    "synthesize_units",
]
