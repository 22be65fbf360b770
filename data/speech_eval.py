"""ASR word error rate of spoken answers: transcribe synthesized audio with the real Whisper tiny.en.

    transcriber = WhisperTranscriber()                     # lyra.assets.whisper_tiny_en(), offline
    result = spoken_wer(samples, "the expected text", transcriber=transcriber)
    result.wer, result.transcript

Text on both sides is normalised the same way before the word-level edit distance, with Whisper's own English
normaliser (`EnglishTextNormalizer`, as spoken-answer evaluations of speech LLMs do): lower case, punctuation
dropped, contractions and titles spelled out, and numbers written as digits, since Whisper writes "24%" where the
answer says "twenty four percent" and both mean the same words. WER = (substitutions + deletions + insertions) /
reference words.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lyra.constants import SAMPLE_RATE


@functools.cache
def _english_normalizer():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})  # no British -> American spelling map: the tiny.en asset ships none


def normalize_text(text: str) -> list[str]:
    """Whisper's English normalisation, as words ("Don't stop-now!" -> ["do", "not", "stop", "now"];
    "twenty four percent" -> ["24%"])."""
    return _english_normalizer()(text).split()


def word_errors(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Word-level Levenshtein distance."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        current = [i] + [0] * len(hypothesis)
        for j, hyp in enumerate(hypothesis, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp))
        previous = current
    return previous[-1]


def error_counts(references: Sequence[str], hypotheses: Sequence[str]) -> tuple[int, int]:
    """(word errors, reference words) over a corpus, both sides normalised."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    errors = words = 0
    for ref, hyp in zip(references, hypotheses):
        r, h = normalize_text(ref), normalize_text(hyp)
        errors += word_errors(r, h)
        words += len(r)
    return errors, words


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER: total word errors over total reference words."""
    errors, words = error_counts(references, hypotheses)
    return errors / max(words, 1)


class WhisperTranscriber:
    """English transcription with HF Whisper (default: the offline tiny.en asset), greedy first.

    As whisper itself does, a decode that loops (zlib compression ratio over 2.4) is retried at rising
    temperatures (seeded), and the answer length is capped by the audio length (6 tokens per second + 10), so one
    hallucinated loop cannot dominate a corpus WER.
    """

    TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    COMPRESSION_RATIO_THRESHOLD = 2.4

    def __init__(self, whisper_dir: str | Path | None = None, *, max_new_tokens: int = 224):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        from lyra import assets

        folder = Path(whisper_dir) if whisper_dir is not None else assets.whisper_tiny_en()
        self.processor = WhisperProcessor.from_pretrained(folder)
        self.model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        self.max_new_tokens = max_new_tokens

    @torch.inference_mode()
    def __call__(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> str:
        """Transcript of at most 30 s of mono audio."""
        samples = np.asarray(samples, dtype=np.float32)
        if sample_rate != SAMPLE_RATE:
            import soxr

            samples = soxr.resample(samples, sample_rate, SAMPLE_RATE).astype(np.float32)
        if len(samples) > 30 * SAMPLE_RATE:
            raise ValueError("WhisperTranscriber takes at most 30 s at a time; split longer audio")
        features = self.processor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        limit = min(self.max_new_tokens, 10 + int(6 * len(samples) / SAMPLE_RATE))
        text = ""
        for temperature in self.TEMPERATURES:
            kwargs = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            torch.manual_seed(0)
            ids = self.model.generate(features, max_new_tokens=limit, **kwargs)
            text = self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
            if _compression_ratio(text) <= self.COMPRESSION_RATIO_THRESHOLD:
                break
        return text


def _compression_ratio(text: str) -> float:
    import zlib

    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


@dataclass(frozen=True)
class SpokenWer:
    """How well a spoken answer can be understood."""

    wer: float  # word error rate of the transcript against the text
    transcript: str  # what Whisper heard
    reference: str  # the text the audio should say


def spoken_wer(samples: np.ndarray, text: str, *, sample_rate: int = SAMPLE_RATE,
               transcriber: WhisperTranscriber | None = None) -> SpokenWer:
    """Transcribe synthesized speech with Whisper tiny.en and score it against the text it should say.

    Audio longer than 30 s is transcribed in 30 s pieces.
    """
    transcriber = transcriber or WhisperTranscriber()
    samples = np.asarray(samples, dtype=np.float32)
    step = 30 * sample_rate
    pieces = [samples[i:i + step] for i in range(0, max(len(samples), 1), step)]
    transcript = " ".join(transcriber(p, sample_rate) for p in pieces if len(p)).strip()
    return SpokenWer(wer=word_error_rate([text], [transcript]), transcript=transcript, reference=text)


__all__ = ["SpokenWer", "WhisperTranscriber", "error_counts", "normalize_text", "spoken_wer", "word_error_rate", "word_errors"]
