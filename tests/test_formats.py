"""Transcript formats parse with standard parsers, stream like they render, land atomically; the journal resumes."""

import html
import io
import json
import os
from datetime import timedelta

import pytest
from lyra.engine import formats
from lyra.engine.events import Segment
from lyra.engine.formats import (
    FORMATS,
    SegmentStream,
    format_timestamp,
    render,
    segment_from_dict,
    segment_lines,
    write_atomic,
)
from lyra.engine.journal import JobIdentity, JournalError, JournalMismatch, TranscriptJournal, journal_path

HOUR = 3600.0


def make_segments():
    """Whisper-like segments: leading spaces, a newline, an empty one, `-->` and `<&>`, an hour boundary, > 2 h."""
    return [
        Segment(0, 0.0, 2.5, " Hello  world.", window=0, avg_logprob=-0.25, compression_ratio=1.2),
        Segment(1, 2.5, 5.0, " two\nlines\t here ", window=0, avg_logprob=-0.5, compression_ratio=1.1),
        Segment(2, 5.0, 6.0, "   ", window=0),  # nothing said: skipped in txt, srt and vtt
        Segment(3, 61.0004, 62.0005, "arrows --> and <b>&</b>", window=2, avg_logprob=-1.0),
        Segment(4, HOUR - 0.0004, HOUR + 1.9996, "across the hour", window=120),
        Segment(5, 2 * HOUR + 5 * 60 + 7.123, 2 * HOUR + 5 * 60 + 9.5, "two hours in", window=250),
    ]


TEXTS = ["Hello world.", "two lines here", "arrows --> and <b>&</b>", "across the hour", "two hours in"]
# Cue times in whole ms, rounded half up as written (62.0005 -> 62001, 3599.9996 -> 3600000).
STARTS_MS = [0, 2_500, 61_000, 3_600_000, 7_507_123]
ENDS_MS = [2_500, 5_000, 62_001, 3_602_000, 7_509_500]


# ---------------------------------------------------------------------------------------------
# Timestamps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seconds, srt_text, vtt_text",
    [
        (0.0, "00:00:00,000", "00:00.000"),
        (62.345, "00:01:02,345", "01:02.345"),
        (0.0005, "00:00:00,001", "00:00.001"),  # half up, as written
        (1.0005, "00:00:01,001", "00:01.001"),  # 1.0005 is 1.000499.. in binary; still rounds up
        (0.0004999, "00:00:00,000", "00:00.000"),
        (999.9995, "00:16:40,000", "16:40.000"),  # carry into seconds and minutes, never ",1000"
        (59.9996, "00:01:00,000", "01:00.000"),
        (HOUR - 0.0004, "01:00:00,000", "01:00:00.000"),  # carry into the hour
        (HOUR - 0.001, "00:59:59,999", "59:59.999"),
        (HOUR, "01:00:00,000", "01:00:00.000"),
        (2 * HOUR + 5 * 60 + 7.123, "02:05:07,123", "02:05:07.123"),
        (100 * HOUR + 0.5, "100:00:00,500", "100:00:00.500"),
    ],
)
def test_format_timestamp(seconds, srt_text, vtt_text):
    assert format_timestamp(seconds, always_hours=True, decimal_marker=",") == srt_text
    assert format_timestamp(seconds) == vtt_text


def test_format_timestamp_never_prints_1000_ms():
    for k in range(20_000):
        text = format_timestamp(k * 0.0005 + 0.00049, always_hours=True, decimal_marker=",")
        assert len(text.split(",")[1]) == 3, text
        assert int(text.split(":")[2].split(",")[0]) < 60, text


@pytest.mark.parametrize("bad", [-0.001, float("nan"), float("inf")])
def test_format_timestamp_rejects_bad_times(bad):
    with pytest.raises(ValueError):
        format_timestamp(bad)


# ---------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------


