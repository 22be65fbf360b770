"""Shared fixtures: a tiny Lyra config that builds in well under a second, offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from lyra.presets import config_from_dict, read_preset


def tiny_config(attn: str = "eager", **overrides):
    """The nano preset shrunk further (LLM width 64, 3 layers) with the real Qwen2 vocabulary size."""
    data = read_preset("nano")
    text = data["backbone"]["text"]
    text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                        "mrope_section": [2, 3, 3]})
    data["backbone"]["vision"].update(depth=1, embed_dim=32, hidden_size=64, num_heads=2)
    data["speech"].update(d_model=48, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=96,
                          decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=96)
    data["projector"]["hidden_size"] = 64
    data["adapters"] = {"speech": {"r": 4, "alpha": 8, "dropout": 0.0},
                        "long_speech": {"r": 8, "alpha": 16, "dropout": 0.0}}
    config = config_from_dict(data, **overrides)
    config._attn_implementation = attn
    return config


def save_base_checkpoints(config, folder, seed: int = 0):
    """Random plain HF Qwen2-VL and Whisper checkpoints of `config`'s shapes in folder/qwen2vl, folder/whisper."""
    from transformers import Qwen2VLForConditionalGeneration, WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    qwen = Qwen2VLForConditionalGeneration(config.backbone_config).eval()
    qwen.save_pretrained(folder / "qwen2vl")
    whisper_config = WhisperConfig(**config.speech_config.to_dict())
    whisper_config._attn_implementation = "eager"
    whisper = WhisperForConditionalGeneration(whisper_config).eval()
    whisper.save_pretrained(folder / "whisper")
    return qwen, whisper


def randomize_lora(model, seed: int = 0):
    """Give every LoRA B matrix non-zero weights so adapters change outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def model_and_processor():
    """A tiny random model with the real Qwen2 tokenizer's processor."""
    from lyra import LyraForConditionalGeneration, LyraProcessor, assets

    torch.manual_seed(0)
    config = tiny_config()
    model = LyraForConditionalGeneration(config).eval()
    return model, LyraProcessor.for_model(config, assets.qwen2_tokenizer())


@pytest.fixture
def tiny_model():
    from lyra import LyraForConditionalGeneration

    torch.manual_seed(0)
    return LyraForConditionalGeneration(tiny_config()).eval()
