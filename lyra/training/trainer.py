"""Running one training stage with transformers' `Trainer`.

    result = train(load_train_config("configs/train/nano_stage1.yaml"))

The Trainer brings resumable checkpoints (`checkpoint-N/` with optimiser, scheduler and RNG state),
gradient accumulation, activation checkpointing, bf16/fp16 mixed precision and, when started with
`accelerate launch`, multi-GPU data parallelism, DeepSpeed ZeRO-2/3 or FSDP (configs/accelerate/).
`LyraTrainer` only adds the stage's adapter and objective and logs the CE, LCMR and generator losses apart.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from lyra.configuration import ImagePositionConfig, LyraConfig
from lyra.data.collator import LyraCollator
from lyra.modeling import LyraForConditionalGeneration, read_whisper_encoder_state
from lyra.processing import LyraProcessor
from lyra.training.config import TrainConfig, TrainConfigError
from lyra.training.data import (
    TrainCollator,
    build_eval_dataset,
    build_train_dataset,
    encoder_frames_given,
    vocoder_folder,
)
from lyra.training.stages import STAGES, StageSpec, prepare_stage, without_groups

__all__ = ["LyraTrainer", "TrainResult", "build_model", "last_checkpoint", "match_vocoder_units", "train",
           "training_arguments", "with_fresh_vision", "with_image_positions", "write_summary"]

log = logging.getLogger(__name__)

POSITIONS = "image_positions."  # parameter names of the image-token positions (optim.positions_lr)

TRAIN_CONFIG_FILE = "train_config.yaml"  # the run's config, written next to the model
SUMMARY_FILE = "train_summary.json"  # steps, time, losses
TOKENIZER_DIR = "tokenizer"  # fresh builds: the tokenizer made for this run, under the output folder
LOSS_PARTS = {"ce_loss": "ce", "lcmr_loss": "lcmr", "unit_loss": "units"}  # LyraOutput field -> log key


class LyraTrainer(Trainer):
    """`Trainer` running one Lyra stage: the forward uses the stage's adapter; stage 4 optimises only the
    speech generator's CTC loss. Logs carry `ce`, `lcmr` and `units` next to `loss`."""

    loss_is_scaled_for_ga = False  # our loss is a per-batch mean: let the Trainer divide by accumulation steps

    def __init__(self, *args, stage: StageSpec, positions_lr: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage = stage
        self.positions_lr = positions_lr
        self._parts: dict[str, torch.Tensor] = {}
        self._part_counts: dict[str, int] = {}
        self._eval_parts: dict[str, torch.Tensor] = {}
        self._eval_counts: dict[str, int] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs, adapter=self.stage.adapter)
        if self.stage.objective == "units":
            if out.unit_loss is None:
                raise ValueError("stage 4 needs unit targets in every batch (speech_generation manifests with tgt_units)")
            loss = out.unit_loss * self.accelerator.unwrap_model(model).config.settings.speech_generator.loss_weight
        else:
            loss = out.loss
        # the Trainer evaluates in eval mode: those parts go to the eval log, not the training log
        parts, counts = (self._parts, self._part_counts) if model.training else (self._eval_parts, self._eval_counts)
        samples = len(inputs["input_ids"])  # weights as the Trainer's eval_loss (a mean over samples)
        for name, key in LOSS_PARTS.items():
            value = getattr(out, name)
            if value is not None:
                parts[key] = parts.get(key, 0.0) + value.detach().float() * samples
                counts[key] = counts.get(key, 0) + samples
        return (loss, out) if return_outputs else loss

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer; with `positions_lr` the image-token positions move to a group of their own at
        that rate (without weight decay). The scheduler, made afterwards, scales every group alike."""
        optimizer = super().create_optimizer(model)
        if self.positions_lr is None or any(g.get("name") == POSITIONS for g in optimizer.param_groups):
            return optimizer
        model = self.model if model is None else model
        chosen = {id(p) for n, p in model.named_parameters() if n.startswith(POSITIONS) and p.requires_grad}
        if not chosen:
            return optimizer
        moved = []
        for group in optimizer.param_groups:
            moved += [p for p in group["params"] if id(p) in chosen]
            group["params"] = [p for p in group["params"] if id(p) not in chosen]
        optimizer.add_param_group({"params": moved, "lr": self.positions_lr, "weight_decay": 0.0, "name": POSITIONS})
        return optimizer

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the stage's loss only (no logits are gathered); its parts are logged as eval_<part>."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume: read the checkpoint with `from_pretrained`, which maps the Qwen2-VL key names that
        `save_pretrained` wrote back to the module's own (the Trainer's plain state-dict load would miss them).
        DeepSpeed and FSDP checkpoints go the Trainer's own way."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_saved(resume_from_checkpoint, model if model is not None else self.model)

    def _load_best_model(self) -> None:
        """`run.keep_best`: the checkpoint of lowest eval_loss, read as a resume reads one."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        log.info("keeping %s (eval_loss %.4f)", self.state.best_model_checkpoint, self.state.best_metric)
        self._load_saved(self.state.best_model_checkpoint, self.model)

    def _load_saved(self, folder: str, model) -> None:
        target = self.accelerator.unwrap_model(model)
        saved = type(target).from_pretrained(folder, dtype=torch.float32)
        target.load_state_dict(saved.state_dict(), strict=True)
        del saved

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._parts:
            for key, total in self._parts.items():
                logs[key] = round(float(total) / self._part_counts[key], 6)
            self._parts, self._part_counts = {}, {}
        if "eval_loss" in logs and self._eval_parts:
            for key, total in self._eval_parts.items():
                logs[f"eval_{key}"] = round(float(total) / self._eval_counts[key], 6)
            self._eval_parts, self._eval_counts = {}, {}
        super().log(logs, start_time)


