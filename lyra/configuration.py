"""Lyra configuration: the Qwen2-VL backbone, the Whisper speech encoder and Lyra's own parts.

`LyraConfig` is a transformers `PreTrainedConfig` so `save_pretrained`/`from_pretrained` work; the
settings of Lyra's own components are frozen dataclasses (one comment per field, with units) that the
config stores as plain dicts in `config.json` and hands back typed through properties.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig, Qwen2VLConfig, WhisperConfig
from transformers.configuration_utils import SubConfigSpec

from lyra.constants import ENCODER_FRAMES_PER_WINDOW

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPEECH_ADAPTER = "speech"  # LoRA used when every speech clip fits in one 30 s window
LONG_SPEECH_ADAPTER = "long_speech"  # LoRA used when a clip spans several windows


@dataclass(frozen=True)
class ProjectorConfig:
    """Speech projector: stack k encoder frames, then a two-layer MLP to the LLM width."""

    k: int = 5  # encoder frames (20 ms each) stacked into one speech token: 5 -> 10 tokens/s
    hidden_size: int = 2048  # width of the projector's inner layer
    trim_speech_padding: bool = False  # keep only tokens covering real audio (True) or all 300 per window

    @property
    def tokens_per_window(self) -> int:
        """Speech tokens one padded 30 s window yields (300 for k=5)."""
        return ENCODER_FRAMES_PER_WINDOW // self.k


@dataclass(frozen=True)
class LoraAdapterConfig:
    """One PEFT LoRA adapter on the LLM's attention and MLP projections."""

    r: int = 64  # rank of the low-rank update
    alpha: int = 16  # LoRA alpha; the update is scaled by alpha / r
    dropout: float = 0.05  # dropout on the adapter input during training
    targets: tuple[str, ...] = LORA_TARGETS  # module names (inside each decoder layer) that get LoRA


@dataclass(frozen=True)
class LcmrConfig:
    """Latent cross-modality regularizer: soft-DTW between speech tokens and transcript embeddings."""

    tau: float = 0.06  # temperature of the speech-token/text-embedding dot products
    gamma: float = 0.1  # soft-DTW smoothing
    weight: float = 0.5  # lambda in loss = CE + lambda * LCMR (0 turns LCMR off)


@dataclass(frozen=True)
class ExtractorConfig:
    """Latent multi-modality extractor: query-aware dropping of image/video/speech tokens at prefill."""

    gap: int = 0  # prune after every layer i with (i + 1) % gap == 0 (never the last); 0 disables
    keep_rate: float = 1.0  # fraction of the multimodal tokens kept at each pruning layer
    min_keep: int = 32  # never keep fewer multimodal tokens than this

    @property
    def enabled(self) -> bool:
        return self.gap > 0


@dataclass(frozen=True)
class ImagePositionConfig:
    """Where each image token sits, added to its features: sines and cosines of its cell's centre (as a fraction
    of the image's height and width) through a linear layer that starts at zero (lyra/vision.py).

    Qwen2-VL places image tokens only through M-RoPE, inside the attention scores; a small LLM does not read that
    back as content ("where is the red circle?"), so tiny models get it here. Off for Qwen2-VL's own checkpoints.
    """

    enabled: bool = False  # add the position features to every image token
    frequencies: int = 8  # sine/cosine pairs per axis, at pi, 2 pi, ..., frequencies * pi

    @property
    def features(self) -> int:
        """Width of the features before the linear layer (sine and cosine, two axes)."""
        return 4 * self.frequencies


@dataclass(frozen=True)
class GeneratorConfig:
    """CTC speech generator: the LLM's answer-token states -> discrete speech units for a unit vocoder.

    Units come at 50 per second of speech (20 ms frames) before CTC collapses repeats; the vocoder that
    turns them into audio must use the same inventory (`num_units`).
    """

    enabled: bool = False  # build the generator; a model without one answers in text only
    upsample: int = 25  # generator frames per answer token (each LLM state is repeated this many times)
    num_layers: int = 2  # causal Qwen2 decoder layers
    hidden_size: int = 4096  # width of those layers
    num_heads: int = 32  # attention heads (and as many key/value heads, as in the reference)
    intermediate_size: int = 11008  # MLP width of those layers
    num_units: int = 1000  # unit inventory (k-means clusters); the CTC blank is id num_units
    loss_weight: float = 1.0  # loss += loss_weight * CTC loss when unit targets are given
    # Add a learned embedding of each frame's place within its token (0 .. upsample-1, starting at zero). Without
    # it the `upsample` frames of the first answer token are equal inputs to causal layers, so they predict one
    # thing and a one-word answer is not spoken. The reference has none (its weights load with False).
    frame_positions: bool = False

    @property
    def blank(self) -> int:
        """Id of the CTC blank (one past the last unit)."""
        return self.num_units


def _default_adapters() -> dict[str, LoraAdapterConfig]:
    return {
        SPEECH_ADAPTER: LoraAdapterConfig(r=64, alpha=16),
        LONG_SPEECH_ADAPTER: LoraAdapterConfig(r=128, alpha=256),
    }


