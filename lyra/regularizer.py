"""Latent cross-modality regularizer (LCMR): soft-DTW between projected speech and transcript embeddings.

The speech tokens of a clip (S x D) are aligned monotonically with the LLM input embeddings of its
transcript (T x D). The cost of pairing speech token i with text token j is
``-log_softmax_j(s_i . t_j / tau)`` and the loss is ``soft-DTW(cost, gamma) / S``, averaged over the
samples that have a transcript.

Soft-DTW here is plain torch: the dynamic programme is swept one anti-diagonal at a time, every cell of
a diagonal and every batch item in one batched op, and autograd differentiates it. There is no length
cap and no custom kernel; it runs wherever torch runs (CPU, CUDA) in float32 or float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Stand-in for the +inf borders of the DP, in units of gamma (the sweep works on -R / gamma).
# Finite so that no inf - inf or 0 * inf can reach autograd; exp(-_BIG) is exactly 0 in any float.
_BIG = 1e30


def _logsumexp3(z: Tensor) -> Tensor:
    """logsumexp over the last dim, (..., 3) -> (...), whose backward is a softmax normalised to 1.

    torch.logsumexp's backward is exp(z - out) with the rounded output; once |z| is in the thousands
    (float32) those weights no longer sum to 1 and the error compounds over thousands of diagonals.
    Shifting by a detached max keeps the value exact and makes the gradient exp(z - m) / sum.
    """
    m = z.detach().amax(dim=-1, keepdim=True)
    return (z - m).exp().sum(dim=-1).log() + m.squeeze(-1)


def soft_dtw(cost: Tensor, gamma: float, cost_lengths: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Soft-DTW value of each pairwise cost matrix in a batch.

    Computes ``R[S, T]`` of the recursion
    ``R[i, j] = cost[i-1, j-1] + softmin_gamma(R[i-1, j-1], R[i-1, j], R[i, j-1])``
    with ``softmin_gamma(a) = -gamma * logsumexp(-a / gamma)``, ``R[0, 0] = 0`` and every other
    border cell ``+inf`` (1-based DP indices over a 0-based ``cost``). As ``gamma -> 0`` this tends
    to the hard DTW value from below.

    Args:
        cost: (B, S, T) pairwise costs. float16/bfloat16 are upcast to float32.
        gamma: smoothing temperature, > 0.
        cost_lengths: optional ``(S_b, T_b)``, two (B,) integer tensors with ``1 <= S_b <= S`` and
            ``1 <= T_b <= T``. Sample b then gets ``R[S_b, T_b]`` of its top-left ``S_b x T_b`` block;
            costs outside that block are ignored (they may be inf or nan) and get zero gradient.

    Returns:
        (B,) soft-DTW values in the compute dtype (float32 or float64).

    Memory is O(B * S * T): each of the S + T - 1 diagonal steps keeps O(B * min(S, T)) for backward.
    """
    if cost.dim() != 3:
        raise ValueError(f"soft_dtw expects cost of shape (B, S, T), got {tuple(cost.shape)}")
    if not cost.is_floating_point():
        raise TypeError(f"soft_dtw expects a floating-point cost, got {cost.dtype}")
    if not gamma > 0:
        raise ValueError(f"soft_dtw needs gamma > 0, got {gamma}")
    if cost.dtype not in (torch.float32, torch.float64):
        cost = cost.float()
    B, S, T = cost.shape
    if S == 0 or T == 0:
        raise ValueError(f"soft_dtw needs S >= 1 and T >= 1, got cost of shape {tuple(cost.shape)}")
    device = cost.device

    if cost_lengths is not None:
        s_len, t_len = (x.to(device=device, dtype=torch.long) for x in cost_lengths)
        if s_len.shape != (B,) or t_len.shape != (B,):
            raise ValueError(
                f"cost_lengths must be two ({B},) tensors, got {tuple(s_len.shape)} and {tuple(t_len.shape)}"
            )
        if bool(((s_len < 1) | (s_len > S) | (t_len < 1) | (t_len > T)).any()):
            raise ValueError(
                f"cost_lengths out of range for cost of shape {tuple(cost.shape)}: "
                f"S_b={s_len.tolist()}, T_b={t_len.tolist()}; need 1 <= S_b <= {S} and 1 <= T_b <= {T}"
            )
        inside = (torch.arange(S, device=device)[None, :, None] < s_len[:, None, None]) & (
            torch.arange(T, device=device)[None, None, :] < t_len[:, None, None]
        )
        # Cells past a sample's lengths never feed its R[S_b, T_b]; zero them so inf/nan padding
        # cannot poison the shared sweep (nor its backward through 0 * nan).
        cost = torch.where(inside, cost, cost.new_zeros(()))

    # The recursion is symmetric under transposition; sweeping with the shorter side across each
    # diagonal keeps the diagonal width (and the skewed copy below) at min(S, T) + 1.
    if S > T:
        cost = cost.transpose(1, 2)
        S, T = T, S
        if cost_lengths is not None:
            s_len, t_len = t_len, s_len

    # Diagonal d (= i + j, DP indices) holds cells i = 0..S. Skew the costs once with a single gather:
    # a per-step slice or diagonal() of `cost` would allocate a full (B, S, T) gradient every step.
    n_diag = S + T - 1  # diagonals d = 2 .. S + T hold all interior cells
    i = torch.arange(S + 1, device=device)[None, :]  # (1, S + 1)
    d = torch.arange(2, S + T + 1, device=device)[:, None]  # (n_diag, 1)
    j = d - i  # (n_diag, S + 1)
    interior = (i >= 1) & (j >= 1) & (j <= T)  # (n_diag, S + 1)
    flat = torch.where(interior, (i - 1) * T + (j - 1), S * T)  # S * T points at a zero pad
    neg_cost = torch.cat([cost.reshape(B, S * T), cost.new_zeros(B, 1)], dim=1) / (-gamma)  # (B, S*T + 1)
    neg_cost_diags = neg_cost[:, flat].unbind(1)  # n_diag x (B, S + 1)
    interior_diags = interior.unbind(0)  # n_diag x (S + 1,)

    # Sweep N = -R / gamma, so that softmin becomes a plain logsumexp. Each diagonal is stored with a
    # leading -BIG column standing for cell i = -1: the "i - 1" neighbours are then a plain slice.
    # Row layout: position p holds cell i = p - 1.
    # N grows like (S + T) * cost / gamma; in float32 the small differences that set the softmin
    # weights then drown in rounding (about 1% gradient error at 3000 x 500 with torch.logsumexp and
    # absolute N; 1e-4 with the offsets below and _logsumexp3). So each diagonal is kept relative to
    # its own maximum: N_d = n_d + M_d, M_d = M_{d-1} + delta_d. The offsets are detached constants:
    # the identity holds for any offsets, so the gradient is unchanged.
    n0 = torch.full((B, S + 2), -_BIG, dtype=cost.dtype, device=device)
    n0[:, 1] = 0.0  # R[0, 0] = 0
    n1 = torch.full((B, S + 2), -_BIG, dtype=cost.dtype, device=device)  # R[0, 1], R[1, 0]: borders
    diags = [n0, n1]  # n_d, kept only to read R[S_b, T_b] for per-sample lengths
    deltas = [cost.new_zeros(B), cost.new_zeros(B)]  # delta_0 = delta_1 = 0
    prev2, prev1 = n0, n1  # prev2 holds n_{d-2} - delta_{d-1}, i.e. n_{d-2} relative to M_{d-1}
    for k in range(n_diag):
        # neighbours of cell i: (i-1, j-1) on d-2, (i-1, j) on d-1, (i, j-1) on d-1
        z = torch.stack((prev2[:, :-1], prev1[:, :-1], prev1[:, 1:]), dim=-1)  # (B, S + 1, 3)
        u = torch.where(interior_diags[k], neg_cost_diags[k] + _logsumexp3(z), -_BIG)  # (B, S + 1)
        delta = u.detach().amax(dim=1)  # (B,): every diagonal has an interior cell, so this is finite
        cur = F.pad(u - delta[:, None], (1, 0), value=-_BIG)  # (B, S + 2)
        prev2, prev1 = prev1 - delta[:, None], cur
        deltas.append(delta)
        if cost_lengths is not None:
            diags.append(cur)

    offsets = torch.stack(deltas).to(torch.float64).cumsum(0).to(cost.dtype)  # (S + T + 1, B): M_d
    if cost_lengths is None:
        return (prev1[:, S + 1] + offsets[-1]) * (-gamma)
    # R[S_b, T_b] lies on diagonal S_b + T_b at position S_b + 1.
    ends = [
        diags[s + t][b, s + 1] + offsets[s + t, b]
        for b, (s, t) in enumerate(zip(s_len.tolist(), t_len.tolist()))
    ]
    return torch.stack(ends) * (-gamma)


