"""Import of the official Lyra release: a tiny synthetic release with the reference's layout and key names.

The release's LLM is a plain HF `Qwen2ForCausalLM` (the reference's `LyraQwen2VLForCausalLM` subclasses it, so
its keys are `model.embed_tokens`, `model.layers.{i}.*`, `model.norm`, `lm_head`) and its adapters are written
by PEFT itself around that model, which gives the reference's `base_model.model.model.layers...` names. The
expected logits come from the same objects through PEFT's own loader, independent of our key mapping.
"""

import copy
import json
import logging
import shutil

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import save_base_checkpoints, tiny_config
from helpers import SPEECH, speech_inputs
from safetensors.torch import load_file, save_file
from transformers import (
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLForConditionalGeneration,
)

from lyra import LyraForConditionalGeneration
from lyra.configuration import LORA_TARGETS
from lyra.convert import ConversionError, ConversionReport, convert_release

ADAPTERS = {"speech_lora": {"r": 4, "alpha": 8}, "long_speech_lora": {"r": 6, "alpha": 12}}
PROJ = "model.model.mm_speech_projector."
GENERATOR = {
    "speech_generator.input_proj.weight": (32, 64),
    "speech_generator.layers.0.self_attn.q_proj.weight": (32, 32),
    "speech_generator.output_proj.weight": (1001, 32),
    "speech_generator.output_proj.bias": (1001,),
}


def qwen2_config(text) -> Qwen2Config:
    """The plain Qwen2 LLM that has the shapes of the Qwen2-VL text model (1-D RoPE = M-RoPE on text/speech)."""
    config = Qwen2Config(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, rms_norm_eps=text.rms_norm_eps, hidden_act=text.hidden_act,
        max_position_embeddings=text.max_position_embeddings, tie_word_embeddings=text.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": text.rope_parameters["rope_theta"]},
    )
    config._attn_implementation = "eager"
    return config


