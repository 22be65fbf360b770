"""Whole jobs through the command line: transcribe (formats, stdin, resume), ask with sessions, chat."""

import io
import subprocess

import numpy as np
import pytest
import soundfile as sf
import srt
import torch
from click.testing import CliRunner
from conftest import tiny_config

from lyra import LyraForConditionalGeneration, LyraProcessor, assets
from lyra.cli import main
from lyra.constants import SAMPLE_RATE
from lyra.engine import jobs
from lyra.engine.transcribe import TranscribeOptions, Transcriber


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny"
    torch.manual_seed(0)
    config = tiny_config()
    LyraForConditionalGeneration(config).save_pretrained(folder)
    LyraProcessor.for_model(config, assets.qwen2_tokenizer()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lecture_wav(tmp_path_factory):
    """Speech, 40 s of silence, speech: about 50 s."""
    folder = tmp_path_factory.mktemp("audio")
    speech = folder / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(speech), "Today we talk about harbours, ships and the sea. "
                    "The first harbour was built with stone."], check=True)
    wave, rate = sf.read(speech, dtype="float32")
    silence = np.zeros(40 * rate, dtype=np.float32)
    path = folder / "lecture.wav"
    sf.write(path, np.concatenate([wave, silence, wave]), rate)
    return path


def run(args, **kwargs):
    result = CliRunner().invoke(main, args, **kwargs)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_transcribe_srt_file_and_stdin(model_dir, lecture_wav, tmp_path):
    out = tmp_path / "lecture.srt"
    run(["transcribe", str(lecture_wav), "--format", "srt", "-o", str(out), "--model", str(model_dir),
         "--max-new-tokens", "6"])
    cues = list(srt.parse(out.read_text()))
    duration = sf.info(lecture_wav).duration
    for cue in cues:
        assert 0 <= cue.start.total_seconds() < cue.end.total_seconds() <= duration + 1e-3
    assert not (tmp_path / "lecture.srt.lyra-journal.jsonl").exists()  # removed once complete
    # the same audio as raw PCM on stdin gives the same transcript
    wave, rate = sf.read(lecture_wav, dtype="int16")
    streamed = run(["transcribe", "-", "--raw-rate", str(rate), "--format", "srt", "--model", str(model_dir),
                    "--max-new-tokens", "6"], input=wave.tobytes())
    assert streamed.stdout == out.read_text()


def test_silence_gives_no_segments(model_dir, tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(35 * SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    result = run(["transcribe", str(path), "--format", "json", "--model", str(model_dir)])
    assert result.stdout == ""  # json streams one line per segment: none


def test_resume_after_interruption(model_dir, lecture_wav, tmp_path, monkeypatch):
    from lyra.pretrained import load_pretrained

    loaded = load_pretrained(model_dir)
    options = TranscribeOptions(max_new_tokens=6)
    whole = jobs.transcribe_audio(loaded.model, loaded.processor, str(lecture_wav), fmt="vtt", options=options,
                                  output=tmp_path / "whole.vtt", err=io.StringIO())
    original = Transcriber.window_segments
    calls = []

    def crash_on_third(self, window, first_id=0):
        calls.append(window.index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, window, first_id)

    monkeypatch.setattr(Transcriber, "window_segments", crash_on_third)
    target = tmp_path / "resumed.vtt"
    with pytest.raises(KeyboardInterrupt):
        jobs.transcribe_audio(loaded.model, loaded.processor, str(lecture_wav), fmt="vtt", options=options,
                              output=target, err=io.StringIO())
    assert not target.exists() and (tmp_path / "resumed.vtt.lyra-journal.jsonl").exists()
    monkeypatch.setattr(Transcriber, "window_segments", original)
    again = jobs.transcribe_audio(loaded.model, loaded.processor, str(lecture_wav), fmt="vtt", options=options,
                                  output=target, resume=True, err=io.StringIO())
    def key(segments):
        return [(s.id, s.start, s.end, s.text, s.window) for s in segments]

    assert key(again) == key(whole)
    assert [s.avg_logprob for s in again] == pytest.approx([s.avg_logprob for s in whole], abs=1e-5)
    assert target.read_text() == (tmp_path / "whole.vtt").read_text()


def test_ask_with_context_then_session(model_dir, lecture_wav, tmp_path):
    session = tmp_path / "session"
    live = run(["ask", "--context", str(lecture_wav), "--session", str(session), "--text", "What is a harbour?",
                "--max-new-tokens", "5", "--model", str(model_dir)])
    assert (session / "session.json").exists()
    reopened = run(["ask", "--session", str(session), "--text", "What is a harbour?", "--max-new-tokens", "5",
                    "--model", str(model_dir)])
    assert reopened.stdout == live.stdout
    chat = run(["chat", "--session", str(session), "--max-new-tokens", "5", "--model", str(model_dir)],
               input="What is a harbour?\n/quit\n")
    assert live.stdout.strip() in chat.stdout
    pruned = tmp_path / "pruned"
    run(["ask", "--context", str(lecture_wav), "--session", str(pruned), "--keep-rate", "0.5", "--text", "Why?",
         "--max-new-tokens", "2", "--model", str(model_dir)])
    import json

    info = json.loads((pruned / "session.json").read_text())["info"]
    assert info["cached_tokens"] < json.loads((session / "session.json").read_text())["info"]["cached_tokens"]


def test_clear_errors(model_dir, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF" + bytes(range(200)))
    result = CliRunner().invoke(main, ["transcribe", str(bad), "--model", str(model_dir)])
    assert result.exit_code != 0 and "bad.wav" in result.output
    result = CliRunner().invoke(main, ["ask", "--model", str(model_dir)])
    assert result.exit_code != 0 and "give a question" in result.output
    result = CliRunner().invoke(main, ["ask", "--session", str(tmp_path), "--text", "hi", "--model", str(model_dir)])
    assert result.exit_code != 0 and "not a saved session" in result.output
