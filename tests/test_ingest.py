"""Streaming ingest: block-by-block decoding, 30 s windows with exact times, VAD cuts, bounded memory, errors."""

import gc
import io
import shutil
import subprocess
import time
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from lyra.engine.ingest import AudioSource, RawFormat, iter_windows, open_audio
from lyra.engine.vad import FRAME_SAMPLES, SpeechDetector, VadState

from lyra.audio import AudioError, load_audio
from lyra.constants import SAMPLE_RATE, WINDOW_SAMPLES

SR = SAMPLE_RATE


class ChunkyPipe(io.RawIOBase):
    """A non-seekable byte stream that hands out at most `chunk` bytes per read, like a pipe or socket."""

    def __init__(self, data: bytes, chunk: int = 777, name: str = "<pipe>"):
        self._data, self._pos, self._chunk, self.name = data, 0, chunk, name

    def readable(self):
        return True

    def seekable(self):
        return False

    def readinto(self, buffer):
        n = min(len(buffer), self._chunk, len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


def same_windows(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.index, x.start, x.end, x.speech) == (y.index, y.start, y.end, y.speech)
        assert x.samples.dtype == y.samples.dtype == np.float32
        np.testing.assert_array_equal(x.samples, y.samples)


def check_contiguous(windows, total=None):
    """Windows tile the stream: consecutive, exact times, at most 30 s each."""
    position = 0
    for i, w in enumerate(windows):
        assert w.index == i
        assert w.start == position / SR
        assert w.end == (position + len(w.samples)) / SR
        assert 0 < len(w.samples) <= WINDOW_SAMPLES
        position += len(w.samples)
    if total is not None:
        assert position == total


def tiny_blocks(wave, size=1234):
    return (wave[i : i + size] for i in range(0, len(wave), size))


def music(seconds, rate=44100, channels=2, seed=0):
    """A chirp plus noise: broadband content that exercises the resampler."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    tone = 0.3 * np.sin(2 * np.pi * (200 + 40 * t) * t)
    return np.stack([tone + 0.05 * rng.standard_normal(t.shape) for _ in range(channels)], 1).astype(np.float32)


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "suffix,fmt,subtype",
    [(".wav", "WAV", "PCM_16"), (".flac", "FLAC", "PCM_16"), (".ogg", "OGG", "VORBIS"), (".mp3", "MP3", "MPEG_LAYER_III")],
)
def test_formats_stream_like_load_audio(tmp_path, suffix, fmt, subtype):
    path = tmp_path / f"clip{suffix}"
    sf.write(path, music(34.0), 44100, format=fmt, subtype=subtype)
    with open_audio(path) as source:
        assert (source.sample_rate_in, source.channels_in) == (44100, 2)
        assert source.duration == pytest.approx(34.0, abs=0.1)  # MP3 frame counts may include codec padding
    windows = list(iter_windows(path))
    check_contiguous(windows)
    assert windows[0].end - windows[0].start == 30.0
    streamed = np.concatenate([w.samples for w in windows])
    reference = load_audio(path)
    assert streamed.shape == reference.shape
    np.testing.assert_allclose(streamed, reference, atol=1e-5)
    assert np.abs(streamed).max() <= 1.0


def test_small_blocks_equal_one_block(tmp_path):
    wave = load_audio_from(tmp_path, music(65.0, rate=22050, channels=1))
    same_windows(list(iter_windows(wave)), list(iter_windows(tiny_blocks(wave, 999))))
    same_windows(list(iter_windows(wave)), list(iter_windows([wave[:5], wave[5:]])))


def load_audio_from(tmp_path, samples, rate=22050):
    path = tmp_path / "any.wav"
    sf.write(path, samples, rate, subtype="FLOAT")
    return load_audio(path)


def test_timestamps_exact_for_75_seconds(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, (0.1 * np.sin(np.arange(75 * SR) * 0.05)).astype(np.float32), SR, subtype="PCM_16")
    windows = list(iter_windows(path))
    assert [(w.start, w.end) for w in windows] == [(0.0, 30.0), (30.0, 60.0), (60.0, 75.0)]
    assert [len(w.samples) for w in windows] == [WINDOW_SAMPLES, WINDOW_SAMPLES, 15 * SR]
    assert all(w.speech is None for w in windows)  # no VAD ran
    assert open_audio(path).duration == 75.0


def test_blocks_are_16k_mono_float32_and_single_pass(tmp_path):
    path = tmp_path / "a.flac"
    sf.write(path, music(3.0, rate=48000), 48000)
    source = open_audio(path)
    blocks = list(source.blocks())
    assert all(b.ndim == 1 and b.dtype == np.float32 for b in blocks)
    assert sum(len(b) for b in blocks) == 3 * SR
    with pytest.raises(RuntimeError, match="read once"):
        source.blocks()
    with open_audio(path) as closed:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        closed.blocks()


# --------------------------------------------------------------------------- streamed equals offline


def test_raw_pipe_equals_file(tmp_path):
    pcm = (np.random.default_rng(1).standard_normal(int(61.3 * SR)) * 3000).astype("<i2")
    path = tmp_path / "mono16k.wav"
    sf.write(path, pcm, SR, subtype="PCM_16")
    from_file = list(iter_windows(path))
    pipe = open_audio(ChunkyPipe(pcm.tobytes(), chunk=333), raw=RawFormat(SR, 1, "s16le"))
    assert pipe.duration is None and pipe.name == "<pipe>"
    same_windows(from_file, list(iter_windows(pipe)))
    raw_path = tmp_path / "mono16k.pcm"
    raw_path.write_bytes(pcm.tobytes())
    raw_file = open_audio(raw_path, raw=RawFormat())
    assert raw_file.duration == pytest.approx(61.3)
    same_windows(from_file, list(iter_windows(raw_file)))


def test_raw_resampled_stereo_float_equals_file(tmp_path):
    samples = music(40.0, rate=44100, channels=2)
    path = tmp_path / "stereo.wav"
    sf.write(path, samples, 44100, subtype="FLOAT")
    from_file = list(iter_windows(path))
    pipe = open_audio(ChunkyPipe(samples.astype("<f4").tobytes(), chunk=4097), raw=RawFormat(44100, 2, "f32le"))
    same_windows(from_file, list(iter_windows(pipe)))


def test_encoded_pipe_is_spooled_and_equals_file(tmp_path):
    path = tmp_path / "clip.flac"
    sf.write(path, music(33.0, rate=32000, channels=1), 32000)
    same_windows(list(iter_windows(path)), list(iter_windows(ChunkyPipe(path.read_bytes(), chunk=1000))))
    with open(path, "rb") as f:  # a seekable file object is decoded in place
        same_windows(list(iter_windows(path)), list(iter_windows(f)))


def test_stdin_raw(monkeypatch):
    pcm = (np.arange(SR * 2) % 200 - 100).astype("<i2")
    monkeypatch.setattr("sys.stdin", SimpleNamespace(buffer=ChunkyPipe(pcm.tobytes(), chunk=100)))
    windows = list(iter_windows(open_audio("-", raw=RawFormat())))
    assert len(windows) == 1 and windows[0].end == 2.0
    np.testing.assert_array_equal(windows[0].samples, pcm.astype(np.float32) / 32768)


# --------------------------------------------------------------------------- VAD


def espeak(text: str, folder) -> np.ndarray:
    path = folder / f"s{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-s", "165", "-w", str(path), text], check=True, capture_output=True)
    return load_audio(path)


SENTENCES = [
    "Welcome to the lecture on streaming speech recognition.",
    "Today we talk about windows, pauses and timestamps.",
    "A two hour recording must never be loaded at once.",
    "Each window holds at most thirty seconds of audio.",
    "Cut points should fall between words, not inside them.",
    "Silent stretches are flagged so the model can skip them.",
    "The detector runs on the samples and nothing else.",
    "That is why streamed input equals offline input.",
    "Memory stays bounded by a few windows at any time.",
    "Thank you for listening to this short test.",
]


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    folder = tmp_path_factory.mktemp("speech")
    return [espeak(s, folder) for s in SENTENCES]


@pytest.fixture(scope="module")
def detector():
    return SpeechDetector().load()


def pause(seconds, kind="zeros", seed=0):
    n = int(seconds * SR)
    if kind == "zeros":
        return np.zeros(n, np.float32)
    return (0.003 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)  # about -50 dBFS


@pytest.mark.parametrize("kind", ["zeros", "noise"])
def test_vad_flags_the_silent_window(sentences, detector, kind):
    a = np.concatenate([sentences[0], pause(0.3, kind), sentences[1]])
    b = np.concatenate([sentences[2], pause(0.3, kind, 1), sentences[3]])
    wave = np.concatenate([a, pause(20.0, kind, 2), b])
    windows = list(iter_windows(wave, vad=detector))
    check_contiguous(windows, total=len(wave))
    assert [w.speech for w in windows] == [True, False, True]
    silent = windows[1]
    assert silent.start <= len(a) / SR + 0.5 and silent.end >= (len(a) + 20 * SR) / SR - 0.5
    # Streamed in tiny blocks: identical windows.
    same_windows(windows, list(iter_windows(tiny_blocks(wave, 4000), vad=detector)))


def test_vad_cuts_fall_in_pauses(sentences, detector):
    parts = []
    for i, s in enumerate(sentences * 2):
        parts += [s, pause(0.4, "noise", i)]
    wave = np.concatenate(parts)  # ~70 s of speech with short pauses only
    windows = list(iter_windows(wave, vad=detector))
    check_contiguous(windows, total=len(wave))
    assert len(windows) >= 3 and all(w.speech for w in windows)
    assert all(len(w.samples) >= 20 * SR for w in windows[:-1])  # cuts come from the last 10 s of a window
    regions = detector.speech_regions(wave)
    for w in windows[1:]:
        boundary = round(w.start * SR)
        assert not [r for r in regions if r.start < boundary < r.end], f"cut at {w.start:.2f}s splits speech"


def test_vad_stream_equals_offline_through_raw_pipe(sentences, detector, tmp_path):
    wave = np.concatenate([sentences[4], pause(12.0), sentences[5], pause(0.5), sentences[6], sentences[7]] * 2)
    pcm = np.round(wave * 32767).astype("<i2")
    path = tmp_path / "speech.wav"
    sf.write(path, pcm, SR, subtype="PCM_16")
    offline = list(iter_windows(path, vad=detector))
    check_contiguous(offline, total=len(pcm))
    assert {w.speech for w in offline} == {True, False}
    streamed = list(iter_windows(open_audio(ChunkyPipe(pcm.tobytes(), chunk=513), raw=RawFormat()), vad=detector))
    same_windows(offline, streamed)
    # Whatever the block boundaries at the windowing layer: one block, odd sizes, blocks larger than a window.
    decoded = pcm.astype(np.float32) / 32768
    for size in (len(decoded), 1, 4097, 130_001, 700_000):
        if size == 1:
            blocks = [decoded[:5], decoded[5:6], decoded[6:]]
        else:
            blocks = tiny_blocks(decoded, size)
        same_windows(offline, list(iter_windows(blocks, vad=detector)))


@pytest.mark.parametrize("kind", ["zeros", "noise"])
def test_vad_pure_silence_has_no_speech_windows(detector, kind):
    wave = pause(65.0, kind)
    windows = list(iter_windows(wave, vad=detector))
    assert [w.speech for w in windows] == [False, False, False]
    assert [(w.start, w.end) for w in windows] == [(0.0, 30.0), (30.0, 60.0), (60.0, 65.0)]
    assert not detector.has_speech(wave)


def test_vad_matches_silero_frame_by_frame(sentences, detector):
    wave = sentences[0][: 3 * SR]
    probs = detector.speech_probabilities(wave)
    assert probs.shape == (-(-len(wave) // FRAME_SAMPLES),) and probs.dtype == np.float32
    np.testing.assert_array_equal(probs, detector.speech_probabilities(wave))  # deterministic
    threads = torch.get_num_threads()
    import silero_vad

    model = silero_vad.load_silero_vad()  # silero's import leaves torch on one thread: fastest frame by frame
    padded = np.pad(wave, (0, len(probs) * FRAME_SAMPLES - len(wave)))
    model.reset_states()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            reference = [model(torch.from_numpy(f)[None], SR).item() for f in padded.reshape(-1, FRAME_SAMPLES)]
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(probs, reference, atol=1e-4)
    assert probs.max() > 0.9 and detector.has_speech(wave)


def test_vad_state_is_explicit(sentences, detector):
    wave = np.concatenate(sentences[:2])
    wave = wave[: len(wave) // FRAME_SAMPLES * FRAME_SAMPLES]
    whole = detector.speech_probabilities(wave)
    state, parts = VadState.initial(), []
    for i in range(0, len(wave), 37 * FRAME_SAMPLES):
        p, state = detector.stream_probabilities(wave[i : i + 37 * FRAME_SAMPLES], state)
        parts.append(p)
    assert state.frames == len(whole)
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-5)


def test_detector_leaves_torch_threads_alone():
    threads = torch.get_num_threads()
    detector = SpeechDetector().load()
    assert torch.get_num_threads() == threads
    detector.speech_probabilities(np.zeros(SR, np.float32))  # runs single-threaded, then restores
    assert torch.get_num_threads() == threads


# --------------------------------------------------------------------------- memory


def _rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def write_long_wav(path, seconds, minute):
    """A long 16 kHz PCM_16 wav written one minute at a time (never whole in memory)."""
    with sf.SoundFile(path, "w", SR, 1, subtype="PCM_16") as f:
        for _ in range(seconds // 60):
            f.write(minute)


def iterate_measured(path, vad=None):
    """Iterate the windows of `path`; returns (windows, last end, seconds, numpy peak MiB, RSS growth MiB)."""
    gc.collect()
    tracemalloc.start()
    rss_before, rss_peak = _rss_kb(), 0
    begin = time.perf_counter()
    count, last_end = 0, 0.0
    with open_audio(path) as source:
        for window in iter_windows(source, vad=vad):
            assert window.index == count
            count, last_end = count + 1, window.end
            rss_peak = max(rss_peak, _rss_kb())
    elapsed = time.perf_counter() - begin
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return count, last_end, elapsed, traced_peak / 2**20, (rss_peak - rss_before) / 1024


def test_two_hours_iterate_in_bounded_memory(tmp_path):
    seconds = 7200
    path = tmp_path / "two_hours.wav"
    write_long_wav(path, seconds, (3000 * np.sin(2 * np.pi * 440 * np.arange(60 * SR) / SR)).astype(np.int16))
    assert open_audio(path).duration == seconds
    count, last_end, elapsed, numpy_mb, rss_mb = iterate_measured(path)
    assert count == seconds // 30 and last_end == seconds
    # A full load is ~440 MiB of float32 (plus the decode buffers): stay far below it.
    assert numpy_mb < 50, f"numpy peak {numpy_mb:.0f} MiB"
    assert rss_mb < 100, f"RSS grew {rss_mb:.0f} MiB"
    print(f"2 h: {count} windows in {elapsed:.1f} s; numpy peak {numpy_mb:.1f} MiB, RSS +{rss_mb:.1f} MiB")


def test_twenty_minutes_with_vad_in_bounded_memory(tmp_path, sentences, detector):
    seconds = 1200
    speech = np.concatenate([sentences[0], pause(0.5), sentences[1], pause(0.5), sentences[2]])
    minute = np.concatenate([speech, pause(60.0 - len(speech) / SR)])[: 60 * SR]  # speech, then a long pause
    path = tmp_path / "twenty_minutes.wav"
    write_long_wav(path, seconds, np.round(minute * 32767).astype(np.int16))
    count, last_end, elapsed, numpy_mb, rss_mb = iterate_measured(path, vad=detector)
    assert last_end == seconds and count >= 2 * seconds // 60  # a speech window and silence every minute
    assert numpy_mb < 50, f"numpy peak {numpy_mb:.0f} MiB"
    assert rss_mb < 100, f"RSS grew {rss_mb:.0f} MiB"
    print(f"20 min with VAD: {count} windows in {elapsed:.1f} s; numpy peak {numpy_mb:.1f} MiB, RSS +{rss_mb:.1f} MiB")


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.wav.*not found"):
        open_audio(tmp_path / "nope.wav")
    with pytest.raises(AudioError, match=r"nope\.wav.*not found"):
        iter_windows(tmp_path / "nope.wav")  # fails at the call, not at the first window


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav.*empty"):
        open_audio(path)
    silent = tmp_path / "zero_frames.wav"
    sf.write(silent, np.zeros(0, np.float32), SR)
    with pytest.raises(AudioError, match=r"zero_frames\.wav.*0 samples"):
        open_audio(silent)
    with pytest.raises(AudioError, match=r"<stdin>.*empty"):
        list(open_audio(ChunkyPipe(b"", name="<stdin>"), raw=RawFormat()).blocks())


def test_random_bytes_and_text(tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(AudioError, match=r"junk\.wav.*(corrupt|unsupported)"):
        open_audio(junk)
    notes = tmp_path / "notes.txt"
    notes.write_text("not audio at all\n" * 50)
    with pytest.raises(AudioError, match=r"notes\.txt.*unsupported.*Supported"):
        open_audio(notes)
    with pytest.raises(AudioError, match=r"<pipe>.*unsupported"):
        open_audio(ChunkyPipe(b"hello world, this is text" * 20))


def test_truncated_file_fails_cleanly(tmp_path):
    path = tmp_path / "cut.flac"
    sf.write(path, music(5.0, rate=16000, channels=1), SR)
    data = path.read_bytes()
    path.write_bytes(data[:200])  # header survives, frames do not
    with pytest.raises(AudioError, match=r"cut\.flac"):
        list(iter_windows(path))


def test_raw_partial_frame(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", SimpleNamespace(buffer=ChunkyPipe(b"\x01\x02\x03", chunk=2)))
    with pytest.raises(AudioError, match=r"<stdin>.*stray byte"):
        list(iter_windows(open_audio("-", raw=RawFormat())))
    odd = tmp_path / "odd.pcm"
    odd.write_bytes(b"\x00" * 10)
    with pytest.raises(AudioError, match=r"odd\.pcm.*stray byte"):
        open_audio(odd, raw=RawFormat(channels=2, dtype="f32le"))


def test_text_mode_and_bad_arguments(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("x")
    with open(path) as f, pytest.raises(AudioError, match="text mode"):
        open_audio(f)
    with pytest.raises(ValueError, match="raw dtype"):
        RawFormat(dtype="u8")
    with pytest.raises(ValueError, match="at most 30"):
        iter_windows(np.zeros(10, np.float32), window_seconds=31)
    assert isinstance(open_audio(ChunkyPipe(b"\x00\x00"), raw=RawFormat()), AudioSource)
