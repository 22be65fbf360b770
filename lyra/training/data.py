"""The training set of a stage: manifests -> datasets (lyra.data), optional speech-frame cache, collation.

The speech encoder is frozen in every stage, so with `cache_speech` each clip is encoded once before
training (padded 30 s windows, exactly as at inference) and only the frames that the kept speech tokens
cover are stored (`count * k` per window). During training the encoder is bypassed
(`encoder_frames_given`): the batch's `input_features` then hold those frames, which the model's
projector reads as if the encoder had just produced them. On a CPU this is the difference between
0.15-0.7 s and nothing per window and step. The cache lives on disk (`data.cache_dir`), one file per sample,
so stages that share data and resumed runs encode nothing again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, Dataset
from transformers.modeling_outputs import BaseModelOutput

from lyra.constants import IMAGE_PLACEHOLDER, SAY_PROMPT
from lyra.data.collator import LyraCollator
from lyra.data.datasets import (
    ASRDataset,
    BrokenSampleError,
    ConversationDataset,
    EncodedSample,
    ImageQADataset,
    LongSpeechQADataset,
    SpeechGenerationDataset,
)
from lyra.data.manifest import GPT, HUMAN, Record, Turn, read_manifest
from lyra.modeling import LyraForConditionalGeneration
from lyra.processing import LyraProcessor
from lyra.training.config import DataConfig

__all__ = [
    "TASK_DATASETS",
    "FrameCachedDataset",
    "TrainCollator",
    "attach_units",
    "build_eval_dataset",
    "build_train_dataset",
    "drawn_image_records",
    "encoder_frames_given",
    "needle_records",
    "text_records",
]

log = logging.getLogger(__name__)

TASK_DATASETS: dict[str, type[ConversationDataset]] = {
    "asr": ASRDataset,
    "image_qa": ImageQADataset,
    "long_speech_qa": LongSpeechQADataset,
    "speech_generation": SpeechGenerationDataset,
    "conversation": ConversationDataset,
}
WRITE_PROMPT = "Write a sentence from the lecture."  # free generation of one corpus sentence
NEEDLE_PASSAGE = (1, 10)  # corpus sentences around the facts of a written needle passage
NEEDLE_FACTS = (1, 3)  # facts (needles) per passage
DRAWN_IMAGES_DIR = ".drawn_images"  # under the data root: images of `data.drawn_images`, one folder per seed
ENCODE_BATCH_WINDOWS = 16  # windows per speech-encoder call while filling the frame cache


# ---------------------------------------------------------------------- records


def text_records(n: int, seed: int = 0) -> list[Record]:
    """`n` text-only conversations from the synthetic corpus: read-aloud ("Say this sentence: X" -> X) and
    free sentences ("Write a sentence from the lecture." -> X), alternating. Training-split sentences only."""
    from lyra.data.corpus import SentenceGenerator

    sentences = SentenceGenerator(seed).generate(n, "train")
    records = []
    for i, sentence in enumerate(sentences):
        prompt = SAY_PROMPT + sentence.text if i % 2 == 0 else WRITE_PROMPT
        records.append(Record(id=f"text-{seed}-{i:06d}", conversations=(Turn(HUMAN, prompt), Turn(GPT, sentence.text))))
    return records


def needle_records(n: int, seed: int = 0, facts: Sequence[int] = NEEDLE_FACTS, questions: int = 1,
                   answers: str = "short", sentences: Sequence[int] = NEEDLE_PASSAGE) -> list[Record]:
    """`n` written needle passages: `sentences` (lowest, highest) corpus sentences with `facts` (lowest, highest)
    unique facts (the lecture needles of lyra.data.lectures) at random places, then a question about one of them
    -> its short answer.

    The skill long-speech QA needs (find the one fact a question asks about, copy its answer) learned on text,
    where contexts are cheap; stage 3 then carries it over to speech. Training-split sentences and facts only.
    `questions` > 1 asks up to that many of a passage's facts, one per turn: every turn is a lookup, where one
    question per passage leaves the rest of it unused. Past six facts a question template repeats, so only the
    person, object or place it names tells the facts apart, as in a lecture with ten needles.
    `answers="sentence"` answers with the fact said whole ("The secret number of Anna Berg is four one two."):
    once the model can copy from its context, saying the fact makes the lookup a copy of what follows the
    words it has just repeated from the question (docs/nano.md, run 5).
    """
    import random

    from lyra.data.corpus import SentenceGenerator
    from lyra.data.lectures import make_needles

    rng = random.Random(f"text-needles-{seed}")
    background = SentenceGenerator(seed + 1).stream("train")
    records = []
    for i in range(n):
        needles = make_needles(rng, rng.randint(*facts), "train")
        passage = [next(background).text for _ in range(rng.randint(*sentences))]
        for needle in needles:
            passage.insert(rng.randint(0, len(passage)), needle.fact)
        # one question: the random stream of the earlier recipe (its configs rebuild the same passages)
        asked = [rng.choice(needles)] if questions == 1 else rng.sample(needles, min(questions, len(needles)))
        said = [needle.sentence if answers == "sentence" else needle.answer for needle in asked]
        turns = [Turn(HUMAN, " ".join(passage) + "\n" + asked[0].question), Turn(GPT, said[0])]
        for needle, answer in zip(asked[1:], said[1:]):
            turns += [Turn(HUMAN, needle.question), Turn(GPT, answer)]
        records.append(Record(id=f"needle-{seed}-{i:06d}", conversations=tuple(turns)))
    return records


def drawn_image_records(n: int, folder: Path, seed: int = 0, progress: bool = False,
                        kinds: Mapping[str, float] | None = None, answers: str = "short") -> list[Record]:
    """`n` typed questions about freshly drawn images (lyra.data.synth_images): every other one asks for
    everything drawn, from the left (`describe`), the rest ask the data builder's questions.

    A vision tower that starts from random weights needs many more images than the data builder's spoken
    set (drawing one costs milliseconds, speaking its question a second), and a description teaches it every
    colour, shape and word of the drawing where a one-word answer teaches one. Each image follows from its
    own seed and is written once under `folder` (atomically), so later runs reuse it.

    `kinds` (question kind -> weight, "describe" included; `synth_images.DRAWN_KINDS`) draws each question's
    kind at those odds instead, to drill the kinds a model still gets wrong; its images carry the kind in
    their name, so they never collide with the default mixture's.

    `answers="sentence"` answers each question whole ("The star is black."; the image's `answer_sentence`, also
    kept in `extra`): the shape's name said just before its colour turns the lookup by shape into run 5's copy
    pattern, which a one-word answer never formed (docs/nano.md, run 10).
    """
    import random

    from lyra.data.synth_images import DESCRIBE_QUESTION, describe, make_image_qa

    folder.mkdir(parents=True, exist_ok=True)
    names, weights = (list(kinds), list(kinds.values())) if kinds else ((), ())
    records = []
    bar = _bar(n, "drawing images", progress)
    for i in range(n):
        if kinds:
            kind = random.Random(f"drawn-kind-{seed}-{i}").choices(names, weights)[0]
            rng = random.Random(f"drawn-image-{seed}-{kind}-{i}")
            qa = make_image_qa(rng, None if kind == "describe" else kind)
            stem, described = f"drawn-{seed}-{kind}-{i:06d}", kind == "describe"
        else:
            qa = make_image_qa(random.Random(f"drawn-image-{seed}-{i}"))
            stem, described = f"drawn-{seed}-{i:06d}", i % 2 == 0
        path = folder / f"{stem}.png"
        if not path.is_file():
            partial = path.with_suffix(".partial.png")
            qa.image.save(partial)
            os.replace(partial, path)
        if described:
            question, answer, extra = DESCRIBE_QUESTION, describe(qa.items), {}
        else:
            said = qa.answer_sentence if answers == "sentence" else qa.answer
            question, answer, extra = qa.question, said, {"answer_sentence": qa.answer_sentence}
        records.append(Record(id=stem, images=(str(path.resolve()),), conversations=(
            Turn(HUMAN, f"{IMAGE_PLACEHOLDER}\n{question}"), Turn(GPT, answer)), extra=extra))
        bar.update(1)
    bar.close()
    return records


def attach_units(records: Sequence[Record], extract: Callable[[Path], list[int]], progress: bool = False) -> list[Record]:
    """Records with `tgt_units` filled from their answer audio (`tgt_audio`, as the data builder writes it).

    `extract(path)` returns the collapsed units of one audio file (e.g. `UnitExtractor.units` of its samples).
    Records that already hold units are kept as they are.
    """
    out = []
    todo = [r for r in records if r.tgt_units is None]
    bar = _bar(len(todo), "speech units", progress)
    for record in records:
        if record.tgt_units is not None:
            out.append(record)
            continue
        audio = record.extra.get("tgt_audio")
        if not audio:
            raise BrokenSampleError(f"{record.where}: no tgt_units and no tgt_audio to extract them from")
        path = Path(audio) if Path(audio).is_absolute() or record.root is None else record.root / audio
        units = tuple(int(u) for u in extract(path))
        out.append(replace(record, tgt_units=units))
        bar.update(1)
    bar.close()
    return out


def vocoder_folder(folder: str) -> Path:
    """`data.units_from` as a folder ("embedded": the shipped nano vocoder)."""
    from lyra.vocoder import EMBEDDED_VOCODER

    return EMBEDDED_VOCODER if folder == "embedded" else Path(folder)


def unit_extractor(folder: str) -> Callable[[Path], list[int]]:
    """`extract(path) -> units` with the k-means centroids of a nano vocoder folder ("embedded": the shipped one)."""
    from lyra.audio import load_audio
    from lyra.data.units import UnitExtractor

    extractor = UnitExtractor.from_pretrained(vocoder_folder(folder))
    return lambda path: extractor.units(load_audio(str(path)))


def _read_source(config: DataConfig, source) -> list[Record]:
    path = Path(source.manifest)
    if not path.is_absolute():
        path = Path(config.root) / path
    records = read_manifest(path)
    if source.max_samples is not None:
        records = records[: source.max_samples]
    if source.answers == "sentence":
        records = [with_whole_answers(r) for r in records]
    return records * max(source.repeat, 1)


def whole_answers(record: Record) -> list[str | None]:
    """Each answer of `record` said whole, where the data has it (None where not): an image question's
    `answer_sentence` ("The circle is red."); a needle question's fact without its lead-in ("The blue kettle is
    hidden in the attic."), from `needle_fact` (a test question) or the fact of its entry in `needles` (a
    training lecture, matched by question)."""
    from lyra.data.lectures import fact_sentence

    facts = {n["question"]: fact_sentence(n["fact"]) for n in record.extra.get("needles", ()) if n.get("fact")}
    single = record.extra.get("answer_sentence") or (
        fact_sentence(record.extra["needle_fact"]) if record.extra.get("needle_fact") else None)
    turns = record.conversations
    out = []
    for k, turn in enumerate(turns):
        if turn.speaker == GPT:
            question = turns[k - 1].value.rsplit("\n", 1)[-1].strip() if k else ""
            out.append(facts.get(question, single if len(record.answers) == 1 else None))
    return out


def with_whole_answers(record: Record) -> Record:
    """`record` with every answer said whole (`whole_answers`); a clear error where the data lacks one."""
    whole = iter(whole_answers(record))
    turns = []
    for turn in record.conversations:
        if turn.speaker == GPT:
            said = next(whole)
            if said is None:
                raise BrokenSampleError(
                    f"{record.where}: answers: sentence needs each answer said whole, and the answer {turn.value!r} "
                    "has none (image questions: 'answer_sentence'; lectures: 'needle_fact', or 'fact' in 'needles', "
                    "which python -m lyra.data.build writes: rebuild the manifest)")
            turn = Turn(GPT, said)
        turns.append(turn)
    return replace(record, conversations=tuple(turns))


# ---------------------------------------------------------------------- datasets


def build_train_dataset(
    config: DataConfig,
    processor: LyraProcessor,
    model: LyraForConditionalGeneration | None = None,
    *,
    progress: bool = True,
) -> Dataset:
    """The stage's training mixture: every manifest read as its task's dataset, plus generated text.

    With `config.cache_speech` (and a model) every sample is encoded now and the speech frames kept
    (`FrameCachedDataset`); the training loop must then run inside `encoder_frames_given(model)`.
    """
    parts = _manifest_datasets(config, config.train, processor, progress)
    if config.text_corpus:
        parts.append(ConversationDataset(text_records(config.text_corpus, config.text_seed), processor))
    if config.text_needles:
        needles = needle_records(config.text_needles, config.text_seed, config.needle_facts, config.needle_questions,
                                 config.needle_answers, config.needle_sentences)
        parts.append(ConversationDataset(needles, processor))
    if config.drawn_images:
        folder = Path(config.root) / DRAWN_IMAGES_DIR / str(config.text_seed)
        records = drawn_image_records(config.drawn_images, folder, config.text_seed, progress=progress,
                                      kinds=config.drawn_kinds, answers=config.drawn_answers)
        parts.append(ImageQADataset(records, processor, skip_broken=config.skip_broken))
    return _joined(config, parts, model, progress)


def build_eval_dataset(
    config: DataConfig,
    processor: LyraProcessor,
    model: LyraForConditionalGeneration | None = None,
    *,
    progress: bool = True,
) -> Dataset | None:
    """The held-out manifests of `config.eval`, read and cached as the training mixture is; None when there are none."""
    if not config.eval:
        return None
    return _joined(config, _manifest_datasets(config, config.eval, processor, progress), model, progress)


def _manifest_datasets(config: DataConfig, sources, processor: LyraProcessor, progress: bool) -> list[ConversationDataset]:
    """Each manifest read as its task's dataset (stage 4's unit targets extracted where records lack them)."""
    parts: list[ConversationDataset] = []
    for source in sources:
        records = _read_source(config, source)
        if source.task == "speech_generation" and any(r.tgt_units is None for r in records):
            if config.units_from is None:
                raise ValueError(
                    f"{source.manifest}: records have no tgt_units; set data.units_from to a vocoder folder (or "
                    "'embedded') so they are extracted from tgt_audio"
                )
            records = attach_units(records, unit_extractor(config.units_from), progress=progress)
        parts.append(TASK_DATASETS[source.task](records, processor, skip_broken=config.skip_broken))
    return parts


def _joined(config: DataConfig, parts: list[ConversationDataset], model: LyraForConditionalGeneration | None,
            progress: bool) -> Dataset:
    """One dataset of `parts`: with `config.cache_speech` (and a model) encoded now, the speech frames kept."""
    if config.cache_speech and model is not None:
        cache_dir = None
        if config.cache_dir is not None:
            cache_dir = Path(config.cache_dir) if Path(config.cache_dir).is_absolute() else Path(config.root) / config.cache_dir
        return FrameCachedDataset(parts, model, dtype=getattr(torch, config.cache_dtype), progress=progress,
                                  cache_dir=cache_dir)
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


class FrameCachedDataset(Dataset):
    """Samples encoded once, with the frozen speech encoder's frames in place of the log-mel features.

    A sample's `input_features` become (W, F, d_model) frames: the first `speech_token_counts[w] * k` frames
    of each window's encoder output (zero-padded to the longest window of the sample), in `dtype`. Images are
    not kept (they would dominate memory): their pixels are recomputed from the files at every access.
    Broken samples are skipped when their dataset allows it (`skip_broken_count` tells how many).

    With `cache_dir` every encoded sample is also written there (one safetensors file per record, under a
    folder named after the tokenizer, processor settings and encoder weights) and read back from disk at each
    access, so RAM holds only file names, and later stages and resumed runs that read the same records skip
    the audio, the log-mel and the encoder altogether (`hits` counts them). The frames are kept apart, one file
    per recording (`frames/`, keyed by the audio files alone): a record whose words change (other answers, a
    new question about the same clip) is tokenised again but not encoded again (`frame_hits` counts those).
    """

    def __init__(
        self,
        datasets: Sequence[ConversationDataset],
        model: LyraForConditionalGeneration,
        *,
        dtype: torch.dtype = torch.float16,
        batch_windows: int = ENCODE_BATCH_WINDOWS,
        progress: bool = True,
        cache_dir: str | Path | None = None,
    ):
        self.processor = datasets[0].processor if datasets else None
        self.k = model.config.settings.projector.k
        self.batch_windows = batch_windows
        self.folder = Path(cache_dir) / cache_fingerprint(self.processor, model, dtype) if cache_dir else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.entries: list[EncodedSample | Path] = []  # in memory, or the file that holds it
        self.images: list[tuple[str, ...]] = []  # per sample: image files to re-read
        self.skip_broken_count = 0
        self.hits = 0  # samples found in cache_dir
        self.frame_hits = 0  # samples tokenised anew whose recordings' frames were found in cache_dir
        pending: list[tuple[int, Path | None, Path | None]] = []  # samples whose speech still has to be encoded
        total = sum(len(d) for d in datasets)
        bar = _bar(total, "encoding", progress)
        for dataset in datasets:
            for record in dataset.records:
                bar.update(1)
                images = tuple(str(p) for p in record.image_paths())
                path = self.folder / f"{record_key(record, type(dataset).__name__)}.safetensors" if self.folder else None
                if path is not None and path.is_file():
                    self.entries.append(path)
                    self.images.append(images)
                    self.hits += 1
                    continue
                try:
                    sample = dataset.encode(record)
                except BrokenSampleError as exc:
                    if not dataset.skip_broken:
                        raise
                    self.skip_broken_count += 1
                    log.warning("skipping broken sample: %s", exc)
                    continue
                if images:
                    sample = replace(sample, pixel_values=None)
                frames_path = self.folder / FRAMES_FOLDER / f"{speech_key(record)}.safetensors" \
                    if path is not None and sample.input_features is not None else None
                frames = load_frames(frames_path, sample, self.k) if frames_path is not None else None
                if frames is not None:
                    sample = replace(sample, input_features=frames)
                    self.frame_hits += 1
                self.entries.append(sample)
                self.images.append(images)
                if sample.input_features is None or frames is not None:
                    self._store(len(self.entries) - 1, path, frames_path)
                    continue
                pending.append((len(self.entries) - 1, path, frames_path))
                if sum(self.entries[i].input_features.shape[0] for i, _, _ in pending) >= batch_windows:
                    self._encode(model, pending, dtype)
                    pending = []
        if pending:
            self._encode(model, pending, dtype)
        bar.close()
        if self.folder is not None:
            log.info("frame cache %s: %d samples found, %d tokenised on cached frames, %d new", self.folder,
                     self.hits, self.frame_hits, len(self.entries) - self.hits - self.frame_hits)

    @torch.no_grad()
    def _encode(self, model: LyraForConditionalGeneration, pending: list[tuple[int, Path | None, Path | None]],
                dtype: torch.dtype) -> None:
        encoder = model.speech_encoder
        param = next(encoder.parameters())
        features = torch.cat([self.entries[i].input_features for i, _, _ in pending])  # (W, n_mels, 3000)
        was_training = encoder.training
        encoder.eval()
        frames = torch.cat([
            encoder(chunk.to(device=param.device, dtype=param.dtype)).last_hidden_state  # (w, 1500, d)
            for chunk in features.split(self.batch_windows)
        ])
        encoder.train(was_training)
        start = 0
        for i, path, frames_path in pending:
            sample = self.entries[i]
            counts = sample.speech_token_counts
            n = counts.numel()
            keep = int(counts.max()) * self.k
            own = frames[start : start + n, :keep].to(device="cpu", dtype=dtype).clone()
            for w in range(n):  # frames past a window's own tokens are never read: zero them
                own[w, int(counts[w]) * self.k :] = 0
            self.entries[i] = replace(sample, input_features=own)
            self._store(i, path, frames_path)
            start += n

    def _store(self, index: int, path: Path | None, frames_path: Path | None) -> None:
        if path is not None:
            save_sample(self.entries[index], path, frames_path)
            self.entries[index] = path

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> EncodedSample:
        entry = self.entries[index]
        sample = load_sample(entry) if isinstance(entry, Path) else entry
        images = self.images[index]
        if images:
            pixels = self.processor(IMAGE_PLACEHOLDER * len(images), images=list(images), return_tensors="pt")
            if not torch.equal(pixels["image_grid_thw"], sample.image_grid_thw):
                raise BrokenSampleError(f"sample {sample.id}: its images changed on disk since they were encoded")
            sample = replace(sample, pixel_values=pixels["pixel_values"])
        return sample


# ---------------------------------------------------------------------- the on-disk frame cache

CACHE_FORMAT = 1  # bump when the stored layout changes
FRAMES_FOLDER = "frames"  # beside the samples: one file of encoder frames per recording, named by speech_key
_SAMPLE_TENSORS = ("input_ids", "labels", "input_features", "speech_token_counts", "speech_clip_windows",
                   "transcript_ids", "image_grid_thw", "tgt_units")


def cache_fingerprint(processor: LyraProcessor, model: LyraForConditionalGeneration, dtype: torch.dtype) -> str:
    """A short hash of everything a cached sample depends on besides its record: tokenizer, chat template,
    processor settings, the speech encoder's weights and the storage dtype."""
    digest = hashlib.sha256()
    tokenizer = processor.tokenizer
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(str(getattr(tokenizer, "chat_template", "")).encode())
    digest.update(json.dumps([CACHE_FORMAT, processor.n_mels, processor.trim_speech_padding, processor.projector_k,
                              str(dtype)]).encode())
    for name, tensor in model.speech_encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def record_key(record: Record, task: str) -> str:
    """A hash of a record as read (its JSON, the dataset kind, and the size and time of each media file)."""
    media = _media_stats(record.speech_paths() + record.image_paths())
    text = json.dumps([task, record.to_json(), media], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def speech_key(record: Record) -> str:
    """A hash of a record's recordings alone (each file's path, size and time): the key of their frames."""
    return hashlib.sha256(json.dumps(_media_stats(record.speech_paths())).encode()).hexdigest()[:32]


def _media_stats(paths: Sequence[Path]) -> list[list]:
    stats = []
    for path in paths:
        try:
            stat = path.stat()
            stats.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
        except OSError:
            stats.append([str(path), None, None])
    return stats


def save_sample(sample: EncodedSample, path: Path, frames_path: Path | None = None) -> None:
    """Write one encoded sample (pixels excluded) as safetensors, atomically (processes may race: same bytes).

    With `frames_path` its encoder frames go to that file instead (kept if it exists: same recordings, same
    frames) and the sample's file names it."""
    tensors = {name: getattr(sample, name).contiguous() for name in _SAMPLE_TENSORS if getattr(sample, name) is not None}
    metadata = {"id": sample.id}
    if frames_path is not None and "input_features" in tensors:
        frames = tensors.pop("input_features")
        if not frames_path.is_file():
            frames_path.parent.mkdir(exist_ok=True)
            _save_atomically({"frames": frames}, frames_path, {})
        metadata["frames"] = frames_path.name
    _save_atomically(tensors, path, metadata)


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_sample(path: Path) -> EncodedSample:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        metadata = f.metadata() or {}
    if "frames" in metadata:
        frames_path = path.parent / FRAMES_FOLDER / metadata["frames"]
        if not frames_path.is_file():
            raise BrokenSampleError(f"frame cache: {path.name} needs {frames_path}, which is gone; delete {path} "
                                    f"(or the whole folder {path.parent}) and run again to encode it anew")
        with safe_open(str(frames_path), framework="pt") as f:
            tensors["input_features"] = f.get_tensor("frames")
    return EncodedSample(id=metadata.get("id", path.stem), **tensors)


def load_frames(path: Path, sample: EncodedSample, k: int) -> torch.Tensor | None:
    """The cached frames of a sample's recordings, or None when there are none of the shape it needs (a file of
    another shape is stale: it is removed, so that the frames encoded now take its place)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        frames = f.get_tensor("frames")
    counts = sample.speech_token_counts
    if frames.shape[:2] == (counts.numel(), int(counts.max()) * k):
        return frames
    path.unlink(missing_ok=True)
    return None


@contextlib.contextmanager
def encoder_frames_given(model: LyraForConditionalGeneration) -> Iterator[None]:
    """Within the block the speech encoder returns its input: `input_features` already are encoder frames
    (from a `FrameCachedDataset`). The encoder's weights are untouched, so checkpoints are unaffected."""
    encoder = model.speech_encoder

    def passthrough(input_features, *args, **kwargs):
        return BaseModelOutput(last_hidden_state=input_features)

    encoder.forward = passthrough
    try:
        yield
    finally:
        del encoder.forward


# ---------------------------------------------------------------------- collation


@dataclass(frozen=True)
class TrainCollator:
    """`LyraCollator` plus what training needs: cached frames padded to one length, unit targets under the
    model's argument name (`unit_targets`), and transcripts dropped when the stage has no LCMR term."""

    base: LyraCollator
    frames: bool = False  # samples carry encoder frames (FrameCachedDataset), not log-mel
    k: int = 5  # frames per speech token (frame padding is rounded to a multiple of it)
    lcmr: bool = False  # keep transcript_ids / transcript_mask / has_transcript

    def __call__(self, samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        if self.frames:
            lengths = [s.input_features.shape[1] for s in samples if s.input_features is not None]
            if lengths:
                width = -(-max(lengths) // self.k) * self.k
                samples = [_pad_frames(s, width) for s in samples]
        batch = self.base(samples)
        if "tgt_units" in batch:
            batch["unit_targets"] = batch.pop("tgt_units")
        if not self.lcmr:
            for key in ("transcript_ids", "transcript_mask", "has_transcript"):
                batch.pop(key, None)
        return batch


def _pad_frames(sample: EncodedSample, width: int) -> EncodedSample:
    frames = sample.input_features
    if frames is None or frames.shape[1] == width:
        return sample
    padded = frames.new_zeros(frames.shape[0], width, frames.shape[2])
    padded[:, : frames.shape[1]] = frames
    return replace(sample, input_features=padded)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, disable=not enabled or total < 50)
