"""Model core: parity with HF Qwen2-VL, speech scattering, positions, losses, save/load, generation."""

import pytest
import torch
from conftest import save_base_checkpoints, tiny_config
from helpers import IMAGE, SPEECH, image_inputs, speech_inputs
from transformers import Qwen2VLForConditionalGeneration

from lyra import LyraForConditionalGeneration
from lyra.modeling import PlaceholderMismatchError


def plain_qwen2vl(model: LyraForConditionalGeneration) -> Qwen2VLForConditionalGeneration:
    """A plain HF Qwen2-VL with the Lyra model's backbone weights (LoRA stripped)."""
    hf = Qwen2VLForConditionalGeneration(model.config.backbone_config).eval()
    state = {k.replace(".base_layer", ""): v for k, v in model.backbone.state_dict().items() if ".lora_" not in k}
    hf.load_state_dict(state)
    return hf


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_text_and_image_logits_equal_hf_qwen2vl(attn):
    torch.manual_seed(0)
    model = LyraForConditionalGeneration(tiny_config(attn)).eval()
    hf = plain_qwen2vl(model)
    text = {"input_ids": torch.randint(10, 5000, (2, 17))}
    assert torch.equal(model(**text).logits, hf(**text).logits)
    inputs = image_inputs()
    ours = model(**inputs)
    assert ours.adapter is None
    assert torch.equal(ours.logits, hf(**inputs).logits)


def test_speech_positions_are_1d_and_image_positions_3d(tiny_model):
    inputs = image_inputs(grid=(1, 4, 6))
    ids = torch.cat([inputs["input_ids"], torch.full((1, 20), SPEECH), torch.tensor([[11, 12]])], 1)
    types = (ids == IMAGE).int()
    pos = tiny_model.position_ids(ids, torch.ones_like(ids, dtype=torch.bool), types, inputs["image_grid_thw"], None)
    img = (ids[0] == IMAGE).nonzero().squeeze(1)
    sp = (ids[0] == SPEECH).nonzero().squeeze(1)
    # image: 2 x 3 merged grid -> height and width axes differ across the grid
    assert not torch.equal(pos[1, 0, img], pos[2, 0, img])
    assert len(set(pos[1, 0, img].tolist())) == 2 and len(set(pos[2, 0, img].tolist())) == 3
    # speech: the same consecutive 1-D position on all three axes
    assert torch.equal(pos[0, 0, sp], pos[1, 0, sp]) and torch.equal(pos[1, 0, sp], pos[2, 0, sp])
    assert torch.equal(pos[0, 0, sp], torch.arange(20) + pos[0, 0, sp[0]])
    assert int(pos[0, 0, sp[0]]) == int(pos[0, 0, sp[0] - 1]) + 1


def test_speech_features_are_scattered_and_counted(tiny_model):
    inputs = speech_inputs(40)
    out = tiny_model(**inputs)
    assert out.logits.shape == (1, 52, tiny_model.config.text_config.vocab_size)
    other = dict(inputs, input_features=inputs["input_features"] + 1.0)
    assert not torch.allclose(tiny_model(**other).logits, out.logits)
    # text before the speech cannot see it (causal), so those logits are unchanged
    assert torch.equal(tiny_model(**other).logits[:, :5], out.logits[:, :5])


@pytest.mark.parametrize("counts", [[39], [41]])
def test_placeholder_mismatch_is_a_clear_error(tiny_model, counts):
    inputs = speech_inputs(40)
    inputs["speech_token_counts"] = torch.tensor(counts)
    with pytest.raises(PlaceholderMismatchError, match=r"40 <\|speech_pad\|> placeholder tokens but \d+ speech"):
        tiny_model(**inputs)


def test_image_mismatch_is_a_clear_error(tiny_model):
    inputs = image_inputs(grid=(1, 4, 6))
    inputs["input_ids"] = inputs["input_ids"][:, :-8]  # drop some image placeholders and text
    inputs["mm_token_type_ids"] = inputs["mm_token_type_ids"][:, :-8]
    with pytest.raises(PlaceholderMismatchError, match="image"):
        tiny_model(**inputs)


