"""Drawn images with questions about them: shapes, colours, counts, positions and short printed words.

``make_image_qa(rng)`` draws one PIL image and asks one question about it, with a short answer (for
accuracy) and a full-sentence answer (for spoken answers). Everything is decided by the ``random.Random``
it is given, so a seed reproduces the image pixel for pixel. Questions and answers use only vocabulary
words (see ``corpus.py``), so they can be spoken by the voices and recognised back.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np
from lyra.data.corpus import number_words
from PIL import Image, ImageDraw, ImageFont

__all__ = ["CELL_COLORS", "CELL_KINDS", "DESCRIBE_QUESTION", "DRAWN_KINDS", "IMAGE_COLORS", "PRINTED_WORDS",
           "QUESTION_KINDS", "SHAPES",
           "DrawnItem", "ImageQA", "cell_labels", "cell_words", "describe", "make_image_qa", "vocabulary_words"]

IMAGE_SIZE = 224  # pixels per side: 8 x 8 = 64 image tokens after Qwen2-VL's 14-pixel patches and 2 x 2 merge
SHAPES = (
    ("circle", "circles"), ("square", "squares"), ("triangle", "triangles"), ("star", "stars"),
    ("diamond", "diamonds"), ("hexagon", "hexagons"), ("cross", "crosses"),
)
IMAGE_COLORS = {  # name -> RGB, far apart so a colour is never ambiguous
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 200), "yellow": (240, 205, 20),
    "orange": (255, 127, 14), "purple": (128, 50, 170), "pink": (245, 120, 190), "brown": (125, 75, 40),
    "black": (20, 20, 20), "gray": (130, 130, 130),
}
# Printed words: short vocabulary nouns that are easy to read at this size.
PRINTED_WORDS = (
    "book", "lamp", "chair", "table", "clock", "candle", "camera", "hammer", "jacket", "kettle", "ladder",
    "mirror", "pencil", "violin", "wagon", "window", "anchor", "barrel", "drum", "globe", "magnet", "ribbon",
    "rocket", "ticket", "vase", "banana", "carrot", "lemon", "potato", "tomato", "apple", "engine", "coin",
    "map", "key", "box", "cup", "plate", "spoon", "shoe", "hat", "garden", "castle", "river", "island",
    "forest", "lake", "museum", "bridge", "school",
)
# Where things stand: name -> (x, y) centre as a fraction of the side, and how an answer sentence says it.
POSITIONS = {
    "left": ((0.2, 0.5), "on the left"), "right": ((0.8, 0.5), "on the right"),
    "top": ((0.5, 0.2), "at the top"), "bottom": ((0.5, 0.8), "at the bottom"),
    "middle": ((0.5, 0.5), "in the middle"),
}
QUESTION_KINDS = ("count", "count_all", "color", "shape", "where", "which_shape", "word", "word_color")

# Question and answer templates (also the source of their vocabulary words).
QUESTIONS = {
    "count": "How many {color} {shapes} are there?",
    "count_all": "How many shapes are there?",
    "color": "What color is the {shape}?",
    "shape": "Which shape is {color}?",
    "where": "Where is the {color} {shape}?",
    "which_shape": "Which shape is {place}?",
    "word": "What word is written in the picture?",
    "word_color": "What color is the word?",
}
DESCRIBE_QUESTION = "What is in the picture from the left?"  # answered by describe(items)
DRAWN_KINDS = (*QUESTION_KINDS, "describe")  # what a question about a drawing can ask
DESCRIBE_PARTS = {"shape": "{a} {color} {shape}", "word": "the word {word} in {color}", "join": " and "}
ARTICLES = ("a", "an")  # the {a} of a shape: "an" before a colour that starts with a vowel
ANSWERS = {
    "count": ("There is one {color} {shape}.", "There are {n} {color} {shapes}."),
    "count_all": ("There is one shape.", "There are {n} shapes."),
    "color": "The {shape} is {color}.",
    "shape": "The {color} shape is a {shape}.",
    "where": "The {color} {shape} is {place}.",
    "which_shape": "The {shape} is {place}.",
    "word": "The word is {word}.",
    "word_color": "The word is written in {color}.",
}


@dataclass(frozen=True)
class DrawnItem:
    """One thing in the picture."""

    kind: str  # a shape name ("circle", ...) or "word"
    color: str  # a key of IMAGE_COLORS
    x: float  # centre, pixels from the left
    y: float  # centre, pixels from the top
    size: float  # radius of the shape (pixels), or the font size of a word
    text: str = ""  # the printed word (kind == "word")


@dataclass(frozen=True)
class ImageQA:
    """A drawn image, one question about it and its answers."""

    image: Image.Image
    kind: str  # one of QUESTION_KINDS
    question: str  # e.g. "How many red circles are there?"
    answer: str  # short answer, e.g. "three"
    answer_sentence: str  # full-sentence answer, e.g. "There are three red circles."
    items: tuple[DrawnItem, ...]  # what was drawn


def make_image_qa(rng: random.Random, kind: str | None = None, size: int = IMAGE_SIZE) -> ImageQA:
    """Draw an image and ask one question of ``kind`` (random when None) about it."""
    kind = kind or rng.choice(QUESTION_KINDS)
    if kind not in QUESTION_KINDS:
        raise ValueError(f"unknown question kind {kind!r}; choose one of {QUESTION_KINDS}")
    maker = {
        "count": _count, "count_all": _count_all, "color": _color, "shape": _shape, "where": _where,
        "which_shape": _which_shape, "word": _word, "word_color": _word_color,
    }[kind]
    items, slots = maker(rng, size)
    image = draw(items, size, background=tuple(rng.randint(238, 255) for _ in range(3)))
    answer_sentence = _answer_sentence(kind, slots)
    question = QUESTIONS[kind].format(**slots)
    return ImageQA(image=image, kind=kind, question=question, answer=slots["answer"],
                   answer_sentence=answer_sentence, items=tuple(items))


def describe(items: tuple[DrawnItem, ...] | list[DrawnItem]) -> str:
    """Everything drawn, from the left: "A red circle, the word lamp in blue and a green star."

    A dense answer (every colour, shape and word) for the same drawing, so that each image teaches a vision
    tower trained from random weights far more than a one-word answer does.
    """
    parts = [DESCRIBE_PARTS["word"].format(word=item.text, color=item.color) if item.kind == "word"
             else DESCRIBE_PARTS["shape"].format(a=ARTICLES[item.color[0] in "aeiou"], color=item.color,
                                                 shape=item.kind)
             for item in sorted(items, key=lambda item: item.x)]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + DESCRIBE_PARTS["join"] + parts[-1]
    return text[0].upper() + text[1:] + "."


def _answer_sentence(kind: str, slots: dict) -> str:
    template = ANSWERS[kind]
    if isinstance(template, tuple):
        template = template[0] if slots.get("count") == 1 else template[1]
    return template.format(**slots)


# ---------------------------------------------------------------------- scenes


def _scatter(rng: random.Random, size: int, specs: list[tuple[str, str]]) -> list[DrawnItem]:
    """Place (shape, colour) specs at random without overlaps (rejection sampling)."""
    items: list[DrawnItem] = []
    for shape, color in specs:
        for _ in range(500):
            r = rng.uniform(0.055, 0.085) * size
            x, y = rng.uniform(r + 2, size - r - 2), rng.uniform(r + 2, size - r - 2)
            if all(math.hypot(x - o.x, y - o.y) > r + o.size + 4 for o in items):
                items.append(DrawnItem(shape, color, x, y, r))
                break
        else:
            raise RuntimeError("could not place the shapes without overlaps; use a larger image")
    return items


def _count(rng, size):
    (shape, shapes), color = rng.choice(SHAPES), rng.choice(list(IMAGE_COLORS))
    n = rng.randint(1, 6)
    specs = [(shape, color)] * n
    for _ in range(rng.randint(0, 4)):  # distractors differ in colour, shape or both
        other_shape = rng.choice(SHAPES)[0]
        other_color = rng.choice(list(IMAGE_COLORS))
        if (other_shape, other_color) != (shape, color):
            specs.append((other_shape, other_color))
    rng.shuffle(specs)
    items = _scatter(rng, size, specs)
    return items, {"shape": shape, "shapes": shapes, "color": color, "count": n, "n": number_words(n),
                   "answer": number_words(n)}


def _count_all(rng, size):
    n = rng.randint(1, 8)
    specs = [(rng.choice(SHAPES)[0], rng.choice(list(IMAGE_COLORS))) for _ in range(n)]
    return _scatter(rng, size, specs), {"count": n, "n": number_words(n), "answer": number_words(n)}


def _distinct(rng, k):
    """k different shapes and k different colours."""
    return [s[0] for s in rng.sample(SHAPES, k)], rng.sample(list(IMAGE_COLORS), k)


def _color(rng, size):
    shapes, colors = _distinct(rng, rng.randint(1, 4))
    items = _scatter(rng, size, list(zip(shapes, colors)))
    return items, {"shape": shapes[0], "color": colors[0], "answer": colors[0]}


def _shape(rng, size):
    shapes, colors = _distinct(rng, rng.randint(1, 4))
    items = _scatter(rng, size, list(zip(shapes, colors)))
    return items, {"shape": shapes[0], "color": colors[0], "answer": shapes[0]}


def _placed(rng, size, k):
    places = rng.sample(list(POSITIONS), k)
    shapes, colors = _distinct(rng, k)
    items = []
    for place, shape, color in zip(places, shapes, colors):
        (fx, fy), _ = POSITIONS[place]
        r = rng.uniform(0.06, 0.085) * size
        jitter = 0.035 * size
        items.append(DrawnItem(shape, color, fx * size + rng.uniform(-jitter, jitter),
                               fy * size + rng.uniform(-jitter, jitter), r))
    return items, places, shapes, colors


def _where(rng, size):
    items, places, shapes, colors = _placed(rng, size, rng.randint(1, 3))
    return items, {"shape": shapes[0], "color": colors[0], "place": POSITIONS[places[0]][1], "answer": places[0]}


def _which_shape(rng, size):
    items, places, shapes, _colors = _placed(rng, size, rng.randint(2, 3))
    return items, {"shape": shapes[0], "place": POSITIONS[places[0]][1], "answer": shapes[0]}


def _word_scene(rng, size):
    word = rng.choice(PRINTED_WORDS)
    color = rng.choice([c for c in IMAGE_COLORS if c not in ("yellow", "pink")])  # readable on white
    font_size = rng.randint(28, 40)
    width = _font(font_size).getlength(word)
    x = rng.uniform(width / 2 + 4, size - width / 2 - 4)
    y = rng.uniform(font_size, size - font_size)
    text_item = DrawnItem("word", color, x, y, font_size, word)
    others = []
    for _ in range(rng.randint(0, 2)):  # small shapes that stay clear of the word's box
        for _ in range(200):
            shape, shape_color = rng.choice(SHAPES)[0], rng.choice(list(IMAGE_COLORS))
            r = rng.uniform(0.04, 0.06) * size
            sx, sy = rng.uniform(r + 2, size - r - 2), rng.uniform(r + 2, size - r - 2)
            clear_of_word = abs(sx - x) > width / 2 + r + 6 or abs(sy - y) > font_size * 0.7 + r + 6
            if clear_of_word and all(math.hypot(sx - o.x, sy - o.y) > r + o.size + 4 for o in others):
                others.append(DrawnItem(shape, shape_color, sx, sy, r))
                break
    return [text_item, *others], word, color


def _word(rng, size):
    items, word, color = _word_scene(rng, size)
    return items, {"word": word, "color": color, "answer": word}


def _word_color(rng, size):
    items, word, color = _word_scene(rng, size)
    return items, {"word": word, "color": color, "answer": color}


# ---------------------------------------------------------------------- drawing


def _font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow's built-in scalable font: the same glyphs on every machine, no system fonts needed.
    return ImageFont.load_default(size=size)


def draw(items: list[DrawnItem], size: int = IMAGE_SIZE, background=(255, 255, 255)) -> Image.Image:
    """Render items on a plain background: (size x size) RGB."""
    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    for item in items:
        fill = IMAGE_COLORS[item.color]
        if item.kind == "word":
            pen.text((item.x, item.y), item.text, fill=fill, font=_font(int(item.size)), anchor="mm")
        else:
            _draw_shape(pen, item.kind, item.x, item.y, item.size, fill)
    return image


def _draw_shape(pen: ImageDraw.ImageDraw, kind: str, x: float, y: float, r: float, fill) -> None:
    if kind == "circle":
        pen.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif kind == "square":
        s = r * 0.85
        pen.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif kind == "triangle":
        pen.polygon(_regular(x, y + r * 0.15, r * 1.1, 3, -90), fill=fill)
    elif kind == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = math.radians(-90 + 36 * i)
            points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
        pen.polygon(points, fill=fill)
    elif kind == "diamond":
        pen.polygon([(x, y - r), (x + r * 0.7, y), (x, y + r), (x - r * 0.7, y)], fill=fill)
    elif kind == "hexagon":
        pen.polygon(_regular(x, y, r, 6, 0), fill=fill)
    elif kind == "cross":
        a, b = r, r * 0.33
        pen.rectangle((x - a, y - b, x + a, y + b), fill=fill)
        pen.rectangle((x - b, y - a, x + b, y + a), fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}")


# Per-cell labels (a vision tower's dense training targets): index 0 is the background in both.
CELL_KINDS = ("background", *(shape for shape, _ in SHAPES), "word")
CELL_COLORS = ("background", *IMAGE_COLORS)
MIN_CELL_COVER = 60  # pixels of a thing a cell must hold to be labelled with it (of 28 x 28 at 224 px and 8 cells)


def cell_labels(items: tuple[DrawnItem, ...] | list[DrawnItem], size: int = IMAGE_SIZE,
                cells: int = 8) -> tuple[list[int], list[int]]:
    """What each cell of a ``cells`` x ``cells`` grid over the drawing holds, row by row from the top left:
    the index in ``CELL_KINDS`` and in ``CELL_COLORS`` of the thing covering most of its pixels, or 0 when fewer
    than ``MIN_CELL_COVER`` (scaled to the cell's area) are covered. The grid of a Qwen2-VL vision tower's merged
    tokens is such a grid (224 px, 14 px patches, 2 x 2 merge: 8 x 8), in the same order.
    """
    if size % cells:
        raise ValueError(f"an image of {size} px does not split into {cells} equal cells")
    masks = []
    for classes in (CELL_KINDS, CELL_COLORS):
        mask = Image.new("L", (size, size), 0)
        pen = ImageDraw.Draw(mask)
        pen.fontmode = "1"  # no anti-aliasing: a glyph's edge pixels would read as other classes
        for item in items:  # drawn in order, like draw(): a later item covers an earlier one
            value = classes.index(item.kind if classes is CELL_KINDS else item.color)
            if item.kind == "word":
                pen.text((item.x, item.y), item.text, fill=value, font=_font(int(item.size)), anchor="mm")
            else:
                _draw_shape(pen, item.kind, item.x, item.y, item.size, value)
        side = size // cells
        blocks = np.asarray(mask).reshape(cells, side, cells, side).transpose(0, 2, 1, 3).reshape(cells * cells, -1)
        counts = np.stack([(blocks == c).sum(1) for c in range(len(classes))], axis=1)
        counts[:, 0] = 0
        covered = counts.sum(1) >= MIN_CELL_COVER * side * side / 28 ** 2
        masks.append(np.where(covered, counts.argmax(1), 0).tolist())
    return masks[0], masks[1]


def cell_words(items: tuple[DrawnItem, ...] | list[DrawnItem], kinds: list[int]) -> list[int]:
    """Which printed word each cell shows: 1 + its index in ``PRINTED_WORDS`` where ``kinds`` (``cell_labels``)
    says the cell holds a word, else 0. A drawing holds at most one word, so a cell showing "la" of "lamp" is
    labelled "lamp": the tower learns to read the word across its cells."""
    words = [item.text for item in items if item.kind == "word"]
    if len(words) > 1:
        raise ValueError(f"cell_words takes drawings with at most one word, got {words}")
    label = 1 + PRINTED_WORDS.index(words[0]) if words else 0
    word_kind = CELL_KINDS.index("word")
    return [label if k == word_kind else 0 for k in kinds]


def _regular(x: float, y: float, r: float, n: int, start_deg: float) -> list[tuple[float, float]]:
    angles = [math.radians(start_deg + 360 * i / n) for i in range(n)]
    return [(x + r * math.cos(a), y + r * math.sin(a)) for a in angles]


def vocabulary_words() -> set[str]:
    """Every word the questions and answers can use."""
    words: set[str] = set()
    texts = list(QUESTIONS.values()) + [t for v in ANSWERS.values() for t in (v if isinstance(v, tuple) else (v,))]
    texts += [DESCRIBE_QUESTION, *DESCRIBE_PARTS.values(), *ARTICLES]
    for text in texts:
        words.update(re.findall(r"[a-z]+", re.sub(r"\{[a-z]+\}", " ", text.lower())))
    for pair in SHAPES:
        words.update(pair)
    words.update(IMAGE_COLORS)
    words.update(PRINTED_WORDS)
    words.update(POSITIONS)
    for _, phrase in POSITIONS.values():
        words.update(phrase.split())
    words.update(number_words(n) for n in range(1, 9))
    return words
