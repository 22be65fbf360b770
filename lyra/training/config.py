"""Training-run configuration: frozen dataclasses, read from (and written back to) YAML.

    config = load_train_config("configs/train/nano_stage1.yaml", output_dir="runs/s1", max_steps=50)

A run is one stage (0 base, 1 alignment, 2 instruction + LCMR, 3 long speech, 4 speech generation; see
`lyra.training.stages`). Relative paths in the YAML (data root, init_from, output_dir) are taken from the
directory the command runs in, so the configs in `configs/train/` are used from the repository root.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "TASKS",
    "DataConfig",
    "DataSource",
    "ExportConfig",
    "ModelSource",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "TrainConfigError",
    "load_train_config",
]

# Dataset kinds a manifest can be read as (lyra.data.datasets): what each record must hold.
TASKS = ("asr", "image_qa", "long_speech_qa", "speech_generation", "conversation")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# How answers are given (DataSource.answers, data.needle_answers): as written, or said whole.
ANSWER_FORMS = ("short", "sentence")


class TrainConfigError(ValueError):
    """A training YAML that does not describe a valid run; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class ModelSource:
    """Where the model of a stage comes from: the previous stage's folder, or a fresh build (stage 0)."""

    init_from: str | None = None  # folder written by an earlier stage (model + processor); None: build fresh
    preset: str = "nano"  # fresh builds: model preset name (nano, mini, ...) or a model YAML (relative: to the training YAML)
    tokenizer: str = "compact"  # fresh builds: "compact" (trained here, lyra.data.tokenizer), "qwen2", or a folder
    speech_encoder: str = "whisper-tiny.en"  # fresh builds: "whisper-tiny.en" (lyra.assets), a Whisper folder, or "random"
    attn_implementation: str = "sdpa"  # "eager", "sdpa" or "flash_attention_2"
    reset_vision: bool = False  # init_from runs: replace its vision tower by a fresh one of the preset's shape
    image_positions: bool = False  # init_from runs: give a model without image-token positions some (lyra/vision.py)
    # init_from runs: give a speech generator without frame positions some (lyra/generator.py)
    frame_positions: bool = False
    # init_from is an earlier run of this same stage (a curriculum: short talks, then longer lectures): keep what it
    # trained instead of starting the stage's projector again from another (stage 3: long_speech from speech)
    continue_stage: bool = False


@dataclass(frozen=True)
class DataSource:
    """One manifest mixed into the training set."""

    manifest: str  # JSONL path, relative to DataConfig.root unless absolute
    task: str = "conversation"  # one of TASKS: how records are checked and read
    max_samples: int | None = None  # use only the first this many records (smoke runs); None: all
    repeat: int = 1  # times the manifest is repeated in the mixture (up-weighting a small set)
    answers: str = "short"  # "short": as written; "sentence": each said whole (training.data.whole_answers)


