"""Training smoke tests: every stage on a handful of real samples (espeak-ng speech, drawn images) with a tiny
model; the loss goes down, only the stage's parameters move, the saved folder reloads to the same outputs,
resuming from a Trainer checkpoint equals an uninterrupted run, and the export/eval paths work."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from lyra.data.collator import LyraCollator
from lyra.data.datasets import ASRDataset, BrokenSampleError, EncodedSample, ImageQADataset
from lyra.data.manifest import GPT, Turn, read_manifest
from safetensors.torch import save_file
from training_data import build_smoke_data

from lyra.pretrained import load_pretrained
from lyra.training import load_train_config
from lyra.training.config import TrainConfigError
from lyra.training.data import FrameCachedDataset, TrainCollator, encoder_frames_given, load_frames, speech_key
from lyra.training.trainer import build_model, train

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "train" / "smoke"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Smoke data, a compact tokenizer and a random tiny model folder that stages 1-4 start from."""
    from lyra.data.tokenizer import build_compact_tokenizer, training_texts

    root = tmp_path_factory.mktemp("training")
    build_smoke_data(root / "data")
    tokenizer = build_compact_tokenizer(root / "tokenizer", texts=list(training_texts(0, sentences=2000, image_qa=500)))
    config = load_train_config(SMOKE / "stage0.yaml", **{"model.tokenizer": str(tokenizer),
                                                         "run.output_dir": str(root / "base")})
    model, processor = build_model(config)
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    return {"root": root, "data": root / "data", "tokenizer": tokenizer, "base": root / "base"}


def run_stage(workspace, stage: int, name: str, resume: bool = False, **overrides):
    settings = {"data.root": str(workspace["data"]), "run.output_dir": str(workspace["root"] / name)}
    if stage == 0:
        settings["model.tokenizer"] = str(workspace["tokenizer"])
    else:
        settings["model.init_from"] = str(workspace["base"])
    settings.update(overrides)
    return train(load_train_config(SMOKE / f"stage{stage}.yaml", **settings), resume=resume, progress=False)


def losses(result, key: str = "loss") -> list[float]:
    return [h[key] for h in result.log_history if key in h and "train_runtime" not in h]


def parameters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before: dict, after, prefix: str = "") -> set[str]:
    now = dict(after.named_parameters())
    return {n for n, p in before.items() if n.startswith(prefix) and not torch.equal(p, now[n].detach())}


def asr_batch(workspace, processor, n: int = 2):
    records = read_manifest(workspace["data"] / "asr" / "train.jsonl")[:n]
    dataset = ASRDataset(records, processor)
    return LyraCollator.for_processor(processor)([dataset[i] for i in range(len(dataset))])


