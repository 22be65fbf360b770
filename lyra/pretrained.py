"""Loading a ready-to-run model + processor: a saved Lyra folder, a hub id, or the embedded default."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from lyra.configuration import LyraConfig
from lyra.modeling import LyraForConditionalGeneration, read_whisper_encoder_state
from lyra.processing import LyraProcessor

logger = logging.getLogger(__name__)

EMBEDDED_CHECKPOINT = Path(__file__).parent / "checkpoints" / "nano"  # shipped in the repository when trained
DEFAULT_PRESET = "nano"


@dataclass
class LoadedModel:
    """A model with its processor, and where they came from."""

    model: LyraForConditionalGeneration
    processor: LyraProcessor
    source: str  # folder, hub id, or "untrained nano preset"
    trained: bool  # False for the preset built from scratch (random LLM weights)


def load_pretrained(
    model: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a Lyra model and its processor.

    Args:
        model: a folder written by `save_pretrained` (model + processor files), a hub id (only where a hub is
            reachable), or None for the embedded default checkpoint.
        device, dtype: where and in which precision to run (default fp32 on CPU; bf16 is usual on CUDA).
        attn_implementation: "eager", "sdpa" (default) or "flash_attention_2" when flash-attn is installed.
    """
    if model is None:
        if (EMBEDDED_CHECKPOINT / "config.json").exists():
            return _load_folder(EMBEDDED_CHECKPOINT, device, dtype, attn_implementation)
        return _untrained_preset(device, dtype, attn_implementation)
    path = Path(model)
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not a Lyra model folder (see `lyra convert` to import one)")
        return _load_folder(path, device, dtype, attn_implementation)
    return _load_hub(str(model), device, dtype, attn_implementation)


def _load_folder(path: Path, device, dtype, attn) -> LoadedModel:
    kwargs = {"dtype": dtype or torch.float32}
    if attn:
        kwargs["attn_implementation"] = attn
    model = LyraForConditionalGeneration.from_pretrained(path, **kwargs).to(device).eval()
    processor = LyraProcessor.from_pretrained(path)
    return LoadedModel(model=model, processor=processor, source=str(path), trained=True)


def _load_hub(repo_id: str, device, dtype, attn) -> LoadedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id)
    except (LocalEntryNotFoundError, HFValidationError, OSError) as err:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local folder nor a reachable hub model ({type(err).__name__}). "
            "Give a folder written by save_pretrained or `lyra convert`, or run where the hub is reachable."
        ) from err
    return _load_folder(Path(folder), device, dtype, attn)


def _untrained_preset(device, dtype, attn) -> LoadedModel:
    """The nano preset with the real Whisper tiny.en encoder and Qwen2 tokenizer, LLM weights random."""
    from lyra import assets
    from lyra.presets import build_config

    whisper = assets.whisper_tiny_en()
    config: LyraConfig = build_config(DEFAULT_PRESET)
    if attn:
        config._attn_implementation = attn
    logger.warning(
        "no trained embedded checkpoint is installed: running the %s preset with random LLM weights "
        "(real Whisper tiny.en encoder and Qwen2 tokenizer), so its answers are noise; pass --model DIR "
        "(a saved or `lyra convert`-ed model) for real answers", DEFAULT_PRESET
    )
    torch.manual_seed(0)
    model = LyraForConditionalGeneration(config)
    model.speech_encoder.load_state_dict(read_whisper_encoder_state(whisper))
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    processor = LyraProcessor.for_model(config, assets.qwen2_tokenizer())
    return LoadedModel(model=model, processor=processor, source=f"untrained {DEFAULT_PRESET} preset", trained=False)
