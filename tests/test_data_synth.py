"""Synthetic-data recipes: vocabulary, held-out splits, drawn images, speech synthesis, lectures, the build."""

import hashlib
import json
import random
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from lyra.data import corpus, lectures, synth_images
from lyra.data.build import LONG_CLIP_SECONDS, PRESETS, BuildConfig, build, main, plan, selected
from lyra.data.corpus import (
    HOMOPHONE_GROUPS,
    SentenceGenerator,
    number_words,
    ordinal_words,
    split_of,
    vocabulary,
    words_of,
    year_words,
)
from lyra.data.manifest import read_manifest
from lyra.data.synth_images import IMAGE_COLORS, make_image_qa
from lyra.data.synth_speech import ANSWER_VOICE, EspeakSynthesizer, PiperSynthesizer, Voice

from lyra.vocoder import EMBEDDED_VOCODER

# ---------------------------------------------------------------------- vocabulary


def test_vocabulary_file_is_current_and_large():
    published = corpus.read_vocabulary()
    assert published == vocabulary(), "data/vocabulary.txt is stale: run lyra.data.corpus.write_vocabulary()"
    assert len(published) >= 500
    assert all(re.fullmatch(r"[a-z]+", w) for w in published)


def test_every_generated_word_is_in_the_vocabulary_and_every_word_is_used():
    vocab = set(vocabulary())
    used: set[str] = set()
    gen = SentenceGenerator(3)
    for s in gen.generate(4000, "train") + gen.generate(200, "test"):
        used.update(s.words)
    rng = random.Random(0)
    for _ in range(1500):
        qa = make_image_qa(rng)
        used.update(words_of(qa.question) + words_of(qa.answer) + words_of(qa.answer_sentence))
        used.update(words_of(synth_images.DESCRIBE_QUESTION) + words_of(synth_images.describe(qa.items)))
    for split in ("train", "test"):
        for needle in lectures.make_needles(rng, 300, split):
            used.update(words_of(needle.fact) + words_of(needle.question) + words_of(needle.answer))
    used.update(words_of(lectures.INTRO.format(topic="history")))
    assert used - vocab == set()
    assert vocab - used == set(), "vocabulary words that no recipe says"


def test_no_homophone_pairs_in_the_vocabulary():
    vocab = set(vocabulary())
    for group in HOMOPHONE_GROUPS:
        present = [w for w in group if w in vocab]
        assert len(present) <= 1, f"homophones in the vocabulary: {present}"
    for kept in ("harbor", "two", "four", "eight", "gray", "color", "right", "red", "blue"):
        assert kept in vocab


def _espeak_ipa(words: list[str]) -> list[str]:
    text = "\n".join(w + "." for w in words)
    out = subprocess.run(["espeak-ng", "-q", "-v", "en-us", "--ipa", "--stdin"], input=text.encode(),
                         capture_output=True, check=True).stdout.decode()
    return [line.strip() for line in out.splitlines() if line.strip()]


def test_no_two_vocabulary_words_sound_alike_to_espeak():
    vocab = vocabulary()
    ipa = _espeak_ipa(vocab)
    assert len(ipa) == len(vocab)
    vowels = "aeiouæɑɒɔəɛɜɪʊʌɐɚᵻ"
    by_sound = defaultdict(list)
    for word, sound in zip(vocab, ipa):
        sound = re.sub("[ˈˌː]", "", sound)
        sound = re.sub(f"(?<=[{vowels}])[tdɾ](?=[{vowels}])", "ɾ", sound)  # US flapping: metal ~ medal
        by_sound[sound].append(word)
    alike = [words for words in by_sound.values() if len(words) > 1]
    assert alike == []
    # The check can fail: known homophones collide under it.
    assert len({re.sub("[ˈˌː]", "", s) for s in _espeak_ipa(["harbor", "harbour", "flower", "flour"])}) == 2


@pytest.mark.parametrize("n, words", [
    (0, "zero"), (7, "seven"), (42, "forty two"), (100, "one hundred"), (305, "three hundred and five"),
    (2012, "two thousand and twelve"), (12345, "twelve thousand three hundred and forty five"),
])
def test_number_words(n, words):
    assert number_words(n) == words


def test_dates_and_years():
    assert ordinal_words(3) == "third" and ordinal_words(21) == "twenty first" and ordinal_words(30) == "thirtieth"
    assert year_words(1984) == "nineteen eighty four" and year_words(2007) == "two thousand and seven"
    with pytest.raises(ValueError):
        year_words(1905)


