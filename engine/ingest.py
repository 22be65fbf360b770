"""Audio that streams in: decode block by block and cut into windows of at most 30 s, in bounded memory.

A two-hour lecture must never sit in RAM at once. ``open_audio`` opens a file, stdin or a pipe and
yields Lyra's waveform format (16 kHz mono float32 in [-1, 1]) block by block: soundfile decodes a fixed
number of frames at a time, channels are averaged, and a streaming soxr resampler (the same quality as
``lyra.audio.load_audio``) converts the rate. ``iter_windows`` turns any block stream into consecutive
``AudioWindow``s with exact absolute times; with a ``SpeechDetector`` it cuts inside pauses and flags
windows that hold no speech.

Streamed equals offline: every decision depends only on the samples, never on how they were chunked.
Raw PCM is re-blocked to fixed frame counts before resampling, the VAD analyses fixed batches of frames
at fixed positions, and a window is cut only once its whole 30 s candidate (or the end of the stream) is
in hand, so the same audio in one block or in a thousand gives the same windows, sample for sample.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr
from lyra.engine.events import AudioWindow
from lyra.engine.vad import FRAME_SAMPLES, SpeechDetector, SpeechRegion, VadState

from lyra.audio import _RESAMPLE_QUALITY, AudioError, _classify_failure, _finish, existing_audio_path
from lyra.constants import SAMPLE_RATE, WINDOW_SAMPLES, WINDOW_SECONDS

__all__ = ["AudioSource", "RawFormat", "iter_windows", "open_audio"]

BLOCK_FRAMES = 1 << 16  # input frames decoded (and resampled) per block: ~1.5 s at 44.1 kHz
VAD_GROUP_FRAMES = 256  # VAD frames analysed per batch (8.2 s); a window waits for the batch holding its end
_SPOOL_CHUNK = 1 << 20  # bytes copied at a time when an encoded pipe is spooled to disk
_RAW_DTYPES = {"s16le": ("<i2", 1.0 / 32768.0), "f32le": ("<f4", None)}  # numpy dtype, scale to [-1, 1]
_UNKNOWN_FRAMES = 1 << 62  # libsndfile reports SF_COUNT_MAX frames when it cannot know the length


@dataclass(frozen=True)
class RawFormat:
    """Layout of headerless PCM (stdin, pipes, ``.raw``/``.pcm`` files), which no decoder can detect."""

    sample_rate: int = SAMPLE_RATE  # Hz of the incoming samples
    channels: int = 1  # interleaved channels per frame
    dtype: str = "s16le"  # "s16le": 16-bit signed little-endian; "f32le": 32-bit float little-endian

    def __post_init__(self) -> None:
        if self.dtype not in _RAW_DTYPES:
            raise ValueError(f"raw dtype must be one of {sorted(_RAW_DTYPES)}, got {self.dtype!r}")
        if int(self.sample_rate) != self.sample_rate or self.sample_rate <= 0:
            raise ValueError(f"raw sample_rate must be a positive whole number of Hz, got {self.sample_rate!r}")
        if int(self.channels) != self.channels or self.channels <= 0:
            raise ValueError(f"raw channels must be a positive whole number, got {self.channels!r}")

    @property
    def frame_bytes(self) -> int:
        """Bytes per frame (one sample of every channel)."""
        return self.channels * np.dtype(_RAW_DTYPES[self.dtype][0]).itemsize


class AudioSource:
    """An opened audio input that yields 16 kHz mono float32 blocks; single pass, closes itself at the end.

    Use as a context manager (or call ``close``) when you may stop before the end. ``duration`` is the
    length in seconds when it is known up front (files), None for streams.
    """

    def __init__(
        self,
        *,
        name: str,
        sample_rate_in: int,
        channels_in: int,
        duration: float | None,
        read: Callable[[int], np.ndarray],
        close: Callable[[], None],
    ) -> None:
        self.name = name  # the file name, "<stdin>" or the file object's name: used in every error
        self.sample_rate_in = sample_rate_in  # Hz of the source before resampling
        self.channels_in = channels_in  # channels of the source before the downmix
        self.duration = duration  # seconds, or None when unknown (streams)
        self._read = read  # read(n) -> (m, C) float32 frames, m < n only at the end of the input
        self._close = close
        self._consumed = False
        self._closed = False

    def blocks(self) -> Iterator[np.ndarray]:
        """Yield the audio as (n,) float32 blocks at 16 kHz mono in [-1, 1]; block sizes vary.

        Raises ``AudioError`` for corrupt data met while decoding and for a source with no samples at all.
        """
        if self._consumed or self._closed:
            raise RuntimeError(f"{self.name}: this AudioSource was already read or closed; it is read once, open it again")
        self._consumed = True
        return self._generate()

    def _generate(self) -> Iterator[np.ndarray]:
        resampler = None
        if self.sample_rate_in != SAMPLE_RATE:
            resampler = soxr.ResampleStream(self.sample_rate_in, SAMPLE_RATE, 1, dtype="float32",
                                            quality=_RESAMPLE_QUALITY)
        produced = 0
        try:
            while True:
                frames = self._read(BLOCK_FRAMES)  # (m, C)
                last = frames.shape[0] < BLOCK_FRAMES
                # Same downmix as load_audio: the float32 mean over channels.
                mono = frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else frames[:, 0]
                if resampler is not None:
                    mono = resampler.resample_chunk(np.ascontiguousarray(mono), last=last)
                if mono.shape[0]:
                    produced += mono.shape[0]
                    yield _finish(np.ascontiguousarray(mono, dtype=np.float32), self.name)
                if last:
                    break
        finally:
            self.close()
        if produced == 0:
            raise AudioError(f"{self.name}: audio is empty (it decodes to 0 samples); pass a clip with sound in it")

    def close(self) -> None:
        """Release the file (idempotent). File objects passed in by the caller stay open."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> AudioSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"AudioSource(name={self.name!r}, sample_rate_in={self.sample_rate_in}, "
                f"channels_in={self.channels_in}, duration={self.duration})")