def lcmr_cost(speech: Tensor, text: Tensor, tau: float, text_mask: Tensor | None = None) -> Tensor:
    """Pairwise LCMR cost between speech tokens and transcript embeddings.

    ``cost[b, i, j] = -log_softmax_j(speech[b, i] . text[b, j] / tau)`` with raw (unnormalised) dot
    products, so ``exp(-cost[b, i])`` is a distribution over the valid text positions of sample b.

    Args:
        speech: (B, S, D) projected speech tokens.
        text: (B, T, D) LLM input embeddings of the transcript.
        tau: softmax temperature, > 0.
        text_mask: optional (B, T) bool, True at valid text positions. Masked columns are left out of
            the softmax (probability exactly 0) and get a huge finite cost; exclude them from any
            alignment, e.g. with ``soft_dtw(..., cost_lengths=...)``.

    Returns:
        (B, S, T) cost in float32 (float64 if the inputs are float64).
    """
    if speech.dim() != 3 or text.dim() != 3:
        raise ValueError(
            f"lcmr_cost expects speech (B, S, D) and text (B, T, D), got {tuple(speech.shape)} and {tuple(text.shape)}"
        )
    if speech.shape[0] != text.shape[0] or speech.shape[2] != text.shape[2]:
        raise ValueError(
            f"lcmr_cost: batch and hidden sizes must match, got speech {tuple(speech.shape)}, text {tuple(text.shape)}"
        )
    if not tau > 0:
        raise ValueError(f"lcmr_cost needs tau > 0, got {tau}")
    # tau = 0.06 magnifies logits ~17x: do the softmax in at least float32.
    dtype = torch.float64 if torch.float64 in (speech.dtype, text.dtype) else torch.float32
    logits = torch.einsum("bsd,btd->bst", speech.to(dtype), text.to(dtype)) / tau  # (B, S, T)
    if text_mask is not None:
        if text_mask.shape != text.shape[:2]:
            raise ValueError(f"text_mask must have shape {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")
        # Finite fill (not -inf): a sample with no valid text then gives a uniform row instead of nan,
        # which would otherwise leak into the gradient of the whole batch through 0 * nan.
        fill = torch.finfo(dtype).min / 4
        logits = logits.masked_fill(~text_mask.to(torch.bool)[:, None, :], fill)
    return -torch.log_softmax(logits, dim=-1)


