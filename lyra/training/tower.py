"""The vision-tower pass of stage 0: a from-scratch Qwen2-VL vision tower learns shapes from dense labels.

    result = train_tower(load_train_config("configs/train/nano_stage0_tower.yaml"))

Only the vision tower (and its merger) trains. Each image is drawn for the run (`lyra.data.synth_images`), and
every merged image token is asked three things through throw-away linear heads: what covers its cell (background,
one of the seven shapes, or a printed word), in which colour (`cell_labels`) and, on a word's cells, which word
(`cell_words`; without that head the tokens named the word 11% of the time, chance 2%: docs/nano.md, run 9).
Through the LLM a tower from random weights learns colours quickly but shapes barely: a one-word or one-sentence
answer gives one signal per image, these labels 64 (docs/nano.md, run 4). The heads are dropped afterwards; the
model folder written is the whole Lyra model with the trained tower.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset
from transformers import Trainer

from lyra.processing import LyraProcessor
from lyra.training.config import TrainConfig

if TYPE_CHECKING:
    from lyra.training.trainer import TrainResult

__all__ = ["DrawnCells", "TowerHeads", "cell_accuracy", "collate_cells", "train_tower"]

log = logging.getLogger(__name__)

HELD_OUT_SEED = "held-out"  # DrawnCells seed of the images the accuracy is measured on (never trained on)
HELD_OUT_IMAGES = 256  # drawings the accuracy is measured on (about 2,000 covered cells)


class DrawnCells(Dataset):
    """`n` drawn images (one seed each, so any index is reproducible) with their per-cell labels.

    Each item: pixel_values (patches, C*T*P*P) and image_grid_thw (1, 3) from the model's image processor,
    kinds and colors (cells,) indices into `CELL_KINDS` and `CELL_COLORS`, words (cells,) `cell_words`, cells =
    merged tokens of the image. `kinds` (question kind -> odds, as `data.drawn_kinds`) picks the scenes drawn
    (a word scene for "word"); by default any of the data builder's.
    """

    def __init__(self, n: int, processor: LyraProcessor, seed: int | str = 0, kinds: dict[str, float] | None = None):
        from lyra.data.synth_images import IMAGE_SIZE

        self.n, self.seed, self.image_processor = n, seed, processor.image_processor
        self.kinds = dict(kinds or {})
        cell = self.image_processor.patch_size * self.image_processor.merge_size
        if IMAGE_SIZE % cell:
            raise ValueError(f"drawn images of {IMAGE_SIZE} px do not split into cells of {cell} px (patch x merge)")
        self.cells = IMAGE_SIZE // cell

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from lyra.data.synth_images import cell_labels, cell_words, make_image_qa

        rng = random.Random(f"drawn-cells-{self.seed}-{index}")
        kind = rng.choices(list(self.kinds), list(self.kinds.values()))[0] if self.kinds else None
        qa = make_image_qa(rng, None if kind == "describe" else kind)
        pixels = self.image_processor(images=[qa.image], return_tensors="pt")
        grid = pixels["image_grid_thw"]
        if grid[0, 1] * grid[0, 2] != (self.cells * self.image_processor.merge_size) ** 2:
            raise ValueError(f"the image processor resized a {qa.image.size} drawing to grid {grid.tolist()}; "
                             "the cell labels need it kept at its size (min_pixels <= 224 * 224 <= max_pixels)")
        kinds, colors = cell_labels(qa.items, cells=self.cells)
        return {"pixel_values": pixels["pixel_values"], "image_grid_thw": grid,
                "kinds": torch.tensor(kinds), "colors": torch.tensor(colors),
                "words": torch.tensor(cell_words(qa.items, kinds))}


def collate_cells(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Images of a batch one after another, as the vision tower takes them."""
    return {key: torch.cat([item[key] for item in items]) for key in items[0]}


