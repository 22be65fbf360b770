"""Per-modality LoRA: routing, plain-Qwen2-VL identity, activation tuning, PEFT format."""

import peft
import pytest
import torch
from conftest import randomize_lora, tiny_config
from helpers import speech_inputs
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

from lyra import LyraForConditionalGeneration


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = LyraForConditionalGeneration(tiny_config()).eval()
    randomize_lora(m)
    return m


def test_routing_by_input(model):
    text = {"input_ids": torch.randint(10, 1000, (1, 9))}
    assert model(**text).adapter is None
    assert model(**speech_inputs(40)).adapter == "speech"
    assert model(**speech_inputs(450, windows=2)).adapter == "long_speech"
    # without window counts the token count decides
    short = speech_inputs(300)
    del short["speech_clip_windows"]
    assert model(**short).adapter == "speech"


def test_no_speech_means_plain_qwen2vl(model):
    from test_model import plain_qwen2vl

    text = {"input_ids": torch.randint(10, 1000, (2, 11))}
    assert torch.equal(model(**text).logits, plain_qwen2vl(model)(**text).logits)


def test_adapters_change_outputs_and_scale(model):
    inputs = speech_inputs(40)
    off = model(**inputs, adapter=None).logits
    speech = model(**inputs).logits
    long = model(**inputs, adapter="long_speech").logits
    assert not torch.allclose(off, speech) and not torch.allclose(speech, long)
    model.set_lora_scale(0.0)
    assert torch.allclose(model(**inputs).logits, off, atol=1e-6)
    model.set_lora_scale(0.5)
    half = model(**inputs).logits
    assert not torch.allclose(half, off) and not torch.allclose(half, speech)
    model.set_lora_scale(1.0)
    assert torch.allclose(model(**inputs).logits, speech, atol=1e-6)
    with pytest.raises(KeyError, match="unknown LoRA adapter"):
        model(**inputs, adapter="vision")
    with pytest.raises(ValueError, match=">= 0"):
        model.set_lora_scale(-1)


def test_peft_format_is_read_by_peft_itself(model, tmp_path):
    folder = model.save_adapter(tmp_path / "speech_lora", "speech")
    assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
    # a plain HF Qwen2-VL text model with the same base weights + PEFT's own loader
    plain = Qwen2VLTextModel(model.config.text_config).eval()
    base = {k.replace(".base_layer", ""): v for k, v in model.language_model.state_dict().items() if ".lora_" not in k}
    plain.load_state_dict(base)
    peft_model = peft.PeftModel.from_pretrained(plain, str(folder)).eval()
    ids = torch.randint(10, 1000, (1, 10))
    embeds = model.get_input_embeddings()(ids)
    model.adapters.activate("speech")
    ours = model.language_model(inputs_embeds=embeds).last_hidden_state
    theirs = peft_model(inputs_embeds=embeds).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_adapter_round_trip_and_mismatch(model, tmp_path):
    model.save_adapter(tmp_path / "long", "long_speech")
    torch.manual_seed(1)
    fresh = LyraForConditionalGeneration(tiny_config()).eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k}, strict=False)
    inputs = speech_inputs(450, windows=2)
    assert not torch.allclose(fresh(**inputs).logits, model(**inputs).logits)
    fresh.load_adapter(tmp_path / "long", "long_speech")
    assert torch.allclose(fresh(**inputs).logits, model(**inputs).logits, atol=1e-6)
    with pytest.raises(ValueError, match="r=8"):
        fresh.load_adapter(tmp_path / "long", "speech")  # speech adapter has r=4


def test_each_adapter_has_its_own_projector(model):
    assert set(model.speech_projectors) == {"speech", "long_speech"}
    short, long = speech_inputs(40), speech_inputs(450, windows=2)
    before_short, before_long = model(**short).logits, model(**long).logits
    with torch.no_grad():
        model.speech_projectors["long_speech"].linear2.bias.add_(1.0)
    assert torch.equal(model(**short).logits, before_short)
    assert not torch.allclose(model(**long).logits, before_long)
