"""Input builders for model tests (token ids, fake speech windows and images)."""

import torch

SPEECH = 151657
IMAGE = 151655
VISION_START, VISION_END = 151652, 151653


def speech_inputs(n_speech: int, before: int = 5, after: int = 7, windows: int = 1, n_mels: int = 80, seed: int = 0,
                  batch: int = 1):
    """input_ids with `n_speech` speech placeholders between text, and matching random windows."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        rows.append(torch.cat([torch.randint(10, 1000, (before,), generator=g), torch.full((n_speech,), SPEECH),
                               torch.randint(10, 1000, (after,), generator=g)]))
    ids = torch.stack(rows)
    counts = _split(n_speech, windows).repeat(batch)
    feats = torch.randn(windows * batch, n_mels, 3000, generator=g)
    return {"input_ids": ids, "input_features": feats, "speech_token_counts": counts,
            "speech_clip_windows": torch.full((batch,), windows)}


def _split(n: int, windows: int) -> torch.Tensor:
    per = [min(300, n - 300 * i) for i in range(windows)]
    return torch.tensor(per)


def image_inputs(grid=(1, 4, 6), before: int = 4, after: int = 6, seed: int = 0, patch_dim: int = 3 * 2 * 14 * 14):
    """input_ids with one image (grid t,h,w in patches; merge 2x2) and random pixel patches."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    n_tokens = t * h * w // 4
    ids = torch.cat([torch.randint(10, 1000, (before,), generator=g), torch.tensor([VISION_START]),
                     torch.full((n_tokens,), IMAGE), torch.tensor([VISION_END]),
                     torch.randint(10, 1000, (after,), generator=g)])[None]
    types = (ids == IMAGE).int()
    pixels = torch.randn(t * h * w, patch_dim, generator=g)
    return {"input_ids": ids, "mm_token_type_ids": types, "pixel_values": pixels,
            "image_grid_thw": torch.tensor([list(grid)])}