def test_srt_parses_with_srt_library():
    srt = pytest.importorskip("srt")  # the `test` extra
    segments = make_segments()
    cues = list(srt.parse(render(segments, "srt")))
    assert [c.index for c in cues] == [1, 2, 3, 4, 5]  # consecutive although segment 2 was skipped
    assert [c.content for c in cues] == TEXTS
    assert [c.start for c in cues] == [timedelta(milliseconds=t) for t in STARTS_MS]
    assert [c.end for c in cues] == [timedelta(milliseconds=t) for t in ENDS_MS]
    assert cues[3].start == timedelta(hours=1) and cues[3].end == timedelta(hours=1, seconds=2)
    assert cues[4].start == timedelta(hours=2, minutes=5, seconds=7, milliseconds=123)


def test_vtt_parses_with_webvtt():
    webvtt = pytest.importorskip("webvtt")  # webvtt-py, the `test` extra
    segments = make_segments()
    document = render(segments, "vtt")
    assert document.startswith("WEBVTT\n\n") and document.count("WEBVTT") == 1
    captions = webvtt.from_buffer(io.StringIO(document)).captions
    assert [html.unescape(c.raw_text) for c in captions] == TEXTS
    assert "--&gt;" in captions[2].raw_text and "&lt;b&gt;&amp;&lt;/b&gt;" in captions[2].raw_text
    assert [c.start_in_seconds * 1000 + c.start_time.milliseconds for c in captions] == STARTS_MS
    assert [c.end_in_seconds * 1000 + c.end_time.milliseconds for c in captions] == ENDS_MS
    assert captions[0].start == "00:00:00.000"
    assert captions[3].start == "01:00:00.000" and captions[3].end == "01:00:02.000"
    assert captions[4].start == "02:05:07.123"


def test_hundred_hours_parse():
    srt, webvtt = pytest.importorskip("srt"), pytest.importorskip("webvtt")
    segment = Segment(0, 100 * HOUR + 0.25, 100 * HOUR + 1.5, "late", window=12_000)
    (cue,) = srt.parse(render([segment], "srt"))
    assert cue.start == timedelta(hours=100, milliseconds=250) and cue.end == timedelta(hours=100, seconds=1.5)
    (caption,) = webvtt.from_buffer(io.StringIO(render([segment], "vtt"))).captions
    assert caption.start == "100:00:00.250" and caption.end_in_seconds == 100 * 3600 + 1


def test_vtt_without_cues_is_a_valid_empty_document():
    webvtt = pytest.importorskip("webvtt")
    assert render([], "vtt") == "WEBVTT\n\n"
    assert webvtt.from_buffer(io.StringIO(render([Segment(0, 0.0, 1.0, " ", window=0)], "vtt"))).captions == []
    assert render([], "srt") == "" and render([], "txt") == ""


def test_txt_is_one_line_per_spoken_segment():
    assert render(make_segments(), "txt") == "".join(t + "\n" for t in TEXTS)


def test_json_is_whisper_verbose_and_round_trips():
    segments = make_segments()
    document = json.loads(render(segments, "json", language="en", duration=7600.0))
    assert set(document) == {"text", "language", "duration", "segments"}
    assert document["language"] == "en" and document["duration"] == 7600.0
    assert document["text"] == " ".join(TEXTS)
    for item in document["segments"]:
        assert set(item) == {"id", "start", "end", "text", "avg_logprob", "compression_ratio", "window"}
    assert [segment_from_dict(item) for item in document["segments"]] == segments  # raw text kept
    assert json.loads(render(segments, "json", text="given"))["text"] == "given"
    assert json.loads(render(segments, "json"))["duration"] == segments[-1].end


def test_json_writes_null_for_non_finite_scores():
    segment = Segment(0, 0.0, 1.0, "x", window=0, avg_logprob=float("-inf"), compression_ratio=float("nan"))
    item = json.loads(render([segment], "json"))["segments"][0]
    assert item["avg_logprob"] is None and item["compression_ratio"] is None