@dataclass
class TrainResult:
    """What a finished stage left behind."""

    output_dir: Path  # final model + processor (from_pretrained / load_pretrained folder)
    stage: int
    global_step: int  # optimiser steps done (including those before a resume)
    seconds: float  # wall time of this process's training loop
    trainable: dict[str, int]  # trained parameters per group
    samples: int  # training samples in the mixture
    log_history: list[dict] = field(default_factory=list)  # the Trainer's logs (loss, ce, lcmr, units, lr, ...)
    export: dict | None = None  # the export's path, size and parameter counts, when one was written
    # measures on held-out data: the tower pass's cells; data.eval's eval_loss and its parts (run.keep_best: best_step)
    held_out: dict[str, float] = field(default_factory=dict)
    model: LyraForConditionalGeneration | None = field(default=None, repr=False, compare=False)  # the trained model


def training_arguments(config: TrainConfig, *, progress: bool = True) -> TrainingArguments:
    """transformers `TrainingArguments` of a run."""
    run, optim = config.run, config.optim
    precision = run.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return TrainingArguments(
        output_dir=run.output_dir,
        per_device_train_batch_size=optim.batch_size,
        per_device_eval_batch_size=optim.batch_size,
        gradient_accumulation_steps=optim.grad_accumulation,
        learning_rate=optim.learning_rate,
        weight_decay=optim.weight_decay,
        adam_beta2=optim.adam_beta2,
        warmup_steps=optim.warmup_steps,
        lr_scheduler_type=optim.lr_scheduler,
        max_steps=optim.max_steps,
        max_grad_norm=optim.max_grad_norm,
        logging_steps=run.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=run.save_steps,
        save_total_limit=run.save_total_limit,
        eval_strategy="steps" if config.data.eval else "no",
        eval_steps=(run.eval_steps or run.save_steps) if config.data.eval else None,
        load_best_model_at_end=run.keep_best,
        metric_for_best_model="eval_loss" if run.keep_best else None,
        greater_is_better=False if run.keep_best else None,
        seed=run.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=run.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if run.gradient_checkpointing else None,
        remove_unused_columns=False,  # batches are exactly the model's keyword arguments already
        dataloader_num_workers=config.data.num_workers,
        report_to=run.report_to,
        disable_tqdm=not progress,
        use_cpu=not torch.cuda.is_available(),
    )


# ---------------------------------------------------------------------- model


def build_model(config: TrainConfig) -> tuple[LyraForConditionalGeneration, LyraProcessor]:
    """The model a stage starts from: `init_from`'s folder, or (stage 0) a fresh build of the preset with its
    tokenizer and speech encoder."""
    source = config.model
    set_seed(config.run.seed)  # fresh weights (a fresh build, a fresh vision tower) follow from the run's seed
    if source.init_from is not None:
        from lyra.pretrained import load_pretrained

        loaded = load_pretrained(source.init_from, attn_implementation=source.attn_implementation)
        model = loaded.model.float()
        if source.reset_vision:
            model = with_fresh_vision(model, source.preset)
        if source.image_positions:
            model = with_image_positions(model)
        if source.frame_positions:
            model = with_frame_positions(model)
        return model, loaded.processor
    from lyra.presets import build_config

    model_config: LyraConfig = build_config(source.preset)
    tokenizer = _tokenizer_folder(source.tokenizer, Path(config.run.output_dir))
    if source.tokenizer != "qwen2":
        from lyra.data.tokenizer import with_tokenizer

        model_config = with_tokenizer(model_config, tokenizer)
    model_config._attn_implementation = source.attn_implementation
    model = LyraForConditionalGeneration(model_config)
    if source.speech_encoder != "random":
        from lyra import assets

        folder = assets.whisper_tiny_en() if source.speech_encoder == "whisper-tiny.en" else source.speech_encoder
        model.speech_encoder.load_state_dict(read_whisper_encoder_state(folder))
    return model, LyraProcessor.for_model(model_config, tokenizer)