# ---------------------------------------------------------------------- splits


def test_held_out_sentences_never_reach_training():
    train = {s.text for s in SentenceGenerator(0).generate(3000, "train")}
    test = {s.text for s in SentenceGenerator(1).generate(300, "test")}
    assert len(train) == 3000 and len(test) == 300
    assert train.isdisjoint(test)
    assert all(split_of(t) == "test" for t in test) and all(split_of(t) == "train" for t in train)
    assert split_of("The museum in Paris, keeps ten books!") == split_of("the museum in paris keeps ten books")
    gen = SentenceGenerator(2)
    held = sum(split_of(gen.sentence().text) == "test" for _ in range(4000))
    assert 0.03 < held / 4000 < 0.07


def test_sentences_are_reproducible_from_the_seed():
    a = [s.text for s in SentenceGenerator(5).generate(50)]
    assert a == [s.text for s in SentenceGenerator(5).generate(50)]
    assert a != [s.text for s in SentenceGenerator(6).generate(50)]
    assert all(s[0].isupper() and s.endswith(".") for s in a)


# ---------------------------------------------------------------------- images


def test_images_are_reproducible_and_answers_match_the_pixels():
    for seed in range(40):
        qa = make_image_qa(random.Random(seed))
        again = make_image_qa(random.Random(seed))
        assert qa.question == again.question and qa.image.tobytes() == again.image.tobytes()
        pixels = np.asarray(qa.image).astype(int)
        for item in qa.items:
            if item.kind != "word":  # a shape's centre has its colour
                assert np.abs(pixels[int(item.y), int(item.x)] - IMAGE_COLORS[item.color]).max() <= 1
        if qa.kind == "count":
            shape, color = next((i.kind, i.color) for i in qa.items if qa.question.split()[3].startswith(i.kind)
                                 and i.color == qa.question.split()[2])
            n = sum(i.kind == shape and i.color == color for i in qa.items)
            assert qa.answer == number_words(n)
        if qa.kind == "word":
            assert qa.answer == qa.items[0].text
            ink = np.abs(pixels - np.array(IMAGE_COLORS[qa.items[0].color])).max(axis=2) < 30
            assert ink.sum() > 50  # the word is really printed in its colour


def test_every_question_kind_is_drawn():
    rng = random.Random(1)
    for kind in synth_images.QUESTION_KINDS:
        qa = make_image_qa(rng, kind)
        assert qa.kind == kind and qa.answer and qa.question.endswith("?") and qa.answer_sentence.endswith(".")
        assert qa.image.size == (synth_images.IMAGE_SIZE, synth_images.IMAGE_SIZE)


def test_describe_names_everything_drawn_from_the_left():
    vocab = set(vocabulary())
    for seed in range(30):
        qa = make_image_qa(random.Random(seed))
        text = synth_images.describe(qa.items)
        assert text[0].isupper() and text.endswith(".") and set(re.findall(r"[a-z]+", text.lower())) <= vocab
        ordered = sorted(qa.items, key=lambda item: item.x)
        mentions = [m.group(0) for m in re.finditer(r"the word \w+ in \w+|\ban? \w+ \w+", text.lower())]
        assert len(mentions) == len(ordered)
        for mention, item in zip(mentions, ordered):
            want = f"the word {item.text} in {item.color}" if item.kind == "word" else f"{item.color} {item.kind}"
            assert mention.endswith(want), (mention, item)
    items = [synth_images.DrawnItem("star", "orange", 150, 20, 10), synth_images.DrawnItem("circle", "red", 30, 50, 10)]
    assert synth_images.describe(items) == "A red circle and an orange star."