def test_unknown_format_is_refused():
    assert FORMATS == ("txt", "srt", "vtt", "json")
    with pytest.raises(ValueError, match="txt, srt, vtt, json"):
        render([], "tsv")


# ---------------------------------------------------------------------------------------------
# Streaming equals rendering
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["txt", "srt", "vtt"])
def test_streamed_equals_render(fmt):
    segments = make_segments()
    stream = SegmentStream(fmt)
    printed = "".join(stream.write(s) for s in segments) + stream.finish()
    assert printed == render(segments, fmt)

    # The same with the bare function and the caller counting cues.
    cues, parts = 0, []
    for s in segments:
        lines = segment_lines(s, fmt, cues)
        cues += bool(lines)
        parts.append(lines)
    assert "".join(parts) == render(segments, fmt)


def test_streamed_json_is_json_lines():
    segments = make_segments()
    stream = SegmentStream("json")
    lines = "".join(stream.write(s) for s in segments).splitlines()
    assert [segment_from_dict(json.loads(line)) for line in lines] == segments
    assert stream.finish() == ""


def test_vtt_header_once_when_streaming():
    stream = SegmentStream("vtt")
    first = stream.write(make_segments()[0])
    second = stream.write(make_segments()[1])
    assert first.startswith("WEBVTT\n\n") and "WEBVTT" not in second


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def test_write_atomic_writes_whole_file(tmp_path):
    target = tmp_path / "out.srt"
    text = render(make_segments(), "srt") * 1000
    write_atomic(target, text)
    assert target.read_text(encoding="utf-8") == text
    write_atomic(str(target), "second\n")
    assert target.read_text(encoding="utf-8") == "second\n"
    assert os.listdir(tmp_path) == ["out.srt"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~formats._umask()  # as open() makes it, not mkstemp's 0600


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("previous\n")

    real_fsync = os.fsync

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(formats.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, "new text that never lands\n" * 1000)
    monkeypatch.setattr(formats.os, "fsync", real_fsync)
    assert target.read_text() == "previous\n"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_write_atomic_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("previous\n")

    def interrupted_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(formats.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, "new\n")
    assert target.read_text() == "previous\n"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_write_atomic_refuses_stdout():
    with pytest.raises(ValueError, match="stdout"):
        write_atomic("-", "x")


# ---------------------------------------------------------------------------------------------
# Journal
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def audio(tmp_path):
    path = tmp_path / "talk.wav"
    path.write_bytes(os.urandom(3 * (1 << 20) + 17))  # larger than first + last MiB
    return path


def identity(audio, **settings):
    return JobIdentity.of(audio, model="lyra-nano", settings={"beam_size": 1, "language": "en", **settings})


def window_segments(window):
    return [Segment(2 * window + k, 30.0 * window + k, 30.0 * window + k + 1, f" w{window} s{k}", window=window,
                    avg_logprob=-0.1 * k, compression_ratio=1.5) for k in range(2)]


def test_journal_path(tmp_path, audio, monkeypatch):
    assert journal_path(tmp_path / "out.srt", audio) == tmp_path / "out.srt.lyra-journal.jsonl"
    monkeypatch.setenv("LYRA_CACHE", str(tmp_path / "cache"))
    for output in ("-", None):
        path = journal_path(output, audio)
        assert path.parent == tmp_path / "cache" / "journals"
        assert path.name.startswith("talk.wav.") and path.name.endswith(".lyra-journal.jsonl")
    assert journal_path("-", tmp_path / "other" / "talk.wav") != journal_path("-", audio)


def test_journal_resumes_finished_windows_after_a_crash(tmp_path, audio):
    path = tmp_path / "out.srt.lyra-journal.jsonl"
    journal, done = TranscriptJournal.open(path, identity(audio), resume=False)
    assert done == {}
    for w in range(3):
        journal.record(w, window_segments(w))
    journal.record(3, [])  # a silent window is finished too
    journal.record(4, window_segments(4))
    # Crash mid-write of window 4: the process dies and leaves half of the last line.
    data = path.read_bytes()
    last_line_start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: last_line_start + (len(data) - last_line_start) // 2])
    del journal

    journal, done = TranscriptJournal.open(path, identity(audio), resume=True)
    assert list(done) == [0, 1, 2, 3]
    assert done[1] == window_segments(1) and done[3] == []
    # Appending after the cut must not glue onto the torn bytes.
    journal.record(4, window_segments(4))
    journal.close(completed=False)
    assert path.exists()
    journal, done = TranscriptJournal.open(path, identity(audio), resume=True)
    assert list(done) == [0, 1, 2, 3, 4] and done[4] == window_segments(4)
    journal.close(completed=True)
    assert not path.exists()
    assert os.listdir(tmp_path) == ["talk.wav"]


def test_journal_torn_line_ending_in_newline_is_ignored(tmp_path, audio):
    path = tmp_path / "j.jsonl"
    journal, _ = TranscriptJournal.open(path, identity(audio), resume=False)
    journal.record(0, window_segments(0))
    journal.close(completed=False)
    with open(path, "ab") as f:
        f.write(b'{"window": 1, "segm\n')
    journal, done = TranscriptJournal.open(path, identity(audio), resume=True)
    assert list(done) == [0]
    journal.close(completed=False)
    assert path.read_bytes().count(b"\n") == 2  # header + window 0: the torn line was cut


def test_journal_corrupt_middle_line_is_an_error(tmp_path, audio):
    path = tmp_path / "j.jsonl"
    journal, _ = TranscriptJournal.open(path, identity(audio), resume=False)
    journal.record(0, window_segments(0))
    journal.record(1, window_segments(1))
    journal.close(completed=False)
    lines = path.read_bytes().split(b"\n")
    lines[1] = b"garbage"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(JournalError, match="line 2 is corrupt"):
        TranscriptJournal.open(path, identity(audio), resume=True)


def test_journal_identity_mismatch_names_the_field(tmp_path, audio):
    path = tmp_path / "j.jsonl"
    journal, _ = TranscriptJournal.open(path, identity(audio), resume=False)
    journal.record(0, window_segments(0))
    journal.close(completed=False)

    with pytest.raises(JournalMismatch) as info:
        TranscriptJournal.open(path, identity(audio, beam_size=5), resume=True)
    message = str(info.value)
    assert "setting 'beam_size': journal has 1, this job has 5" in message
    assert "without --resume" in message and str(path) in message

    with pytest.raises(JournalMismatch, match="model: journal has 'lyra-nano', this job has 'lyra-base'"):
        TranscriptJournal.open(path, JobIdentity.of(audio, "lyra-base", identity(audio).settings), resume=True)

    data = bytearray(audio.read_bytes())
    data[-1] ^= 0xFF  # same size, the end changed
    audio.write_bytes(bytes(data))
    with pytest.raises(JournalMismatch, match="audio content fingerprint"):
        TranscriptJournal.open(path, identity(audio), resume=True)

    # Starting over replaces the journal.
    journal, done = TranscriptJournal.open(path, identity(audio), resume=False)
    assert done == {}
    journal.close(completed=False)
    journal, done = TranscriptJournal.open(path, identity(audio), resume=True)
    assert done == {}
    journal.close(completed=True)


def test_journal_resume_without_journal_starts_empty(tmp_path, audio):
    path = tmp_path / "sub" / "j.jsonl"
    journal, done = TranscriptJournal.open(path, identity(audio), resume=True)
    assert done == {} and path.exists()
    with journal:
        journal.record(0, window_segments(0))
    assert path.exists()  # leaving the block without completing keeps the journal
    with pytest.raises(JournalError, match="closed"):
        journal.record(1, [])


def test_journal_identity_settings_compare_as_json(audio):
    assert identity(audio, sizes=(1, 2)) == JobIdentity.from_dict(json.loads(json.dumps(
        identity(audio, sizes=[1, 2]).__dict__)))
    with pytest.raises(TypeError, match="JSON"):
        identity(audio, bad=object())
