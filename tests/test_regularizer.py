"""LCMR: anti-diagonal soft-DTW against a brute-force DP, gradients, and the masked loss."""

import math
import time

import pytest
import torch

from lyra.regularizer import lcmr_cost, lcmr_loss, soft_dtw


def brute_soft_dtw(cost: torch.Tensor, gamma: float) -> torch.Tensor:
    """Textbook double-loop soft-DTW of one (S, T) cost, from torch scalar ops so autograd works.

    Border cells (+inf) are simply left out of the softmin rather than represented.
    """
    S, T = cost.shape
    R = [[None] * (T + 1) for _ in range(S + 1)]
    R[0][0] = cost.new_zeros(())
    for i in range(1, S + 1):
        for j in range(1, T + 1):
            prev = [r for r in (R[i - 1][j - 1], R[i - 1][j], R[i][j - 1]) if r is not None]
            softmin = -gamma * torch.logsumexp(-torch.stack(prev) / gamma, dim=0)
            R[i][j] = cost[i - 1, j - 1] + softmin
    return R[S][T]


def hard_dtw(cost: torch.Tensor) -> float:
    """Plain DTW of one (S, T) cost in Python floats."""
    S, T = cost.shape
    c = cost.tolist()
    R = [[math.inf] * (T + 1) for _ in range(S + 1)]
    R[0][0] = 0.0
    for i in range(1, S + 1):
        for j in range(1, T + 1):
            R[i][j] = c[i - 1][j - 1] + min(R[i - 1][j - 1], R[i - 1][j], R[i][j - 1])
    return R[S][T]


SHAPES = [(1, 1), (1, 7), (6, 1), (2, 2), (5, 9), (13, 4), (17, 17), (60, 200), (200, 60)]


