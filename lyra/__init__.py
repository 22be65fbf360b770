"""Lyra: a speech-centric omni-model (Qwen2-VL + Whisper speech tower) with a long-speech engine.

Public names are imported lazily so that `lyra --help` and the asset builder start fast.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "LyraConfig": "lyra.configuration",
    "ProjectorConfig": "lyra.configuration",
    "LoraAdapterConfig": "lyra.configuration",
    "LcmrConfig": "lyra.configuration",
    "ExtractorConfig": "lyra.configuration",
    "LyraForConditionalGeneration": "lyra.modeling",
    "LyraOutput": "lyra.modeling",
    "LyraCache": "lyra.modeling",
    "LyraProcessor": "lyra.processing",
    "build_config": "lyra.presets",
    "load_pretrained": "lyra.pretrained",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lyra' has no attribute {name!r}")
