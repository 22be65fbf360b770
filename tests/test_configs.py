"""Every file under configs/ loads: model presets, training stages, accelerate (DeepSpeed / FSDP) launch configs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml

from lyra.presets import build_config
from lyra.training import STAGES, TrainConfigError, load_train_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
YAMLS = sorted(CONFIGS.rglob("*.yaml"))


def kind(path: Path) -> str:
    data = yaml.safe_load(path.read_text())
    if "backbone" in data:
        return "model"
    if "stage" in data:
        return "train"
    if "distributed_type" in data:
        return "accelerate"
    return "unknown"


def test_configs_folder_has_every_kind():
    kinds = [kind(p) for p in YAMLS]
    assert "unknown" not in kinds, [p for p, k in zip(YAMLS, kinds) if k == "unknown"]
    assert kinds.count("train") >= 10 and kinds.count("accelerate") == 3 and kinds.count("model") >= 5


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_loads(path):
    k = kind(path)
    if k == "model":
        config = build_config(path)
        assert config.text_config.hidden_size > 0 and config.speech_config.d_model > 0
    elif k == "train":
        config = load_train_config(path)
        assert config.stage in STAGES and (config.data.train or config.data.text_corpus or config.data.drawn_images
                                           or config.data.drawn_cells)
        if config.model.preset.endswith(".yaml"):
            assert Path(config.model.preset).is_file()
        assert config.to_dict()["stage"] == config.stage
    else:
        from accelerate.commands.config.config_args import ClusterConfig

        data = yaml.safe_load(path.read_text())
        assert data["compute_environment"] == "LOCAL_MACHINE" and data["num_processes"] >= 1
        cluster = ClusterConfig.from_yaml_file(str(path))  # accelerate's own reader
        if data["distributed_type"] == "DEEPSPEED":
            ds_file = CONFIGS.parent / data["deepspeed_config"]["deepspeed_config_file"]
            ds = json.loads(ds_file.read_text())
            stage = ds["zero_optimization"]["stage"]
            assert f"zero{stage}" in path.stem
            for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
                assert ds[key] == "auto"  # filled from the training YAML by the Trainer
        else:
            assert data["distributed_type"] == "FSDP" and cluster.fsdp_config["fsdp_use_orig_params"] is True
            wrapped = data["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(",")
            assert {"Qwen2VLDecoderLayer", "WhisperEncoderLayer"} <= set(wrapped)


def test_json_files_parse():
    files = sorted(CONFIGS.rglob("*.json"))
    assert len(files) >= 2
    for path in files:
        json.loads(path.read_text())


def test_nano_stages_chain_into_each_other():
    # README's order
    names = ["0", "1", "0_speech", "0_vision", "0_mix", "0_tower", "0_see", "0_read", "0_drill", "0_copy", "0_recall",
             "2", "3", "3_long", "4"]
    configs = [load_train_config(CONFIGS / "train" / f"nano_stage{name}.yaml") for name in names]
    assert [c.stage for c in configs] == [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 3, 4]
    assert configs[0].model.init_from is None and configs[0].model.tokenizer == "compact"
    for before, after in itertools.pairwise(configs):
        assert after.model.init_from == before.run.output_dir
        assert after.model.continue_stage == (after.stage == before.stage == 3)  # stage 3's second part
    assert all(configs[i].data.drawn_images > 0 for i in (3, 4, 6, 7, 8))  # vision and mixed passes
    tower = configs[5]
    assert tower.model.reset_vision and tower.data.drawn_cells >= tower.optim.max_steps * tower.optim.batch_size
    assert configs[8].data.drawn_kinds["color"] > configs[8].data.drawn_kinds["shape"]  # the drill pass
    copy, recall = configs[9], configs[10]
    assert copy.data.text_corpus and not (copy.data.train or copy.data.drawn_images)  # text only: it learns to copy
    assert recall.data.needle_answers == "sentence" and recall.data.needle_questions > 1 and recall.data.text_corpus
    assert configs[11].lcmr_weight == 0.0  # the nano recipe's choice after the LCMR ablation (docs/nano.md)
    assert {s.answers for s in configs[12].data.train} == {"sentence"}  # lecture needles answered whole
    assert any("nano_needles" in s.manifest for s in configs[12].data.train)  # and the short talks
    assert any("nano_needles_long" in s.manifest for s in configs[13].data.train)  # then longer lectures
    assert configs[14].export.enabled and configs[14].export.max_megabytes == 25
    assert configs[14].export.path == "lyra/checkpoints/nano"


BAD_TRAINING_YAML = [  # (YAML, what the error must say)
    ("stage: 1\nmodel: {init_from: x}\ndata: {train: [{manifest: a.jsonl}]}\noptim: {lr: 1}\n",
     r"optim.*unknown key\(s\) \['lr'\]"),
    ("stage: 2\ndata: {train: [{manifest: a.jsonl}]}\n", "init_from"),
    ("stage: 0\ndata: {train: [{manifest: a.jsonl, task: poetry}]}\n", "poetry"),
    ("stage: 0\ndata: {train: [{manifest: a.jsonl, answers: long}]}\n", r"answers 'long' of a.jsonl is not one of"),
    ("stage: 0\ndata: {drawn_images: -4}\n", r"data.drawn_images .* 0 or more, got -4"),
    ("stage: 0\ndata: {drawn_images: 10, drawn_kinds: {colour: 1}}\n", r"unknown question kind\(s\) \['colour'\]"),
    ("stage: 0\ndata: {drawn_images: 10, drawn_kinds: {color: 0}}\n", "at least one is above 0"),
    ("stage: 0\ndata: {text_needles: 10, drawn_kinds: {color: 1}}\n", "set one of them to the number of drawings"),
    ("stage: 0\ndata: {drawn_images: 10, drawn_kinds: [color]}\n", "drawn_kinds: expected a mapping"),
    ("stage: 0\ndata: {drawn_cells: 100, text_needles: 4}\n", "drawn_cells is stage 0's vision-tower pass"),
    ("stage: 0\ndata: {drawn_cells: 100}\noptim: {frozen: [vision]}\n", "leave optim.frozen empty"),
    ("stage: 0\ndata: {text_needles: 10, needle_facts: [3, 2]}\n", r"needle_facts .* got \[3, 2\]"),
    ("stage: 0\ndata: {text_needles: 10, needle_facts: 4}\n", r"needle_facts is \[lowest, highest\].* got \[4\]"),
    ("stage: 0\ndata: {text_needles: 10, needle_sentences: [9, 3]}\n", r"needle_sentences .* got \[9, 3\]"),
    ("stage: 0\ndata: {text_needles: 10, needle_sentences: [-1, 3]}\n", r"needle_sentences .* got \[-1, 3\]"),
    ("stage: 0\ndata: {text_needles: 10, needle_questions: 0}\n", "needle_questions .* 1 or more, got 0"),
    ("stage: 0\ndata: {text_needles: 10, needle_answers: full}\n", r"needle_answers must be one of .* got 'full'"),
    ("stage: 0\ndata: {drawn_images: 10, drawn_answers: long}\n", r"drawn_answers must be one of .* got 'long'"),
    ("stage: 0\nmodel: {reset_vision: true}\ndata: {drawn_cells: 100}\n",
     "reset_vision replaces the vision tower of model.init_from"),
    ("stage: 0\nmodel: {continue_stage: true}\ndata: {text_needles: 10}\n",
     "continue_stage carries on from the run in model.init_from"),
    ("stage: 0\nmodel: {image_positions: true}\ndata: {text_needles: 10}\n",
     "image_positions adds image-token positions to the model in model.init_from"),
    ("stage: 0\nmodel: {frame_positions: true}\ndata: {text_needles: 10}\n",
     "frame_positions adds frame positions to the speech generator of the model in model.init_from"),
    ("stage: 0\ndata: {text_needles: 10, eval: [{manifest: a.jsonl, task: poems}]}\n", "data.eval: task 'poems'"),
    ("stage: 0\ndata: {text_needles: 10}\nrun: {eval_steps: -1}\n", "run.eval_steps .* got -1"),
    ("stage: 0\ndata: {text_needles: 10}\nrun: {keep_best: true}\n", "list held-out manifests under data.eval"),
    (("stage: 0\ndata: {text_needles: 10, eval: [{manifest: a.jsonl}]}\nrun: {keep_best: true, save_steps: 100, "
      "eval_steps: 50}\n"), r"set run.eval_steps to run.save_steps \(100\) or to 0, got 50"),
    ("stage: 0\ndata: {drawn_cells: 100, eval: [{manifest: a.jsonl}]}\n", "leave data.eval empty"),
]


def test_training_yaml_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, message in BAD_TRAINING_YAML:
        bad.write_text(text)
        with pytest.raises(TrainConfigError, match=message):
            load_train_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("stage: 0\ndata: {train: [{manifest: a.jsonl}]}\noptim: {learning_rate: 1e-3}\n")
    assert load_train_config(good).optim.learning_rate == pytest.approx(1e-3)  # YAML reads 1e-3 as a string
    assert load_train_config(good, **{"optim.max_steps": 7}).optim.max_steps == 7