def write_main(folder, state, shards: int = 2):
    """Write HF weights the way save_pretrained shards them (model-0000i-of-0000n + index)."""
    for old in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        old.unlink()
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def read_main(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    state = {}
    for name in set(index["weight_map"].values()):
        state.update(load_file(str(folder / name)))
    return state


def random_projector(g, d_in, hidden, d_out, prefix=PROJ):
    return {
        f"{prefix}linear1.weight": torch.randn(hidden, d_in, generator=g) * 0.05,
        f"{prefix}linear1.bias": torch.randn(hidden, generator=g) * 0.05,
        f"{prefix}linear2.weight": torch.randn(d_out, hidden, generator=g) * 0.05,
        f"{prefix}linear2.bias": torch.randn(d_out, generator=g) * 0.05,
    }


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Base Qwen2-VL + base Whisper + a release folder laid out like dvlab-research/Lyra's."""
    root = tmp_path_factory.mktemp("release")
    config = tiny_config()
    qwen, whisper = save_base_checkpoints(config, root)

    torch.manual_seed(1)  # the release LLM differs from the base one
    llm = Qwen2ForCausalLM(qwen2_config(config.text_config)).eval()
    lyra = root / "Lyra_Tiny"
    lyra.mkdir()
    g = torch.Generator().manual_seed(2)
    main = {k: v for k, v in llm.state_dict().items() if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    main.update({k: torch.randn(shape, generator=g) for k, shape in GENERATOR.items()})
    d_model, width = config.speech_config.d_model, config.text_config.hidden_size
    # the stage-1 projector the reference also keeps in the main folder; the adapters' ones replace it
    main.update(random_projector(g, d_model * 5, 64, width, prefix="model.mm_speech_projector."))
    write_main(lyra, main)
    (lyra / "config.json").write_text(json.dumps({
        "model_type": "Lyra_Qwen2VL_SpeechGenerator", "speech_norm": False, "speech_encoder_ds_rate": 5,
        "mm_speech_projector_type": "simple_mlp", "speech_generator_type": "ctc",
        "ctc_decoder_config": "(2,4096,32,11008)", "ctc_upsample_factor": 25, "unit_vocab_size": 1000,
    }))

    projectors = {}
    for i, (folder, settings) in enumerate(ADAPTERS.items()):
        lora = peft.LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=0.05,
                               target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
        wrapped = peft.get_peft_model(copy.deepcopy(llm), lora)
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        wrapped.save_pretrained(lyra / folder)
        # the long-speech file uses PEFT's longer prefix (base_model.model.) to check both spellings
        prefix = PROJ if i == 0 else "base_model.model." + PROJ
        state = random_projector(g, d_model * 5, 64, width, prefix=prefix)
        torch.save(state, lyra / folder / "non_lora_trainables.bin")
        projectors[folder] = {k.removeprefix("base_model.model.").removeprefix(PROJ): v for k, v in state.items()}
    return {"root": root, "lyra": lyra, "qwen": qwen, "whisper": whisper, "llm": llm, "main": main,
            "projectors": projectors, "config": config}


def run(release, out, **kwargs):
    return convert_release(release["lyra"], release["root"] / "qwen2vl", release["root"] / "whisper", out, **kwargs)


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "lyra-tiny"
    path = run(release, out)
    model = LyraForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    return path, model


KEEP = 8  # compare the logits of the last positions (after every speech token) to keep the vocab matmul small


def expected_logits(release, inputs, adapter_folder, projector_folder=None):
    """Whisper encoder -> a stage's speech projector (functional) -> plain Qwen2 LLM + PEFT's own adapter loader.

    The projector is the one of `projector_folder`, by default the adapter's own (the speech stage's when
    adapters are off), as the reference swaps both in together.
    """
    whisper, llm = release["whisper"], release["llm"]
    p = release["projectors"][projector_folder or adapter_folder or "speech_lora"]
    with torch.no_grad():
        frames = whisper.model.encoder(inputs["input_features"]).last_hidden_state  # (W, 1500, d_model)
        w, f, d = frames.shape
        stacked = frames.reshape(w, f // 5, d * 5)
        tokens = F.linear(F.relu(F.linear(stacked, p["linear1.weight"], p["linear1.bias"])),
                          p["linear2.weight"], p["linear2.bias"])
        counts = inputs["speech_token_counts"].tolist()
        speech = torch.cat([tokens[i, :n] for i, n in enumerate(counts)])
        ids = inputs["input_ids"]
        embeds = llm.model.embed_tokens(ids)
        embeds[ids == SPEECH] = speech
        if adapter_folder is None:
            return llm(inputs_embeds=embeds, logits_to_keep=KEEP).logits
        wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(llm), str(release["lyra"] / adapter_folder)).eval()
        return wrapped(inputs_embeds=embeds, logits_to_keep=KEEP).logits


def test_weights_come_from_the_right_sources(release, converted):
    _, model = converted
    ours = {k.replace(".base_layer", ""): v for k, v in model.language_model.state_dict().items() if ".lora_" not in k}
    for key, value in release["main"].items():
        if key.startswith(("model.embed_tokens", "model.layers", "model.norm")):
            assert torch.equal(ours[key.removeprefix("model.")], value), key
    if not model.config.tie_word_embeddings:
        assert torch.equal(model.backbone.lm_head.weight, release["main"]["lm_head.weight"])
    base_llm = release["qwen"].model.language_model.state_dict()
    assert not torch.equal(ours["layers.0.self_attn.q_proj.weight"], base_llm["layers.0.self_attn.q_proj.weight"])

    for key, value in release["qwen"].model.visual.state_dict().items():
        assert torch.equal(model.visual.state_dict()[key], value), key
    for key, value in release["whisper"].model.encoder.state_dict().items():
        assert torch.equal(model.speech_encoder.state_dict()[key], value), key
    assert set(model.speech_projectors) == {"speech", "long_speech"}
    assert model.speech_projector is model.speech_projectors["speech"]
    for folder, name in (("speech_lora", "speech"), ("long_speech_lora", "long_speech")):
        projector = model.speech_projectors[name].state_dict()
        assert projector.keys() == release["projectors"][folder].keys()
        for key, value in release["projectors"][folder].items():
            assert torch.equal(projector[key], value), (name, key)
        theirs = load_file(str(release["lyra"] / folder / "adapter_model.safetensors"))
        mine = model.adapters.state_dict(name)
        assert len(mine) == len(theirs) == 2 * len(LORA_TARGETS) * release["config"].text_config.num_hidden_layers
        for key, value in theirs.items():
            assert torch.equal(mine[key.replace("base_model.model.model.", "base_model.model.", 1)], value), key
        settings = model.config.settings.adapters[name]
        assert (settings.r, settings.alpha) == (ADAPTERS[folder]["r"], ADAPTERS[folder]["alpha"])
        assert settings.dropout == 0.05
        assert settings.targets == LORA_TARGETS
    assert model.config.settings.projector.k == 5 and model.config.settings.projector.hidden_size == 64


def test_speech_forward_matches_peft_on_plain_qwen2(release, converted):
    _, model = converted
    with torch.no_grad():
        short = speech_inputs(40)
        out = model(**short, logits_to_keep=KEEP)
        assert out.adapter == "speech"
        assert torch.allclose(out.logits, expected_logits(release, short, "speech_lora"), atol=1e-5)
        off = model(**short, adapter=None, logits_to_keep=KEEP).logits
        assert torch.allclose(off, expected_logits(release, short, None), atol=1e-5)
        assert not torch.allclose(off, out.logits, atol=1e-3)
        # long speech routes to the long-speech adapter together with the long-speech stage's own projector
        long = speech_inputs(310, windows=2)
        out = model(**long, logits_to_keep=KEEP)
        assert out.adapter == "long_speech"
        assert torch.allclose(out.logits, expected_logits(release, long, "long_speech_lora"), atol=1e-5)
        wrong = expected_logits(release, long, "long_speech_lora", projector_folder="speech_lora")
        assert not torch.allclose(out.logits, wrong, atol=1e-3)


def test_side_files_and_report(release, converted):
    path, _ = converted
    generator = load_file(str(path / "speech_generator.safetensors"))
    assert generator.keys() == GENERATOR.keys()
    for key, value in generator.items():
        assert torch.equal(value, release["main"][key])

    report = ConversionReport.load(path)
    layers = release["config"].text_config.num_hidden_layers
    per_adapter = 2 * len(LORA_TARGETS) * layers
    assert report.tensors["llm"] == 12 * layers + 2  # embed + norm (+ lm_head when untied)
    assert report.tensors["adapter.speech"] == report.tensors["adapter.long_speech"] == per_adapter
    assert report.tensors["projector.speech"] == report.tensors["projector.long_speech"] == 4
    assert report.tensors["speech_generator"] == len(GENERATOR)
    assert report.tensors["ignored.main_projector"] == 4
    assert report.tensors["vision_base"] > 0 and "vision" not in report.tensors
    assert report.speech_generator["config"]["ctc_decoder_config"] == "(2,4096,32,11008)"
    assert set(report.adapters) == {"speech", "long_speech"}
    assert report.adapters["long_speech"]["r"] == 6
    assert report.files == ["speech_generator.safetensors"]
    sources = {name: str(release["lyra"] / folder / "non_lora_trainables.bin")
               for folder, name in (("speech_lora", "speech"), ("long_speech_lora", "long_speech"))}
    assert report.projector == {"k": 5, "hidden_size": 64, "sources": sources}
    assert any(all(source in note for source in sources.values()) for note in report.notes)
    assert report.sources["lyra"] == str(release["lyra"])
    assert report.dtype == "float32"  # dtype=None keeps the release's
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_long_speech_adapter_alone(release, tmp_path, caplog):
    lyra = tmp_path / "Lyra_Tiny"
    shutil.copytree(release["lyra"], lyra)
    shutil.rmtree(lyra / "speech_lora")
    rel = dict(release, lyra=lyra)
    with caplog.at_level(logging.WARNING, logger="lyra.convert"):
        out = run(rel, tmp_path / "out")
    assert not caplog.records
    model = LyraForConditionalGeneration.from_pretrained(out, attn_implementation="eager")
    assert model.adapters.names == ["long_speech"]
    assert list(model.speech_projectors) == ["long_speech"]
    for key, value in release["projectors"]["long_speech_lora"].items():
        assert torch.equal(model.projector_for("long_speech").state_dict()[key], value), key
    report = ConversionReport.load(out)
    assert set(report.projector["sources"]) == {"long_speech"} and "projector.speech" not in report.tensors


def test_identical_projectors_are_noted(broken):
    rel, out = broken
    shutil.copy(rel["lyra"] / "speech_lora" / "non_lora_trainables.bin",
                rel["lyra"] / "long_speech_lora" / "non_lora_trainables.bin")
    run(rel, out)
    model = LyraForConditionalGeneration.from_pretrained(out, attn_implementation="eager")
    for key, value in rel["projectors"]["speech_lora"].items():
        assert torch.equal(model.speech_projectors["long_speech"].state_dict()[key], value), key
    assert "the speech and long-speech adapters carry the same projector" in ConversionReport.load(out).notes


def test_overwrite_and_dtype(release, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        run(release, out)
    assert (out / "stale.txt").exists()
    run(release, out, dtype="bfloat16", overwrite=True)
    assert not (out / "stale.txt").exists()
    model = LyraForConditionalGeneration.from_pretrained(out, attn_implementation="eager")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert ConversionReport.load(out).dtype == "bfloat16"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="unknown dtype"):
        run(release, tmp_path / "x", dtype="int8")


def test_release_with_tower_copies_in_torch_bin(release, tmp_path):
    """A main folder saved as pytorch_model.bin that also holds the towers, as the reference's whole-model saves do."""
    lyra = tmp_path / "Lyra_Tiny"
    shutil.copytree(release["lyra"], lyra)
    main = read_main(lyra)
    for old in list(lyra.glob("model*.safetensors")) + [lyra / "model.safetensors.index.json"]:
        old.unlink()
    torch.manual_seed(5)
    visual = Qwen2VLForConditionalGeneration(release["config"].backbone_config).model.visual.state_dict()
    main.update({"model.vision_tower.vision_tower." + k: v for k, v in visual.items()})
    encoder = release["whisper"].model.encoder.state_dict()
    main.update({"model.speech_tower.speech_tower." + k: torch.zeros_like(v) for k, v in encoder.items()})
    main["lm_head.weight"] = main["model.embed_tokens.weight"].clone()  # tied, saved anyway
    main["model.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(main, lyra / "pytorch_model.bin")
    out = run(dict(release, lyra=lyra), tmp_path / "out")
    model = LyraForConditionalGeneration.from_pretrained(out, attn_implementation="eager")
    for key, value in visual.items():
        assert torch.equal(model.visual.state_dict()[key], value), key
    for key, value in encoder.items():  # the release's (zeroed) Whisper copy is not used
        assert torch.equal(model.speech_encoder.state_dict()[key], value), key
    report = ConversionReport.load(out)
    assert report.tensors["vision"] == len(visual) and "vision_base" not in report.tensors
    assert report.tensors["ignored.speech_tower"] == len(encoder)
    assert report.tensors["ignored.buffers"] == 1

    main["lm_head.weight"] = main["lm_head.weight"] + 1
    torch.save(main, lyra / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="lm_head.weight differs"):
        run(dict(release, lyra=lyra), tmp_path / "out2")


@pytest.fixture
def broken(release, tmp_path):
    """A writable copy of the release folder to break."""
    lyra = tmp_path / "Lyra_Tiny"
    shutil.copytree(release["lyra"], lyra)
    return dict(release, lyra=lyra), tmp_path / "out"


def assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_missing_adapter_config(broken):
    rel, out = broken
    (rel["lyra"] / "long_speech_lora" / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"long_speech_lora/adapter_config\.json"):
        run(rel, out)
    assert_nothing_written(out)


def test_missing_folders_and_files(broken, tmp_path):
    rel, out = broken
    with pytest.raises(FileNotFoundError, match="Whisper"):
        convert_release(rel["lyra"], rel["root"] / "qwen2vl", tmp_path / "nowhere", out)
    (rel["lyra"] / "speech_lora" / "non_lora_trainables.bin").unlink()
    with pytest.raises(FileNotFoundError, match="non_lora_trainables.bin"):
        run(rel, out)
    for folder in ADAPTERS:
        shutil.rmtree(rel["lyra"] / folder)
    with pytest.raises(FileNotFoundError, match="no adapter folder"):
        run(rel, out)
    assert_nothing_written(out)


def test_projector_with_wrong_shape(broken):
    rel, out = broken
    path = rel["lyra"] / "speech_lora" / "non_lora_trainables.bin"
    state = torch.load(path, weights_only=True)
    state[PROJ + "linear2.weight"] = torch.zeros(64, 63)
    torch.save(state, path)
    with pytest.raises(ConversionError, match=r"linear2\.weight has shape \(64, 63\), expected \(64, 64\)"):
        run(rel, out)
    state[PROJ + "linear2.weight"] = torch.zeros(64, 64)
    state[PROJ + "linear1.weight"] = torch.zeros(64, 47 * 5)  # not a multiple of Whisper's d_model 48
    torch.save(state, path)
    with pytest.raises(ConversionError, match="multiple of the Whisper d_model 48"):
        run(rel, out)
    assert_nothing_written(out)


def test_projectors_of_different_shapes(broken):
    rel, out = broken
    path = rel["lyra"] / "long_speech_lora" / "non_lora_trainables.bin"
    d_model, width = rel["config"].speech_config.d_model, rel["config"].text_config.hidden_size
    torch.save(random_projector(torch.Generator().manual_seed(3), d_model * 5, 32, width), path)
    shapes = r"projectors differ in shape.*speech_lora.*-> 64.*long_speech_lora.*-> 32"
    with pytest.raises(ConversionError, match=shapes):
        run(rel, out)
    torch.save(random_projector(torch.Generator().manual_seed(3), d_model * 4, 64, width), path)
    with pytest.raises(ConversionError, match=r"projectors differ in shape.*48\*5 -> 64.*48\*4 -> 64"):
        run(rel, out)
    assert_nothing_written(out)


def test_unexpected_keys(broken):
    rel, out = broken
    main = read_main(rel["lyra"])
    write_main(rel["lyra"], {**main, "model.mm_audio_projector.weight": torch.zeros(2)})
    with pytest.raises(ConversionError, match=r"no place.*model\.mm_audio_projector\.weight"):
        run(rel, out)
    write_main(rel["lyra"], {**main, "model.layers.0.self_attn.rope_scale": torch.zeros(2)})
    with pytest.raises(ConversionError, match=r"no place in the Qwen2-VL backbone.*rope_scale"):
        run(rel, out)
    write_main(rel["lyra"], {k: v for k, v in main.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ConversionError, match=r"lacks 1 LLM weights.*layers\.1\.mlp\.up_proj\.weight"):
        run(rel, out)
    write_main(rel["lyra"], main)

    adapter = rel["lyra"] / "speech_lora" / "adapter_model.safetensors"
    lora = load_file(str(adapter))
    extra = {"base_model.model.model.speech_tower.layers.0.fc1.lora_A.weight": torch.zeros(4, 48)}
    save_file({**lora, **extra}, str(adapter))
    with pytest.raises(ConversionError, match="not LLM LoRA weights.*speech_tower"):
        run(rel, out)
    assert_nothing_written(out)


def test_llm_shape_mismatch_names_both_shapes(broken):
    rel, out = broken
    main = read_main(rel["lyra"])
    write_main(rel["lyra"], {**main, "model.norm.weight": torch.ones(65)})
    with pytest.raises(ConversionError, match=r"model\.norm\.weight has shape \(65,\).*expects \(64,\)"):
        run(rel, out)
    assert_nothing_written(out)


def test_unsupported_adapter_options(broken):
    rel, out = broken
    path = rel["lyra"] / "speech_lora" / "adapter_config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "use_dora": True}))
    with pytest.raises(ConversionError, match="use_dora"):
        run(rel, out)
    path.write_text(json.dumps({**data, "target_modules": ["q_proj", "fc1"]}))
    with pytest.raises(ConversionError, match="fc1"):
        run(rel, out)
    assert_nothing_written(out)


def test_cli_convert_writes_a_loadable_model_folder(release, tmp_path):
    """`lyra convert` + the stock Qwen2-VL tokenizer -> a folder `--model` and load_pretrained accept."""
    import shutil

    import numpy as np
    from click.testing import CliRunner
    from test_pipeline import stock_qwen2vl_tokenizer

    from lyra.cli import main
    from lyra.pretrained import load_pretrained

    base = tmp_path / "qwen2vl"
    shutil.copytree(release["root"] / "qwen2vl", base)
    stock_qwen2vl_tokenizer(tmp_path / "tok")
    for f in (tmp_path / "tok").iterdir():
        shutil.copy(f, base / f.name)
    out = tmp_path / "converted"
    args = ["convert", "--lyra", str(release["lyra"]), "--qwen2vl", str(base), "--whisper",
            str(release["root"] / "whisper"), "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    loaded = load_pretrained(out, attn_implementation="eager")
    assert loaded.trained and loaded.processor.speech_token_id == loaded.model.config.speech_token_id
    assert loaded.processor.feature_extractor.feature_size == loaded.model.config.speech_config.num_mel_bins
    prompt = loaded.processor.apply_chat_template([{"role": "user", "content": "<speech>\nWhat was said?"}])
    inputs = loaded.processor(prompt, audios=[np.zeros(16000 * 3, dtype=np.float32)])
    gen = loaded.model.generate(dict(inputs), max_new_tokens=2)
    assert gen.sequences.shape == (1, 2) and gen.cache.adapter == "speech"
    # a second run refuses to overwrite
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "exists" in str(again.exception) + again.output
