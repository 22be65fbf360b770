"""The real assets end to end: Whisper tiny.en parity, processor -> model, the demo command."""

import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner
from PIL import Image
from transformers import WhisperModel

from lyra import LyraForConditionalGeneration, LyraProcessor, assets
from lyra.cli import main
from lyra.modeling import read_whisper_encoder_state
from lyra.presets import build_config


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "question.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "What colour is the circle in this picture?"], check=True)
    return path


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    config = build_config("nano")
    model = LyraForConditionalGeneration(config).eval()
    model.speech_encoder.load_state_dict(read_whisper_encoder_state(assets.whisper_tiny_en()))
    processor = LyraProcessor.build(assets.qwen2_tokenizer(), n_mels=80, trim_speech_padding=True)
    return model, processor


def test_speech_tower_equals_hf_whisper_encoder(nano, speech_wav):
    model, processor = nano
    inputs = processor("<speech>", audios=[speech_wav])
    reference = WhisperModel.from_pretrained(assets.whisper_tiny_en()).encoder.eval()
    with torch.no_grad():
        ours = model.speech_encoder(inputs["input_features"]).last_hidden_state
        theirs = reference(inputs["input_features"]).last_hidden_state
    assert ours.shape == (1, 1500, 384)
    assert torch.equal(ours, theirs)


def test_processor_to_model(nano, speech_wav, tmp_path):
    model, processor = nano
    long_wav = tmp_path / "long.wav"
    audio, rate = sf.read(speech_wav, dtype="float32")
    sf.write(long_wav, np.tile(audio, int(np.ceil(45 * rate / len(audio)))), rate)  # > 30 s: two windows
    prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\n<speech>\nAnd <speech>?"}])
    image = Image.new("RGB", (9000, 7000), "blue")  # huge: scaled within max_pixels by the processor
    inputs = processor(prompt, images=[image], audios=[speech_wav, long_wav])
    assert inputs["speech_clip_windows"].tolist() == [1, 2]
    assert inputs["speech_token_counts"][1] == 300
    with torch.no_grad():
        out = model(**inputs)
    assert out.adapter == "long_speech"
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(out.logits).all()


def test_demo_command_runs():
    result = CliRunner().invoke(main, ["demo", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "answer:" in result.output
    assert "adapter: speech" in result.output
    assert "spoken by espeak-ng" in result.output
    from lyra.pretrained import EMBEDDED_CHECKPOINT

    if not (EMBEDDED_CHECKPOINT / "config.json").exists():
        assert "the LLM weights are random, so the answer is noise" in result.output


def stock_qwen2vl_tokenizer(folder):
    """Our tokenizer folder minus <|speech_pad|>: what a stock Qwen2-VL checkpoint ships."""
    import json
    import shutil

    shutil.copytree(assets.qwen2_tokenizer(), folder)
    for name, key in (("tokenizer.json", "added_tokens"),):
        data = json.loads((folder / name).read_text())
        data[key] = [t for t in data[key] if t["content"] != "<|speech_pad|>"]
        (folder / name).write_text(json.dumps(data))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = [t for t in config["extra_special_tokens"] if t != "<|speech_pad|>"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_processor_for_model_adds_the_speech_token(tmp_path):
    from transformers import AutoTokenizer

    stock = stock_qwen2vl_tokenizer(tmp_path / "stock")
    assert "<|speech_pad|>" not in AutoTokenizer.from_pretrained(stock).get_vocab()
    config = build_config("mini")
    processor = LyraProcessor.for_model(config, stock)
    assert processor.speech_token_id == 151657
    assert processor.feature_extractor.feature_size == 128 and not processor.trim_speech_padding
    processor.save_pretrained(tmp_path / "saved")
    again = LyraProcessor.from_pretrained(tmp_path / "saved")
    assert again("<speech>", audios=[np.zeros(16000, dtype=np.float32)])["input_ids"].eq(151657).sum() == 300
    config.speech_token_id = 151700
    with pytest.raises(ValueError, match="expects 151700"):
        LyraProcessor.for_model(config, stock)


def test_batched_groups_in_order():
    from lyra.engine.pipeline import batched

    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched([], 2)) == []
    with pytest.raises(ValueError, match="size"):
        list(batched([1], 0))
