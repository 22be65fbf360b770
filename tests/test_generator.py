"""CTC speech generator: loss in the model output, same positions in training and inference, streamed = offline,
CTC collapse across chunk borders, reference sizes, and release weights imported by `lyra convert`."""

import copy
import json
from dataclasses import replace

import peft
import pytest
import torch
from conftest import save_base_checkpoints, tiny_config
from helpers import speech_inputs
from safetensors.torch import save_file
from speaking import liven, speaking_model
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

from lyra import LyraForConditionalGeneration, build_config
from lyra.configuration import LORA_TARGETS, GeneratorConfig
from lyra.constants import IGNORE_INDEX
from lyra.convert import ConversionReport, convert_release
from lyra.generator import SpeechGenerator, answer_states, ctc_collapse

BLANK = build_config("nano").settings.speech_generator.blank  # the nano generator's blank (one past its units)


def answer_batch(model, answer_len=8, prompt_len=6, batch=2, units=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 1000, (batch, prompt_len + answer_len), generator=g)
    labels = ids.clone()
    labels[:, :prompt_len] = IGNORE_INDEX
    targets = torch.randint(0, model.config.settings.speech_generator.num_units, (batch, units), generator=g)
    targets[1, units - 7:] = IGNORE_INDEX  # a shorter second answer
    return ids, labels, targets


def test_unit_loss_is_part_of_the_output_and_trains():
    torch.manual_seed(0)
    model = LyraForConditionalGeneration(tiny_config()).train()
    ids, labels, targets = answer_batch(model)
    out = model(ids, labels=labels, unit_targets=targets)
    weight = model.config.settings.speech_generator.loss_weight
    assert out.unit_loss is not None and out.ce_loss is not None
    assert torch.allclose(out.loss, out.ce_loss + weight * out.unit_loss)
    assert model(ids, labels=labels).unit_loss is None

    optimizer = torch.optim.Adam(model.speech_generator.parameters(), lr=2e-3)
    first = float(out.unit_loss.detach())
    for _ in range(12):
        loss = model(ids, labels=labels, unit_targets=targets).unit_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.6 * first, (first, float(loss))

    with pytest.raises(ValueError, match="need labels"):
        model(ids, unit_targets=targets)
    plain = LyraForConditionalGeneration(tiny_config(speech_generator={"enabled": False}))
    assert plain.speech_generator is None
    with pytest.raises(ValueError, match="no speech generator"):
        plain(ids, labels=labels, unit_targets=targets)


def test_ctc_loss_matches_torch_on_the_reference_normalisation():
    torch.manual_seed(0)
    model = LyraForConditionalGeneration(tiny_config()).eval()
    g = model.speech_generator
    states = torch.randn(2, 3, 64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    targets = torch.tensor([[1, 2, 3, 4], [5, 6, IGNORE_INDEX, IGNORE_INDEX]])
    out = g(states, mask, targets)
    assert out.frame_mask.sum(1).tolist() == [75, 50]  # 25 frames per state
    lp = out.logits.float().log_softmax(-1)
    expected = sum(
        torch.nn.functional.ctc_loss(lp[i, :n], targets[i, :m], torch.tensor(n), torch.tensor(m), blank=BLANK,
                                     reduction="sum")
        for i, (n, m) in enumerate([(75, 4), (50, 2)])
    ) / 6
    assert torch.allclose(out.loss, expected, atol=1e-5)
    # more units than frames: the sample is stretched (as the reference does), so CTC stays finite
    long = torch.randint(0, 128, (1, 40))
    stretched = g(states[:1, :1], None, long)
    assert stretched.frame_mask.shape[1] == 40 and torch.isfinite(stretched.loss)


def test_training_and_inference_read_each_answer_token_at_its_own_position():
    """Inference feeds the generator the state at each answer token's own position (after the token went in),
    the same positions the training loss reads through labels, also with the token extractor pruning speech."""
    torch.manual_seed(0)
    config = tiny_config(extractor={"gap": 1, "keep_rate": 0.5, "min_keep": 8})
    model = LyraForConditionalGeneration(config).double().eval()
    inputs = speech_inputs(40, before=5, after=6)
    inputs["input_features"] = inputs["input_features"].double()
    steps = list(model.stream_generate(inputs, max_new_tokens=6, eos_token_id=-1))
    answer = torch.stack([s.tokens for s in steps], dim=1)
    assert steps[-1].final_hidden_states is not None and all(s.final_hidden_states is None for s in steps[:-1])
    own = torch.stack([s.hidden_states for s in steps[1:]] + [steps[-1].final_hidden_states], dim=1)
    predicting = torch.stack([s.hidden_states for s in steps], dim=1)  # what the reference feeds at inference

    ids = torch.cat([inputs["input_ids"], answer], dim=1)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -answer.shape[1]:] = answer
    targets = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        out = model(**{**inputs, "input_ids": ids}, labels=labels, unit_targets=targets)
    assert out.hidden_states.shape[1] < ids.shape[1]  # the extractor dropped speech tokens
    kept_labels = torch.where(out.token_index >= 0, labels.gather(1, out.token_index.clamp(min=0)), IGNORE_INDEX)
    trained, mask = answer_states(out.hidden_states, kept_labels)
    assert bool(mask.all()) and trained.shape == own.shape
    assert torch.allclose(trained, own, atol=1e-9)
    assert not torch.allclose(trained, predicting, atol=1e-3)
    with torch.no_grad():
        assert torch.allclose(out.unit_loss, model.speech_generator(own, None, targets).loss, atol=1e-9)