def test_cell_labels_follow_the_drawing():
    from lyra.data.synth_images import CELL_COLORS, CELL_KINDS, DrawnItem, cell_labels

    circle = DrawnItem("circle", "red", 28 * 5 + 14, 28 * 2 + 14, 20)  # centred in row 2, column 5 of 8 x 8
    word = DrawnItem("word", "blue", 60, 196, 36, "lamp")  # rows 6 and 7
    kinds, colors = cell_labels([circle, word])
    assert len(kinds) == len(colors) == 64
    assert (kinds[2 * 8 + 5], colors[2 * 8 + 5]) == (CELL_KINDS.index("circle"), CELL_COLORS.index("red"))
    assert kinds[0] == colors[0] == 0 and kinds[63] == 0  # empty corners are background
    word_cells = {i for i, k in enumerate(kinds) if k == CELL_KINDS.index("word")}
    assert word_cells and all(i // 8 in (6, 7) and colors[i] == CELL_COLORS.index("blue") for i in word_cells)
    assert {i for i, k in enumerate(kinds) if k == CELL_KINDS.index("circle")} <= {13, 20, 21, 22, 29}
    covered = cell_labels([DrawnItem("square", "green", 112, 112, 4)])[0]  # 8 x 8 px: under a cell's minimum
    assert set(covered) == {0}
    qa = make_image_qa(random.Random(3), "count_all")
    painted = {CELL_KINDS[k] for k in cell_labels(qa.items)[0]} - {"background"}
    assert painted == {item.kind for item in qa.items}  # every shape holds at least one cell (r >= 12 px)
    with pytest.raises(ValueError, match="equal cells"):
        cell_labels([circle], cells=5)


def test_cell_words_name_the_word_on_its_cells_only():
    from lyra.data.synth_images import CELL_KINDS, PRINTED_WORDS, DrawnItem, cell_labels, cell_words

    circle = DrawnItem("circle", "red", 28 * 5 + 14, 28 * 2 + 14, 20)
    word = DrawnItem("word", "blue", 60, 196, 36, "lamp")
    kinds, _ = cell_labels([circle, word])
    words = cell_words([circle, word], kinds)
    lamp = 1 + PRINTED_WORDS.index("lamp")
    assert {i for i, w in enumerate(words) if w} == {i for i, k in enumerate(kinds) if k == CELL_KINDS.index("word")}
    assert set(words) == {0, lamp}
    assert set(cell_words([circle], cell_labels([circle])[0])) == {0}  # no word drawn: nothing to read
    with pytest.raises(ValueError, match="at most one word"):
        cell_words([word, word], kinds)


# ---------------------------------------------------------------------- speech


def test_espeak_speech_is_16k_and_deterministic():
    speak = EspeakSynthesizer()
    text = "Professor Morgan measured forty two green bottles."
    a, b = speak(text), speak(text)
    assert a.dtype == np.float32 and np.array_equal(a, b)
    assert 1.5 < len(a) / 16000 < 6 and abs(float(np.abs(a).max()) - 0.9) < 1e-3
    fast = speak(text, Voice("espeak", 300, 50, "f2"))
    assert len(fast) < len(a)


def test_piper_speech_is_reproducible_from_its_seed():
    text = "The red lamp is on the table."
    first = PiperSynthesizer(seed=3, threads=1)
    a1, a2 = first(text), first(text, Voice("piper", 1.3))
    second = PiperSynthesizer(seed=3, threads=1)
    assert np.array_equal(a1, second(text)) and np.array_equal(a2, second(text, Voice("piper", 1.3)))
    assert len(a2) > len(first(text, Voice("piper", 0.8)))
    assert 1.0 < len(a1) / 16000 < 4.0


def test_piper_without_noise_speaks_a_text_the_same_way_every_time():
    """The answer voice: one rendering per text, so a spoken answer has one unit sequence to learn."""
    text = "The red lamp is on the table."
    speak = PiperSynthesizer(seed=3, threads=1)
    fixed = Voice("piper", 1.0, noise=False)
    assert np.array_equal(speak(text, fixed), speak(text, fixed))
    assert np.array_equal(speak(text, fixed), PiperSynthesizer(seed=5, threads=1)(text, fixed))
    assert not np.array_equal(speak(text), speak(text))  # with noise every rendering differs
    assert fixed.to_json() == {"engine": "piper", "length_scale": 1.0, "noise": False}
    assert Voice("piper", 1.0).to_json() == {"engine": "piper", "length_scale": 1.0}


# ---------------------------------------------------------------------- lectures


def test_lecture_is_streamed_with_its_needles(tmp_path):
    speak = EspeakSynthesizer()
    lecture = lectures.write_lecture(tmp_path / "l.wav", minutes=0.5, speak=lambda t: speak(t, Voice("espeak", 200)),
                                     seed=4, n_needles=3, split="test")
    info = sf.info(str(tmp_path / "l.wav"))
    assert info.samplerate == 16000 and abs(info.frames / 16000 - lecture.duration) < 1e-6
    assert 30 <= lecture.duration < 45
    assert len(lecture.needles) == 3 and len({n.needle.question for n in lecture.needles}) == 3
    facts = [s.text for s in lecture.segments]
    for placed in lecture.needles:
        assert facts.count(placed.needle.fact) == 1
        assert set(words_of(placed.needle.answer)) <= set(words_of(placed.needle.fact))
        assert split_of(placed.needle.fact) == "test"
        seg = next(s for s in lecture.segments if s.text == placed.needle.fact)
        assert (seg.start, seg.end) == (placed.start, placed.end) and 0 < placed.depth < 1
    assert all(split_of(t) == "test" for t in facts[1:])
    lines = [json.loads(x) for x in lecture.segments_file.read_text().splitlines()]
    assert [x["text"] for x in lines] == facts and all(a["end"] <= b["start"] for a, b in zip(lines, lines[1:]))


# ---------------------------------------------------------------------- the build


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "build.json" and ".parts" not in p.parts}