def open_audio(source: str | os.PathLike | BinaryIO, *, raw: RawFormat | None = None) -> AudioSource:
    """Open ``source`` for block-by-block decoding; nothing beyond a file header is read yet.

    ``source``: a path, ``"-"`` for stdin (binary), or a binary file object. Encoded audio is whatever
    libsndfile reads (WAV, FLAC, OGG, MP3, ...), at any rate and channel count. Headerless PCM needs
    ``raw`` (its rate, channels and sample type). An encoded stream that cannot seek (a pipe) is first
    copied to a temporary file, because decoders seek; pipe raw PCM to stream without delay.

    Raises ``AudioError`` naming the source and the fix: missing file, empty file, unsupported or corrupt
    data, and raw data that is not a whole number of frames.
    """
    if isinstance(source, (str, os.PathLike)) and os.fspath(source) == "-":
        return _open_stream(getattr(sys.stdin, "buffer", sys.stdin), "<stdin>", raw, owned=False)
    if isinstance(source, (str, os.PathLike)):
        path = existing_audio_path(source)
        size = path.stat().st_size
        if size == 0:
            raise AudioError(f"{path}: audio file is empty (0 bytes); pass a file that contains audio")
        if raw is not None and size % raw.frame_bytes:
            raise AudioError(_partial_frame_message(str(path), raw, size % raw.frame_bytes))
        if raw is None:
            with open(path, "rb") as f:
                head = f.read(16)
            return _open_encoded(str(path), head, str(path), owned=True)
        return _open_raw(open(path, "rb"), str(path), raw, owned=True, size=size)
    if hasattr(source, "read"):
        name = str(getattr(source, "name", "<file object>"))
        return _open_stream(source, name, raw, owned=False)
    raise AudioError(
        f"cannot open audio from a {type(source).__name__}; pass a path, '-' for stdin, or a binary file object"
    )


def _open_stream(stream: BinaryIO, name: str, raw: RawFormat | None, *, owned: bool,
                 size: int | None = None) -> AudioSource:
    if isinstance(stream, io.TextIOBase):
        raise AudioError(f"{name}: file object was opened in text mode; open it with 'rb'")
    if raw is not None:
        return _open_raw(stream, name, raw, owned=owned, size=size)
    if not _seekable(stream):
        # Decoders seek (headers, trailing chunks): copy the pipe to disk, never into RAM.
        spool = tempfile.TemporaryFile()  # noqa: SIM115 -- the AudioSource owns and closes it
        while chunk := stream.read(_SPOOL_CHUNK):
            if isinstance(chunk, str):
                spool.close()
                raise AudioError(f"{name}: file object was opened in text mode; open it with 'rb'")
            spool.write(chunk)
        if owned:
            stream.close()
        spool.seek(0)
        stream, owned = spool, True
    start = stream.tell()
    head = stream.read(16)
    if isinstance(head, str):
        raise AudioError(f"{name}: file object was opened in text mode; open it with 'rb'")
    if len(head) == 0:
        _close_if(stream, owned)
        raise AudioError(f"{name}: audio file is empty (0 bytes); pass a file that contains audio")
    stream.seek(start)
    return _open_encoded(stream, head, name, owned=owned)


