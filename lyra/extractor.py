"""Latent multi-modality extractor (LCME): query-aware dropping of multimodal tokens.

At a pruning layer the text-query tokens look at the multimodal tokens through that layer's own
attention projections; the multimodal tokens they attend to least are dropped from the hidden states,
positions, rotary tables, masks and labels before the next layer. The scores are computed here from
q/k directly, so the extractor works the same whatever attention kernel (eager, sdpa, flash) the
layers use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

from lyra.configuration import ExtractorConfig


def is_pruning_layer(layer_idx: int, num_layers: int, config: ExtractorConfig) -> bool:
    """Layers after which tokens are dropped: (i + 1) % gap == 0, never the last layer."""
    return config.enabled and (layer_idx + 1) % config.gap == 0 and layer_idx < num_layers - 1


def query_mask_for(mm_mask: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Text tokens after the first multimodal token of each sample that are not answer targets.

    mm_mask, valid (B, L) bool; labels (B, L) or None -> (B, L) bool.
    """
    after_first_mm = torch.cumsum(mm_mask.int(), dim=1) > 0
    query = after_first_mm & ~mm_mask & valid
    if labels is not None:
        query &= labels < 0
    return query


def mm_attention_scores(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    query_mask: torch.Tensor,
    key_valid: torch.Tensor,
) -> torch.Tensor:
    """Attention the query tokens pay to every token of the chunk, averaged over heads and queries.

    Args:
        layer: a Qwen2-VL decoder layer (its input norm and q/k projections, LoRA included, are used).
        hidden: (B, L, D) input of that layer.
        cos, sin: (B, L, head_dim) rotary tables of the chunk.
        query_mask: (B, L) bool, the text-query tokens.
        key_valid: (B, L) bool, tokens that may be attended (not padding).
    Returns:
        (B, L) float32 scores; rows without queries are all zero.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    b, length, _ = x.shape
    n_q = int(query_mask.sum(1).max())
    if n_q == 0:
        return torch.zeros(b, length, device=x.device)
    # Gather each sample's query positions into a (B, Nq) table, padded with position 0.
    order = torch.sort(query_mask.int(), dim=1, descending=True, stable=True).indices[:, :n_q]  # (B, Nq)
    q_valid = torch.gather(query_mask, 1, order)  # (B, Nq)
    xq = torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[-1]))
    cos_q = torch.gather(cos, 1, order[..., None].expand(-1, -1, cos.shape[-1]))
    sin_q = torch.gather(sin, 1, order[..., None].expand(-1, -1, sin.shape[-1]))

    head_dim = attn.head_dim
    q = attn.q_proj(xq).view(b, n_q, -1, head_dim).transpose(1, 2)  # (B, H, Nq, hd)
    k = attn.k_proj(x).view(b, length, -1, head_dim).transpose(1, 2)  # (B, Hkv, L, hd)
    q, _ = apply_rotary_pos_emb(q, q, cos_q, sin_q)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)  # (B, H, L, hd)

    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scaling  # (B, H, Nq, L)
    causal = torch.arange(length, device=x.device)[None, None, :] <= order[..., None]  # (B, Nq, L)
    allowed = causal & key_valid[:, None, :]
    logits = logits.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    probs = logits.softmax(-1).mean(1)  # (B, Nq, L): averaged over heads
    probs = probs * q_valid[..., None]
    return probs.sum(1) / q_valid.sum(1, keepdim=True).clamp(min=1)


@dataclass
class Compaction:
    """Which tokens survive a pruning step, as a gather plan.

    index (B, L') positions in the old sequence; valid (B, L') False for left padding introduced when
    samples keep different numbers of tokens.
    """

    index: torch.Tensor
    valid: torch.Tensor

    def gather(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """Apply to a (B, L, ...) tensor; padded slots get `fill`."""
        idx = self.index.view(*self.index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        out = torch.gather(x, 1, idx)
        pad = ~self.valid.view(*self.valid.shape, *([1] * (x.dim() - 2)))
        return out.masked_fill(pad, fill) if (~self.valid).any() else out


def keep_counts(n_mm: torch.Tensor, config: ExtractorConfig) -> torch.Tensor:
    """Multimodal tokens kept per sample: max(min_keep, ceil(keep_rate * n)), never more than n."""
    want = torch.tensor(
        [max(config.min_keep, math.ceil(config.keep_rate * int(n))) for n in n_mm.tolist()], device=n_mm.device
    )
    return torch.minimum(want, n_mm)


def plan_compaction(
    scores: torch.Tensor, mm_mask: torch.Tensor, valid: torch.Tensor, config: ExtractorConfig
) -> Compaction | None:
    """Pick the top-scoring multimodal tokens per sample; None when nothing would be dropped.

    scores (B, L) from `mm_attention_scores`; mm_mask, valid (B, L) bool. Non-multimodal tokens (and
    padding) are always kept, so every sample keeps its text and its order.
    """
    mm = mm_mask & valid
    n_mm = mm.sum(1)
    keep_n = keep_counts(n_mm, config)
    if bool((keep_n == n_mm).all()):
        return None
    b, length = mm.shape
    ranked = scores.masked_fill(~mm, float("-inf"))
    order = ranked.argsort(dim=1, descending=True, stable=True)  # (B, L)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(length, device=order.device).expand(b, -1))
    keep = ~mm | (rank < keep_n[:, None])  # (B, L)
    new_len = keep.sum(1)
    width = int(new_len.max())
    # Right-align each sample's kept tokens (left padding, as in generation batches).
    slot = torch.cumsum(keep.int(), dim=1) - 1 + (width - new_len)[:, None]
    index = torch.zeros(b, width, dtype=torch.long, device=keep.device)
    rows = torch.arange(b, device=keep.device)[:, None].expand(-1, length)
    index[rows[keep], slot[keep]] = torch.arange(length, device=keep.device).expand(b, -1)[keep]
    valid_new = torch.arange(width, device=keep.device)[None, :] >= (width - new_len)[:, None]
    return Compaction(index=index, valid=valid_new)