@dataclass(frozen=True)
class DataConfig:
    """The training mixture and how it is read."""

    root: str = "data/nano"  # folder the manifests are relative to (python -m lyra.data.build --out ROOT)
    train: tuple[DataSource, ...] = ()  # manifests of the mixture
    # held-out manifests, read as train's are: their loss (and its parts) is logged as eval_loss, eval_units, ... every
    # run.eval_steps; with run.keep_best the run ends with the checkpoint whose eval_loss was lowest
    eval: tuple[DataSource, ...] = ()
    text_corpus: int = 0  # text-only conversations generated from lyra.data.corpus (read-aloud and free sentences)
    text_needles: int = 0  # text-only needle questions: a written passage with a few unique facts, then a question
    needle_facts: tuple[int, ...] = (1, 3)  # facts per written needle passage: lowest, highest (6 templates)
    needle_sentences: tuple[int, ...] = (1, 10)  # corpus sentences around a written passage's facts: lowest, highest
    # (a 2-minute lecture says about 30, a 10-minute one 150)
    needle_questions: int = 1  # facts of a passage asked, one per turn (at most the passage's facts)
    needle_answers: str = "short"  # "short": the answer alone ("attic"); "sentence": the fact said whole
    drawn_images: int = 0  # typed questions about images drawn for the run (lyra.data.synth_images), no speech
    drawn_kinds: dict[str, float] = field(default_factory=dict)  # drawn_images' (or drawn_cells') question kinds ->
    # weight ("describe" included); empty: every other image described, the rest one of the data builder's kinds
    drawn_answers: str = "short"  # drawn_images' answers: "short" ("black") or "sentence" ("The star is black.")
    drawn_cells: int = 0  # stage 0's vision-tower pass: drawings labelled per cell; trains the tower alone (tower.py)
    text_seed: int = 0  # seed of those conversations and images
    cache_speech: bool = True  # encode every clip once with the frozen speech encoder and keep its frames in RAM
    cache_dtype: str = "float16"  # dtype of the cached frames ("float16" halves the RAM; used in every step alike)
    cache_dir: str | None = ".frame_cache"  # on-disk cache (relative: to root) shared by stages and resumes; None: RAM
    skip_broken: bool = True  # a sample whose media cannot be read is counted and replaced by the next one
    units_from: str | None = None  # stage 4: vocoder folder whose k-means centroids turn tgt_audio into tgt_units
    num_workers: int = 0  # DataLoader worker processes (0: load in the training process)


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule (AdamW, transformers' schedulers)."""

    learning_rate: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 0  # linear warm-up steps
    lr_scheduler: str = "cosine"  # transformers SchedulerType: "cosine", "linear", "constant_with_warmup", ...
    batch_size: int = 8  # samples per device and micro-step
    grad_accumulation: int = 1  # micro-steps per optimiser step
    max_steps: int = 1000  # optimiser steps
    max_grad_norm: float = 1.0  # gradient clipping (L2 norm)
    adam_beta2: float = 0.999  # AdamW beta2
    # learning rate of the image-token positions (lyra/vision.py); they start at zero, and at a stage's rate they stay
    # far below the image tokens' scale for its whole run (nano: RMS 0.08 against 3.1); None: learning_rate
    positions_lr: float | None = None
    # parameter groups the stage would train that stay frozen ("llm", "vision", "projector:speech", ...; the
    # stage's groups: lyra.training.stages); e.g. [vision] in stage 0 reads a finished tower, about a third faster
    frozen: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunConfig:
    """Output, checkpoints, logging and precision."""

    output_dir: str = "runs/nano"  # checkpoints (checkpoint-N/) and the final model + processor
    seed: int = 0  # model init, data order, dropout
    logging_steps: int = 10  # log losses every this many optimiser steps
    save_steps: int = 500  # write a resumable checkpoint every this many steps
    save_total_limit: int = 2  # keep at most this many checkpoints
    eval_steps: int = 0  # loss on data.eval every this many optimiser steps (0: at every save_steps)
    keep_best: bool = False  # end with the saved checkpoint of lowest eval_loss (needs data.eval; eval_steps 0 or
    # save_steps, so that each checkpoint is measured and only those are)
    precision: str = "auto"  # "auto": bf16 on a CUDA device that supports it, else fp32; or "bf16", "fp16", "fp32"
    gradient_checkpointing: bool = False  # recompute decoder-layer activations in the backward pass (less memory)
    report_to: str = "none"  # transformers integrations ("none", "tensorboard", "wandb", ...)


@dataclass(frozen=True)
class ExportConfig:
    """The shipping copy written after the run (the embedded nano checkpoint is one)."""

    enabled: bool = False  # write it
    path: str | None = None  # folder (default: <output_dir>/export)
    dtype: str = "float16"  # weights' storage dtype
    max_megabytes: float = 25.0  # fail if the folder is larger than this (MB = 10**6 bytes)
    include_speech_encoder: bool = False  # False: leave the frozen Whisper encoder out (load_pretrained adds it)


@dataclass(frozen=True)
class TrainConfig:
    """One training run."""

    stage: int  # 0 base, 1 speech alignment, 2 instruction + LCMR, 3 long speech, 4 speech generation
    name: str = ""  # a label for logs and reports
    model: ModelSource = field(default_factory=ModelSource)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    lcmr_weight: float | None = None  # override the model's LCMR lambda (stage 2 uses LCMR, the others never)

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3, 4):
            raise TrainConfigError(f"stage must be 0, 1, 2, 3 or 4, got {self.stage}")
        for part, sources in (("train", self.data.train), ("eval", self.data.eval)):
            for source in sources:
                if source.task not in TASKS:
                    raise TrainConfigError(f"data.{part}: task {source.task!r} of {source.manifest} is not one of "
                                           f"{TASKS}")
                if source.answers not in ANSWER_FORMS:
                    raise TrainConfigError(f"data.{part}: answers {source.answers!r} of {source.manifest} is not one "
                                           f"of {ANSWER_FORMS}")
        _check_eval(self)
        if self.run.precision not in PRECISIONS:
            raise TrainConfigError(f"run.precision must be one of {PRECISIONS}, got {self.run.precision!r}")
        if self.model.init_from is None and self.stage != 0:
            raise TrainConfigError(
                f"stage {self.stage} trains on top of an earlier stage: set model.init_from to that stage's output folder"
            )
        for name in ("text_corpus", "text_needles", "drawn_images", "drawn_cells"):
            if getattr(self.data, name) < 0:
                raise TrainConfigError(f"data.{name} is a number of samples: 0 or more, got {getattr(self.data, name)}")
        if not (self.data.train or self.data.text_corpus or self.data.text_needles or self.data.drawn_images
                or self.data.drawn_cells):
            raise TrainConfigError("the run has no data: list manifests under data.train (or set data.text_corpus, "
                                   "data.text_needles, data.drawn_images or data.drawn_cells)")
        if self.data.drawn_cells and (self.stage != 0 or self.data.train or self.data.text_corpus
                                      or self.data.text_needles or self.data.drawn_images):
            raise TrainConfigError("data.drawn_cells is stage 0's vision-tower pass and trains on nothing else: use "
                                   "stage: 0 and leave data.train, text_corpus, text_needles and drawn_images empty")
        if self.data.drawn_cells and self.optim.frozen:
            raise TrainConfigError("optim.frozen: stage 0's vision-tower pass (data.drawn_cells) trains the tower alone; "
                                   "leave optim.frozen empty")
        _check_needles(self.data)
        _check_drawn_kinds(self.data)
        if self.model.continue_stage and self.model.init_from is None:
            raise TrainConfigError("model.continue_stage carries on from the run in model.init_from: set init_from to "
                                   "the output folder of an earlier run of this stage")
        if self.model.image_positions and self.model.init_from is None:
            raise TrainConfigError("model.image_positions adds image-token positions to the model in model.init_from; "
                                   "a fresh build takes them from its preset (image_positions: {enabled: true})")
        if self.model.frame_positions and self.model.init_from is None:
            raise TrainConfigError("model.frame_positions adds frame positions to the speech generator of the model in "
                                   "model.init_from; a fresh build takes them from its preset (speech_generator: "
                                   "{frame_positions: true})")
        if self.model.reset_vision and self.model.init_from is None:
            raise TrainConfigError("model.reset_vision replaces the vision tower of model.init_from; a fresh build "
                                   "(no init_from) has a fresh tower already")

    def to_dict(self) -> dict:
        """Plain types, for YAML."""
        return _plain(dataclasses.asdict(self))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    def replace(self, **changes) -> TrainConfig:
        """A copy with some fields replaced; dotted names reach into sections (`**{"optim.max_steps": 5}`)."""
        data = self.to_dict()
        for key, value in changes.items():
            target = data
            *parents, leaf = key.split(".")
            for p in parents:
                target = target[p]
            if leaf not in target:
                raise TrainConfigError(f"unknown config field {key!r}")
            target[leaf] = value
        return build(TrainConfig, data, "overrides")