def with_fresh_vision(model: LyraForConditionalGeneration, preset: str) -> LyraForConditionalGeneration:
    """A copy of `model` whose vision tower is freshly initialised with `preset`'s vision shape (the rest keeps
    its weights): a larger tower for a model trained with a smaller one."""
    from lyra.presets import build_config

    vision = build_config(preset).backbone_config.vision_config
    if vision.hidden_size != model.config.backbone_config.text_config.hidden_size:
        raise ValueError(f"the preset's vision merger gives width {vision.hidden_size}, the model's LLM takes "
                         f"{model.config.backbone_config.text_config.hidden_size}")
    config = copy.deepcopy(model.config)
    config.backbone_config.vision_config = copy.deepcopy(vision)
    return _rebuilt(model, config, fresh="backbone.model.visual.", what="a fresh vision tower")


def with_image_positions(model: LyraForConditionalGeneration) -> LyraForConditionalGeneration:
    """A copy of `model` with image-token positions (lyra/vision.py), which start at zero: the copy answers as
    `model` does until they are trained. A model that has them already is returned as it is."""
    if model.image_positions is not None:
        return model
    config = model.config.with_settings(image_positions=ImagePositionConfig(enabled=True))
    return _rebuilt(model, config, fresh="image_positions.", what="image positions")


def with_frame_positions(model: LyraForConditionalGeneration) -> LyraForConditionalGeneration:
    """A copy of `model` whose speech generator has frame positions (lyra/generator.py), which start at zero: the
    copy speaks as `model` does until they are trained. A generator that has them already is returned as it is."""
    generator = model.speech_generator
    if generator is None:
        raise ValueError("the model has no speech generator to give frame positions (speech_generator.enabled)")
    if generator.frame_embed is not None:
        return model
    settings = replace(model.config.settings.speech_generator, frame_positions=True)
    config = model.config.with_settings(speech_generator=settings)
    return _rebuilt(model, config, fresh="speech_generator.frame_embed.", what="frame positions")


def _rebuilt(model: LyraForConditionalGeneration, config: LyraConfig, fresh: str, what: str
             ) -> LyraForConditionalGeneration:
    """`config`'s model with every weight of `model` except those under `fresh`, which start new."""
    rebuilt = LyraForConditionalGeneration(config)
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith(fresh)}
    missing, unexpected = rebuilt.load_state_dict(kept, strict=False)
    if unexpected or any(not k.startswith(fresh) for k in missing):
        raise RuntimeError(f"rebuilding with {what} lost weights: {missing} {unexpected}")
    return rebuilt


def _tokenizer_folder(name: str, output_dir: Path) -> Path:
    if name == "qwen2":
        from lyra import assets

        return assets.qwen2_tokenizer()
    if name == "compact":
        from lyra.data.tokenizer import build_compact_tokenizer

        folder = output_dir / TOKENIZER_DIR
        if not (folder / "tokenizer.json").exists():  # resumed runs reuse it (the build is deterministic anyway)
            build_compact_tokenizer(folder)
        return folder
    folder = Path(name)
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{folder}: not a tokenizer folder; use 'compact', 'qwen2' or a saved tokenizer folder")
    return folder


# ---------------------------------------------------------------------- the run


def _step_of(checkpoint: str | None) -> float:
    """The optimiser step of a `checkpoint-N` folder (nan for none)."""
    return float(Path(checkpoint).name.removeprefix("checkpoint-")) if checkpoint else float("nan")


def _kept_measures(trainer: LyraTrainer, keep_best: bool) -> dict[str, float]:
    """data.eval's measures of the model the run ends with: its logged evaluation (run.keep_best: the best
    checkpoint's, else the last step's), or one more pass when that step was not evaluated."""
    step = _step_of(trainer.state.best_model_checkpoint) if keep_best else trainer.state.global_step
    logged = (h for h in reversed(trainer.state.log_history) if "eval_loss" in h and h.get("step") == step)
    metrics = next(logged, None) or trainer.evaluate()
    return {k: float(v) for k, v in metrics.items() if k == "eval_loss" or k.removeprefix("eval_") in LOSS_PARTS.values()}


def last_checkpoint(output_dir: Path) -> str:
    """The `checkpoint-N/` folder a resumed run continues from; a clear error when there is none."""
    checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if checkpoint is None:
        raise FileNotFoundError(f"--resume: {output_dir} holds no checkpoint-N folder; run without --resume first")
    return checkpoint


