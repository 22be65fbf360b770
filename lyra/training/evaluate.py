"""Evaluation of a trained model on the synthetic test sets (`python -m lyra.data.build` layout).

    report = evaluate(model, processor, "data/nano", EvalSettings(limit=100))
    print(report.to_markdown())

| task | manifest(s) | metric |
|---|---|---|
| asr | asr/test_*.jsonl | word error rate, normalised as the reference does (lyra.data.metrics.wer) |
| image_qa | image_qa/test.jsonl (spoken question), image_qa/test_typed.jsonl | accuracy |
| needle | lectures/test.jsonl | accuracy per lecture length, extractor off and keep_rate 1 / 0.5 / 0.25, with prefill time |
| spoken_answer | speech_gen/test.jsonl | WER of Whisper tiny.en's transcript of the spoken answer against its own text (Whisper's English normaliser, lyra.data.speech_eval) |

An answer counts when, normalised, it is the short answer ("attic") or the whole-sentence answer the data holds
(an image question's `answer_sentence`; a needle's fact without its lead-in, "The blue kettle is hidden in the
attic."): a model may answer either way, and neither a list of guesses nor a sentence with a wrong slot passes.
Greedy decoding throughout. Lectures go through the engine's `LectureSession` exactly as `lyra ask --context`
does (windows encoded and prefilled as they are read), so the prefill time is the engine's.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lyra.data.manifest import Record, read_manifest
from lyra.data.metrics import accuracy, accuracy_by, answer_matches, wer
from lyra.modeling import LyraForConditionalGeneration
from lyra.processing import LyraProcessor

__all__ = ["EvalReport", "EvalRow", "EvalSettings", "SpokenAnswer", "evaluate", "generate_answers", "spoken_answer"]

TASKS = ("asr", "image_qa", "needle", "spoken_answer")
EXAMPLES_PER_SET = 20  # predictions kept in the JSON report per test set


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and how."""

    tasks: tuple[str, ...] = TASKS  # subset of TASKS
    limit: int | None = 100  # samples per test set (None: all)
    batch_size: int = 8  # prompts decoded together (ASR, image QA)
    max_new_tokens: int = 96  # answer length limit (tokens)
    keep_rates: tuple[float, ...] = (1.0, 0.5, 0.25)  # token-extractor settings for the needle test (plus "off")
    lecture_minutes: tuple[float, ...] | None = None  # only lectures of these lengths (None: all)
    vad: bool = False  # run Silero VAD when ingesting lectures (the CLI's default is on)
    vocoder: str | None = None  # vocoder folder for spoken answers (None: the embedded one, when present)


@dataclass(frozen=True)
class EvalRow:
    """One line of the report."""

    task: str  # "asr", "image_qa", "needle", "spoken_answer"
    dataset: str  # the manifest, e.g. "asr/test_espeak"
    metric: str  # "wer" or "accuracy"
    value: float  # WER as a fraction (0.05 = 5 %), accuracy as a fraction
    n: int  # samples scored
    details: dict = field(default_factory=dict)  # e.g. {"minutes": 10, "extractor": "keep 0.5", "prefill_s": 1.2}