@pytest.mark.parametrize("groups", [[1] * 14, [3, 1, 4, 1, 5]])
def test_streamed_units_equal_offline_units(groups):
    torch.manual_seed(0)
    model = speaking_model()
    generator = model.speech_generator
    states = torch.randn(2, sum(groups), 64)
    offline_frames = generator.predict(states)
    offline_units = generator.units(states)
    assert min(len(u) for u in offline_units) > sum(groups)  # several units per token: a real test of collapse

    stream = generator.start(2)
    frames, units, start = [], [[], []], 0
    for n in groups:
        step = generator.step(states[:, start:start + n], stream)
        frames.append(step.frames)
        for i in range(2):
            units[i] += step.units[i]
        start += n
    assert torch.equal(torch.cat(frames, dim=1), offline_frames)
    assert units == offline_units
    assert stream.frames == 25 * sum(groups)

    stream.reset()
    again = generator.step(states[:, :2], stream)
    assert torch.equal(again.frames, offline_frames[:, :50])
    rerun_frames, new_units = generator.rerun(states[:1, :3], emitted=2)
    assert torch.equal(rerun_frames, generator.predict(states[:1, :3]))
    assert new_units == generator.units(states[:1, :3])[0][2:]


def test_frame_positions_let_the_first_answer_token_speak():
    """The copies of the first state are equal inputs to causal layers: without frame positions they predict one
    thing (a one-word answer says one unit at most); with them the first token alone says several."""
    settings = GeneratorConfig(enabled=True, upsample=25, num_layers=2, hidden_size=64, num_heads=4,
                               intermediate_size=128, num_units=40)
    text = tiny_config().text_config
    states = torch.randn(3, 4, text.hidden_size, generator=torch.Generator().manual_seed(1))
    plain = liven(SpeechGenerator(settings, text, "sdpa"))
    assert all(plain.predict(states)[i, :25].unique().numel() == 1 for i in range(3))
    placed = liven(SpeechGenerator(replace(settings, frame_positions=True), text, "sdpa"))
    with torch.no_grad():
        placed.frame_embed.weight.mul_(4)  # as large as the projected states, as training makes them
    assert all(placed.predict(states)[i, :25].unique().numel() > 3 for i in range(3))
    assert min(len(u) for u in placed.units(states[:, :1])) > 3


def test_frame_places_count_within_each_state():
    settings = GeneratorConfig(enabled=True, upsample=4, num_layers=1, hidden_size=16, num_heads=2,
                               intermediate_size=32, num_units=12, frame_positions=True)
    generator = SpeechGenerator(settings, tiny_config().text_config, "sdpa")
    states = torch.arange(6.0)[None, :, None].expand(1, 6, 64).reshape(2, 3, 64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    frames, frame_mask, places = generator.upsample_states(states, mask)
    assert places[0].tolist() == [0, 1, 2, 3] * 3 and places[1].tolist() == [0, 1, 2, 3] * 2 + [0] * 4
    # stretched to 14 frames for 14 target units: copies 5, 5, 4; a fifth copy keeps the last place
    frames, frame_mask, places = generator.upsample_states(states[:1], mask[:1], torch.tensor([14]))
    assert frames[0, :, 0].tolist() == [0.0] * 5 + [1.0] * 5 + [2.0] * 4
    assert places[0].tolist() == [0, 1, 2, 3, 3] * 2 + [0, 1, 2, 3]
    assert frame_mask.all() and generator.frame_embed.weight.shape == (4, 16)


def test_ctc_collapse_across_chunk_borders():
    b = BLANK
    frames = torch.tensor([[b, 3, 3, b, 3, 4, 4, 4, b, b, 5, 5, 7, b, 7]])
    whole, last = ctc_collapse(frames, b)
    assert whole == [[3, 3, 4, 5, 7, 7]] and int(last[0]) == 7
    for cut in range(frames.shape[1] + 1):  # every single border
        first, prev = ctc_collapse(frames[:, :cut], b)
        second, _ = ctc_collapse(frames[:, cut:], b, prev)
        assert [first[0] + second[0]] == whole, cut
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # random streams of few symbols (many repeats) cut into random pieces
        stream = torch.randint(0, 4, (2, 60), generator=g)
        stream[stream == 3] = b
        expected, _ = ctc_collapse(stream, b)
        got, prev, pos = [[], []], None, 0
        while pos < 60:
            n = int(torch.randint(1, 9, (1,), generator=g))
            part, prev = ctc_collapse(stream[:, pos:pos + n], b, prev)
            got = [got[i] + part[i] for i in range(2)]
            pos += n
        assert got == expected


def test_presets_carry_the_reference_generator():
    for name in ("mini", "base", "pro"):
        s = build_config(name).settings.speech_generator
        assert (s.enabled, s.upsample, s.num_layers, s.hidden_size, s.num_heads, s.intermediate_size, s.num_units,
                s.blank) == (True, 25, 2, 4096, 32, 11008, 1000, 1000)
    config = build_config("mini")
    with torch.device("meta"):
        model = LyraForConditionalGeneration(config)
    size = sum(p.numel() for p in model.speech_generator.parameters())
    assert 0.40e9 < size < 0.42e9  # 2 x (attention 67M + MLP 135M) + projections
    nano = build_config("nano").settings.speech_generator
    assert nano.enabled and nano.num_units == 512 and nano.hidden_size == 256 and nano.frame_positions
    assert not config.settings.speech_generator.frame_positions  # the reference has none: its weights load as they are
    round_trip = type(config).from_dict(config.to_dict())
    assert round_trip.settings.speech_generator == config.settings.speech_generator


# ---- release weights -----------------------------------------------------------------------------------
class ReferenceGenerator(torch.nn.Module):
    """The reference's SpeechGeneratorCTC structure, built from transformers' own Qwen2 decoder layers."""

    def __init__(self, llm_width, layers, width, heads, ffn, units):
        super().__init__()
        self.config = Qwen2Config(hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=heads, rms_norm_eps=1e-6,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}, vocab_size=units + 1)
        self.config._attn_implementation = "eager"
        self.input_proj = torch.nn.Linear(llm_width, width)
        self.layers = torch.nn.ModuleList(Qwen2DecoderLayer(self.config, i) for i in range(layers))
        self.output_proj = torch.nn.Linear(width, units + 1)

    def predict(self, states, upsample):
        """The reference's `predict`: repeat, project, causal layers over positions 0..F-1, argmax."""
        x = self.input_proj(states.repeat_interleave(upsample, dim=1))
        n = x.shape[1]
        positions = torch.arange(n)[None]
        cos, sin = Qwen2RotaryEmbedding(self.config)(x, positions)
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_embeddings=(cos, sin))
        return self.output_proj(x).argmax(-1)


