"""Speech synthesis for the data recipes: speed (times real time) and how well Whisper tiny.en understands it.

Held-out corpus sentences are spoken by espeak-ng (175 wpm, en-us) and by Piper (joe, length scale 1.0,
0.8 and 1.3, with 1 and with all onnxruntime threads). Speed is audio seconds per wall second of
synthesis (a Piper voice is loaded once, outside the timing). Intelligibility: Whisper tiny.en (the real
weights from the `assets` extra, greedy, no prompt) transcribes each clip; WER with `lyra.data.metrics`.

    python bench/bench_synth.py                 # 40 sentences, writes its section of docs/benchmarks.md
    python bench/bench_synth.py --sentences 10 --no-docs
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from _common import write_docs  # bench/ is the script's folder, first on sys.path

from lyra.constants import SAMPLE_RATE

SECTION_START = "<!-- bench:synth -->"
SECTION_END = "<!-- /bench:synth -->"


def transcriber():
    """Whisper tiny.en, greedy: 16 kHz float32 -> text."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from lyra import assets

    folder = assets.whisper_tiny_en()
    processor = WhisperProcessor.from_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()

    def run(wave: np.ndarray) -> str:
        features = processor(wave, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        with torch.inference_mode():
            ids = model.generate(features)
        return processor.batch_decode(ids, skip_special_tokens=True)[0].strip()

    return run


def measure(name, speak, texts, transcribe):
    waves, seconds = [], 0.0
    for text in texts:
        start = time.perf_counter()
        waves.append(speak(text))
        seconds += time.perf_counter() - start
    audio = sum(len(w) for w in waves) / SAMPLE_RATE
    from lyra.data.metrics import wer

    hypotheses = [transcribe(w) for w in waves] if transcribe else None
    errors = wer(texts, hypotheses) if hypotheses else None
    row = {"name": name, "audio_s": audio, "synth_s": seconds, "xrt": audio / seconds,
           "wer": errors.wer if errors else None, "example": hypotheses[0] if hypotheses else ""}
    print(f"{name:34s} {audio:7.1f} s audio in {seconds:6.2f} s = {row['xrt']:6.1f}x real time"
          + (f", Whisper tiny.en WER {100 * row['wer']:.1f}%" if errors else ""), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sentences", type=int, default=40, help="held-out sentences per condition")
    p.add_argument("--no-whisper", action="store_true", help="skip the intelligibility check")
    p.add_argument("--docs", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)

    from lyra.data.corpus import SentenceGenerator
    from lyra.data.synth_speech import ESPEAK_TEST_VOICE, EspeakSynthesizer, PiperSynthesizer, Voice

    texts = [s.text for s in SentenceGenerator(123).generate(args.sentences, "test")]
    transcribe = None if args.no_whisper else transcriber()
    espeak = EspeakSynthesizer()
    rows = [measure("espeak-ng en-us 175 wpm", lambda t: espeak(t, ESPEAK_TEST_VOICE), texts, transcribe)]
    cores = os.cpu_count() or 1
    for threads in sorted({1, cores}):
        piper = PiperSynthesizer(seed=0, threads=threads)
        for scale in (1.0, 0.8, 1.3):
            if threads != 1 and scale != 1.0:
                continue  # speed only: the audio does not depend on the thread count
            rows.append(measure(f"Piper joe, length scale {scale}, {threads} thread{'s' * (threads > 1)}",
                                lambda t, s=scale, p=piper: p(t, Voice("piper", s)), texts,
                                transcribe if threads == 1 else None))
    if not args.no_docs:
        load = os.getloadavg()[0]
        lines = [
            "## Speech synthesis for the data recipes (`bench/bench_synth.py`)",
            "",
            f"{len(texts)} held-out corpus sentences per condition; {platform.processor() or platform.machine()}, "
            f"{cores} cores, load average {load:.1f} at the end (other jobs were running), {dt.date.today()}. "
            "Speed = audio seconds per second of synthesis (voice already loaded; loading Piper takes 2-6 s). "
            "WER: Whisper tiny.en (greedy) transcribing the synthetic speech, normalised as `lyra.data.metrics`.",
            "",
            "| voice | audio (s) | x real time | Whisper tiny.en WER |",
            "| --- | ---: | ---: | ---: |",
        ]
        for r in rows:
            w = f"{100 * r['wer']:.1f}%" if r["wer"] is not None else "-"
            lines.append(f"| {r['name']} | {r['audio_s']:.1f} | {r['xrt']:.1f} | {w} |")
        arguments = " ".join(argv if argv is not None else sys.argv[1:])
        lines += ["", f"Command: `python bench/bench_synth.py {arguments}`".replace(" `", "`")]
        write_docs("\n".join(lines) + "\n", args.docs, SECTION_START, SECTION_END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
