"""Model-size presets: YAML files in `configs/` (installed as `lyra.configs`) -> `LyraConfig`.

    config = build_config("mini")                     # a named preset
    config = build_config("my.yaml", extractor={"gap": 2, "keep_rate": 0.5})
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml
from transformers import Qwen2VLConfig, WhisperConfig

from lyra.configuration import LyraConfig

PRESETS = ("nano", "mini", "base", "pro")
SETTINGS_KEYS = ("projector", "adapters", "lcmr", "extractor", "speech_generator", "image_positions")


def preset_path(name: str) -> Path:
    """The YAML file of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} or give a YAML path")
    return Path(str(resources.files("lyra.configs") / f"{name}.yaml"))


def read_preset(name_or_path: str | Path) -> dict:
    """The raw YAML mapping of a preset name or a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = preset_path(str(name_or_path))
    if not path.exists():
        raise FileNotFoundError(f"model config {path} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or "backbone" not in data or "speech" not in data:
        raise ValueError(f"{path}: a model config needs 'backbone' and 'speech' sections")
    return data


def config_from_dict(data: dict, **overrides) -> LyraConfig:
    """Build a `LyraConfig` from a preset mapping; `overrides` replace any of SETTINGS_KEYS."""
    backbone = data["backbone"]
    text = dict(backbone["text"])
    backbone_config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(backbone["vision"]),
        tie_word_embeddings=backbone.get("tie_word_embeddings", text.get("tie_word_embeddings", False)),
    )
    speech_config = WhisperConfig(**data["speech"])
    settings = {k: data[k] for k in SETTINGS_KEYS if k in data}
    settings.update(overrides)
    return LyraConfig(backbone_config=backbone_config, speech_config=speech_config, **settings)


def build_config(name_or_path: str | Path = "nano", **overrides) -> LyraConfig:
    """`LyraConfig` of a named preset (nano, mini, base, pro) or a YAML file."""
    return config_from_dict(read_preset(name_or_path), **overrides)