def assert_reloads(result, workspace):
    """The saved folder gives the same outputs as the model in memory."""
    loaded = load_pretrained(result.output_dir, attn_implementation="eager")
    batch = asr_batch(workspace, loaded.processor)
    model = result.model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        got = loaded.model(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_written_needle_questions():
    from lyra.data.corpus import split_of
    from lyra.data.lectures import NEEDLE_TEMPLATES

    from lyra.training.data import needle_records

    records = needle_records(40, seed=5)
    assert [r.conversations for r in records] == [r.conversations for r in needle_records(40, seed=5)]
    questions = {t[1].split("{")[0] for t in NEEDLE_TEMPLATES}
    for r in records:
        human, gpt = r.conversations
        passage, question = human.value.rsplit("\n", 1)
        assert any(question.startswith(q) for q in questions) and gpt.value in passage
        facts = [s for s in passage.split(". ") if any(t[0].split("{")[0] in s for t in NEEDLE_TEMPLATES)]
        assert 1 <= len(facts) and all(split_of(f.rstrip(".") + ".") == "train" for f in facts)


def test_written_needle_drill_asks_every_fact_in_turn():
    from lyra.training.data import needle_records

    records = needle_records(30, seed=2, facts=(7, 8), questions=8)
    assert records[0].conversations != needle_records(30, seed=3, facts=(7, 8), questions=8)[0].conversations
    for r in records:
        passage = r.conversations[0].value.rsplit("\n", 1)[0]
        questions = [t.value.rsplit("\n", 1)[-1] for t in r.conversations[0::2]]
        answers = [t.value for t in r.conversations[1::2]]
        assert 7 <= len(questions) == len(answers) <= 8 and len(set(questions)) == len(questions)
        assert all(answer in passage for answer in answers)
        assert "\n" not in "".join(t.value for t in r.conversations[2::2])  # the passage is written once
    assert {len(r.conversations) for r in records} == {14, 16}
    assert all(len(r.conversations) == 4 for r in needle_records(10, seed=2, facts=(2, 2), questions=8))
    said = needle_records(30, seed=2, facts=(7, 8), questions=8, answers="sentence")
    assert [r.conversations[0::2] for r in said] == [r.conversations[0::2] for r in records]  # same passages
    for r, short in zip(said, records):
        passage = r.conversations[0].value.rsplit("\n", 1)[0]
        for answer, word in zip(r.conversations[1::2], short.conversations[1::2]):
            assert f" {word.value} " in f" {answer.value[:-1]} " and answer.value[1:] in passage


def test_written_needle_passages_as_long_as_asked():
    import re

    from lyra.training.data import NEEDLE_PASSAGE, needle_records

    assert [r.conversations for r in needle_records(5, seed=4)] == \
        [r.conversations for r in needle_records(5, seed=4, sentences=NEEDLE_PASSAGE)]
    for lowest, highest in ((0, 0), (30, 40)):
        for r in needle_records(12, seed=4, facts=(2, 2), sentences=(lowest, highest)):
            passage = r.conversations[0].value.rsplit("\n", 1)[0]
            said = len(re.findall(r"[.!?](?:\s|$)", passage))
            assert lowest + 2 <= said <= highest + 2


def test_drawn_image_records(tmp_path):
    from lyra.data.synth_images import DESCRIBE_QUESTION, QUESTIONS

    from lyra.training.data import drawn_image_records

    records = drawn_image_records(6, tmp_path, seed=3)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 6 and not any(".partial" in f.name for f in files)
    stamps = [f.stat().st_mtime_ns for f in files]
    again = drawn_image_records(6, tmp_path, seed=3)  # the same questions, the images reused as written
    assert [r.conversations for r in again] == [r.conversations for r in records]
    assert [f.stat().st_mtime_ns for f in sorted(tmp_path.iterdir())] == stamps
    templates = [q.split("{")[0] for q in QUESTIONS.values()]
    for i, r in enumerate(records):  # every other record asks for the whole drawing, the rest one question
        human, gpt = r.conversations
        assert human.value.startswith("<image>\n") and r.image_paths()[0].is_file() and gpt.value
        if i % 2 == 0:
            assert human.value[8:] == DESCRIBE_QUESTION and gpt.value.endswith(".")
        else:
            assert any(human.value[8:].startswith(t) for t in templates) and human.value != DESCRIBE_QUESTION
    other = drawn_image_records(6, tmp_path / "other", seed=4)
    assert [r.conversations for r in other] != [r.conversations for r in records]


def test_drawn_image_records_drill_the_weighted_kinds(tmp_path):
    from lyra.data.synth_images import DESCRIBE_QUESTION, IMAGE_COLORS, QUESTIONS

    from lyra.training.data import drawn_image_records

    default = drawn_image_records(40, tmp_path, seed=5)
    drilled = drawn_image_records(40, tmp_path, seed=5, kinds={"color": 3, "describe": 1, "word": 0})
    assert len(list(tmp_path.iterdir())) == 80  # drilled images never overwrite the default mixture's
    questions = [r.conversations[0].value[8:] for r in drilled]
    colour = QUESTIONS["color"].split("{")[0]
    n_colour = sum(q.startswith(colour) for q in questions)
    assert n_colour + questions.count(DESCRIBE_QUESTION) == 40 and 22 <= n_colour <= 38  # 3 : 1 odds, no words
    for record in drilled:  # a colour question is answered by a colour
        if record.conversations[0].value[8:].startswith(colour):
            assert record.conversations[1].value in IMAGE_COLORS
    again = drawn_image_records(40, tmp_path, seed=5, kinds={"color": 3, "describe": 1, "word": 0})
    assert [r.conversations for r in again] == [r.conversations for r in drilled]
    assert [r.conversations for r in drawn_image_records(40, tmp_path, seed=5)] == [r.conversations for r in default]


def test_drawn_image_answers_said_whole(tmp_path):
    from lyra.data.synth_images import DESCRIBE_QUESTION

    from lyra.training.data import drawn_image_records, whole_answers

    kinds = {"color": 2, "count": 1, "describe": 1}
    short = drawn_image_records(30, tmp_path, seed=6, kinds=kinds)
    said = drawn_image_records(30, tmp_path, seed=6, kinds=kinds, answers="sentence")
    asked = 0
    for s, w in zip(short, said):
        assert s.conversations[0] == w.conversations[0] and s.image_paths() == w.image_paths()
        if s.conversations[0].value.endswith(DESCRIBE_QUESTION):
            assert w.conversations[1] == s.conversations[1] and not w.extra
            continue
        asked += 1
        answer, sentence = s.conversations[1].value, w.conversations[1].value
        assert sentence == w.extra["answer_sentence"] == s.extra["answer_sentence"] != answer
        assert f" {answer} " in f" {sentence[:-1]} " and sentence.endswith(".")
        assert whole_answers(s) == [sentence]  # the short records say it whole where a stage asks
    assert asked >= 15


def test_stage0_base_pass_trains_llm_vision_and_speech_projector(workspace):
    before = parameters(load_pretrained(workspace["base"]).model)  # the same seed builds the same fresh model
    result = run_stage(workspace, 0, "stage0")
    assert set(result.trainable) == {"llm", "vision", "projector:speech"}
    moved = changed(before, result.model)
    for prefix in ("backbone.model.language_model.", "backbone.model.visual.", "speech_projectors.speech."):
        assert any(n.startswith(prefix) for n in moved), prefix
    assert not any(n.startswith(("speech_encoder.", "speech_projectors.long_speech.")) for n in moved)
    curve = losses(result)
    assert len(curve) == 6 and curve[-1] < curve[0] - 0.3, curve
    assert_reloads(result, workspace)
    assert (result.output_dir / "tokenizer.json").exists() and (result.output_dir / "train_config.yaml").exists()
    summary = json.loads((result.output_dir / "train_summary.json").read_text())
    assert summary["global_step"] == 6 and summary["stage"] == 0


def run_tower(workspace, name: str, resume: bool = False, **overrides):
    settings = {"model.init_from": str(workspace["base"]), "run.output_dir": str(workspace["root"] / name), **overrides}
    return train(load_train_config(SMOKE / "stage0_tower.yaml", **settings), resume=resume, progress=False)


def test_stage0_tower_pass_trains_a_fresh_tower_alone(workspace):
    base = parameters(load_pretrained(workspace["base"]).model)
    result = run_tower(workspace, "tower")
    visual = "backbone.model.visual."
    assert result.trainable == {"vision": sum(p.numel() for n, p in base.items() if n.startswith(visual))}
    now = dict(result.model.named_parameters())
    assert not {n for n, p in base.items() if not n.startswith(visual) and not torch.equal(p, now[n])}
    assert all(not torch.equal(p, now[n]) for n, p in base.items() if n.startswith(visual) and p.dim() > 1)  # fresh
    curve = losses(result)
    assert len(curve) == 6 and curve[-1] < curve[0] - 0.5, curve
    assert set(result.held_out) == {"kind_accuracy", "color_accuracy", "word_accuracy"}
    assert all(0 <= v <= 1 for v in result.held_out.values())
    reloaded = dict(load_pretrained(result.output_dir, attn_implementation="eager").model.named_parameters())
    for name, p in now.items():
        torch.testing.assert_close(reloaded[name], p, rtol=0, atol=0)
    summary = json.loads((result.output_dir / "train_summary.json").read_text())
    assert summary["global_step"] == 6 and summary["held_out"] == result.held_out


def test_drawn_cells_follow_the_kinds_and_label_words(workspace):
    from lyra.training.tower import DrawnCells, TowerHeads, collate_cells

    processor = load_pretrained(workspace["base"]).processor
    words = DrawnCells(6, processor, seed=1, kinds={"word": 1})
    shapes = DrawnCells(6, processor, seed=1, kinds={"count_all": 1})
    assert all(words[i]["words"].any() for i in range(6))  # every drawing holds a word, read on its cells
    assert not any(shapes[i]["words"].any() for i in range(6))
    model = load_pretrained(workspace["base"]).model
    heads = TowerHeads(model.visual, model.config.backbone_config.vision_config.hidden_size)
    batch = collate_cells([words[i] for i in range(3)])
    with_words = heads(**batch)["loss"]
    without = heads(**{k: v for k, v in batch.items() if k != "words"})["loss"]
    assert with_words > without  # the word head's loss is part of it where the drawings hold words


def test_stage0_tower_pass_resumes(workspace):
    straight = run_tower(workspace, "tower_straight", **{"optim.max_steps": 4, "run.save_steps": 2})
    run_tower(workspace, "tower_resumed", **{"optim.max_steps": 2, "run.save_steps": 2})
    resumed = run_tower(workspace, "tower_resumed", resume=True, **{"optim.max_steps": 4, "run.save_steps": 2})
    assert resumed.global_step == 4
    b = dict(resumed.model.named_parameters())
    for name, p in straight.model.named_parameters():
        torch.testing.assert_close(p, b[name], rtol=0, atol=1e-6)


def test_fresh_vision_takes_the_presets_shape(workspace, tmp_path):
    import yaml

    from lyra.training.trainer import with_fresh_vision

    model = load_pretrained(workspace["base"]).model
    preset = yaml.safe_load((SMOKE / "tiny_model.yaml").read_text())
    preset["backbone"]["vision"].update(depth=2, embed_dim=48, num_heads=3)
    (tmp_path / "wider.yaml").write_text(yaml.safe_dump(preset))
    fresh = with_fresh_vision(model, str(tmp_path / "wider.yaml"))
    assert len(fresh.visual.blocks) == 2 and fresh.config.backbone_config.vision_config.embed_dim == 48
    old = dict(model.named_parameters())
    for name, p in fresh.named_parameters():
        if not name.startswith("backbone.model.visual."):
            assert torch.equal(p, old[name]), name
    preset["backbone"]["vision"]["hidden_size"] = 32  # the merger must give the LLM's width
    (tmp_path / "narrow.yaml").write_text(yaml.safe_dump(preset))
    with pytest.raises(ValueError, match="width 32"):
        with_fresh_vision(model, str(tmp_path / "narrow.yaml"))


def test_stage0_gives_an_earlier_model_image_positions_and_trains_them(workspace):
    result = run_stage(workspace, 0, "stage0_positions", **{"model.init_from": str(workspace["base"]),
                                                            "model.image_positions": True})
    trained = result.model.image_positions
    assert trained is not None and trained.proj.weight.any()  # they start at zero: the image questions moved them
    loaded = load_pretrained(result.output_dir).model
    assert loaded.config.settings.image_positions.enabled
    assert torch.equal(loaded.image_positions.proj.weight, trained.proj.weight)
    # optim.positions_lr: a group of their own at that rate; the rest of the model at the stage's
    faster = run_stage(workspace, 0, "stage0_positions_lr", **{"model.init_from": str(workspace["base"]),
                                                               "model.image_positions": True,
                                                               "optim.positions_lr": 0.03})
    grown = faster.model.image_positions.proj.weight.abs().mean() / trained.proj.weight.abs().mean()
    assert grown > 3, float(grown)  # ten times the rate (3e-3): Adam's steps are ten times as long
    llm = "backbone.model.language_model.layers.0.mlp.down_proj.base_layer.weight"
    base = dict(load_pretrained(workspace["base"]).model.named_parameters())[llm]
    moved = [(dict(r.model.named_parameters())[llm] - base).abs().mean() for r in (result, faster)]
    assert 0.5 < moved[1] / moved[0] < 2, moved  # the LLM keeps the stage's rate


def test_stage0_leaves_the_frozen_groups_as_they_were(workspace):
    before = parameters(load_pretrained(workspace["base"]).model)
    result = run_stage(workspace, 0, "stage0_frozen", **{"model.init_from": str(workspace["base"]),
                                                         "optim.frozen": ["vision"]})
    assert set(result.trainable) == {"llm", "projector:speech"}
    moved = changed(before, result.model)
    assert any(n.startswith("backbone.model.language_model.") for n in moved)
    assert not any(n.startswith("backbone.model.visual.") for n in moved)
    with pytest.raises(TrainConfigError, match=r"optim.frozen: stage 0 does not train \['lora:speech'\]"):
        run_stage(workspace, 0, "stage0_bad", **{"optim.frozen": ["lora:speech"]})
    with pytest.raises(TrainConfigError, match="would train nothing"):
        run_stage(workspace, 1, "stage1_none", **{"optim.frozen": ["projector:speech"]})


def test_stage1_trains_only_the_speech_projector(workspace):
    before = parameters(load_pretrained(workspace["base"]).model)
    result = run_stage(workspace, 1, "stage1")
    assert set(result.trainable) == {"projector:speech"}
    curve = losses(result)
    assert curve[-1] < curve[0], curve
    moved = changed(before, result.model)
    assert moved and all(n.startswith("speech_projectors.speech.") for n in moved)
    assert_reloads(result, workspace)


def test_stage2_speech_lora_with_lcmr(workspace):
    before = parameters(load_pretrained(workspace["base"]).model)
    result = run_stage(workspace, 2, "stage2")
    curve, lcmr, ce = losses(result), losses(result, "lcmr"), losses(result, "ce")
    assert len(lcmr) == len(curve) == 6  # LCMR is on in this stage and logged apart from the CE
    assert curve[-1] < curve[0], curve
    for total, c, r in zip(curve, ce, lcmr):
        assert total == pytest.approx(c + 0.5 * r, rel=1e-4)
    moved = changed(before, result.model)
    assert any(".lora_B.speech." in n for n in moved) and any(n.startswith("speech_projectors.speech.") for n in moved)
    assert not any("long_speech" in n or n.startswith("speech_generator") for n in moved)
    assert_reloads(result, workspace)


def test_stage3_long_speech_adapter_and_projector(workspace):
    before = parameters(load_pretrained(workspace["base"]).model)
    result = run_stage(workspace, 3, "stage3")
    assert set(result.trainable) == {"lora:long_speech", "projector:long_speech"}
    curve = losses(result)
    assert curve[-1] < curve[0], curve
    moved = changed(before, result.model)
    assert moved and all(".long_speech." in n for n in moved)
    # The long-speech projector started from the speech projector (unchanged here) and moved from there.
    start = result.model.speech_projectors["speech"].linear2.bias
    assert not torch.equal(result.model.speech_projectors["long_speech"].linear2.bias, start)
    assert_reloads(result, workspace)


def test_stage3_continued_keeps_its_projector(workspace):
    """A curriculum's second part (model.continue_stage) starts from the first part's long-speech projector, not
    again from the speech projector. Learning rate 0: what each run starts from is what it ends with."""
    short = run_stage(workspace, 3, "stage3_short", **{"optim.max_steps": 2})
    still = {"optim.max_steps": 1, "optim.learning_rate": 0.0, "model.init_from": str(short.output_dir)}
    continued = run_stage(workspace, 3, "stage3_long", **still, **{"model.continue_stage": True})
    restarted = run_stage(workspace, 3, "stage3_again", **still)
    trained = short.model.speech_projectors["long_speech"].linear2.bias
    speech = short.model.speech_projectors["speech"].linear2.bias
    assert not torch.equal(trained, speech)
    assert torch.equal(continued.model.speech_projectors["long_speech"].linear2.bias, trained)
    assert torch.equal(restarted.model.speech_projectors["long_speech"].linear2.bias, speech)


def test_stage4_generator_only_and_export(workspace):
    before = parameters(load_pretrained(workspace["base"]).model)
    result = run_stage(workspace, 4, "stage4")
    curve, units, ce = losses(result), losses(result, "units"), losses(result, "ce")
    assert curve == pytest.approx(units) and curve[-1] < curve[0] - 0.5, curve
    assert max(ce) - min(ce) < 1e-4  # the LLM is frozen (the batch order only changes the float sums)
    moved = changed(before, result.model)
    assert moved and all(n.startswith("speech_generator.") for n in moved)
    exported = load_pretrained(result.export["path"])
    assert result.export["megabytes"] < 25
    state = dict(exported.model.named_parameters())
    for name, p in result.model.named_parameters():
        torch.testing.assert_close(state[name], p.detach().half().float(), rtol=0, atol=0)


def test_stage4_fits_the_generator_to_the_vocoders_units(workspace, tmp_path):
    """data.units_from names a vocoder with another unit inventory: the generator's output layer is rebuilt for
    it, trained, saved and reloaded at that size."""
    from lyra.vocoder import NanoVocoder, NanoVocoderConfig

    base = load_pretrained(workspace["base"]).model
    units = base.config.settings.speech_generator.num_units
    NanoVocoder(NanoVocoderConfig(num_units=2 * units)).save_pretrained(tmp_path / "vocoder")
    result = run_stage(workspace, 4, "stage4_units", **{"data.units_from": str(tmp_path / "vocoder")})
    generator = result.model.speech_generator
    assert generator.output_proj.out_features == 2 * units + 1 and generator.blank == 2 * units
    assert losses(result, "units")[-1] < losses(result, "units")[0]
    reloaded = load_pretrained(result.output_dir).model
    assert reloaded.config.settings.speech_generator.num_units == 2 * units
    torch.testing.assert_close(reloaded.speech_generator.output_proj.weight, generator.output_proj.weight)
    assert not base.speech_generator.resize_units(units)  # the same inventory: nothing changes


def test_stage4_gives_the_generator_frame_positions_and_trains_them(workspace):
    from lyra.training.trainer import with_frame_positions

    base = load_pretrained(workspace["base"]).model.eval()
    assert base.speech_generator.frame_embed is None
    grown = with_frame_positions(base).eval()
    states = torch.randn(2, 5, base.config.text_config.hidden_size)
    assert torch.equal(grown.speech_generator.predict(states), base.speech_generator.predict(states))  # from zero
    assert with_frame_positions(grown) is grown
    result = run_stage(workspace, 4, "stage4_places", **{"model.frame_positions": True})
    embed = result.model.speech_generator.frame_embed
    assert embed.weight.any() and losses(result, "units")[-1] < losses(result, "units")[0]
    loaded = load_pretrained(result.output_dir).model
    assert loaded.config.settings.speech_generator.frame_positions
    torch.testing.assert_close(loaded.speech_generator.frame_embed.weight, embed.weight)


def test_stage4_held_out_loss_and_the_best_checkpoint(workspace):
    """data.eval's loss (and the unit CTC) is logged every run.eval_steps; run.keep_best ends the run with the
    saved checkpoint whose held-out loss was lowest, and the summary gives that loss (its logged evaluation, not a
    second pass); a run whose last step was not evaluated is evaluated once more at the end."""
    held_out = [{"manifest": "speech_gen/test.jsonl", "task": "speech_generation"},
                {"manifest": "speech_gen/train.jsonl", "task": "speech_generation", "max_samples": 3}]  # 5: batches 4 + 1
    result = run_stage(workspace, 4, "stage4_best", **{"data.eval": held_out, "run.save_steps": 1, "run.keep_best": True,
                                                       "optim.learning_rate": 0.05})
    logged = [h for h in result.log_history if "eval_loss" in h]
    assert [h["step"] for h in logged] == [1, 2, 3, 4, 5, 6]
    assert all(h["eval_units"] == pytest.approx(h["eval_loss"], rel=1e-5) for h in logged)  # both means over samples
    assert all("eval_units" not in h for h in result.log_history if "loss" in h)  # the training log keeps its own
    evals = {h["step"]: h for h in logged}
    best = min(evals, key=lambda step: evals[step]["eval_loss"])
    assert result.held_out["best_step"] == best
    assert result.held_out["eval_loss"] == pytest.approx(evals[best]["eval_loss"], rel=1e-5)
    assert result.held_out["eval_units"] == pytest.approx(evals[best]["eval_units"], rel=1e-5)
    saved = load_pretrained(workspace["root"] / "stage4_best" / f"checkpoint-{best}").model
    kept = dict(result.model.named_parameters())
    for name, p in saved.speech_generator.named_parameters():
        torch.testing.assert_close(kept[f"speech_generator.{name}"], p, rtol=0, atol=0)
    summary = json.loads((result.output_dir / "train_summary.json").read_text())
    assert summary["held_out"]["best_step"] == best
    sparse = run_stage(workspace, 4, "stage4_sparse", **{"data.eval": held_out, "run.eval_steps": 4})
    logged = [h for h in sparse.log_history if "eval_loss" in h]
    assert [h["step"] for h in logged] == [4, 6]  # step 6 (the last) by the pass after training
    assert sparse.held_out == {key: pytest.approx(logged[-1][key]) for key in ("eval_loss", "eval_ce", "eval_units")}


def test_resume_from_checkpoint_equals_uninterrupted_run(workspace):
    straight = run_stage(workspace, 0, "straight", **{"optim.max_steps": 4, "run.save_steps": 2})
    run_stage(workspace, 0, "resumed", **{"optim.max_steps": 2, "run.save_steps": 2})
    resumed = run_stage(workspace, 0, "resumed", resume=True, **{"optim.max_steps": 4, "run.save_steps": 2})
    assert resumed.global_step == 4
    assert losses(resumed)[-1] == pytest.approx(losses(straight)[-1], rel=1e-6)
    b = dict(resumed.model.named_parameters())
    for name, p in straight.model.named_parameters():
        torch.testing.assert_close(p, b[name], rtol=0, atol=1e-6)


def test_resume_without_checkpoint_is_a_clear_error(workspace, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_stage(workspace, 1, "never", resume=True, **{"run.output_dir": str(tmp_path / "empty")})


def test_cached_frames_give_the_encoder_path_loss(workspace):
    """The frame cache (encoder run once, frames stored) trains on exactly what the model computes itself."""
    loaded = load_pretrained(workspace["base"], attn_implementation="eager")
    model, processor = loaded.model, loaded.processor
    records = read_manifest(workspace["data"] / "image_qa" / "train.jsonl")[:3]
    plain = ImageQADataset(records, processor)
    cached = FrameCachedDataset([plain], model, dtype=torch.float32, progress=False)
    k = model.config.settings.projector.k
    direct = TrainCollator(LyraCollator.for_processor(processor), k=k, lcmr=True)([plain[i] for i in range(3)])
    frames = TrainCollator(LyraCollator.for_processor(processor), frames=True, k=k, lcmr=True)(
        [cached[i] for i in range(3)])
    assert frames["input_features"].shape[1] < direct["input_features"].shape[2]  # frames of real audio only
    with torch.no_grad():
        want = model(**direct, adapter="speech")
        with encoder_frames_given(model):
            got = model(**frames, adapter="speech")
    torch.testing.assert_close(got.ce_loss, want.ce_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.lcmr_loss, want.lcmr_loss, rtol=1e-5, atol=1e-5)
    assert model.speech_encoder(direct["input_features"][:1]).last_hidden_state.shape[1] == 1500  # restored


def test_cli_train_and_eval(workspace, tmp_path):
    from lyra.cli import main

    runner = CliRunner()
    out = tmp_path / "cli_stage1"
    result = runner.invoke(main, ["train", str(SMOKE / "stage1.yaml"), "--data", str(workspace["data"]),
                                  "--init-from", str(workspace["base"]), "--output", str(out), "--max-steps", "2",
                                  "--set", "run.logging_steps=1"])
    assert result.exit_code == 0, result.output
    assert "stage 1: 2 steps" in result.output and (out / "model.safetensors").exists()

    report_dir = tmp_path / "report"
    result = runner.invoke(main, ["eval", "--model", str(out), "--data", str(workspace["data"]), "--limit", "2",
                                  "--max-new-tokens", "8", "--keep-rates", "1,0.5", "-o", str(report_dir)])
    assert result.exit_code == 0, result.output
    report = json.loads((report_dir / "report.json").read_text())
    rows = report["rows"]
    asr = [r for r in rows if r["task"] == "asr"]
    assert asr and asr[0]["n"] == 2 and asr[0]["value"] >= 0
    assert {r["dataset"] for r in rows if r["task"] == "image_qa"} == {"image_qa/test", "image_qa/test_typed"}
    for row in (r for r in rows if r["task"] == "image_qa"):  # "correct/total" per question kind
        counts = [tuple(map(int, v.split("/"))) for v in row["details"]["by_kind"].values()]
        assert sum(t for _, t in counts) == row["n"] == 2 and all(0 <= c <= t for c, t in counts)
        assert sum(c for c, _ in counts) == round(row["value"] * row["n"])
    assert "Correct answers by question kind:\n- image_qa/test: " in (report_dir / "report.md").read_text()
    needles = [r for r in rows if r["task"] == "needle"]
    assert [r["details"]["extractor"] for r in needles] == ["off", "keep 1", "keep 0.5"]
    assert all(r["details"]["prefill_s"] > 0 and r["details"]["minutes"] == 0.5 for r in needles)
    assert any(r["task"] == "spoken_answer" for r in rows) or any("spoken_answer" in s for s in report["skipped"])
    assert "| asr | asr/test_espeak |" in (report_dir / "report.md").read_text()

    # Only lectures of the given lengths (the smoke lectures last 0.5 min): none of 2 min, so no needle rows.
    result = runner.invoke(main, ["eval", "--model", str(out), "--data", str(workspace["data"]), "--tasks", "needle",
                                  "--lecture-minutes", "2", "-o", str(tmp_path / "none")])
    assert result.exit_code == 0, result.output
    assert not json.loads((tmp_path / "none" / "report.json").read_text())["rows"]
    result = runner.invoke(main, ["eval", "--model", str(out), "--data", str(workspace["data"]), "--tasks", "needle",
                                  "--lecture-minutes", "half"])
    assert result.exit_code != 0 and "--lecture-minutes" in result.output


def test_correct_by_kind_needs_every_kind():
    from lyra.data.manifest import GPT, HUMAN, Record, Turn

    from lyra.training.evaluate import correct_by_kind

    def record(i, **extra):
        return Record(id=str(i), conversations=(Turn(HUMAN, "q"), Turn(GPT, "a")), extra=extra)

    records = [record(0, kind="count_all"), record(1, kind="shape_color"), record(2, kind="count_all")]
    got = correct_by_kind(records, ["two", "red", "six"], ["two", "blue", "three"])
    assert got == {"count_all": "1/2", "shape_color": "0/1"}
    assert correct_by_kind(records + [record(3)], ["two", "red", "six", "x"], ["two", "blue", "three", "x"]) == {}


def test_an_answer_counts_short_or_said_whole():
    from lyra.data.lectures import make_needles
    from lyra.data.manifest import GPT, HUMAN, Record, Turn
    from lyra.data.metrics import accuracy

    from lyra.training.evaluate import accepted_answers, correct_by_kind

    def record(answer, **extra):
        return Record(id="r", conversations=(Turn(HUMAN, "q"), Turn(GPT, answer)), extra=extra)

    image = record("red", kind="color", answer_sentence="The circle is red.")
    needle = record("attic", needle_fact="Remember that the blue kettle is hidden in the attic.")
    assert accepted_answers(image) == ["red", "The circle is red."]
    assert accepted_answers(needle) == ["attic", "The blue kettle is hidden in the attic."]
    assert accepted_answers(record("two")) == ["two"]
    predictions = ["the circle is red", "The square is red.", "Red.", "The blue kettle is hidden in the attic.",
                   "The red kettle is hidden in the attic.", "attic or garden"]
    golds = [accepted_answers(image)] * 3 + [accepted_answers(needle)] * 3
    assert [accuracy([p], [g]).correct for p, g in zip(predictions, golds)] == [1, 0, 1, 1, 0, 0]
    assert correct_by_kind([image, image], ["The circle is red.", "blue"], [accepted_answers(image)] * 2) == {
        "color": "1/2"}
    for needle in make_needles(random.Random(0), 12, "train"):  # every template, lead-in or not
        assert needle.sentence[0].isupper() and needle.sentence.endswith(".") and needle.answer in needle.sentence
        assert needle.sentence in needle.fact or needle.sentence[1:] in needle.fact
        assert not needle.sentence.startswith(("Remember", "Please"))


def test_a_source_answered_with_whole_sentences(tmp_path):
    from lyra.data.datasets import BrokenSampleError
    from lyra.data.manifest import read_manifest, write_manifest

    from lyra.training.config import DataConfig, DataSource
    from lyra.training.data import _read_source

    fact = {"Where was Anna Berg born?": "Please note that Anna Berg was born in Oslo.",
            "In which room is the red drum hidden?": "Remember that the red drum is hidden in the attic."}
    lecture = {"id": "l", "long_speech": "a.flac", "conversations": [
        {"from": "human", "value": "<speech>\nIn which room is the red drum hidden?"}, {"from": "gpt", "value": "attic"},
        {"from": "human", "value": "Where was Anna Berg born?"}, {"from": "gpt", "value": "Oslo"}],
        "needles": [{"question": q, "answer": "x", "fact": f} for q, f in fact.items()]}
    image = {"id": "i", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat color is the star?"},
             {"from": "gpt", "value": "red"}], "answer_sentence": "The star is red."}
    write_manifest(tmp_path / "m.jsonl", [lecture, image])
    config = DataConfig(root=str(tmp_path))
    said = _read_source(config, DataSource("m.jsonl", answers="sentence"))
    assert [r.answers for r in said] == [["The red drum is hidden in the attic.", "Anna Berg was born in Oslo."],
                                         ["The star is red."]]
    assert [r.conversations[0::2] for r in said] == [r.conversations[0::2] for r in read_manifest(tmp_path / "m.jsonl")]
    assert [r.answers for r in _read_source(config, DataSource("m.jsonl"))] == [["attic", "Oslo"], ["red"]]
    del lecture["needles"][1]["fact"]  # a manifest built before the builder wrote facts
    write_manifest(tmp_path / "m.jsonl", [lecture])
    with pytest.raises(BrokenSampleError, match="the answer 'attic' has none.*rebuild the manifest"):
        _read_source(config, DataSource("m.jsonl", answers="sentence"))


def test_spoken_answer_reads_the_training_positions(workspace):
    """The evaluation's spoken answer feeds the generator the states a teacher-forced forward over the prompt and
    the answer gives at the answer tokens' positions (what stage 4 trains on), and renders its units."""
    from lyra.constants import IGNORE_INDEX
    from lyra.generator import answer_states
    from lyra.training.evaluate import spoken_answer
    from lyra.vocoder import NanoVocoder, NanoVocoderConfig

    loaded = load_pretrained(workspace["base"], attn_implementation="eager")
    model, processor = loaded.model, loaded.processor
    record = read_manifest(workspace["data"] / "speech_gen" / "train.jsonl")[1]  # image + spoken question
    torch.manual_seed(0)
    vocoder = NanoVocoder(NanoVocoderConfig(num_units=model.config.settings.speech_generator.num_units)).eval()
    answer = spoken_answer(model, processor, record, vocoder, max_new_tokens=5)
    assert len(answer.tokens) == answer.states.shape[0] == 5
    assert answer.units and all(0 <= u < 32 for u in answer.units)
    assert len(answer.audio) == int(vocoder.durations(torch.tensor(answer.units)).sum()) * 320

    prompt = processor.apply_chat_template(record.messages()[:-1], add_generation_prompt=True)
    inputs = processor(prompt, images=[str(p) for p in record.image_paths()],
                       audios=[str(p) for p in record.speech_paths()])
    answer_ids = torch.tensor([answer.tokens])
    input_ids = torch.cat([inputs["input_ids"], answer_ids], dim=1)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -answer_ids.shape[1]:] = answer_ids
    batch = {**inputs, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer_ids)], dim=1)}
    with torch.no_grad():
        hidden = model(**batch).hidden_states
    states, _ = answer_states(hidden, labels)
    torch.testing.assert_close(answer.states, states[0], rtol=1e-4, atol=1e-4)