@dataclass
class EvalReport:
    """Rows, skipped tasks (with the reason) and example predictions."""

    model: str
    rows: list[EvalRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    examples: dict[str, list[dict]] = field(default_factory=dict)  # dataset -> [{id, reference, prediction}]
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"model": self.model, "seconds": round(self.seconds, 1), "rows": [asdict(r) for r in self.rows],
                "skipped": self.skipped, "examples": self.examples}

    def to_markdown(self) -> str:
        lines = [f"# Evaluation of {self.model}", "",
                 "| task | test set | setting | metric | value | n | prefill s |", "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            shown = {k: v for k, v in r.details.items() if k != "prefill_s" and not isinstance(v, dict)}
            setting = ", ".join(f"{k} {v}" for k, v in shown.items())
            prefill = r.details.get("prefill_s")
            value = f"{100 * r.value:.2f} %"
            lines.append(f"| {r.task} | {r.dataset} | {setting or '-'} | {r.metric} | {value} | {r.n} | "
                         f"{'-' if prefill is None else f'{prefill:.2f}'} |")
        by_kind = [r for r in self.rows if r.details.get("by_kind")]
        if by_kind:
            lines += ["", "Correct answers by question kind:"] + [
                f"- {r.dataset}: " + ", ".join(f"{k} {v}" for k, v in r.details["by_kind"].items()) for r in by_kind]
        if self.skipped:
            lines += ["", "Not evaluated:"] + [f"- {s}" for s in self.skipped]
        lines += ["", f"({self.seconds:.0f} s)"]
        return "\n".join(lines) + "\n"

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        """Write report.json and report.md into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        json_path, md_path = folder / "report.json", folder / "report.md"
        json_path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        md_path.write_text(self.to_markdown())
        return json_path, md_path


# ---------------------------------------------------------------------- generation


@torch.inference_mode()
def generate_answers(
    model: LyraForConditionalGeneration,
    processor: LyraProcessor,
    records: Sequence[Record],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 96,
) -> list[str]:
    """Greedy answers to the last question of each record (its conversation up to the last answer is the prompt)."""
    answers: list[str] = []
    eos = model.config.text_config.eos_token_id
    eos = set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
    device = next(model.parameters()).device
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = [processor.apply_chat_template(r.messages()[:-1], add_generation_prompt=True) for r in chunk]
        images = [str(p) for r in chunk for p in r.image_paths()]
        audios = [str(p) for r in chunk for p in r.speech_paths()]
        inputs = processor(prompts, images=images or None, audios=audios or None)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        sequences = model.generate(inputs, max_new_tokens=max_new_tokens).sequences.tolist()
        for row in sequences:
            tokens = []
            for token in row:
                if token in eos:
                    break
                tokens.append(token)
            answers.append(processor.decode(tokens, skip_special_tokens=True).strip())
    return answers


def _limited(records: list[Record], limit: int | None) -> list[Record]:
    return records if limit is None else records[:limit]


def _examples(records, references, predictions) -> list[dict]:
    return [{"id": r.id, "reference": ref, "prediction": pred}
            for r, ref, pred in list(zip(records, references, predictions))[:EXAMPLES_PER_SET]]


# ---------------------------------------------------------------------- tasks


def evaluate_asr(model, processor, manifest: Path, settings: EvalSettings, report: EvalReport, name: str) -> None:
    records = _limited(read_manifest(manifest), settings.limit)
    if not records:
        return
    hypotheses = generate_answers(model, processor, records, batch_size=settings.batch_size,
                                  max_new_tokens=settings.max_new_tokens)
    references = [r.answers[-1] for r in records]
    errors = wer(references, hypotheses)
    report.rows.append(EvalRow("asr", name, "wer", errors.wer, len(records),
                               {"errors": errors.errors, "words": errors.reference_words}))
    report.examples[name] = _examples(records, references, hypotheses)


def evaluate_image_qa(model, processor, manifest: Path, settings: EvalSettings, report: EvalReport, name: str) -> None:
    records = _limited(read_manifest(manifest), settings.limit)
    if not records:
        return
    predictions = generate_answers(model, processor, records, batch_size=settings.batch_size,
                                   max_new_tokens=settings.max_new_tokens)
    accepted = [accepted_answers(r) for r in records]
    score = accuracy(predictions, accepted)
    spoken = "question spoken" if any(r.speech for r in records) else "question typed"
    details = {"input": spoken, "by_kind": correct_by_kind(records, predictions, accepted)}
    report.rows.append(EvalRow("image_qa", name, "accuracy", score.accuracy, score.total, details))
    report.examples[name] = _examples(records, [r.answers[-1] for r in records], predictions)


def accepted_answers(record: Record) -> list[str]:
    """The answers that count for a question: its short answer and, where the data has one, the whole sentence
    (`lyra.training.data.whole_answers`: an image question's `answer_sentence`, a needle's fact without its
    lead-in)."""
    from lyra.training.data import whole_answers

    whole = whole_answers(record)[-1]
    return [record.answers[-1]] + ([whole] if whole else [])


def correct_by_kind(records: Sequence[Record], predictions: Sequence[str],
                    references: Sequence[str | Sequence[str]]) -> dict[str, str]:
    """"correct/total" per question kind (the data builder's `kind` field: "count_all", "word_color", ...),
    kinds in first-seen order; empty when a record has no kind."""
    kinds = [r.extra.get("kind") for r in records]
    if not kinds or None in kinds:
        return {}
    return {k: f"{s.correct}/{s.total}" for k, s in accuracy_by(kinds, predictions, references).items()}


def evaluate_needles(model, processor, manifest: Path, settings: EvalSettings, report: EvalReport, name: str) -> None:
    """Needle accuracy per lecture length and extractor setting; prefill time is the mean per lecture."""
    from lyra.configuration import ExtractorConfig
    from lyra.engine.jobs import build_session

    records = read_manifest(manifest)
    lectures: dict[Path, list[Record]] = {}
    for r in records:
        minutes = r.extra.get("lecture_minutes")
        if settings.lecture_minutes is not None and minutes not in settings.lecture_minutes:
            continue
        lectures.setdefault(r.speech_paths()[0], []).append(r)
    if settings.limit is not None:  # questions, counted over lectures in order
        kept, total = {}, 0
        for path, questions in lectures.items():
            if total >= settings.limit:
                break
            kept[path] = questions[: settings.limit - total]
            total += len(kept[path])
        lectures = kept
    if not lectures:
        return
    layers = model.config.text_config.num_hidden_layers
    variants = [("off", ExtractorConfig(gap=0))] + [
        (f"keep {rate:g}", ExtractorConfig(gap=max(1, layers // 4), keep_rate=rate)) for rate in settings.keep_rates
    ]
    saved = model.extractor_config
    examples = []
    try:
        for label, extractor in variants:
            model.set_extractor(extractor)
            by_length: dict[float, dict] = {}
            for path, questions in lectures.items():
                minutes = float(questions[0].extra.get("lecture_minutes", 0.0))
                start = time.perf_counter()
                session = build_session(model, processor, str(path), vad=settings.vad, err=io.StringIO())
                prefill = time.perf_counter() - start
                cell = by_length.setdefault(minutes, {"correct": 0, "total": 0, "prefill": [], "cached": []})
                cell["prefill"].append(prefill)
                cell["cached"].append(session.info.cached_tokens)
                for r in questions:
                    question = r.conversations[0].value.replace("<speech>", "").strip()
                    prediction = session.answer(question, max_new_tokens=settings.max_new_tokens).strip()
                    cell["correct"] += answer_matches(prediction, accepted_answers(r))
                    cell["total"] += 1
                    if label == "off" and len(examples) < EXAMPLES_PER_SET:
                        examples.append({"id": r.id, "reference": r.answers[-1], "prediction": prediction})
            for minutes, cell in sorted(by_length.items()):
                report.rows.append(EvalRow(
                    "needle", name, "accuracy", cell["correct"] / cell["total"], cell["total"],
                    {"minutes": minutes, "extractor": label,
                     "prefill_s": round(sum(cell["prefill"]) / len(cell["prefill"]), 3),
                     "cached_tokens": int(sum(cell["cached"]) / len(cell["cached"]))},
                ))
    finally:
        model.set_extractor(saved)
    report.examples[name] = examples


@dataclass
class SpokenAnswer:
    """A generated answer with its speech."""

    text: str  # the text answer (up to the end-of-turn token)
    tokens: list[int]  # every generated token, end-of-turn included
    states: torch.Tensor  # (T, D) final LLM states at the generated tokens' own positions (what the generator reads)
    units: list[int]  # collapsed speech units
    audio: np.ndarray  # (N,) float32 at the vocoder's rate


@torch.inference_mode()
def spoken_answer(model, processor, record: Record, vocoder, max_new_tokens: int) -> SpokenAnswer:
    """Answer one record's last question in text and speech: the speech generator reads the final LLM states at
    the answer tokens' own positions (end-of-turn included), as in training; the vocoder renders its units."""
    from lyra.vocoder import synthesize_units

    prompt = processor.apply_chat_template(record.messages()[:-1], add_generation_prompt=True)
    images = [str(p) for p in record.image_paths()]
    audios = [str(p) for p in record.speech_paths()]
    inputs = processor(prompt, images=images or None, audios=audios or None)
    device = next(model.parameters()).device
    steps = list(model.stream_generate({k: v.to(device) for k, v in inputs.items()}, max_new_tokens=max_new_tokens))
    eos = model.config.text_config.eos_token_id
    eos = set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
    tokens = [int(s.tokens[0]) for s in steps]
    # A step's hidden_states predicted its token; the state *at* token i is the next step's (the last one's own
    # comes as final_hidden_states).
    states = torch.stack([s.hidden_states[0] for s in steps[1:]] + [steps[-1].final_hidden_states[0]])
    units = model.speech_generator.units(states[None])[0]
    text_tokens = tokens[: next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]
    text = processor.decode(text_tokens, skip_special_tokens=True).strip()
    return SpokenAnswer(text=text, tokens=tokens, states=states, units=units, audio=synthesize_units(vocoder, units))


def evaluate_spoken_answers(model, processor, manifest: Path, settings: EvalSettings, report: EvalReport,
                            name: str) -> None:
    from lyra.vocoder import EMBEDDED_VOCODER, load_vocoder

    if model.speech_generator is None:
        report.skipped.append(f"spoken_answer ({name}): the model has no speech generator")
        return
    folder = Path(settings.vocoder) if settings.vocoder else EMBEDDED_VOCODER
    if not (folder / "config.json").exists():
        report.skipped.append(f"spoken_answer ({name}): no vocoder at {folder} (build it: python -m lyra.data.vocoder_recipe)")
        return
    from lyra.data.speech_eval import WhisperTranscriber, error_counts

    vocoder = load_vocoder(folder)
    transcriber = WhisperTranscriber()
    records = _limited(read_manifest(manifest), settings.limit)
    texts, heard = [], []
    for record in records:
        answer = spoken_answer(model, processor, record, vocoder, settings.max_new_tokens)
        texts.append(answer.text)
        heard.append(transcriber(answer.audio, vocoder.sample_rate) if len(answer.audio) else "")
    if records:
        # Whisper's English normalisation on both sides ("24%" is "twenty four percent"); an empty text answer
        # has no words to get wrong.
        errors, words = error_counts(texts, heard)
        report.rows.append(EvalRow("spoken_answer", name, "wer", errors / max(words, 1), len(records),
                                   {"against": "the model's own text answer", "errors": errors, "words": words}))
        report.examples[name] = _examples(records, texts, heard)


# ---------------------------------------------------------------------- all of it


def evaluate(
    model: LyraForConditionalGeneration,
    processor: LyraProcessor,
    data_dir: str | Path,
    settings: EvalSettings = EvalSettings(),
    *,
    model_name: str = "",
    log=None,
) -> EvalReport:
    """Every test set of `settings.tasks` found under `data_dir`; missing sets are listed in `report.skipped`."""
    data_dir = Path(data_dir)
    unknown = set(settings.tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown evaluation task(s) {sorted(unknown)}; choose from {TASKS}")
    model.eval()
    report = EvalReport(model=model_name)
    start = time.perf_counter()
    plan = []
    if "asr" in settings.tasks:
        plan += [("asr", p, evaluate_asr) for p in sorted((data_dir / "asr").glob("test*.jsonl"))]
    if "image_qa" in settings.tasks:
        plan += [("image_qa", data_dir / "image_qa" / f, evaluate_image_qa) for f in ("test.jsonl", "test_typed.jsonl")]
    if "needle" in settings.tasks:
        plan.append(("needle", data_dir / "lectures" / "test.jsonl", evaluate_needles))
    if "spoken_answer" in settings.tasks:
        plan.append(("spoken_answer", data_dir / "speech_gen" / "test.jsonl", evaluate_spoken_answers))
    for task, path, run in plan:
        name = f"{path.parent.name}/{path.stem}"
        if not path.is_file():
            report.skipped.append(f"{task} ({name}): {path} not found")
            continue
        if log:
            log(f"evaluating {name} ...")
        run(model, processor, path, settings, report, name)
    if "asr" in settings.tasks and not any(r.task == "asr" for r in report.rows):
        report.skipped.append(f"asr: no asr/test*.jsonl under {data_dir}")
    report.seconds = time.perf_counter() - start
    return report