def test_convert_loads_the_release_generator(tmp_path):
    from test_convert import qwen2_config, random_projector, write_main

    root = tmp_path
    config = tiny_config()
    save_base_checkpoints(config, root)
    torch.manual_seed(1)
    llm = Qwen2ForCausalLM(qwen2_config(config.text_config)).eval()
    release = root / "Lyra_Tiny"
    release.mkdir()
    main = {k: v for k, v in llm.state_dict().items() if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    write_main(release, main)
    torch.manual_seed(2)
    reference = ReferenceGenerator(64, layers=2, width=32, heads=4, ffn=48, units=10).eval()
    liven(reference, seed=3)
    save_file({f"speech_generator.{k}": v.contiguous() for k, v in reference.state_dict().items()},
              str(release / "speech_generator.safetensors"))
    (release / "config.json").write_text(json.dumps({
        "model_type": "Lyra_Qwen2VL_SpeechGenerator", "speech_generator_type": "ctc",
        "ctc_decoder_config": "(2,32,4,48)", "ctc_upsample_factor": 5, "unit_vocab_size": 10, "ctc_loss_weight": 0.5,
    }))
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    peft.get_peft_model(copy.deepcopy(llm), lora).save_pretrained(release / "speech_lora")
    g = torch.Generator().manual_seed(4)
    torch.save(random_projector(g, config.speech_config.d_model * 5, 64, 64),
               release / "speech_lora" / "non_lora_trainables.bin")

    out = convert_release(release, root / "qwen2vl", root / "whisper", root / "converted")
    model = LyraForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    s = model.config.settings.speech_generator
    assert (s.enabled, s.num_layers, s.hidden_size, s.num_heads, s.intermediate_size, s.num_units, s.upsample,
            s.loss_weight) == (True, 2, 32, 4, 48, 10, 5, 0.5)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.speech_generator.state_dict()[key], value), key
    report = ConversionReport.load(out)
    assert report.speech_generator["loaded"] and report.files == [] and not (out / "speech_generator.safetensors").exists()

    states = torch.randn(1, 7, 64)
    with torch.no_grad():
        expected = reference.predict(states, 5)
    assert len(set(expected[0].tolist())) > 3
    assert torch.equal(model.speech_generator.predict(states), expected)
    stream = model.speech_generator.start(1)
    streamed = torch.cat([model.speech_generator.step(states[:, t], stream).frames for t in range(7)], dim=1)
    assert torch.equal(streamed, expected)


def test_generator_module_builds_from_settings_alone():
    settings = GeneratorConfig(enabled=True, upsample=4, num_layers=1, hidden_size=16, num_heads=2,
                               intermediate_size=32, num_units=12)
    generator = SpeechGenerator(settings, tiny_config().text_config, "sdpa")
    names = set(generator.state_dict())
    assert {"input_proj.weight", "output_proj.bias", "layers.0.self_attn.q_proj.bias", "layers.0.mlp.down_proj.weight",
            "layers.0.input_layernorm.weight"} <= names
    assert generator.output_proj.out_features == 13 and generator.blank == 12