def test_cached_frames_of_another_shape_are_replaced(tmp_path):
    sample = EncodedSample(id="a", input_ids=torch.zeros(3, dtype=torch.long), labels=torch.zeros(3, dtype=torch.long),
                           speech_token_counts=torch.tensor([5, 2]))
    path = tmp_path / "frames" / "key.safetensors"
    path.parent.mkdir()
    save_file({"frames": torch.ones(2, 20, 8)}, str(path))
    assert load_frames(path, sample, k=4).shape == (2, 20, 8)  # 2 windows, 5 tokens x 4 frames
    assert load_frames(path, sample, k=2) is None and not path.exists()


def test_gradient_checkpointing_trains_the_same(workspace):
    settings = {"optim.max_steps": 2, "run.save_steps": 100}
    plain = run_stage(workspace, 2, "no_ckpt", **settings)
    checkpointed = run_stage(workspace, 2, "ckpt", **settings, **{"run.gradient_checkpointing": True})
    assert checkpointed.model.language_model.layers[0].gradient_checkpointing
    assert not plain.model.language_model.layers[0].gradient_checkpointing
    assert losses(checkpointed) == pytest.approx(losses(plain), rel=1e-5)
    b = dict(checkpointed.model.named_parameters())
    for name, p in plain.model.named_parameters():
        torch.testing.assert_close(p, b[name], rtol=1e-4, atol=1e-6)