class TowerHeads(nn.Module):
    """A Qwen2-VL vision tower + merger and three linear heads on each merged token (kinds, colours, words; the
    word head is trained on a word's cells only)."""

    def __init__(self, visual: nn.Module, width: int):
        from lyra.data.synth_images import CELL_COLORS, CELL_KINDS, PRINTED_WORDS

        super().__init__()
        self.visual = visual
        self.kind_head = nn.Linear(width, len(CELL_KINDS))
        self.color_head = nn.Linear(width, len(CELL_COLORS))
        self.word_head = nn.Linear(width, 1 + len(PRINTED_WORDS))

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, kinds: torch.Tensor | None = None,
                colors: torch.Tensor | None = None, words: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        tokens = self.visual(pixel_values, grid_thw=image_grid_thw).pooler_output  # (cells of every image, D)
        out = {"kind_logits": self.kind_head(tokens), "color_logits": self.color_head(tokens),
               "word_logits": self.word_head(tokens)}
        if kinds is not None and colors is not None:
            out["loss"] = F.cross_entropy(out["kind_logits"], kinds) + F.cross_entropy(out["color_logits"], colors)
            on_word = words > 0 if words is not None else None
            if on_word is not None and bool(on_word.any()):
                out["loss"] = out["loss"] + F.cross_entropy(out["word_logits"][on_word], words[on_word])
        return out


@torch.no_grad()
def cell_accuracy(heads: TowerHeads, data: DrawnCells, batch_size: int = 32) -> dict[str, float]:
    """Accuracy of the heads on the cells that hold something (the background is most cells and easy); the word
    head's on the cells of a word."""
    was_training = heads.training
    heads.eval()
    device = next(heads.parameters()).device
    right = {"kind": 0, "color": 0, "word": 0}
    covered = worded = 0
    for start in range(0, len(data), batch_size):
        batch = collate_cells([data[i] for i in range(start, min(start + batch_size, len(data)))])
        out = heads(batch["pixel_values"].to(device), batch["image_grid_thw"].to(device))
        out = {key: value.cpu() for key, value in out.items()}
        fg = batch["kinds"] > 0
        covered += int(fg.sum())
        right["kind"] += int((out["kind_logits"].argmax(-1) == batch["kinds"])[fg].sum())
        right["color"] += int((out["color_logits"].argmax(-1) == batch["colors"])[fg].sum())
        on_word = batch["words"] > 0
        worded += int(on_word.sum())
        right["word"] += int((out["word_logits"].argmax(-1) == batch["words"])[on_word].sum())
    heads.train(was_training)
    totals = {"kind": covered, "color": covered, "word": worded}
    return {f"{key}_accuracy": value / max(totals[key], 1) for key, value in right.items()}


def train_tower(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train only the vision tower of the run's model on `config.data.drawn_cells` labelled drawings; save the
    model and processor to `run.output_dir` (resumable from its `checkpoint-N/` folders with `resume`).
    `held_out` of the result: the heads' accuracy on cells of 256 drawings never trained on."""
    from lyra.training.trainer import (
        TRAIN_CONFIG_FILE,
        TrainResult,
        build_model,
        last_checkpoint,
        training_arguments,
        write_summary,
    )

    output_dir = Path(config.run.output_dir)
    checkpoint = last_checkpoint(output_dir) if resume else None
    output_dir.mkdir(parents=True, exist_ok=True)
    args = training_arguments(config, progress=progress)
    model, processor = build_model(config)
    model.requires_grad_(False)
    model.visual.requires_grad_(True)
    heads = TowerHeads(model.visual, model.config.backbone_config.vision_config.hidden_size)
    trainable = sum(p.numel() for p in model.visual.parameters())
    log.info("stage 0 (vision tower): training %d parameters on %d drawings", trainable, config.data.drawn_cells)
    dataset = DrawnCells(config.data.drawn_cells, processor, seed=config.data.text_seed, kinds=config.data.drawn_kinds)
    trainer = Trainer(model=heads, args=args, train_dataset=dataset, data_collator=collate_cells)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start

    held_out = DrawnCells(HELD_OUT_IMAGES, processor, seed=HELD_OUT_SEED)
    accuracy = cell_accuracy(heads, held_out, args.per_device_train_batch_size)
    log.info("held-out cells: %s", accuracy)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    config.save(output_dir / TRAIN_CONFIG_FILE)
    result = TrainResult(output_dir=output_dir, stage=0, global_step=trainer.state.global_step, seconds=seconds,
                         trainable={"vision": trainable}, samples=len(dataset), held_out=accuracy,
                         log_history=list(trainer.state.log_history), model=model)
    write_summary(result, config, args)
    return result
