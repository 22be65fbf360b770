"""Shared by the speech-generation tests: tiny speaking models and random vocoders.

Import what you use into the test module (`from speaking import ...`).
"""

from __future__ import annotations

import torch
from conftest import tiny_config
from torch import nn

from lyra import LyraForConditionalGeneration, LyraProcessor, assets
from lyra.vocoder import CodeHiFiGAN, CodeHiFiGANConfig, NanoVocoder, NanoVocoderConfig


def liven(generator: nn.Module, seed: int = 0, std: float = 0.3) -> nn.Module:
    """Random generator weights large enough that the 25 frames of one state disagree (many units per token).

    A freshly initialised head (std 0.02) predicts the same unit for every frame of a token.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in generator.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
    return generator


def speaking_model(seed: int = 0, **overrides) -> LyraForConditionalGeneration:
    """The tiny test model with a lively speech generator (the nano generator's sizes and units)."""
    torch.manual_seed(seed)
    model = LyraForConditionalGeneration(tiny_config(**overrides)).eval()
    liven(model.speech_generator, seed)
    return model


def processor_for(model: LyraForConditionalGeneration) -> LyraProcessor:
    return LyraProcessor.for_model(model.config, assets.qwen2_tokenizer())


def nano_vocoder(num_units: int | None = None, seed: int = 0, **config) -> NanoVocoder:
    """A randomly initialised nano vocoder (default PyTorch init; output is shaped noise, but deterministic);
    `config` overrides other `NanoVocoderConfig` fields."""
    torch.manual_seed(seed)
    units = num_units or tiny_config().settings.speech_generator.num_units
    return NanoVocoder(NanoVocoderConfig(num_units=units, **config)).eval()


def hifigan_config(num_units: int = 20, dur: bool = True) -> dict:
    """A small config in the published code HiFi-GAN JSON layout (training keys included, as released)."""
    config = {
        "resblock": "1", "num_gpus": 0, "batch_size": 16, "learning_rate": 0.0002, "adam_b1": 0.8, "adam_b2": 0.99,
        "lr_decay": 0.999, "seed": 1234,
        "upsample_rates": [5, 4, 4, 2, 2], "upsample_kernel_sizes": [11, 8, 8, 4, 4],
        "upsample_initial_channel": 32, "resblock_kernel_sizes": [3, 7, 11],
        "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        "num_embeddings": num_units, "embedding_dim": 16, "model_in_dim": 16,
        "segment_size": 8960, "code_hop_size": 320, "f0": False, "num_mels": 80, "num_freq": 1025, "n_fft": 1024,
        "hop_size": 256, "win_size": 1024, "sampling_rate": 16000, "fmin": 0, "fmax": 8000, "fmax_for_loss": None,
        "num_workers": 4, "dist_config": {"dist_backend": "nccl", "dist_url": "env://"},
    }
    if dur:
        config["dur_prediction_weight"] = 1.0
        config["dur_predictor_params"] = {"encoder_embed_dim": 16, "var_pred_hidden_dim": 16,
                                          "var_pred_kernel_size": 3, "var_pred_dropout": 0.5}
    return config


def random_hifigan(num_units: int = 20, seed: int = 0, dur: bool = True) -> CodeHiFiGAN:
    torch.manual_seed(seed)
    return CodeHiFiGAN(CodeHiFiGANConfig.from_dict(hifigan_config(num_units, dur))).eval()