@pytest.mark.parametrize("S,T", SHAPES)
@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_soft_dtw_matches_brute_force(S, T, gamma):
    g = torch.Generator().manual_seed(S * 1000 + T)
    cost = torch.rand(2, S, T, generator=g, dtype=torch.float64) * 3
    got = soft_dtw(cost, gamma)
    assert got.shape == (2,) and got.dtype == torch.float64
    with torch.no_grad():
        want = torch.stack([brute_soft_dtw(cost[b], gamma) for b in range(2)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_soft_dtw_padded_batch_with_lengths():
    g = torch.Generator().manual_seed(1)
    lengths = [(1, 1), (3, 9), (12, 5), (12, 12), (7, 1), (1, 10)]
    S, T = 12, 12
    cost = torch.rand(len(lengths), S, T, generator=g, dtype=torch.float64)
    # Padding may hold anything, including inf and nan: it must neither change values nor gradients.
    for b, (s, t) in enumerate(lengths):
        cost[b, s:, :] = float("nan")
        cost[b, :, t:] = float("inf")
    cost.requires_grad_(True)
    s_len = torch.tensor([s for s, _ in lengths])
    t_len = torch.tensor([t for _, t in lengths])
    got = soft_dtw(cost, 0.3, cost_lengths=(s_len, t_len))
    got.sum().backward()
    for b, (s, t) in enumerate(lengths):
        block = cost.detach()[b, :s, :t].clone().requires_grad_(True)
        want = brute_soft_dtw(block, 0.3)
        want.backward()
        assert abs(got[b].item() - want.item()) < 1e-9
        torch.testing.assert_close(cost.grad[b, :s, :t], block.grad, rtol=0, atol=1e-9)
        pad_grad = cost.grad[b].clone()
        pad_grad[:s, :t] = 0
        assert torch.all(pad_grad == 0)


def test_soft_dtw_lengths_out_of_range_fail_loudly():
    cost = torch.rand(2, 4, 5)
    with pytest.raises(ValueError, match="cost_lengths"):
        soft_dtw(cost, 0.1, cost_lengths=(torch.tensor([4, 5]), torch.tensor([5, 5])))
    with pytest.raises(ValueError, match="cost_lengths"):
        soft_dtw(cost, 0.1, cost_lengths=(torch.tensor([4, 0]), torch.tensor([5, 5])))


@pytest.mark.parametrize("S,T", [(1, 1), (1, 5), (4, 1), (3, 3), (6, 9), (11, 4)])
def test_soft_dtw_gradient_matches_brute_force(S, T):
    g = torch.Generator().manual_seed(7 + S * 31 + T)
    cost = (torch.rand(2, S, T, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    weights = torch.tensor([0.7, -1.3], dtype=torch.float64)
    (soft_dtw(cost, 0.2) * weights).sum().backward()
    ref = cost.detach().clone().requires_grad_(True)
    sum(w * brute_soft_dtw(ref[b], 0.2) for b, w in enumerate(weights)).backward()
    torch.testing.assert_close(cost.grad, ref.grad, rtol=0, atol=1e-10)


def test_soft_dtw_gradcheck():
    g = torch.Generator().manual_seed(3)
    cost = torch.rand(2, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: soft_dtw(c, 0.5), (cost,))
    lengths = (torch.tensor([4, 2]), torch.tensor([3, 6]))
    assert torch.autograd.gradcheck(lambda c: soft_dtw(c, 0.5, cost_lengths=lengths), (cost,))
    tall = torch.rand(1, 5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: soft_dtw(c, 0.1), (tall,))


def test_soft_dtw_tends_to_hard_dtw():
    g = torch.Generator().manual_seed(5)
    cost = torch.rand(3, 15, 23, generator=g, dtype=torch.float64)
    hard = torch.tensor([hard_dtw(cost[b]) for b in range(3)], dtype=torch.float64)
    previous_gap = None
    for gamma in (1.0, 0.1, 0.01, 1e-3, 1e-5):
        soft = soft_dtw(cost, gamma)
        gap = hard - soft
        # softmin <= min, and >= min - gamma * log(3) at each of the <= S + T - 1 cells of a path.
        assert torch.all(gap >= -1e-12)
        assert torch.all(gap <= gamma * math.log(3) * (15 + 23))
        if previous_gap is not None:
            assert torch.all(gap <= previous_gap + 1e-12)
        previous_gap = gap
    torch.testing.assert_close(soft_dtw(cost, 1e-5), hard, rtol=0, atol=1e-3)


def test_soft_dtw_dtypes():
    g = torch.Generator().manual_seed(11)
    cost = torch.rand(2, 8, 5, generator=g, dtype=torch.float64)
    ref = soft_dtw(cost, 0.1)
    got32 = soft_dtw(cost.float(), 0.1)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, rtol=1e-5, atol=1e-5)
    got16 = soft_dtw(cost.bfloat16(), 0.1)
    assert got16.dtype == torch.float32 and torch.isfinite(got16).all()
    torch.testing.assert_close(got16.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_soft_dtw_cuda_matches_cpu():
    g = torch.Generator().manual_seed(13)
    cost = torch.rand(3, 40, 90, generator=g, dtype=torch.float64)
    lengths = (torch.tensor([40, 17, 1]), torch.tensor([90, 33, 5]))
    cpu = cost.clone().requires_grad_(True)
    gpu = cost.cuda().requires_grad_(True)
    want = soft_dtw(cpu, 0.1, cost_lengths=lengths)
    got = soft_dtw(gpu, 0.1, cost_lengths=(lengths[0].cuda(), lengths[1].cuda()))
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-9)
    torch.testing.assert_close(gpu.grad.cpu(), cpu.grad, rtol=0, atol=1e-9)


def test_soft_dtw_long_sequence_has_no_length_cap():
    g = torch.Generator().manual_seed(17)
    cost = torch.rand(1, 3000, 500, generator=g).requires_grad_(True)
    start = time.perf_counter()
    value = soft_dtw(cost, 0.1)
    value.sum().backward()
    elapsed = time.perf_counter() - start
    print(f"soft_dtw 3000x500 forward+backward on CPU: {elapsed:.2f} s")
    assert torch.isfinite(value).all()
    assert torch.isfinite(cost.grad).all()
    # The gradient of soft-DTW w.r.t. the cost is a soft alignment: every cell weight in [0, 1],
    # every path starts at the first cell, and every row of the cost is visited at least once.
    assert cost.grad.min() >= 0 and cost.grad.max() <= 1 + 1e-3
    assert abs(cost.grad[0, 0, 0].item() - 1) < 1e-3 and abs(cost.grad[0, -1, -1].item() - 1) < 1e-3
    assert torch.all(cost.grad.sum(-1) >= 1 - 1e-3)


def test_soft_dtw_float32_gradient_stays_accurate_on_long_inputs():
    # Thousands of diagonals of float32 rounding must not compound into a visibly wrong alignment.
    g = torch.Generator().manual_seed(19)
    cost64 = (torch.rand(2, 1200, 300, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    cost32 = cost64.detach().float().requires_grad_(True)
    value64, value32 = soft_dtw(cost64, 0.1), soft_dtw(cost32, 0.1)
    value64.sum().backward()
    value32.sum().backward()
    torch.testing.assert_close(value32.double(), value64.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(cost32.grad.double(), cost64.grad, rtol=0, atol=5e-4)


# ----------------------------------------------------------------------------------------------
# LCMR cost and loss


def _embeddings(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_lcmr_cost_rows_are_negative_log_softmax():
    speech = _embeddings(2, 7, 16, seed=0)
    text = _embeddings(2, 5, 16, seed=1)
    text_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    cost = lcmr_cost(speech, text, 0.5, text_mask=text_mask)
    assert cost.shape == (2, 7, 5)
    torch.testing.assert_close(torch.exp(-cost[0]).sum(-1), torch.ones(7))
    torch.testing.assert_close(torch.exp(-cost[1, :, :3]).sum(-1), torch.ones(7))
    assert torch.all(torch.exp(-cost[1, :, 3:]) == 0)
    want = -torch.log_softmax(speech[1] @ text[1, :3].T / 0.5, dim=-1)
    torch.testing.assert_close(cost[1, :, :3], want)
    unmasked = lcmr_cost(speech, text, 0.5)
    torch.testing.assert_close(unmasked, -torch.log_softmax(speech @ text.transpose(1, 2) / 0.5, dim=-1))


def _reference_loss(speech, text, tau, gamma):
    """Loss of one unpadded sample: speech (S, D), text (T, D)."""
    cost = lcmr_cost(speech[None], text[None], tau)
    return soft_dtw(cost, gamma)[0] / speech.shape[0]


def test_lcmr_loss_matches_per_sample_reference_with_padding():
    D = 8
    lengths = [(9, 4), (5, 6), (12, 2)]
    S, T = 12, 6
    speech = _embeddings(3, S, D, seed=2).double()
    text = _embeddings(3, T, D, seed=3).double()
    speech_mask = torch.zeros(3, S, dtype=torch.bool)
    text_mask = torch.zeros(3, T, dtype=torch.bool)
    for b, (s, t) in enumerate(lengths):
        speech_mask[b, :s] = True
        text_mask[b, T - t :] = True  # text left-padded: order of valid positions is what counts
    loss = lcmr_loss(speech, speech_mask, text, text_mask, torch.tensor([True, True, True]), tau=0.5)
    want = torch.stack(
        [_reference_loss(speech[b, :s], text[b, T - t :], 0.5, 0.1) for b, (s, t) in enumerate(lengths)]
    ).mean()
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-10)


def test_lcmr_loss_masks_samples_without_transcript():
    D = 16
    speech = _embeddings(3, 20, D, seed=4).requires_grad_(True)
    text = _embeddings(3, 6, D, seed=5)
    speech_mask = torch.ones(3, 20, dtype=torch.bool)
    text_mask = torch.ones(3, 6, dtype=torch.bool)
    has_transcript = torch.tensor([True, False, True])
    loss = lcmr_loss(speech, speech_mask, text, text_mask, has_transcript)

    # Whatever the untranscribed sample holds (even nan or an empty transcript) is ignored.
    speech2 = speech.detach().clone()
    speech2[1] = float("nan")
    text2 = text.clone()
    text2[1] = _embeddings(6, D, seed=6) * 100
    text_mask2 = text_mask.clone()
    text_mask2[1] = False
    loss2 = lcmr_loss(speech2, speech_mask, text2, text_mask2, has_transcript)
    assert loss2.item() == loss.item()

    want = (_reference_loss(speech[0], text[0], 0.06, 0.1) + _reference_loss(speech[2], text[2], 0.06, 0.1)) / 2
    torch.testing.assert_close(loss, want)

    loss.backward()
    assert torch.isfinite(speech.grad).all()
    assert speech.grad[0].abs().sum() > 0 and speech.grad[2].abs().sum() > 0
    assert torch.all(speech.grad[1] == 0)


def test_lcmr_loss_without_any_transcript_is_a_connected_zero():
    speech = _embeddings(2, 10, 8, seed=7).requires_grad_(True)
    text = _embeddings(2, 4, 8, seed=8)
    loss = lcmr_loss(
        speech,
        torch.ones(2, 10, dtype=torch.bool),
        text,
        torch.zeros(2, 4, dtype=torch.bool),
        torch.tensor([False, False]),
    )
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.all(speech.grad == 0)


def test_lcmr_loss_transcript_without_tokens_fails_loudly():
    speech = _embeddings(1, 10, 8, seed=9)
    text = _embeddings(1, 4, 8, seed=10)
    with pytest.raises(ValueError, match="has_transcript"):
        lcmr_loss(
            speech, torch.ones(1, 10, dtype=torch.bool), text, torch.zeros(1, 4, dtype=torch.bool), torch.tensor([True])
        )


def test_lcmr_loss_realistic_shape_is_finite_and_trains_speech():
    B, S, T, D = 2, 300, 40, 64
    # Embedding-table scale (Qwen2 rows have std ~0.02-0.05); projected speech of comparable scale.
    speech = (_embeddings(B, S, D, seed=11) * 0.05).requires_grad_(True)
    text = (_embeddings(B, T, D, seed=12) * 0.05).requires_grad_(True)
    speech_mask = torch.ones(B, S, dtype=torch.bool)
    speech_mask[1, 250:] = False
    text_mask = torch.ones(B, T, dtype=torch.bool)
    text_mask[1, 31:] = False
    loss = lcmr_loss(speech, speech_mask, text, text_mask, torch.tensor([True, True]))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(speech.grad).all() and speech.grad.abs().sum() > 0
    assert torch.isfinite(text.grad).all()
    assert torch.all(speech.grad[1, 250:] == 0) and torch.all(text.grad[1, 31:] == 0)

    # bf16 activations (the training dtype) also give a finite float32 loss.
    loss16 = lcmr_loss(
        speech.detach().bfloat16(), speech_mask, text.detach().bfloat16(), text_mask, torch.tensor([True, True])
    )
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)


def test_lcmr_loss_prefers_aligned_order():
    T, D, repeat = 12, 32, 5
    text = _embeddings(1, T, D, seed=13) * 0.3
    speech = text.repeat_interleave(repeat, dim=1) + 0.01 * _embeddings(1, T * repeat, D, seed=14)
    shuffled = text[:, torch.randperm(T, generator=torch.Generator().manual_seed(15))]
    masks = dict(speech_mask=torch.ones(1, T * repeat, dtype=torch.bool), text_mask=torch.ones(1, T, dtype=torch.bool))
    aligned = lcmr_loss(speech, text=text, has_transcript=torch.tensor([True]), **masks)
    misaligned = lcmr_loss(speech, text=shuffled, has_transcript=torch.tensor([True]), **masks)
    assert aligned < misaligned
    # Same speech, same text content: only the order differs, and the order is what LCMR scores.
    assert misaligned - aligned > 1.0