def test_loss_parts_and_gradients(tiny_model):
    inputs = speech_inputs(30)
    labels = inputs["input_ids"].clone()
    labels[:, :-4] = -100
    tiny_model.train()
    out = tiny_model(**inputs, labels=labels)
    assert out.lcmr_loss is None and torch.equal(out.loss, out.ce_loss)
    transcript = torch.randint(10, 1000, (1, 6))
    out = tiny_model(**inputs, labels=labels, transcript_ids=transcript, transcript_mask=torch.ones(1, 6, dtype=torch.bool),
                     has_transcript=torch.tensor([True]))
    assert out.lcmr_loss is not None and out.lcmr_loss.item() > 0
    assert torch.allclose(out.loss, out.ce_loss + 0.5 * out.lcmr_loss)
    out.loss.backward()
    assert tiny_model.speech_projector.linear1.weight.grad.abs().sum() > 0
    # without a transcript the sample is masked out of LCMR
    tiny_model.zero_grad()
    out = tiny_model(**inputs, labels=labels, transcript_ids=transcript, transcript_mask=torch.ones(1, 6, dtype=torch.bool),
                     has_transcript=torch.tensor([False]))
    assert out.lcmr_loss.item() == 0.0


def test_save_load_round_trip(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    again = LyraForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert again.config.settings == tiny_model.config.settings
    inputs = speech_inputs(25)
    assert torch.equal(again(**inputs).logits, tiny_model(**inputs).logits)
    assert again.backbone.lm_head.weight.data_ptr() == again.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_generation_equals_full_recompute(attn):
    torch.manual_seed(1)
    model = LyraForConditionalGeneration(tiny_config(attn)).eval()
    inputs = speech_inputs(30, batch=2, seed=3)
    inputs["input_ids"][1, :3] = 151643  # left padding on the second stream
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][1, :3] = 0
    gen = model.generate(inputs, max_new_tokens=6)
    assert gen.sequences.shape == (2, 6)
    full_ids = torch.cat([inputs["input_ids"], gen.sequences[:, :-1]], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 5, dtype=torch.long)], 1)
    logits = model(**dict(inputs, input_ids=full_ids, attention_mask=mask)).logits
    assert torch.equal(logits[:, inputs["input_ids"].shape[1] - 1:].argmax(-1), gen.sequences)
    streamed = [step.tokens for step in model.stream_generate(inputs, max_new_tokens=6)]
    assert torch.equal(torch.stack(streamed, 1), gen.sequences)


def test_generation_stops_at_eos(tiny_model):
    inputs = {"input_ids": torch.randint(10, 1000, (1, 8))}
    free = tiny_model.generate(inputs, max_new_tokens=4, eos_token_id=151645).sequences[0]
    assert free.shape[0] == 4
    out = tiny_model.generate(inputs, max_new_tokens=10, eos_token_id=int(free[0]))
    assert out.sequences.shape[1] == 1


def test_from_base_checkpoints(tmp_path):
    qwen, whisper = save_base_checkpoints(tiny_config(), tmp_path, seed=2)
    model = LyraForConditionalGeneration.from_base(tmp_path / "qwen2vl", tmp_path / "whisper", attn_implementation="eager")
    text = {"input_ids": torch.randint(10, 5000, (1, 12))}
    assert torch.equal(model(**text).logits, qwen(**text).logits)
    feats = torch.randn(1, 80, 3000)
    assert torch.equal(model.speech_encoder(feats).last_hidden_state, whisper.model.encoder(feats).last_hidden_state)


def test_gradient_checkpointing_and_bf16(tiny_model):
    inputs = speech_inputs(20)
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100
    tiny_model.train()
    reference = tiny_model(**inputs, labels=labels).loss
    tiny_model.activation_checkpointing_enable()
    out = tiny_model(**inputs, labels=labels)
    assert torch.allclose(out.loss, reference)
    out.loss.backward()
    assert tiny_model.speech_projector.linear1.weight.grad is not None
    model = tiny_model.eval().to(torch.bfloat16)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_cache_rollback_answers_again_identically():
    """Ingest once, ask, roll back, ask again: the second answer equals the first (pruned cache too)."""
    from lyra import ExtractorConfig

    torch.manual_seed(3)
    model = LyraForConditionalGeneration(tiny_config()).eval()
    model.set_extractor(ExtractorConfig(gap=1, keep_rate=0.5, min_keep=8))
    context = speech_inputs(60, after=2, seed=4)
    out = model(**context, use_cache=True)
    cache = out.cache
    mark = cache.mark()
    question = {"input_ids": torch.randint(10, 1000, (1, 6))}
    first = model.generate(question, max_new_tokens=4, cache=cache).sequences
    assert cache.cached_tokens(0) > mark.lengths[0]
    cache.rollback(mark)
    assert tuple(v.shape[1] for v in cache.key_valid) == mark.lengths
    assert all(layer.keys.shape[-2] == n for layer, n in zip(cache.kv.layers, mark.lengths))
    second = model.generate(question, max_new_tokens=4, cache=cache).sequences
    assert torch.equal(first, second)