def _pack_valid(x: Tensor, mask: Tensor) -> Tensor:
    """Move the valid positions of each row to the front, keeping their order. x: (B, L, D), mask: (B, L)."""
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # (B, L): valid first
    return x.gather(1, order[:, :, None].expand(-1, -1, x.shape[2]))


def lcmr_loss(
    speech: Tensor,
    speech_mask: Tensor,
    text: Tensor,
    text_mask: Tensor,
    has_transcript: Tensor,
    tau: float = 0.06,  # softmax temperature of the cost (reference value)
    gamma: float = 0.1,  # soft-DTW smoothing (reference value)
) -> Tensor:
    """LCMR loss: mean over transcribed samples of ``soft_dtw(lcmr_cost(s, t, tau), gamma) / S_b``.

    Args:
        speech: (B, S, D) projected speech tokens (padded).
        speech_mask: (B, S) bool, True at valid speech tokens (any padding side; order is kept).
        text: (B, T, D) LLM input embeddings of each transcript (padded).
        text_mask: (B, T) bool, True at valid transcript tokens.
        has_transcript: (B,) bool; samples without a transcript are left out entirely (their tensors
            neither enter the value nor get gradient).
        tau: temperature of the cost softmax.
        gamma: soft-DTW smoothing.

    Returns:
        Scalar loss (float32, or float64 for float64 inputs). If no sample has a transcript it is a
        zero still connected to ``speech``, so ``backward()`` works and gives zero gradients.

    Raises:
        ValueError: on shape mismatches, or if a sample with a transcript has no valid speech token or
            no valid text token.
    """
    if speech.dim() != 3 or text.dim() != 3:
        raise ValueError(
            f"lcmr_loss expects speech (B, S, D) and text (B, T, D), got {tuple(speech.shape)} and {tuple(text.shape)}"
        )
    B = speech.shape[0]
    if speech_mask.shape != speech.shape[:2] or text_mask.shape != text.shape[:2] or has_transcript.shape != (B,):
        raise ValueError(
            f"lcmr_loss: masks must be speech_mask {tuple(speech.shape[:2])}, text_mask {tuple(text.shape[:2])}, "
            f"has_transcript ({B},); got {tuple(speech_mask.shape)}, {tuple(text_mask.shape)}, "
            f"{tuple(has_transcript.shape)}"
        )
    speech_mask = speech_mask.to(torch.bool)
    text_mask = text_mask.to(torch.bool)
    keep = has_transcript.to(device=speech.device, dtype=torch.bool)

    s_len = speech_mask.sum(1)  # (B,)
    t_len = text_mask.sum(1)  # (B,)
    empty = keep & ((s_len == 0) | (t_len == 0))
    if bool(empty.any()):
        bad = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"lcmr_loss: samples {bad} have has_transcript=True but no valid speech or text tokens "
            f"(speech lengths {s_len[empty].tolist()}, text lengths {t_len[empty].tolist()}); "
            "set has_transcript=False for them"
        )
    if not bool(keep.any()):
        return speech.sum() * 0.0

    # Only transcribed samples enter the computation; pack valid positions to the front and trim.
    speech, speech_mask, s_len = speech[keep], speech_mask[keep], s_len[keep]
    text, text_mask, t_len = text[keep], text_mask[keep], t_len[keep]
    s_max, t_max = int(s_len.max()), int(t_len.max())
    speech = _pack_valid(speech, speech_mask)[:, :s_max]  # (B', S', D)
    text = _pack_valid(text, text_mask)[:, :t_max]  # (B', T', D)
    packed_text_mask = torch.arange(t_max, device=text.device)[None, :] < t_len[:, None]  # (B', T')

    cost = lcmr_cost(speech, text, tau, text_mask=packed_text_mask)  # (B', S', T')
    per_sample = soft_dtw(cost, gamma, cost_lengths=(s_len, t_len)) / s_len.to(cost.dtype)  # (B',)
    return per_sample.mean()