def test_build_is_reproducible_disjoint_and_independent_of_workers(tmp_path):
    settings = dict(PRESETS["tiny"], use_piper=False, asr_train=10, asr_test=5, block_size=3)
    one = build(BuildConfig(out=tmp_path / "a", seed=7, **settings))
    build(BuildConfig(out=tmp_path / "b", seed=7, workers=2, **settings))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert one["manifests"]["asr/train"]["records"] == 10

    train = {r.speech_asr for r in read_manifest(tmp_path / "a" / "asr" / "train.jsonl")}
    test = {r.speech_asr for r in read_manifest(tmp_path / "a" / "asr" / "test_espeak.jsonl")}
    assert len(train) == 10 and len(test) == 5 and train.isdisjoint(test)
    for r in read_manifest(tmp_path / "a" / "image_qa" / "train.jsonl"):
        assert r.image_paths()[0].is_file() and r.speech_paths()[0].is_file()
    lectures_test = read_manifest(tmp_path / "a" / "lectures" / "test.jsonl")
    assert all(r.long_speech and r.extra["needle_fact"] for r in lectures_test)
    for r in read_manifest(tmp_path / "a" / "lectures" / "train.jsonl"):  # each needle's fact, for whole answers
        assert r.extra["needles"] and all(n["answer"] in n["fact"] for n in r.extra["needles"])

    # A second run finds every block done and rewrites the same manifests.
    before = _digest(tmp_path / "a")
    build(BuildConfig(out=tmp_path / "a", seed=7, **settings))
    assert _digest(tmp_path / "a") == before


def test_only_builds_the_named_manifests_with_the_items_of_a_whole_build(tmp_path):
    settings = dict(PRESETS["tiny"], use_piper=False, asr_train=6, asr_test=3, block_size=3)
    build(BuildConfig(out=tmp_path / "whole", seed=5, **settings))
    part = build(BuildConfig(out=tmp_path / "part", seed=5, only=("asr/test_espeak", "lectures"), **settings))
    assert set(part["manifests"]) == {"asr/test_espeak", "lectures/train", "lectures/test"}
    assert not (tmp_path / "part" / "asr" / "train.jsonl").exists()
    whole, built = _digest(tmp_path / "whole"), _digest(tmp_path / "part")
    assert built and all(whole[name] == digest for name, digest in built.items())
    assert any(name.startswith("lectures/") and name.endswith(".flac") for name in built)
    # A second part of the same build: build.json lists both parts' manifests.
    second = build(BuildConfig(out=tmp_path / "part", seed=5, only=("image_qa/test",), **settings))
    assert {"asr/test_espeak", "lectures/test", "image_qa/test", "image_qa/test_typed"} <= set(second["manifests"])
    assert json.loads((tmp_path / "part" / "build.json").read_text())["manifests"] == second["manifests"]
    with pytest.raises(ValueError, match="asr/test_piper.*asr/train"):  # no Piper conditions without Piper
        selected(plan(BuildConfig(out=tmp_path / "x", **settings)), ("asr/test_piper",))
    result = CliRunner().invoke(main, ["--out", str(tmp_path / "cli"), "--preset", "tiny", "--only", "asr/nope"])
    assert result.exit_code == 2 and "--only names no manifest of this build: asr/nope" in result.output


def test_plan_includes_piper_test_conditions():
    blocks = plan(BuildConfig(out=Path("/nonexistent"), seed=0, **PRESETS["tiny"]))
    voices = {b.manifest: b.items[0]["voice"] for b in blocks if b.kind == "asr"}
    assert voices["asr/test_piper_fast"] == {"engine": "piper", "rate": 0.8, "pitch": 50, "variant": "", "noise": True}
    assert voices["asr/test_piper_slow"]["rate"] == 1.3 and voices["asr/test_espeak"]["engine"] == "espeak"
    texts = {b.manifest: [i["text"] for i in b.items] for b in blocks if b.kind == "asr"}
    assert texts["asr/test_piper"] == texts["asr/test_espeak"]
    assert set(texts["asr/train"]).isdisjoint(texts["asr/test_piper"])