def _check_range(data: DataConfig, name: str, least: int, what: str) -> None:
    """data.<name> must be [lowest, highest] with least <= lowest <= highest."""
    values = getattr(data, name)
    lowest, highest = (tuple(values) + (least - 1, least - 1))[:2]
    if len(values) != 2 or not least <= lowest <= highest:
        raise TrainConfigError(f"data.{name} is [lowest, highest] {what}, {least} <= lowest <= highest, got "
                               f"{list(values)}")


def _check_eval(config: TrainConfig) -> None:
    run = config.run
    if run.eval_steps < 0:
        raise TrainConfigError(f"run.eval_steps is a number of optimiser steps: 0 (at every save) or more, got "
                               f"{run.eval_steps}")
    if run.keep_best and not config.data.eval:
        raise TrainConfigError("run.keep_best picks the checkpoint of lowest loss on held-out data: list held-out "
                               "manifests under data.eval, or set run.keep_best: false")
    if run.keep_best and run.eval_steps not in (0, run.save_steps):
        raise TrainConfigError(f"run.keep_best compares the saved checkpoints: measure each of them, set run.eval_steps "
                               f"to run.save_steps ({run.save_steps}) or to 0, got {run.eval_steps}")
    if config.data.drawn_cells and config.data.eval:
        raise TrainConfigError("data.eval: stage 0's vision-tower pass (data.drawn_cells) measures its own held-out "
                               "cells; leave data.eval empty")


