"""Spoken answers through the engine: text and audio events interleaved, equal to the offline pipeline, clear
errors when a model cannot speak, `lyra ask --speak`, and lecture sessions with the token extractor."""

import io
import struct

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner
from conftest import tiny_config
from speaking import nano_vocoder, processor_for, speaking_model

from lyra import LyraForConditionalGeneration
from lyra.engine.events import AudioWindow, SpeechChunk, TextDelta
from lyra.engine.session import LectureSession
from lyra.engine.speak import SpeakOptions, SpeechOutput, SpeechUnavailable, answer_events, spoken_events
from lyra.vocoder import synthesize_units


def prompt_inputs(processor, text="Tell me about the harbour."):
    return processor(processor.apply_chat_template([{"role": "user", "content": text}]))


def offline_speech(model, inputs, vocoder, max_new_tokens, cache=None, seed=0):
    """The same answer without streaming: every token's own state, the whole generator pass, the whole audio."""
    torch.manual_seed(seed)  # the same sampled tokens as the streamed run
    steps = list(model.stream_generate(inputs, max_new_tokens=max_new_tokens, cache=cache, temperature=1.0))
    own = torch.stack([s.hidden_states for s in steps[1:]] + [steps[-1].final_hidden_states], dim=1)
    units = model.speech_generator.units(own)[0]
    return units, synthesize_units(vocoder, units)


@pytest.fixture(scope="module")
def speaking():
    model = speaking_model()
    return model, processor_for(model), nano_vocoder()


def test_answer_events_speak_while_the_text_is_generated(speaking):
    model, processor, vocoder = speaking
    inputs = prompt_inputs(processor)
    torch.manual_seed(0)  # sampled answers: the random tiny model's greedy answer is one token repeated
    events = list(answer_events("r1", model, processor, inputs, max_new_tokens=24, temperature=1.0, speak=True,
                                vocoder=vocoder))
    kinds = [type(e) for e in events]
    speech = [e for e in events if isinstance(e, SpeechChunk)]
    texts = [i for i, k in enumerate(kinds) if k is TextDelta]
    assert len(speech) >= 3 and len(texts) >= 10
    assert kinds.index(SpeechChunk) < texts[-1]  # audio starts long before the text ends
    assert kinds.index(SpeechChunk) < len(texts) // 2 + len(speech)
    assert [c.index for c in speech] == list(range(len(speech)))
    assert all(c.request_id == "r1" and c.sample_rate == 16000 and c.samples.dtype == np.float32 for c in speech)
    assert "".join(c.transcript for c in speech) == "".join(e.text for e in events if isinstance(e, TextDelta))
    assert len(speech[0].samples) == SpeakOptions().first_chunk_frames * 320

    units, audio = offline_speech(model, inputs, vocoder, 24)
    joined = np.concatenate([c.samples for c in speech])
    assert len(units) > 24 and joined.shape == audio.shape
    assert np.abs(joined - audio).max() < 1e-5

    torch.manual_seed(0)
    text_only = list(answer_events("r2", model, processor, inputs, max_new_tokens=24, temperature=1.0))
    assert all(isinstance(e, TextDelta) for e in text_only)
    assert "".join(e.text for e in text_only) == "".join(e.text for e in events if isinstance(e, TextDelta))


def test_reference_rerun_streaming_gives_the_same_events(speaking):
    model, processor, vocoder = speaking
    inputs = prompt_inputs(processor, "Why?")
    runs = []
    for rerun in (False, True):
        torch.manual_seed(0)
        steps = model.stream_generate(inputs, max_new_tokens=10, temperature=1.0)
        runs.append(list(spoken_events("x", model, processor, steps, vocoder, rerun=rerun)))
    assert [type(e) for e in runs[0]] == [type(e) for e in runs[1]]
    for a, b in zip(*runs):
        if isinstance(a, SpeechChunk):
            assert np.array_equal(a.samples, b.samples) and a.transcript == b.transcript
        else:
            assert a == b


def test_speech_unavailable_is_raised_at_once(speaking):
    model, processor, vocoder = speaking
    inputs = prompt_inputs(processor)
    with pytest.raises(SpeechUnavailable, match="no vocoder"):
        answer_events("x", model, processor, inputs, speak=True, vocoder=None)
    with pytest.raises(SpeechUnavailable, match="units"):
        answer_events("x", model, processor, inputs, speak=True, vocoder=nano_vocoder(64))
    silent = LyraForConditionalGeneration(tiny_config(speech_generator={"enabled": False})).eval()
    with pytest.raises(SpeechUnavailable, match="no speech generator"):
        answer_events("x", silent, processor, inputs, speak=True, vocoder=vocoder)