def test_spoken_answers_are_in_the_vocoders_voice():
    """Stage 4 learns the nano vocoder's units of the answers: only speech in its own voice comes back as words."""
    from lyra.data import vocoder_recipe

    blocks = plan(BuildConfig(out=Path("/nonexistent"), seed=0, **PRESETS["tiny"]))
    voices = {Voice(**item["answer_voice"]) for b in blocks if b.kind == "speechgen" for item in b.items}
    assert voices == {ANSWER_VOICE}
    assert vocoder_recipe.parse_voice(vocoder_recipe.RecipeSettings().voice) == ANSWER_VOICE
    shipped = json.loads((EMBEDDED_VOCODER / "recipe.json").read_text())["settings"]["voice"]
    assert vocoder_recipe.parse_voice(shipped) == ANSWER_VOICE


def test_vocoder_recipe_voice_option():
    from lyra.data.vocoder_recipe import parse_voice, voice_spec

    assert parse_voice("piper:0.8") == Voice("piper", 0.8)
    assert parse_voice("espeak") == Voice("espeak", 160) and parse_voice("piper") == Voice("piper", 1.0)
    assert parse_voice("piper:1.0:fixed") == Voice("piper", 1.0, noise=False)
    for voice in (Voice("piper", 0.8), Voice("piper", 1.0, noise=False), Voice("espeak", 160)):
        assert parse_voice(voice_spec(voice)) == voice
    for bad in ("festival:1", "piper:9", "espeak:fast", "espeak:160:fixed", "piper:1:loud"):
        with pytest.raises(ValueError, match="--voice"):
            parse_voice(bad)


def test_vocoder_recipe_checks_the_kept_units_before_it_speaks(tmp_path):
    from lyra.data.vocoder_recipe import RecipeSettings, build as build_vocoder

    with pytest.raises(FileNotFoundError, match="nowhere/model.safetensors"):
        build_vocoder(tmp_path / "out", RecipeSettings(units_from=str(tmp_path / "nowhere"), voice="espeak:160"),
                      log=lambda *_: pytest.fail("the recipe started before checking --units-from"))
    assert not (tmp_path / "out").exists()


def test_speechgen_image_fraction_sets_the_share_of_image_answers():
    def kinds(fraction):
        settings = dict(PRESETS["tiny"], speechgen_train=8, speechgen_image_fraction=fraction)
        blocks = plan(BuildConfig(out=Path("/nonexistent"), seed=0, **settings))
        return [item["kind"] for b in blocks if b.manifest == "speech_gen/train" for item in b.items]

    assert kinds(0.5) == ["say", "image"] * 4  # the default: every other one, as before the option
    assert kinds(0.0) == ["say"] * 8 and kinds(1.0) == ["image"] * 8 and kinds(0.25).count("image") == 2
    with pytest.raises(ValueError, match="speechgen_image_fraction must lie in"):
        BuildConfig(out=Path("/nonexistent"), speechgen_image_fraction=1.5)
    result = CliRunner().invoke(main, ["--out", "/nonexistent", "--speechgen-image-fraction", "2"])
    assert result.exit_code == 2 and "speechgen_image_fraction must lie in [0, 1], got 2.0" in result.output


def test_short_spoken_answers_say_the_answer_alone(tmp_path):
    """--speechgen-answers short: the spoken image questions are answered with the word the nano model says
    ("gray"), in the answer voice; the default keeps the sentence and the item plan of earlier builds."""
    settings = dict(PRESETS["tiny"], speechgen_train=2, speechgen_test=0, speechgen_image_fraction=1.0,
                    only=("speech_gen/train",))
    sentence = plan(BuildConfig(out=tmp_path / "s", seed=4, **settings))
    assert all("answer" not in item for b in sentence for item in b.items)
    build(BuildConfig(out=tmp_path / "short", seed=4, speechgen_answers="short", **settings))
    records = list(read_manifest(tmp_path / "short" / "speech_gen" / "train.jsonl"))
    seeds = [item["seed"] for b in selected(sentence, ("speech_gen/train",)) for item in b.items]
    for record, seed in zip(records, seeds, strict=True):
        qa = make_image_qa(random.Random(seed))
        assert record.conversations[-1].value == qa.answer and record.speech_asr == qa.question
        assert record.extra["tgt_voice"] == ANSWER_VOICE.to_json() and 0.2 < record.extra["tgt_duration"] < 1.2
    with pytest.raises(ValueError, match="speechgen_answers must be 'sentence' or 'short', got 'long'"):
        BuildConfig(out=tmp_path, speechgen_answers="long")