def _check_needles(data: DataConfig) -> None:
    _check_range(data, "needle_facts", 1, "facts per written passage")
    _check_range(data, "needle_sentences", 0, "corpus sentences around a written passage's facts")
    if data.needle_answers not in ANSWER_FORMS:
        raise TrainConfigError(f"data.needle_answers must be one of {ANSWER_FORMS}, got {data.needle_answers!r}")
    if data.needle_questions < 1:
        raise TrainConfigError(f"data.needle_questions is the number of facts asked per passage: 1 or more, got "
                               f"{data.needle_questions}")


def _check_drawn_kinds(data: DataConfig) -> None:
    if data.drawn_answers not in ANSWER_FORMS:
        raise TrainConfigError(f"data.drawn_answers must be one of {ANSWER_FORMS}, got {data.drawn_answers!r}")
    if not data.drawn_kinds:
        return
    from lyra.data.synth_images import DRAWN_KINDS

    unknown = sorted(set(data.drawn_kinds) - set(DRAWN_KINDS))
    if unknown:
        raise TrainConfigError(f"data.drawn_kinds: unknown question kind(s) {unknown}; choose from {list(DRAWN_KINDS)}")
    if any(w < 0 for w in data.drawn_kinds.values()) or not sum(data.drawn_kinds.values()) > 0:
        raise TrainConfigError(f"data.drawn_kinds: weights are 0 or more and at least one is above 0, got "
                               f"{data.drawn_kinds}")
    if not (data.drawn_images or data.drawn_cells):
        raise TrainConfigError("data.drawn_kinds weights the drawings of data.drawn_images or data.drawn_cells: set "
                               "one of them to the number of drawings (or drop drawn_kinds)")


def load_train_config(path: str | Path, **overrides) -> TrainConfig:
    """Read a training YAML; `overrides` are dotted field names (`"run.output_dir"`, `"optim.max_steps"`)."""
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"{path}: training config not found (see configs/train/ for examples)")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path}: a training config is a YAML mapping, got {type(data).__name__}")
    config = build(TrainConfig, data, str(path))
    preset = Path(config.model.preset)
    if preset.suffix in (".yaml", ".yml") and not preset.is_absolute() and (path.parent / preset).is_file():
        overrides = {"model.preset": str((path.parent / preset).resolve()), **overrides}  # beside the training YAML
    return config.replace(**overrides) if overrides else config


# ---------------------------------------------------------------------- YAML -> dataclasses


def build(cls, data: Any, where: str):
    """Build dataclass `cls` from a mapping, converting values to the annotated types; unknown keys are errors."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise TrainConfigError(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TrainConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {name: _convert(hints[name], value, f"{where}: {name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TrainConfigError as exc:
        raise TrainConfigError(f"{where}: {exc}") from None
    except TypeError as exc:
        raise TrainConfigError(f"{where}: {exc}") from None


def _convert(hint, value, where: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise TrainConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_convert(args[0], v, where) for v in items)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if value is None:
        raise TrainConfigError(f"{where}: a value is required")
    try:
        if hint is bool:
            if isinstance(value, str):
                return {"true": True, "false": False, "yes": True, "no": False}[value.lower()]
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)  # YAML reads "1e-3" as a string
        if hint is str:
            return str(value)
    except (KeyError, ValueError, TypeError):
        raise TrainConfigError(f"{where}: {value!r} is not a valid {hint.__name__}") from None
    return value


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
