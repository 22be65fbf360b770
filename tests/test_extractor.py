"""Token extractor (LCME): identity at keep_rate 1, counts, positions, batching, cached decoding."""

import pytest
import torch
from conftest import tiny_config
from helpers import SPEECH, image_inputs, speech_inputs

from lyra import ExtractorConfig, LyraForConditionalGeneration


def build(attn="eager", seed=0, **extractor):
    torch.manual_seed(seed)
    model = LyraForConditionalGeneration(tiny_config(attn)).eval()
    if extractor:
        model.set_extractor(ExtractorConfig(**extractor))
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_keep_rate_one_is_bit_identical(attn):
    model = build(attn)
    inputs = speech_inputs(120, seed=1)
    base = model(**inputs)
    model.set_extractor(ExtractorConfig(gap=1, keep_rate=1.0, min_keep=32))
    same = model(**inputs)
    assert torch.equal(base.logits, same.logits)
    assert torch.equal(base.token_index, same.token_index)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_pruning_counts_and_text_kept(attn):
    model = build(attn, gap=1, keep_rate=0.5, min_keep=32)  # 3 layers: prunes after layers 0 and 1
    inputs = speech_inputs(100, before=5, after=7, seed=2)
    out = model(**inputs)
    kept = out.token_index[0]
    ids = inputs["input_ids"][0]
    n_speech_kept = int((ids[kept] == SPEECH).sum())
    assert n_speech_kept == 32  # 100 -> 50 -> max(32, 25)
    assert out.logits.shape[1] == 12 + 32
    text = (ids != SPEECH).nonzero().squeeze(1)
    assert torch.equal(kept[torch.isin(kept, text)], text)  # every text token survives, in order
    assert bool((kept[1:] > kept[:-1]).all())  # original order kept


def test_images_are_pruned_too():
    model = build(gap=1, keep_rate=0.25, min_keep=2)
    inputs = image_inputs(grid=(1, 8, 8))  # 16 image tokens
    out = model(**inputs)
    ids = inputs["input_ids"][0]
    assert int((ids[out.token_index[0]] == 151655).sum()) == 2  # 16 -> 4 -> max(2, 1)


def test_kept_tokens_keep_their_positions():
    model = build(gap=1, keep_rate=0.5, min_keep=32)
    inputs = speech_inputs(100, seed=3)
    seen = {}

    def grab(module, args, kwargs):
        seen["cos"] = kwargs["position_embeddings"][0]

    handle = model.language_model.layers[2].register_forward_pre_hook(grab, with_kwargs=True)
    out = model(**inputs)
    handle.remove()
    ids = inputs["input_ids"]
    positions = model.position_ids(ids, torch.ones_like(ids, dtype=torch.bool), None, None, None)
    hidden = torch.zeros(1, ids.shape[1], 64)
    cos, _ = model.language_model.rotary_emb(hidden, positions)
    assert torch.equal(seen["cos"], cos[:, out.token_index[0]])


def test_batch_with_different_counts_matches_single_runs():
    model = build(gap=1, keep_rate=0.5, min_keep=8)
    a = speech_inputs(60, seed=4)
    b = speech_inputs(30, seed=5)
    pad = a["input_ids"].shape[1] - b["input_ids"].shape[1]
    ids = torch.cat([a["input_ids"], torch.cat([torch.full((1, pad), 151643), b["input_ids"]], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    batch = {"input_ids": ids, "attention_mask": mask,
             "input_features": torch.cat([a["input_features"], b["input_features"]]),
             "speech_token_counts": torch.cat([a["speech_token_counts"], b["speech_token_counts"]])}
    out = model(**batch)
    for row, single in enumerate([a, b]):
        ref = model(**single)
        got = out.logits[row][out.token_index[row] >= 0]
        # left padding survives compaction: the kept tokens sit at the right end
        assert torch.allclose(got[-ref.logits.shape[1]:], ref.logits[0], atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_decoding_after_pruning_matches_training_forward(attn):
    """Decoding with a pruned prefill cache gives the logits the training forward gives for the answer."""
    model = build(attn, gap=1, keep_rate=0.5, min_keep=16)
    prompt = speech_inputs(80, seed=6)
    gen = model.generate(prompt, max_new_tokens=5)
    answer = gen.sequences
    full = dict(prompt, input_ids=torch.cat([prompt["input_ids"], answer], 1))
    labels = torch.full_like(full["input_ids"], -100)
    labels[:, -5:] = answer  # answer tokens are targets, so they are not queries of the extractor
    out = model(**full, labels=labels)
    n_prompt_kept = out.logits.shape[1] - 5
    greedy = out.logits[0, n_prompt_kept - 1: -1].argmax(-1)
    assert torch.equal(greedy, answer[0])
    # and the cached state really is shorter than the prompt in the pruned layers
    assert gen.cache.cached_tokens(-1) < prompt["input_ids"].shape[1] + 5
    assert gen.cache.cached_tokens(0) == prompt["input_ids"].shape[1] + 5


def test_extractor_with_training_loss_and_backward():
    model = build(gap=1, keep_rate=0.5, min_keep=8)
    model.train()
    inputs = speech_inputs(50, seed=7)
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100
    out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.speech_projector.linear2.weight.grad.abs().sum() > 0