def test_multi_sentence_clips_fit_one_window(tmp_path):
    settings = dict(PRESETS["tiny"], use_piper=False, asr_train=2, asr_train_long=3, block_size=8)
    build(BuildConfig(out=tmp_path, seed=3, **settings))
    long = [r for r in read_manifest(tmp_path / "asr" / "train.jsonl") if "-long-" in r.id]
    assert len(long) == 3
    for r in long:
        sentences = re.split(r"(?<=[.!?]) ", r.speech_asr)
        assert len(sentences) >= 2 and r.conversations[-1].value == r.speech_asr
        assert all(split_of(x) == "train" for x in sentences)
        info = sf.info(str(r.speech_paths()[0]))
        assert info.duration <= LONG_CLIP_SECONDS + 0.01 and abs(info.duration - r.extra["duration"]) < 0.01


def test_changing_one_count_leaves_other_manifests_alone():
    """Each manifest has its own random stream: adding lectures (a second build pass) keeps earlier blocks valid."""
    def items(**changes):
        config = BuildConfig(out=Path("/nonexistent"), seed=0, **{**PRESETS["tiny"], **changes})
        return {b.part: b.items for b in plan(config) if not b.manifest.startswith("lectures/")}

    assert items(lecture_train=0, lecture_test_minutes=()) == items(lecture_train=3)
    with_long = items(asr_train_long=2)
    assert {k: v for k, v in with_long.items() if not k.startswith("asr__train")} == {
        k: v for k, v in items().items() if not k.startswith("asr__train")}


def test_a_finished_block_is_only_reused_by_a_build_that_plans_the_same_items(monkeypatch):
    """Blocks kept in DIR/.parts are named by what they hold: a build with another answer voice redoes the spoken
    answers (and only them) instead of taking the old voice's audio."""
    import lyra.data.build as build_module

    def parts():
        return {b.manifest: b.part for b in plan(BuildConfig(out=Path("/nonexistent"), seed=0, **PRESETS["tiny"]))}

    before = parts()
    monkeypatch.setattr(build_module, "ANSWER_VOICE", Voice("espeak", 123))
    after = parts()
    changed = {m for m in before if before[m] != after[m]}
    assert changed == {"speech_gen/train", "speech_gen/test"}


def test_held_out_check_ignores_image_answers_and_catches_sentence_leaks(tmp_path):
    from lyra.data.build import _check_held_out

    held_out = SentenceGenerator(1).generate(1, "test")[0].text
    image_answer = next(t for t in (f"There are {n} shapes." for n in ("two", "three", "four", "five", "six", "seven",
                                                                        "eight", "nine")) if split_of(t) == "test")

    def record(i, answer, image=False):
        human = "<image>\n<speech>" if image else "Say this sentence: " + answer
        return {"id": f"r{i}", **({"image": "x.png", "speech": "q.flac"} if image else {}),
                "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]}

    (tmp_path / "speech_gen").mkdir()
    for split in ("train", "test"):  # the same templated answer about two different drawn images
        lines = [record(0, image_answer, image=True)]
        (tmp_path / "speech_gen" / f"{split}.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    _check_held_out(tmp_path)
    with open(tmp_path / "speech_gen" / "train.jsonl", "a") as f:
        f.write(json.dumps(record(1, held_out)) + "\n")
    with open(tmp_path / "speech_gen" / "test.jsonl", "a") as f:
        f.write(json.dumps(record(1, held_out)) + "\n")
    with pytest.raises(RuntimeError, match="held-out sentences reached training manifests"):
        _check_held_out(tmp_path)


def test_command_line(tmp_path):
    result = CliRunner().invoke(main, ["--out", str(tmp_path / "cli"), "--preset", "tiny", "--no-piper",
                                       "--asr-train", "2", "--lecture-test-minutes", "0.2"])
    assert result.exit_code == 0, result.output
    assert "asr/train: 2 records" in result.output
    assert (tmp_path / "cli" / "vocabulary.txt").read_text().split() == vocabulary()
    summary = json.loads((tmp_path / "cli" / "build.json").read_text())
    assert summary["config"]["lecture_test_minutes"] == [0.2]