@dataclass(frozen=True)
class LyraSettings:
    """Lyra's own components, gathered; `LyraConfig` serialises it as plain dicts."""

    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    adapters: dict[str, LoraAdapterConfig] = field(default_factory=_default_adapters)
    lcmr: LcmrConfig = field(default_factory=LcmrConfig)
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    speech_generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    image_positions: ImagePositionConfig = field(default_factory=ImagePositionConfig)


def _as_dict(obj) -> dict:
    out = dataclasses.asdict(obj)
    for value in out.values():
        if isinstance(value, dict) and "targets" in value:
            value["targets"] = list(value["targets"])
    return out


def _adapter_from_dict(d: dict) -> LoraAdapterConfig:
    d = dict(d)
    if "targets" in d:
        d["targets"] = tuple(d["targets"])
    return LoraAdapterConfig(**d)


@strict
class LyraConfig(PreTrainedConfig):
    """Configuration of `LyraForConditionalGeneration`.

    Args:
        backbone_config: the Qwen2-VL config (vision tower + LLM), dict or `Qwen2VLConfig`.
        speech_config: the Whisper config whose encoder is the speech tower, dict or `WhisperConfig`.
        projector, adapters, lcmr, extractor, speech_generator, image_positions: dicts (or the dataclasses above)
            for Lyra's own parts (not named "generator": transformers takes a config attribute of that name for a
            text config).
        speech_token_id: id of `<|speech_pad|>`, the placeholder projected speech replaces.
    """

    model_type = "lyra"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=Qwen2VLConfig),
        "speech_config": SubConfigSpec(config_class=WhisperConfig),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    speech_config: dict | PreTrainedConfig | None = None
    projector: dict | None = None
    adapters: dict | None = None
    lcmr: dict | None = None
    extractor: dict | None = None
    speech_generator: dict | None = None
    image_positions: dict | None = None
    speech_token_id: int = 151657
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        defaults = LyraSettings()
        self.projector = _as_dict(_coerce(self.projector, ProjectorConfig, defaults.projector))
        adapters = defaults.adapters if self.adapters is None else self.adapters
        self.adapters = {
            name: _as_dict(a if isinstance(a, LoraAdapterConfig) else _adapter_from_dict(a))
            for name, a in adapters.items()
        }
        self.lcmr = _as_dict(_coerce(self.lcmr, LcmrConfig, defaults.lcmr))
        self.extractor = _as_dict(_coerce(self.extractor, ExtractorConfig, defaults.extractor))
        self.speech_generator = _as_dict(_coerce(self.speech_generator, GeneratorConfig, defaults.speech_generator))
        self.image_positions = _as_dict(_coerce(self.image_positions, ImagePositionConfig, defaults.image_positions))
        super().__post_init__(**kwargs)
        self.tie_word_embeddings = bool(self.backbone_config.tie_word_embeddings)

    @property
    def settings(self) -> LyraSettings:
        """Lyra's own settings as frozen dataclasses."""
        return LyraSettings(
            projector=ProjectorConfig(**self.projector),
            adapters={name: _adapter_from_dict(d) for name, d in self.adapters.items()},
            lcmr=LcmrConfig(**self.lcmr),
            extractor=ExtractorConfig(**self.extractor),
            speech_generator=GeneratorConfig(**self.speech_generator),
            image_positions=ImagePositionConfig(**self.image_positions),
        )

    @property
    def text_config(self):
        """The LLM's config (Qwen2-VL text config)."""
        return self.backbone_config.text_config

    def with_settings(self, **changes) -> LyraConfig:
        """A copy with some of Lyra's settings replaced, e.g. `extractor=ExtractorConfig(gap=2, keep_rate=0.5)`."""
        d = self.to_dict()
        for key, value in changes.items():
            if key == "adapters":
                d[key] = {n: _as_dict(a) if dataclasses.is_dataclass(a) else a for n, a in value.items()}
            else:
                d[key] = _as_dict(value) if dataclasses.is_dataclass(value) else value
        new = LyraConfig.from_dict(d)
        new._attn_implementation = self._attn_implementation
        return new


def _coerce(value, cls, default):
    if value is None:
        return default
    if isinstance(value, cls):
        return value
    return cls(**value)


# Known to the Auto classes, so loading a tokenizer or processor from a Lyra model folder (whose config.json
# says "lyra") does not make transformers warn about an unknown model type.
AutoConfig.register(LyraConfig.model_type, LyraConfig, exist_ok=True)

__all__ = [
    "LONG_SPEECH_ADAPTER",
    "LORA_TARGETS",
    "SPEECH_ADAPTER",
    "ExtractorConfig",
    "GeneratorConfig",
    "ImagePositionConfig",
    "LcmrConfig",
    "LoraAdapterConfig",
    "LyraConfig",
    "LyraSettings",
    "ProjectorConfig",
]
