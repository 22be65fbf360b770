"""A handful of real training samples (espeak-ng speech, drawn images) in the data builder's manifest layout."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from lyra.data.corpus import SentenceGenerator
from lyra.data.manifest import write_manifest
from lyra.data.synth_images import make_image_qa
from lyra.data.synth_speech import EspeakSynthesizer, Voice, write_audio

from lyra.constants import ASR_PROMPT, SAMPLE_RATE


def build_smoke_data(root: Path, *, n_asr: int = 4, n_images: int = 4, n_speechgen: int = 4, num_units: int = 32,
                     seed: int = 0) -> Path:
    """Write asr/, image_qa/, lectures/ and speech_gen/ train manifests with their media under `root`."""
    speak = EspeakSynthesizer()
    voice = Voice("espeak", 220)
    rng = random.Random(seed)
    sentences = [s.text for s in SentenceGenerator(seed).generate(n_asr + 8, "train")]

    asr = []
    for i, text in enumerate(sentences[:n_asr]):
        rel = f"audio/asr-{i}.flac"
        write_audio(root / "asr" / rel, speak(text, voice))
        asr.append({"id": f"asr-{i}", "speech": rel, "speech_asr": text,
                    "conversations": [{"from": "human", "value": f"<speech>\n{ASR_PROMPT}"},
                                      {"from": "gpt", "value": text}]})
    write_manifest(root / "asr" / "train.jsonl", asr)

    spoken, typed = [], []
    for i in range(n_images):
        qa = make_image_qa(random.Random(rng.getrandbits(32)))
        image = f"images/img-{i}.png"
        (root / "image_qa" / image).parent.mkdir(parents=True, exist_ok=True)
        qa.image.save(root / "image_qa" / image)
        audio = f"audio/img-{i}.flac"
        write_audio(root / "image_qa" / audio, speak(qa.question, voice))
        spoken.append({"id": f"img-{i}", "image": image, "speech": audio, "speech_asr": qa.question,
                       "conversations": [{"from": "human", "value": "<image>\n<speech>"},
                                         {"from": "gpt", "value": qa.answer}], "kind": qa.kind})
        typed.append({"id": f"img-{i}-typed", "image": image,
                      "conversations": [{"from": "human", "value": f"<image>\n{qa.question}"},
                                        {"from": "gpt", "value": qa.answer}], "kind": qa.kind})
    write_manifest(root / "image_qa" / "train.jsonl", spoken)
    write_manifest(root / "image_qa" / "train_typed.jsonl", typed)

    # One recording longer than a 30 s window: sentences with pauses, the last one the "needle".
    pieces, silence = [], np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    fact = "The secret number of Alice Morgan is seven three nine."
    for text in sentences[n_asr:] + [fact]:
        pieces += [speak(text, Voice("espeak", 130)), silence]
    wave = np.concatenate(pieces)
    if len(wave) < 32 * SAMPLE_RATE:
        wave = np.concatenate([np.zeros(32 * SAMPLE_RATE - len(wave), dtype=np.float32), wave])
    write_audio(root / "lectures" / "audio" / "lecture-0.flac", wave)
    write_manifest(root / "lectures" / "train.jsonl", [{
        "id": "lecture-0", "long_speech": "audio/lecture-0.flac",
        "conversations": [{"from": "human", "value": "<speech>\nWhat is the secret number of Alice Morgan?"},
                          {"from": "gpt", "value": "seven three nine"}]}])

    gen = []
    for i in range(n_speechgen):
        text = sentences[i]
        units = [rng.randrange(num_units) for _ in range(6 + 2 * i)]
        if i % 2 == 0:
            gen.append({"id": f"gen-{i}", "tgt_units": units,
                        "conversations": [{"from": "human", "value": f"Say this sentence: {text}"},
                                          {"from": "gpt", "value": text}]})
        else:
            gen.append({"id": f"gen-{i}", "image": f"../image_qa/images/img-{i}.png",
                        "speech": f"../image_qa/audio/img-{i}.flac", "tgt_units": units,
                        "conversations": [{"from": "human", "value": "<image>\n<speech>"},
                                          {"from": "gpt", "value": spoken[i]["conversations"][1]["value"]}]})
    write_manifest(root / "speech_gen" / "train.jsonl", gen)

    # Test manifests in the builder's names, reusing the media (lyra eval reads these).
    write_manifest(root / "asr" / "test_espeak.jsonl", [{**r, "id": r["id"] + "-test"} for r in asr])
    write_manifest(root / "image_qa" / "test.jsonl", [{**r, "id": r["id"] + "-test"} for r in spoken])
    write_manifest(root / "image_qa" / "test_typed.jsonl", [{**r, "id": r["id"] + "-test"} for r in typed])
    write_manifest(root / "lectures" / "test.jsonl", [{
        "id": "lecture-0-q0", "long_speech": "audio/lecture-0.flac", "lecture_minutes": 0.5,
        "conversations": [{"from": "human", "value": "<speech>\nWhat is the secret number of Alice Morgan?"},
                          {"from": "gpt", "value": "seven three nine"}]}])
    write_manifest(root / "speech_gen" / "test.jsonl", [{**r, "id": r["id"] + "-test"} for r in gen[:2]])
    return root