def test_frame_cache_on_disk_is_reused(workspace, tmp_path):
    loaded = load_pretrained(workspace["base"], attn_implementation="eager")
    records = read_manifest(workspace["data"] / "image_qa" / "train.jsonl")
    datasets = [ImageQADataset(records, loaded.processor)]
    first = FrameCachedDataset(datasets, loaded.model, progress=False, cache_dir=tmp_path)
    again = FrameCachedDataset(datasets, loaded.model, progress=False, cache_dir=tmp_path)
    assert first.hits == 0 and again.hits == len(records) == len(again)
    for i in range(len(records)):
        a, b = first[i], again[i]
        assert a.id == b.id and torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
        assert torch.equal(a.input_features, b.input_features) and a.input_features.dtype == torch.float16
    # Other answers about the same recordings: tokenised again, not encoded again.
    answered = [dataclasses.replace(r, conversations=(*r.conversations[:-1], Turn(GPT, "A different answer.")))
                for r in records]
    spoken = sum(bool(r.speech) for r in records)
    assert 0 < spoken
    other = FrameCachedDataset([ImageQADataset(answered, loaded.processor)], loaded.model, progress=False,
                               cache_dir=tmp_path)
    assert other.hits == 0 and other.frame_hits == spoken
    for i in range(len(records)):
        a, b = first[i], other[i]
        assert not torch.equal(a.labels, b.labels)
        assert (a.input_features is None and b.input_features is None) or torch.equal(a.input_features, b.input_features)
    # A frames file removed by hand: the sample that needs it says so and how to mend it.
    frames_files = sorted((other.folder / "frames").iterdir())
    assert len(frames_files) == spoken
    frames_files[0].unlink()
    broken = next(i for i, r in enumerate(answered) if r.speech and speech_key(r) == frames_files[0].stem)
    with pytest.raises(BrokenSampleError, match=r"which is gone; delete .* and run again"):
        other[broken]
    # Other encoder weights are another cache.
    with torch.no_grad():
        loaded.model.speech_encoder.layer_norm.bias.add_(1.0)
    assert FrameCachedDataset(datasets, loaded.model, progress=False, cache_dir=tmp_path).hits == 0
