"""`lyra demo`: one spoken question about a drawn image, answered with streamed text."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from PIL import Image

from lyra.audio import AudioArray
from lyra.constants import IMAGE_PLACEHOLDER, SAMPLE_RATE, SPEECH_PLACEHOLDER

# A question kind the nano model answers from speech (15/15 held out, docs/nano.md); it does not yet answer the
# colour of a named shape ("What color is the circle?"), whose lookup by shape it has not learned.
QUESTION = "What color is the word?"
EXPECTED = "green"
SCENE = "the word lamp in green, a red circle and a blue square"


@dataclass
class DemoReport:
    """What the demo ran and measured."""

    source: str  # which model answered
    trained: bool  # False: random LLM weights, the answer is noise
    question_audio: str  # "espeak-ng" or "tone" (when espeak-ng is not installed)
    adapter: str | None  # LoRA adapter the router picked
    image_tokens: int
    speech_tokens: int
    answer: str
    load_s: float
    prefill_s: float  # time to the first answer token (includes image and speech encoding)
    tokens_per_s: float  # decoding speed after the first token


def demo_image() -> Image.Image:
    """The `SCENE`, drawn like the nano model's training images (224 x 224)."""
    from lyra.data.synth_images import DrawnItem, draw

    return draw([DrawnItem("word", "green", 112, 70, 36, "lamp"), DrawnItem("circle", "red", 60, 160, 28),
                 DrawnItem("square", "blue", 165, 160, 26)])


def spoken_question(text: str = QUESTION) -> tuple[AudioArray, str]:
    """The question spoken by espeak-ng, or a 2 s tone when espeak-ng is missing."""
    if shutil.which("espeak-ng"):
        import soundfile as sf

        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "question.wav"
            subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
            samples, rate = sf.read(wav, dtype="float32")
        return AudioArray(samples, rate), "espeak-ng"
    t = np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE
    return AudioArray((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), SAMPLE_RATE), "tone"


def run_demo(model: str | None = None, *, max_new_tokens: int = 24, out: TextIO | None = None,
             err: TextIO | None = None) -> DemoReport:
    """Load `model` (default: the embedded checkpoint), ask the spoken question about the image, stream the answer."""
    out, err = out or sys.stdout, err or sys.stderr
    from lyra.pretrained import load_pretrained

    t0 = time.perf_counter()
    print("loading model ...", file=err, flush=True)
    loaded = load_pretrained(model)
    load_s = time.perf_counter() - t0
    print(f"model: {loaded.source} ({load_s:.1f} s)", file=err)
    if not loaded.trained:
        print("the LLM weights are random, so the answer is noise (the trained nano checkpoint is not in this "
              "install; docs/nano.md); pass --model DIR for a trained model", file=err)
    audio, audio_kind = spoken_question()
    processor = loaded.processor
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{SPEECH_PLACEHOLDER}"}], add_generation_prompt=True
    )
    inputs = processor(prompt, images=[demo_image()], audios=[audio])
    ids = inputs["input_ids"]
    image_tokens = int((ids == processor.image_token_id).sum())
    speech_tokens = int((ids == processor.speech_token_id).sum())
    print(f"question: {QUESTION!r} spoken by {audio_kind} about {SCENE}; "
          f"{image_tokens} image tokens, {speech_tokens} speech tokens", file=err)

    tokens: list[int] = []
    shown = ""
    t1 = time.perf_counter()
    first = None
    adapter = None
    steps = 0  # decoding steps, the end-of-answer token's included
    out.write("answer: ")
    with torch.inference_mode():
        for step in loaded.model.stream_generate(dict(inputs), max_new_tokens=max_new_tokens):
            steps += 1
            if first is None:
                first = time.perf_counter()
                adapter = step.cache.adapter
            if bool(step.finished[0]) and int(step.tokens[0]) in _eos_ids(loaded):
                break
            tokens.append(int(step.tokens[0]))
            text = processor.decode(tokens, skip_special_tokens=True)
            out.write(text[len(shown):])
            out.flush()
            shown = text
    out.write("\n")
    end = time.perf_counter()
    decode_s = max(end - (first or end), 1e-9)
    report = DemoReport(
        source=loaded.source, trained=loaded.trained, question_audio=audio_kind, adapter=adapter,
        image_tokens=image_tokens, speech_tokens=speech_tokens, answer=shown,
        load_s=load_s, prefill_s=(first or end) - t1, tokens_per_s=max(steps - 1, 0) / decode_s,
    )
    print(f"adapter: {adapter}; first token after {report.prefill_s:.2f} s; "
          f"{report.tokens_per_s:.1f} tokens/s", file=err)
    return report


def _eos_ids(loaded) -> set[int]:
    eos = loaded.model.config.text_config.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