def _open_encoded(file: str | BinaryIO, head: bytes, name: str, *, owned: bool) -> AudioSource:
    """Open ``file`` (a path or a seekable binary stream) with libsndfile; ``head``: its first bytes."""
    suffix = Path(name).suffix.lower()
    try:
        sound = sf.SoundFile(file)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError, OSError) as exc:
        _close_if(file, owned)
        raise _classify_failure(name, head, suffix, exc) from None
    if sound.frames == 0:
        sound.close()
        _close_if(file, owned)
        raise AudioError(f"{name}: audio is empty (the file decodes to 0 samples); pass a clip with sound in it")

    def read(n: int) -> np.ndarray:
        try:
            return sound.read(n, dtype="float32", always_2d=True)  # (m, C)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError, OSError) as exc:
            raise _classify_failure(name, head, suffix, exc) from None

    def close() -> None:
        sound.close()
        _close_if(file, owned)

    rate = int(sound.samplerate)
    # libsndfile's frame count is exact for PCM/FLAC/OGG and an estimate for some MP3s.
    duration = sound.frames / rate if sound.frames < _UNKNOWN_FRAMES else None
    return AudioSource(name=name, sample_rate_in=rate, channels_in=int(sound.channels), duration=duration,
                       read=read, close=close)


def _open_raw(stream: BinaryIO, name: str, raw: RawFormat, *, owned: bool, size: int | None) -> AudioSource:
    np_dtype, scale = _RAW_DTYPES[raw.dtype]
    frame_bytes = raw.frame_bytes
    seen = 0

    def read(n: int) -> np.ndarray:
        nonlocal seen
        data = _read_exact(stream, n * frame_bytes, name)
        seen += len(data)
        stray = len(data) % frame_bytes
        if stray:
            raise AudioError(_partial_frame_message(name, raw, stray, total=seen))
        x = np.frombuffer(data, dtype=np_dtype).reshape(-1, raw.channels)  # (m, C)
        if scale is not None:
            return x.astype(np.float32) * np.float32(scale)  # exact, as libsndfile scales PCM_16
        return x.astype(np.float32)

    duration = size / frame_bytes / raw.sample_rate if size is not None else None
    return AudioSource(name=name, sample_rate_in=int(raw.sample_rate), channels_in=int(raw.channels),
                       duration=duration, read=read, close=lambda: _close_if(stream, owned))


def _read_exact(stream: BinaryIO, n: int, name: str) -> bytes:
    """Read n bytes, or fewer only at the end: pipes and sockets may return short reads."""
    parts, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if isinstance(chunk, str):
            raise AudioError(f"{name}: file object was opened in text mode; open it with 'rb'")
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _partial_frame_message(name: str, raw: RawFormat, stray: int, total: int | None = None) -> str:
    where = f"{total} bytes" if total is not None else "its size"
    return (
        f"{name}: raw {raw.dtype} audio with {raw.channels} channel(s) needs whole frames of {raw.frame_bytes} "
        f"bytes, but {where} leaves {stray} stray byte(s); the data is truncated or the raw format is wrong "
        f"(check sample type and channel count, e.g. `ffmpeg -i IN -f s16le -ac 1 -ar 16000 -`)"
    )


def _seekable(stream) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _close_if(file, owned: bool) -> None:
    if owned and not isinstance(file, str):  # libsndfile owns what it opened from a path
        file.close()


# ---------------------------------------------------------------------------------------------------
# Windows


