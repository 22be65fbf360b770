"""Long synthetic lectures (1 minute to 2 hours) with a few unique facts ("needles") to ask about.

A lecture is many corpus sentences read by one voice with short pauses, and a few needle sentences
placed at chosen depths ("The secret number of Alice Morgan is seven three nine."). Each needle comes
with a question and a short answer. The audio is written block by block as it is synthesised, so a
two-hour lecture never sits in memory; the sentence timings go to a small JSONL file beside it.

Needle frames ("secret number of", "was born in", ...) never occur in the corpus templates, so each
question has exactly one answer in its lecture. Held-out lectures use held-out sentences and
held-out needles only (``corpus.split_of`` of the text).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lyra.data.corpus import (
    BUILDINGS,
    COLORS,
    EVENTS,
    FIRST_NAMES,
    OBJECTS,
    ONES,
    PLACES,
    ROOMS,
    SURNAMES,
    TOPICS,
    WEEKDAYS,
    SentenceGenerator,
    number_words,
    split_of,
)
from lyra.data.synth_speech import AudioFileWriter

__all__ = ["NEEDLE_TEMPLATES", "Lecture", "Needle", "PlacedNeedle", "Segment", "make_needles", "write_lecture"]

# (fact, question, answer) with slots; the answer is a short phrase that appears in the fact.
NEEDLE_TEMPLATES = (
    ("The secret number of {person} is {digits}.", "What is the secret number of {person}?", "{digits}"),
    ("Remember that the {color} {obj} is hidden in the {room}.", "In which room is the {color} {obj} hidden?",
     "{room}"),
    ("Please note that {person} was born in {place}.", "Where was {person} born?", "{place}"),
    ("The {event} of {place} always starts on a {weekday}.", "On which day does the {event} of {place} start?",
     "{weekday}"),
    ("The favorite color of {person} is {color}.", "What is the favorite color of {person}?", "{color}"),
    ("{person} keeps exactly {count} {objs} in the {room}.", "How many {objs} does {person} keep in the {room}?",
     "{count}"),
)
LEAD_INS = ("Remember that ", "Please note that ")  # how some facts open; not part of the fact itself
INTRO = "Welcome back everyone. Today the lecture is about {topic}."
PAUSE_SECONDS = (0.25, 0.7)  # silence between sentences, drawn uniformly


@dataclass(frozen=True)
class Needle:
    """A unique fact and the question that asks for it."""

    fact: str  # the sentence said in the lecture
    question: str
    answer: str  # short answer, words of the fact
    template: int  # index into NEEDLE_TEMPLATES

    @property
    def sentence(self) -> str:
        """The fact as a whole-sentence answer: "The blue kettle is hidden in the attic." (no lead-in)."""
        return fact_sentence(self.fact)


def fact_sentence(fact: str) -> str:
    """A needle fact without its lead-in ("Remember that ..."), capitalised: the answer that says it whole."""
    for lead in LEAD_INS:
        if fact.startswith(lead):
            fact = fact[len(lead):]
            return fact[0].upper() + fact[1:]
    return fact


@dataclass(frozen=True)
class Segment:
    """One sentence of the lecture and when it is said."""

    start: float  # seconds from the start of the audio
    end: float
    text: str


@dataclass(frozen=True)
class PlacedNeedle:
    needle: Needle
    start: float  # seconds
    end: float
    depth: float  # start / lecture duration


@dataclass(frozen=True)
class Lecture:
    """A written lecture: its audio file, length, sentences and needles."""

    audio: Path
    segments_file: Path  # JSONL: one {"start", "end", "text"} per sentence
    duration: float  # seconds
    segments: tuple[Segment, ...]
    needles: tuple[PlacedNeedle, ...]

    @property
    def transcript(self) -> str:
        return " ".join(s.text for s in self.segments)


def make_needles(rng: random.Random, n: int, split: str = "train") -> list[Needle]:
    """``n`` needles of ``split`` with different templates where possible and distinct people/objects."""
    if n < 0:
        raise ValueError(f"a lecture needs 0 or more needles, got {n}")
    needles: list[Needle] = []
    used_keys: set[str] = set()
    order = list(range(len(NEEDLE_TEMPLATES)))
    rng.shuffle(order)
    tries = 0
    while len(needles) < n:
        tries += 1
        if tries > 10_000:
            raise RuntimeError(f"could not draw {n} distinct {split} needles")
        index = order[len(needles) % len(order)]
        fact_t, question_t, answer_t = NEEDLE_TEMPLATES[index]
        (obj, objs) = rng.choice(OBJECTS)
        values = {
            "person": f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}",
            "digits": " ".join(ONES[rng.randint(1, 9)] for _ in range(3)),
            "color": rng.choice(COLORS),
            "obj": obj,
            "objs": objs,
            "room": rng.choice(ROOMS),
            "place": rng.choice(PLACES),
            "event": rng.choice(EVENTS),
            "weekday": rng.choice(WEEKDAYS),
            "building": rng.choice(BUILDINGS),
            "count": number_words(rng.randint(2, 12)),
        }
        fact = fact_t.format(**values)
        question = question_t.format(**values)
        # One answer per question within a lecture, and one fact per person.
        key = values["person"] if "{person}" in fact_t else question
        if split_of(fact) != split or key in used_keys:
            continue
        used_keys.add(key)
        needles.append(Needle(fact=fact, question=question, answer=answer_t.format(**values), template=index))
    return needles


def write_lecture(
    path: str | Path,
    *,
    minutes: float,
    speak: Callable[[str], np.ndarray],
    seed: int,
    n_needles: int = 3,
    split: str = "train",
) -> Lecture:
    """Synthesise a lecture of at least ``minutes`` minutes into ``path`` (.flac or .wav), streaming.

    ``speak(text) -> (N,) float32 16 kHz`` reads one sentence (one voice for the whole lecture). Needles go
    at depths drawn uniformly in 5..95 % of the target length. Returns the ``Lecture``; the sentence timings
    are also written to ``<path stem>.segments.jsonl``.
    """
    if not 0 < minutes <= 24 * 60:
        raise ValueError(f"lecture length must be in (0, 1440] minutes, got {minutes}")
    path = Path(path)
    rng = random.Random(f"lecture-{seed}")
    target = minutes * 60.0
    needles = make_needles(rng, n_needles, split)
    depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
    pending = list(zip(depths, needles))
    background: Iterator = SentenceGenerator(seed).stream(split)
    segments: list[Segment] = []
    placed: list[PlacedNeedle] = []
    segments_file = path.with_name(path.name.split(".")[0] + ".segments.jsonl")
    with AudioFileWriter(path) as out:
        first = True
        while out.seconds < target or pending:
            needle = None
            if first:
                text = INTRO.format(topic=rng.choice(TOPICS))
                first = False
            elif pending and out.seconds >= pending[0][0] * target:
                needle = pending.pop(0)[1]
                text = needle.fact
            else:
                text = next(background).text
            start = out.seconds
            out.write(speak(text))
            segments.append(Segment(round(start, 3), round(out.seconds, 3), text))
            if needle is not None:
                placed.append(PlacedNeedle(needle, round(start, 3), round(out.seconds, 3), 0.0))
            out.silence(rng.uniform(*PAUSE_SECONDS))
        duration = out.seconds
    placed = [PlacedNeedle(p.needle, p.start, p.end, round(p.start / duration, 4)) for p in placed]
    with open(segments_file, "w", encoding="utf-8") as f:
        for s in segments:
            f.write(json.dumps({"start": s.start, "end": s.end, "text": s.text}) + "\n")
    return Lecture(audio=path, segments_file=segments_file, duration=duration, segments=tuple(segments),
                   needles=tuple(placed))


def vocabulary_words() -> set[str]:
    """Words of the needle and intro templates (slot values come from the corpus lists)."""
    words: set[str] = set()
    for texts in NEEDLE_TEMPLATES + ((INTRO,),):
        for text in texts:
            words.update(re.findall(r"[a-z]+", re.sub(r"\{[a-z]+\}", " ", text.lower())))
    return words
