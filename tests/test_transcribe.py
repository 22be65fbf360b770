"""Transcriber guards: silence, repetition loops, temperature fallback, resume numbering."""

import numpy as np
import pytest
from lyra.engine.events import AudioWindow
from lyra.engine.transcribe import TranscribeOptions, Transcriber, _Decode, compression_ratio

from lyra.constants import SAMPLE_RATE


@pytest.fixture(scope="module")
def transcriber(model_and_processor):
    return Transcriber(*model_and_processor, TranscribeOptions(max_new_tokens=5))


def window(i, seconds=3.0, speech=None):
    samples = (0.1 * np.random.default_rng(i).standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)
    return AudioWindow(i, i * 30.0, i * 30.0 + seconds, samples, speech=speech)


def test_real_decode_gives_timed_segment(transcriber):
    segments = transcriber.window_segments(window(2))
    assert len(segments) <= 1
    for s in segments:
        assert (s.start, s.end, s.window) == (60.0, 63.0, 2) and s.text
        assert s.avg_logprob <= 0 and s.compression_ratio > 0


def test_silence_gives_no_text(transcriber, monkeypatch):
    monkeypatch.setattr(transcriber, "_decode", lambda *a: pytest.fail("silence must not be decoded"))
    assert transcriber.window_segments(window(0, speech=False)) == []


def test_loops_retry_hotter_then_drop(transcriber, monkeypatch):
    seen = []
    loop = "the the the the the the the the the the the the the the the the"
    assert compression_ratio(loop) > 2.4

    def fake(w, temperature):
        seen.append(temperature)
        return _Decode(loop, -0.1, compression_ratio(loop))

    monkeypatch.setattr(transcriber, "_decode", fake)
    assert transcriber.window_segments(window(1)) == []
    assert seen == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]

    seen.clear()

    def good_when_warm(w, temperature):
        seen.append(temperature)
        text = loop if temperature < 0.4 else "a lecture about harbours"
        return _Decode(text, -0.2, compression_ratio(text))

    monkeypatch.setattr(transcriber, "_decode", good_when_warm)
    assert transcriber.window_segments(window(1))[0].text == "a lecture about harbours"
    assert seen == [0.0, 0.2, 0.4]


def test_resume_reuses_done_windows_and_numbers_segments(transcriber, monkeypatch):
    from lyra.engine.events import Segment

    def fake(w, temperature):
        return _Decode(f"window {w.index}", -0.1, 1.0)

    monkeypatch.setattr(transcriber, "_decode", fake)
    done = {0: [Segment(7, 0.0, 3.0, "from the journal", 0)]}
    out = list(transcriber.segments([window(0), window(1, speech=False), window(2)], done=done))
    texts = [(w.index, [(s.id, s.text) for s in segs]) for w, segs in out]
    assert texts == [(0, [(0, "from the journal")]), (1, []), (2, [(1, "window 2")])]