def iter_windows(
    source: AudioSource | str | os.PathLike | BinaryIO | np.ndarray | Iterable[np.ndarray],
    *,
    window_seconds: float = WINDOW_SECONDS,
    vad: SpeechDetector | None = None,
    min_window_seconds: float | None = None,
    max_pause_seconds: float = 5.0,
) -> Iterator[AudioWindow]:
    """Cut a 16 kHz stream into consecutive ``AudioWindow``s of at most ``window_seconds``, in bounded memory.

    ``source``: an ``AudioSource``, anything ``open_audio`` takes (path, ``"-"``, binary file object;
    opened and closed here), a whole (N,) float32 wave, or an iterable of (n,) float32 16 kHz blocks.

    Without ``vad``: fixed windows of ``window_seconds`` (the last one shorter), ``speech=None``.
    With ``vad`` each window is cut inside a pause and gets ``speech=True/False``:
      - a window with no speech region is the whole candidate (``speech=False``);
      - a pause of at least ``max_pause_seconds`` is cut out into windows of its own (``speech=False``):
        a speech window ends where the long pause starts and the silence ends where speech resumes;
      - otherwise the window ends in the middle of the longest run of quiet VAD frames (probability below
        ``vad.silence_threshold``) that lies between ``min_window_seconds`` (default 2/3 of the window)
        and ``window_seconds``; with no quiet frame there, at the least speech-like frame.
    The VAD runs once over the whole stream (state carried, fixed 8 s batches on the absolute frame grid)
    and a candidate is judged only once it is complete (``window_seconds`` plus one sample and its VAD
    frames, or the end of the stream): the windows depend on the samples alone, not on how they arrived.
    ``start``/``end`` are exact: first sample / 16000.
    Memory: one candidate window, one VAD batch and one incoming block.
    """
    window = _seconds_to_samples(window_seconds, "window_seconds")
    if window > WINDOW_SAMPLES:
        raise ValueError(f"window_seconds must be at most {WINDOW_SECONDS} s (Whisper's window), got {window_seconds}")
    if min_window_seconds is None:
        min_window = window * 2 // 3
    else:
        min_window = _seconds_to_samples(min_window_seconds, "min_window_seconds")
        if min_window > window:
            raise ValueError(f"min_window_seconds ({min_window_seconds}) must not exceed window_seconds ({window_seconds})")
    max_pause = _seconds_to_samples(max_pause_seconds, "max_pause_seconds")

    opened = None
    if isinstance(source, (str, os.PathLike)) or hasattr(source, "read"):
        source = opened = open_audio(source)  # now, so a bad file fails at the call, not at the first window
    if isinstance(source, AudioSource):
        blocks: Iterable[np.ndarray] = source.blocks()
    elif isinstance(source, np.ndarray):
        blocks = [source]
    else:
        blocks = source
    return _windows(blocks, window, min_window, max_pause, vad, opened)


def _windows(blocks: Iterable[np.ndarray], window: int, min_window: int, max_pause: int,
             vad: SpeechDetector | None, opened: AudioSource | None) -> Iterator[AudioWindow]:
    buffer = _SampleBuffer()
    track = _VadTrack(vad) if vad is not None else None
    index = 0
    try:
        for block in blocks:
            buffer.push(_check_block(block))
            while _ready(buffer, track, window):
                yield _next_window(buffer, track, index, window, min_window, max_pause, final=False)
                index += 1
        while len(buffer):  # the end of the stream: whatever is left, with the VAD's last partial group
            if track is not None:
                track.analyse(buffer, _frames_to_cover(buffer.start + min(window, len(buffer))), end_of_stream=True)
            yield _next_window(buffer, track, index, window, min_window, max_pause, final=len(buffer) <= window)
            index += 1
    finally:
        if opened is not None:
            opened.close()


def _ready(buffer: _SampleBuffer, track: _VadTrack | None, window: int) -> bool:
    """Whether the next window can be cut before the stream ends, whatever follows."""
    if track is None:
        return len(buffer) >= window  # a fixed window does not depend on what comes after it
    # With VAD the cut depends on whether more audio follows, so wait for one sample past the window,
    # and for the VAD to have analysed every frame the window touches.
    return len(buffer) > window and track.analyse(buffer, _frames_to_cover(buffer.start + window), end_of_stream=False)


