"""Image-token positions as content: where each merged image token sits, added to its features.

Qwen2-VL places image tokens only through M-RoPE, inside the attention scores. The nano model's tower gives a
token no trace of its place (a linear probe names a single shape's row from its token 14% of the time, chance
12.5%; docs/nano.md, run 9), and its 4-layer LLM did not learn to read the place out of the scores, so it could
not say where a thing is. `ImagePositions` adds, to each merged token, sines and cosines of its cell's centre as a
fraction of the image's height and width, through a linear layer that starts at zero: a model gains it without
any change to what it computes until training moves the layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lyra.configuration import ImagePositionConfig
from lyra.constants import ZERO_INIT


class ImagePositions(nn.Module):
    """Position features of merged image tokens -> LLM width (zero at initialisation).

    Args:
        config: frequencies per axis.
        llm_dim: the LLM width the image tokens have.
        merge_size: the vision merger's spatial merge (2 for Qwen2-VL): `image_grid_thw` counts patches, the
            LLM sees one token per merge x merge patches.
    """

    def __init__(self, config: ImagePositionConfig, llm_dim: int, merge_size: int):
        super().__init__()
        self.frequencies = config.frequencies
        self.merge_size = merge_size
        self.proj = nn.Linear(config.features, llm_dim)
        setattr(self.proj, ZERO_INIT, True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def features(self, rows: int, cols: int, device=None) -> torch.Tensor:
        """(rows * cols, 4 * frequencies) for a grid of merged cells, row by row from the top left."""
        freqs = torch.arange(1, self.frequencies + 1, device=device, dtype=torch.float32) * math.pi
        ys = (torch.arange(rows, device=device, dtype=torch.float32) + 0.5) / rows
        xs = (torch.arange(cols, device=device, dtype=torch.float32) + 0.5) / cols
        y = (ys[:, None] * freqs).repeat_interleave(cols, dim=0)  # (rows * cols, F)
        x = (xs[:, None] * freqs).repeat(rows, 1)
        return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=-1)

    def forward(self, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """(N, 3) patch grids (t, h, w) -> (sum of t * h/merge * w/merge, llm_dim): one row per merged token, in the
        order Qwen2-VL's merger emits them (image by image, frame by frame, row by row)."""
        device = self.proj.weight.device
        rows = []
        for t, h, w in image_grid_thw.tolist():
            cells = self.features(h // self.merge_size, w // self.merge_size, device)
            rows.append(cells.repeat(t, 1))
        return self.proj(torch.cat(rows).to(self.proj.weight.dtype))