def _zero3() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run one stage: build or load the model, freeze all but the stage's parameters, train, save the model and
    processor to `run.output_dir` (and the export, when enabled).

    With `resume` the run continues from the last `checkpoint-N/` in the output folder.
    """
    if config.data.drawn_cells:
        from lyra.training.tower import train_tower

        return train_tower(config, resume=resume, progress=progress)
    try:
        spec = without_groups(STAGES[config.stage], config.optim.frozen)
    except ValueError as exc:
        raise TrainConfigError(f"optim.frozen: {exc}") from None
    output_dir = Path(config.run.output_dir)
    checkpoint = last_checkpoint(output_dir) if resume else None
    output_dir.mkdir(parents=True, exist_ok=True)
    # Arguments first: under `accelerate launch` with DeepSpeed ZeRO-3 they make from_pretrained partition the
    # weights as it loads them.
    args = training_arguments(config, progress=progress)
    cache = config.data.cache_speech
    if cache and _zero3():
        raise TrainConfigError("data.cache_speech needs the whole speech encoder in every process; with DeepSpeed "
                               "ZeRO-3 set data.cache_speech: false")
    model, processor = build_model(config)
    if config.lcmr_weight is not None:
        model.config.lcmr = {**model.config.lcmr, "weight": float(config.lcmr_weight)}
    lcmr = spec.lcmr and model.config.settings.lcmr.weight > 0
    if config.data.units_from is not None and model.speech_generator is not None:
        match_vocoder_units(model, vocoder_folder(config.data.units_from))
    trainable = prepare_stage(model, spec, fresh=checkpoint is None and not config.model.continue_stage)
    log.info("stage %d (%s): training %s", spec.number, spec.name, trainable)

    if cache and args.device.type == "cuda":
        model.speech_encoder.to(args.device)  # encode the cache on this process's GPU (the Trainer moves the rest)
    dataset = build_train_dataset(config.data, processor, model, progress=progress)
    held_out = build_eval_dataset(config.data, processor, model, progress=progress)
    collator = TrainCollator(LyraCollator.for_processor(processor), frames=cache,
                             k=model.config.settings.projector.k, lcmr=lcmr)
    trainer = LyraTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=held_out, data_collator=collator,
                          processing_class=processor, stage=spec, positions_lr=config.optim.positions_lr)
    start = time.perf_counter()
    with encoder_frames_given(model) if cache else contextlib.nullcontext():
        trainer.train(resume_from_checkpoint=checkpoint)
        seconds = time.perf_counter() - start
        final = _kept_measures(trainer, config.run.keep_best) if held_out is not None else {}

    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        config.save(output_dir / TRAIN_CONFIG_FILE)
    result = TrainResult(output_dir=output_dir, stage=spec.number, global_step=trainer.state.global_step,
                         seconds=seconds, trainable=trainable, samples=len(dataset),
                         log_history=list(trainer.state.log_history), held_out=final)
    if config.run.keep_best:
        result.held_out["best_step"] = _step_of(trainer.state.best_model_checkpoint)
    if config.export.enabled and trainer.is_world_process_zero():
        from lyra.training.export import export_model

        dtype = getattr(torch, config.export.dtype)
        target = Path(config.export.path) if config.export.path else output_dir / "export"
        exported = export_model(trainer.accelerator.unwrap_model(model), processor, target, dtype=dtype,
                                max_megabytes=config.export.max_megabytes,
                                include_speech_encoder=config.export.include_speech_encoder)
        result.export = asdict(exported)
    result.model = trainer.accelerator.unwrap_model(model)
    if trainer.is_world_process_zero():
        write_summary(result, config, args)
    return result


def match_vocoder_units(model: LyraForConditionalGeneration, folder: Path) -> None:
    """Stage 4 learns the units of the vocoder in `folder`: a generator built for another unit inventory gets a
    fresh output layer of the vocoder's size (and the model config says so), before training or resuming."""
    from lyra.vocoder import load_vocoder

    units = load_vocoder(folder).num_units
    before = model.speech_generator.settings.num_units
    if model.speech_generator.resize_units(units):
        model.config.speech_generator = {**model.config.speech_generator, "num_units": units}
        log.warning("the speech generator emitted %d units, the vocoder in %s has %d: its output layer starts "
                    "afresh at %d units", before, folder, units, units)


def write_summary(result: TrainResult, config: TrainConfig, args: TrainingArguments) -> Path:
    """`train_summary.json` in the run's output folder: the result (without the model) and where it ran."""
    summary = {f.name: getattr(result, f.name) for f in fields(result) if f.name != "model"}
    summary["output_dir"] = str(result.output_dir)
    summary.update(name=config.name, device=str(args.device), world_size=args.world_size,
                   torch=torch.__version__, threads=torch.get_num_threads(),
                   omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
    path = Path(result.output_dir) / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return path