def _frames_to_cover(sample: int) -> int:
    """How many VAD frames (from the stream start) it takes to cover samples [0, sample)."""
    return -(-sample // FRAME_SAMPLES)


def _next_window(buffer: _SampleBuffer, track: _VadTrack | None, index: int, window: int, min_window: int,
                 max_pause: int, final: bool) -> AudioWindow:
    start = buffer.start
    candidate = buffer.peek(window)  # (n,) n <= window
    n = candidate.shape[0]
    speech = None
    cut = n
    if track is not None:
        # The frames that lie inside the candidate (at the end of the stream, also the zero-padded last one).
        first = _frames_to_cover(start)
        last = _frames_to_cover(start + n) if final else (start + n) // FRAME_SAMPLES
        probs = track.probabilities(first, max(first, last))
        offset = first * FRAME_SAMPLES - start  # candidate offset of the first frame (0..511)
        regions = [SpeechRegion(a + offset, b + offset)
                   for a, b in track.detector.regions_from_probabilities(probs, n - offset)]
        cut = _choose_cut(regions, probs, offset, track.detector.silence_threshold, n, min_window, max_pause, final)
        speech = any(a < cut for a, _ in regions)
        track.forget((start + cut) // FRAME_SAMPLES)
    samples = candidate[:cut].copy() if cut < n else candidate
    buffer.drop(cut)
    return AudioWindow(index=index, start=start / SAMPLE_RATE, end=(start + cut) / SAMPLE_RATE,
                       samples=samples, speech=speech)


def _choose_cut(regions: list[SpeechRegion], probs: np.ndarray, offset: int, quiet_below: float, n: int,
                min_window: int, max_pause: int, final: bool) -> int:
    """Where the window ends, in samples from its start (0 < cut <= n); see ``iter_windows`` for the rules.

    ``regions`` are in candidate samples; ``probs[i]`` covers candidate samples [offset + 512 i, + 512).
    Speech/no-speech decisions use the VAD's regions (which ignore blips shorter than its minimum speech);
    the cut itself goes in a run of quiet frames, so it never lands in a word onset too short to be a region.
    """
    if not regions:
        return n
    if regions[0].start >= max_pause:
        return regions[0].start  # a long leading silence becomes a window of its own
    # Pauses between speech regions, and after the last one (when it ends before the candidate does).
    pauses = [(a.end, b.start) for a, b in pairwise(regions)]
    if regions[-1].end < n:
        pauses.append((regions[-1].end, n))
    for begin, end in pauses:
        if end - begin >= max_pause:
            return begin  # speech ends at a long pause: the pause goes to the next window
    if final:
        return n
    best = None
    for begin, end in _quiet_runs(probs < quiet_below):
        lo, hi = max(offset + begin, min_window), min(offset + end, n)
        if hi > lo and (best is None or hi - lo >= best[1] - best[0]):
            best = (lo, hi)  # the longest quiet stretch in the search zone; ties go to the later one
    if best is not None:
        return (best[0] + best[1]) // 2
    # No quiet frame in the zone (continuous speech): cut in the middle of the least speech-like frame.
    first = max(0, -(-(min_window - offset) // FRAME_SAMPLES))
    if first >= len(probs):
        return n
    frame = len(probs) - 1 - int(np.argmin(probs[first:][::-1]))  # the latest minimum
    return min(offset + frame * FRAME_SAMPLES + FRAME_SAMPLES // 2, n)


def _quiet_runs(quiet: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of quiet frames as [begin, end) sample offsets from the first frame."""
    edges = np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(int(a) * FRAME_SAMPLES, int(b) * FRAME_SAMPLES) for a, b in zip(starts, stops)]


class _VadTrack:
    """Speech probabilities of the stream's 512-sample frames, on the absolute frame grid, each computed once.

    Frames are analysed in fixed groups of ``VAD_GROUP_FRAMES`` at fixed positions, carrying the detector's
    ``VadState`` across groups; only the last group at the end of the stream is shorter (and its last frame
    zero-padded). Batch shapes, and so every float, are the same however the samples arrived.
    """

    def __init__(self, detector: SpeechDetector) -> None:
        self.detector = detector
        self.state = VadState.initial()  # recurrent state after the last analysed frame
        self.first = 0  # absolute index of the first kept frame probability
        self._probs: deque[np.ndarray] = deque()  # kept probabilities, one array per group, in order
        self._kept = 0  # frames held in _probs
        self.ended = False  # the stream's last (partial) group was analysed

    @property
    def analysed(self) -> int:
        """Frames analysed so far (absolute)."""
        return self.state.frames

    def analyse(self, buffer: _SampleBuffer, frames: int, *, end_of_stream: bool) -> bool:
        """Analyse groups until at least ``frames`` frames are done; False if that needs samples not yet here."""
        stream_end = buffer.start + len(buffer)
        while self.analysed < frames and not self.ended:
            begin = self.analysed * FRAME_SAMPLES
            stop = begin + VAD_GROUP_FRAMES * FRAME_SAMPLES
            if stop > stream_end:
                if not end_of_stream:
                    return False
                stop, self.ended = stream_end, True
            samples = buffer.read(begin, stop)
            pad = -samples.shape[0] % FRAME_SAMPLES
            if pad:
                samples = np.concatenate([samples, np.zeros(pad, np.float32)])
            probs, self.state = self.detector.stream_probabilities(samples, self.state)
            self._probs.append(probs)
            self._kept += probs.shape[0]
        return True

    def probabilities(self, first: int, last: int) -> np.ndarray:
        """Probabilities of frames [first, last) (absolute; all analysed and not forgotten)."""
        if first < self.first or last > self.first + self._kept:
            raise RuntimeError(f"VAD frames [{first}, {last}) not available (kept {self.first}..{self.first + self._kept})")
        kept = np.concatenate(self._probs) if len(self._probs) != 1 else self._probs[0]
        return kept[first - self.first : last - self.first]

    def forget(self, before: int) -> None:
        """Drop probabilities of frames before ``before`` (absolute)."""
        while self._probs and self.first + self._probs[0].shape[0] <= before:
            self.first += self._probs[0].shape[0]
            self._kept -= self._probs.popleft().shape[0]


def _check_block(block) -> np.ndarray:
    x = np.asarray(block)
    if x.ndim != 1:
        raise ValueError(f"audio blocks must be (n,) mono 16 kHz float32, got shape {tuple(x.shape)}; "
                         "use open_audio for files")
    if x.dtype != np.float32:
        if x.dtype.kind != "f":
            raise ValueError(f"audio blocks must be float samples in [-1, 1], got dtype {x.dtype}")
        x = x.astype(np.float32)
    return x


def _seconds_to_samples(seconds: float, label: str) -> int:
    samples = round(float(seconds) * SAMPLE_RATE)
    if samples <= 0:
        raise ValueError(f"{label} must be positive, got {seconds}")
    return samples


class _SampleBuffer:
    """The not-yet-windowed tail of the stream: a FIFO of blocks with the absolute offset of its first sample."""

    def __init__(self) -> None:
        self.start = 0  # absolute sample offset of the first buffered sample
        self._blocks: deque[np.ndarray] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, block: np.ndarray) -> None:
        if block.shape[0]:
            self._blocks.append(block)
            self._size += block.shape[0]

    def peek(self, n: int) -> np.ndarray:
        """The first min(n, len) samples as one contiguous array.

        Only those samples are merged (into the head block), so a huge incoming block is never copied whole.
        """
        n = min(n, self._size)
        if self._blocks[0].shape[0] >= n:
            return self._blocks[0][:n]
        merged, taken = [], 0
        while taken < n:
            block = self._blocks.popleft()
            take = min(block.shape[0], n - taken)
            merged.append(block[:take])
            if take < block.shape[0]:
                self._blocks.appendleft(block[take:])
            taken += take
        head = np.concatenate(merged)
        self._blocks.appendleft(head)
        return head

    def read(self, begin: int, stop: int) -> np.ndarray:
        """A copy of the samples at absolute offsets [begin, stop), all still buffered."""
        if begin < self.start or stop > self.start + self._size:
            raise RuntimeError(f"samples [{begin}, {stop}) are not buffered ({self.start}..{self.start + self._size})")
        parts, offset = [], self.start
        for block in self._blocks:
            lo, hi = max(begin, offset), min(stop, offset + block.shape[0])
            if lo < hi:
                parts.append(block[lo - offset : hi - offset])
            offset += block.shape[0]
            if offset >= stop:
                break
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def drop(self, n: int) -> None:
        """Forget the first n samples."""
        self.start += n
        self._size -= n
        while n:
            head = self._blocks[0]
            if head.shape[0] <= n:
                self._blocks.popleft()
                n -= head.shape[0]
            else:
                self._blocks[0] = head[n:]
                n = 0
