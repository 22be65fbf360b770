"""The four training stages of Lyra (plus stage 0, the base pass the nano model needs), as data.

| stage | trains | adapter in the forward | loss |
|---|---|---|---|
| 0 base | LLM (embeddings, layers, norm, head) + vision tower (+ image positions) + "speech" projector | none | CE |
| 1 alignment | the "speech" projector | none | CE |
| 2 instruction | "speech" LoRA + "speech" projector | speech | CE + lambda * LCMR |
| 3 long speech | "long_speech" LoRA + "long_speech" projector (started from the speech projector) | long_speech | CE |
| 4 speech generation | the CTC speech generator | routed from the input | generator CTC |

Stage 0 exists because no base weights can be installed here: the reference starts from a pretrained
Qwen2-VL, the nano model from random weights. It may also read speech (ASR clips through the "speech"
projector): a from-scratch LLM learns to read speech tokens far faster while all its weights move than
through LoRA and the projector alone (docs/nano.md). Its vision-tower pass (`data.drawn_cells`,
`lyra.training.tower`) trains the vision tower alone, on per-cell labels of drawings, before the LLM reads it.
The Whisper encoder is frozen in every stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from torch import nn

from lyra.configuration import LONG_SPEECH_ADAPTER, SPEECH_ADAPTER
from lyra.modeling import AUTO, LyraForConditionalGeneration

__all__ = ["STAGES", "StageSpec", "parameter_groups", "prepare_stage", "set_trainable", "without_groups"]

# Parameter groups a stage can train.
LLM = "llm"  # the language model's own weights (LoRA weights excluded) and the output head
VISION = "vision"  # the vision tower, its merger and the image-token positions (lyra/vision.py) where there are any
GENERATOR = "generator"  # the CTC speech generator


def projector(name: str) -> str:
    return f"projector:{name}"


def lora(name: str) -> str:
    return f"lora:{name}"


@dataclass(frozen=True)
class StageSpec:
    """What one stage trains and how its loss is made."""

    number: int  # 0..4
    name: str  # short label
    trains: tuple[str, ...]  # parameter groups (LLM, VISION, GENERATOR, projector(name), lora(name))
    adapter: str | None  # LoRA adapter of the forward pass: a name, None (adapters off) or AUTO (routed)
    lcmr: bool = False  # add the LCMR term (needs transcripts in the batch)
    objective: str = "ce"  # "ce": CE (+ LCMR); "units": only the speech generator's CTC loss
    init_projector_from: str | None = None  # copy this projector into the trained one before the stage starts


STAGES: dict[int, StageSpec] = {
    0: StageSpec(0, "base", trains=(LLM, VISION, projector(SPEECH_ADAPTER)), adapter=None),
    1: StageSpec(1, "alignment", trains=(projector(SPEECH_ADAPTER),), adapter=None),
    2: StageSpec(2, "instruction", trains=(lora(SPEECH_ADAPTER), projector(SPEECH_ADAPTER)), adapter=SPEECH_ADAPTER,
                 lcmr=True),
    3: StageSpec(3, "long_speech", trains=(lora(LONG_SPEECH_ADAPTER), projector(LONG_SPEECH_ADAPTER)),
                 adapter=LONG_SPEECH_ADAPTER, init_projector_from=SPEECH_ADAPTER),
    4: StageSpec(4, "speech_generation", trains=(GENERATOR,), adapter=AUTO, objective="units"),
}


def without_groups(spec: StageSpec, frozen: Iterable[str]) -> StageSpec:
    """The stage with some of its parameter groups left frozen; a ValueError names a group it does not train or a
    stage left with nothing to train."""
    frozen = tuple(frozen)
    unknown = [g for g in frozen if g not in spec.trains]
    if unknown:
        raise ValueError(f"stage {spec.number} does not train {unknown}; it trains {list(spec.trains)}")
    trains = tuple(g for g in spec.trains if g not in frozen)
    if not trains:
        raise ValueError(f"stage {spec.number} would train nothing with {list(frozen)} frozen")
    return replace(spec, trains=trains)


def parameter_groups(model: LyraForConditionalGeneration, group: str) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs of one group; a KeyError names groups the model lacks."""
    named = list(model.named_parameters())
    if group == LLM:
        llm_prefix = "backbone.model.language_model."
        yield from ((n, p) for n, p in named
                    if (n.startswith(llm_prefix) and ".lora_" not in n) or n.startswith("backbone.lm_head."))
    elif group == VISION:
        yield from ((n, p) for n, p in named if n.startswith(("backbone.model.visual.", "image_positions.")))
    elif group == GENERATOR:
        if model.speech_generator is None:
            raise KeyError("this model has no speech generator (speech_generator.enabled is false in its config)")
        yield from ((n, p) for n, p in named if n.startswith("speech_generator."))
    elif group.startswith("projector:"):
        name = group.split(":", 1)[1]
        if name not in model.speech_projectors:
            raise KeyError(f"no speech projector {name!r}; the model has {list(model.speech_projectors)}")
        yield from ((n, p) for n, p in named if n.startswith(f"speech_projectors.{name}."))
    elif group.startswith("lora:"):
        name = group.split(":", 1)[1]
        if name not in model.adapters.names:
            raise KeyError(f"no LoRA adapter {name!r}; the model has {model.adapters.names}")
        yield from ((n, p) for n, p in named if f".lora_A.{name}." in n or f".lora_B.{name}." in n)
    else:
        raise KeyError(f"unknown parameter group {group!r}")


def set_trainable(model: LyraForConditionalGeneration, spec: StageSpec) -> dict[str, int]:
    """Freeze everything, then unfreeze the stage's groups; returns trained parameter counts per group."""
    model.requires_grad_(False)
    counts = {}
    for group in spec.trains:
        params = list(parameter_groups(model, group))
        if not params:
            raise KeyError(f"stage {spec.number} trains {group!r} but the model has no such parameters")
        for _, p in params:
            p.requires_grad_(True)
        counts[group] = sum(p.numel() for _, p in params)
    return counts


def prepare_stage(model: LyraForConditionalGeneration, spec: StageSpec, *, fresh: bool = True) -> dict[str, int]:
    """Set up a model for a stage: initialise what the stage starts from (`fresh`: not when resuming), then
    freeze all but the stage's parameters. Returns trained parameter counts per group."""
    if fresh and spec.init_projector_from is not None:
        source = model.speech_projectors[spec.init_projector_from]
        for group in spec.trains:
            if group.startswith("projector:"):
                target = model.speech_projectors[group.split(":", 1)[1]]
                if target is not source:
                    target.load_state_dict(source.state_dict())
    return set_trainable(model, spec)
