"""Speech projector: Whisper encoder frames -> LLM-width speech tokens."""

from __future__ import annotations

import torch
from torch import nn


class SpeechProjector(nn.Module):
    """Stack k consecutive encoder frames and map them to the LLM width.

    Trailing frames that do not fill a group of k are dropped, as in the reference:
    1500 frames of one 30 s window -> 300 tokens for k = 5.
    """

    def __init__(self, encoder_dim: int, llm_dim: int, k: int = 5, hidden_size: int = 2048):
        super().__init__()
        self.k = k
        self.linear1 = nn.Linear(encoder_dim * k, hidden_size)
        self.act = nn.ReLU()
        self.linear2 = nn.Linear(hidden_size, llm_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (W, F, encoder_dim) -> tokens (W, F // k, llm_dim)."""
        w, f, d = frames.shape
        f = f - f % self.k
        stacked = frames[:, :f].reshape(w, f // self.k, d * self.k)  # (W, F/k, k*D)
        return self.linear2(self.act(self.linear1(stacked)))


def keep_window_tokens(tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep the first counts[w] tokens of each window and concatenate them.

    tokens (W, N, D), counts (W,) -> (sum(counts), D). With untrimmed windows every count is N.
    """
    n = tokens.shape[1]
    if counts.numel() and int(counts.max()) > n:
        raise ValueError(f"speech_token_counts asks for {int(counts.max())} tokens from a window that has {n}")
    keep = torch.arange(n, device=tokens.device)[None, :] < counts.to(tokens.device)[:, None]  # (W, N)
    return tokens[keep]
