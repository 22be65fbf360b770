"""Streaming an answer as text deltas (shared by one-off questions and lecture sessions)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from lyra.modeling import LyraCache, LyraForConditionalGeneration
from lyra.processing import LyraProcessor


@torch.inference_mode()
def stream_text(
    model: LyraForConditionalGeneration,
    processor: LyraProcessor,
    inputs: Mapping[str, torch.Tensor],
    *,
    cache: LyraCache | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
) -> Iterator[str]:
    """Generate from processor `inputs` (continuing `cache` if given) and yield new text as it forms.

    Text is yielded only in whole characters (a multi-byte character split over tokens waits for its
    last token); generation stops at EOS, which is not shown.
    """
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    eos = model.config.text_config.eos_token_id
    eos = set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
    tokens: list[int] = []
    shown = ""
    for step in model.stream_generate(inputs, cache=cache, max_new_tokens=max_new_tokens, temperature=temperature):
        token = int(step.tokens[0])
        if token in eos:
            return
        tokens.append(token)
        decoded = processor.decode(tokens, skip_special_tokens=True)
        if len(decoded) > len(shown) and not decoded.endswith("\ufffd"):
            yield decoded[len(shown):]
            shown = decoded


def question_text(question: str = "", *, images: int = 0, audio: bool = False) -> str:
    """The user's turn: one `<image>` per image, `<speech>` for a spoken question, then the typed text."""
    parts = ["<image>"] * images + (["<speech>"] if audio else []) + ([question.strip()] if question.strip() else [])
    if not parts:
        raise ValueError("a question needs text, audio or an image: give --text, --audio or --image")
    return "\n".join(parts)