def test_speech_output_headers():
    class Pipe(io.BytesIO):
        def seekable(self):
            return False

    pipe = Pipe()
    out = SpeechOutput(pipe, 16000)
    out.write(np.full(100, 0.5, np.float32))
    out.close()
    data = pipe.getvalue()
    assert data[:4] == b"RIFF" and struct.unpack("<I", data[40:44])[0] == 0xFFFFFFFF and len(data) == 44 + 200
    assert np.frombuffer(data[44:], "<i2")[0] == round(0.5 * 32767)

    seekable = io.BytesIO()
    out = SpeechOutput(seekable, 16000)
    out.write(np.linspace(-1, 1, 160, dtype=np.float32))
    out.write(np.zeros(40, np.float32))
    out.close()
    samples, rate = sf.read(io.BytesIO(seekable.getvalue()), dtype="float32")
    assert rate == 16000 and len(samples) == 200 and samples[0] == pytest.approx(-1, abs=1e-4)
    raw = io.BytesIO()
    SpeechOutput(raw, 16000, fmt="s16le").write(np.zeros(10, np.float32))
    assert len(raw.getvalue()) == 20


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, speaking):
    model, processor, vocoder = speaking
    folder = tmp_path_factory.mktemp("speaking") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    vocoder.save_pretrained(folder / "vocoder")
    return folder


def test_cli_ask_speak_writes_a_wav(model_folder, tmp_path):
    from lyra.cli import main
    from lyra.pretrained import load_pretrained

    loaded = load_pretrained(model_folder)
    assert loaded.vocoder is not None and loaded.vocoder.num_units == loaded.model.speech_generator.settings.num_units
    out = tmp_path / "answer.wav"
    runner = CliRunner()
    result = runner.invoke(main, ["ask", "--text", "Tell me about the harbour.", "--speak", str(out),
                                  "--max-new-tokens", "12", "--model", str(model_folder)])
    assert result.exit_code == 0, result.output
    samples, rate = sf.read(out, dtype="float32")
    assert rate == 16000 and len(samples) >= 320 and len(samples) % 320 == 0  # whole 20 ms frames
    assert "written to" in result.stderr

    piped = runner.invoke(main, ["ask", "--text", "Tell me about the harbour.", "--speak", "-",
                                 "--max-new-tokens", "12", "--model", str(model_folder)])
    assert piped.exit_code == 0, piped.stderr
    audio = piped.stdout_bytes
    size = struct.unpack("<I", audio[40:44])[0]  # streaming size on a pipe; CliRunner's buffer can seek
    assert audio[:4] == b"RIFF" and size in (0xFFFFFFFF, len(audio) - 44)
    streamed = np.frombuffer(audio[44:], "<i2").astype(np.float32) / 32767
    assert len(streamed) == len(samples) and np.abs(streamed - samples).max() < 1e-3
    assert piped.stderr.strip()  # the text went to stderr

    silent = runner.invoke(main, ["ask", "--text", "hi", "--speak", str(out), "--max-new-tokens", "4", "--model",
                                  str(model_folder), "--vocoder", str(model_folder)])  # not a vocoder folder
    assert silent.exit_code != 0


def test_long_speech_session_with_the_extractor_speaks(speaking):
    """Long speech (several windows, long-speech adapter) + token extraction + spoken answer, together."""
    _, processor, vocoder = speaking
    model = speaking_model(extractor={"gap": 1, "keep_rate": 0.5, "min_keep": 8})
    session = LectureSession(model, processor)
    g = np.random.default_rng(0)
    for i in range(3):
        session.add_window(AudioWindow(i, 4.0 * i, 4.0 * (i + 1), (0.1 * g.standard_normal(64000)).astype(np.float32)))
    info = session.close_audio()
    assert info.windows == 3 and info.adapter == "long_speech"
    assert info.cached_tokens < info.speech_tokens  # the extractor pruned the cache
    torch.manual_seed(0)
    events = list(session.ask_events("What was said?", max_new_tokens=16, temperature=1.0, speak=True, vocoder=vocoder))
    speech = [e for e in events if isinstance(e, SpeechChunk)]
    assert speech and [type(e) for e in events].index(SpeechChunk) < len(events) - 1
    assert session.cache.cached_tokens() == info.cached_tokens  # rolled back for the next question

    mark = session.cache.mark()
    inputs = processor(f"{session._before_question}What was said?{session._after_question}")
    _, audio = offline_speech(model, inputs, vocoder, 16, cache=session.cache)
    session.cache.rollback(mark)
    assert np.abs(np.concatenate([c.samples for c in speech]) - audio).max() < 1e-5
    torch.manual_seed(0)
    again = list(session.ask_events("What was said?", max_new_tokens=16, temperature=1.0, speak=True, vocoder=vocoder))
    assert np.array_equal(np.concatenate([e.samples for e in again if isinstance(e, SpeechChunk)]),
                          np.concatenate([c.samples for c in speech]))
