"""Lyra: a speech-centric omni-model (Qwen2-VL + Whisper speech tower) with a long-speech engine."""

from lyra.configuration import (
    ExtractorConfig,
    LcmrConfig,
    LoraAdapterConfig,
    LyraConfig,
    ProjectorConfig,
)
from lyra.modeling import LyraCache, LyraForConditionalGeneration, LyraOutput
from lyra.presets import build_config

__version__ = "0.1.0"

__all__ = [
    "ExtractorConfig",
    "LcmrConfig",
    "LoraAdapterConfig",
    "LyraCache",
    "LyraConfig",
    "LyraForConditionalGeneration",
    "LyraOutput",
    "LyraProcessor",
    "ProjectorConfig",
    "build_config",
]


def __getattr__(name):
    # The processor pulls in audio/image I/O; import it only when asked for.
    if name == "LyraProcessor":
        from lyra.processing import LyraProcessor

        return LyraProcessor
    raise AttributeError(f"module 'lyra' has no attribute {name!r}")
