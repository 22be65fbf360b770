"""Transcription of audio of any length: window by window, segments out as soon as each is ready.

Each window (at most 30 s, cut inside pauses when VAD runs) is asked for its transcript with the ASR
prompt. Guards from mature engines: windows without speech give no text; a decode whose text compresses
too well (a repetition loop) or whose tokens are too unlikely is retried at higher temperatures, and a
loop that survives every retry is dropped rather than printed.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import torch
from lyra.engine.events import AudioWindow, Segment

from lyra.constants import ASR_PROMPT, SAMPLE_RATE, SPEECH_PLACEHOLDER
from lyra.modeling import LyraForConditionalGeneration
from lyra.processing import LyraProcessor


@dataclass(frozen=True)
class TranscribeOptions:
    """Decoding settings of `Transcriber` (whisper's defaults where they apply)."""

    prompt: str = ASR_PROMPT  # instruction after the speech
    max_new_tokens: int = 224  # per window: 30 s of fast speech is about 100 words
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # fallback schedule
    compression_ratio_threshold: float = 2.4  # above: a repetition loop, retry hotter
    logprob_threshold: float = -1.0  # mean token log-probability below this: retry hotter
    seed: int = 0  # sampling seed of the fallback temperatures (runs are reproducible)


def compression_ratio(text: str) -> float:
    """len(text) / len(zlib(text)): about 1-2 for normal speech, high for repeated phrases."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


@dataclass(frozen=True)
class _Decode:
    text: str
    avg_logprob: float
    compression_ratio: float


class Transcriber:
    """Turns `AudioWindow`s into `Segment`s with one model call per window."""

    def __init__(self, model: LyraForConditionalGeneration, processor: LyraProcessor, options: TranscribeOptions = TranscribeOptions()):
        self.model = model
        self.processor = processor
        self.options = options
        self._prompt = processor.apply_chat_template(
            [{"role": "user", "content": f"{SPEECH_PLACEHOLDER}\n{options.prompt}"}], add_generation_prompt=True
        )
        eos = model.config.text_config.eos_token_id
        self._eos = set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}

    def window_segments(self, window: AudioWindow, first_id: int = 0) -> list[Segment]:
        """The transcript of one window: [] for silence or an unbreakable loop, else one segment."""
        if window.speech is False or len(window.samples) == 0:
            return []
        best = None
        for temperature in self.options.temperatures:
            best = self._decode(window, temperature)
            if self._acceptable(best):
                break
        if best is None or not best.text.strip() or best.compression_ratio > self.options.compression_ratio_threshold:
            return []
        return [Segment(id=first_id, start=window.start, end=window.end, text=best.text.strip(), window=window.index,
                        avg_logprob=best.avg_logprob, compression_ratio=best.compression_ratio)]

    def segments(self, windows: Iterable[AudioWindow], done: dict[int, list[Segment]] | None = None) -> Iterator[tuple[AudioWindow, list[Segment]]]:
        """(window, its segments) for every window, in order; windows in `done` are not decoded again."""
        done = done or {}
        next_id = 0
        for window in windows:
            if window.index in done:
                segments = done[window.index]
            else:
                segments = self.window_segments(window, next_id)
            segments = [replace(s, id=next_id + i) for i, s in enumerate(segments)]
            next_id += len(segments)
            yield window, segments

    def _acceptable(self, result: _Decode) -> bool:
        opts = self.options
        return result.compression_ratio <= opts.compression_ratio_threshold and result.avg_logprob >= opts.logprob_threshold

    @torch.inference_mode()
    def _decode(self, window: AudioWindow, temperature: float) -> _Decode:
        inputs = self.processor(self._prompt, audios=[(window.samples, SAMPLE_RATE)])
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        generator = torch.Generator(device=device).manual_seed(self.options.seed + window.index)
        tokens: list[int] = []
        logprob = 0.0
        for step in self.model.stream_generate(
            inputs, max_new_tokens=self.options.max_new_tokens, temperature=temperature, generator=generator
        ):
            token = int(step.tokens[0])
            if token in self._eos:
                break
            tokens.append(token)
            logprob += float(step.logprobs[0])
        text = self.processor.decode(tokens, skip_special_tokens=True)
        return _Decode(text=text, avg_logprob=logprob / max(len(tokens), 1), compression_ratio=compression_ratio(text))
