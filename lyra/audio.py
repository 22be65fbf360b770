"""Audio I/O: decode anything a user hands us into Lyra's one waveform format, and cut it into windows.

Every waveform inside Lyra is 16 kHz mono float32 in [-1, 1] (``SAMPLE_RATE``). ``load_audio`` is the
only door in: it decodes with soundfile (libsndfile: WAV, FLAC, OGG Vorbis/Opus, MP3, AIFF, ...),
downmixes to mono and resamples with soxr. Bad input never surfaces as a libsndfile traceback: it is
an ``AudioError`` that names the file and says what to do about it.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from lyra.constants import SAMPLE_RATE, WINDOW_SAMPLES

__all__ = ["SUPPORTED_FORMATS", "AudioArray", "AudioError", "AudioSource", "load_audio", "split_windows"]

# What libsndfile decodes, by the names users know; listed in "unsupported format" errors.
SUPPORTED_FORMATS = "WAV, FLAC, OGG (Vorbis/Opus), MP3, AIFF, AU, CAF, W64, RF64"
_SUPPORTED_SUFFIXES = frozenset(
    {
        ".wav",
        ".wave",
        ".flac",
        ".ogg",
        ".oga",
        ".opus",
        ".mp3",
        ".aif",
        ".aiff",
        ".aifc",
        ".au",
        ".snd",
        ".caf",
        ".w64",
        ".rf64",
    }
)
_READ_BLOCK_FRAMES = 1 << 20  # frames decoded per block: bounds peak memory for hour-long files
_RESAMPLE_QUALITY = "VHQ"  # soxr's very-high-quality preset (the brief asks for high quality)


class AudioError(ValueError):
    """Audio input that Lyra cannot use; the message names the source and the fix."""


@dataclass(frozen=True)
class AudioArray:
    """Samples already in memory, with their rate.

    ``samples`` is (N,) mono or (N, C) channels-last; integer dtypes are scaled to [-1, 1] by their range.
    """

    samples: np.ndarray  # (N,) or (N, C)
    sample_rate: int  # Hz


# A path, encoded file bytes, a binary file object, samples with their rate, or bare samples at 16 kHz.
AudioSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | AudioArray | tuple | np.ndarray


def existing_audio_path(source: str | os.PathLike) -> Path:
    """`source` as a Path, or an `AudioError` when it is missing or not a file."""
    path = Path(source)
    if not path.exists():
        raise AudioError(f"{path}: audio file not found; check the path (working dir: {Path.cwd()})")
    if not path.is_file():
        raise AudioError(f"{path}: is not a file; pass the path of an audio file ({SUPPORTED_FORMATS})")
    return path


def load_audio(source: AudioSource, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode ``source`` into a mono float32 waveform at ``sample_rate`` Hz, values clipped to [-1, 1].

    ``source`` may be:
      - a path (``str`` / ``os.PathLike``) to an audio file;
      - ``bytes`` / ``bytearray`` / ``memoryview`` holding an encoded file (e.g. an HTTP upload);
      - a binary file object (anything with ``read``);
      - ``AudioArray(samples, rate)`` or a tuple ``(samples, rate)``: (N,) or (N, C) channels-last samples;
      - a bare ``np.ndarray``, taken to be already at ``sample_rate`` (pass a rate if it is not).

    Returns (N,) float32. Raises ``AudioError`` for a missing file, an unsupported or corrupt file,
    empty audio (no samples) and non-finite samples.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate}")
    if isinstance(source, AudioArray):
        return _from_array(source.samples, source.sample_rate, sample_rate, "<array>")
    if isinstance(source, tuple):
        if len(source) != 2:
            raise AudioError(
                f"<array>: an audio tuple must be (samples, sample_rate), got a tuple of {len(source)} items"
            )
        samples, rate = source
        return _from_array(samples, rate, sample_rate, "<array>")
    if isinstance(source, np.ndarray):
        return _from_array(source, sample_rate, sample_rate, "<array>")
    if isinstance(source, (str, os.PathLike)):
        path = existing_audio_path(source)
        with open(path, "rb") as f:
            head = f.read(16)
        return _decode(str(path), head, str(path), path.suffix.lower(), sample_rate)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _decode(io.BytesIO(data), data[:16], "<bytes>", "", sample_rate)
    if hasattr(source, "read"):
        name = str(getattr(source, "name", "<file object>"))
        data = source.read()
        if isinstance(data, str):
            raise AudioError(f"{name}: file object was opened in text mode; open it with 'rb'")
        return _decode(io.BytesIO(data), data[:16], name, Path(name).suffix.lower(), sample_rate)
    raise AudioError(
        f"cannot read audio from a {type(source).__name__}; pass a path, bytes, a binary file object, "
        "or (samples, sample_rate)"
    )


def split_windows(wave: np.ndarray) -> list[np.ndarray]:
    """Cut a 16 kHz mono wave into consecutive 30 s windows (``WINDOW_SAMPLES``); the last may be shorter.

    Windows are views into ``wave`` (no copy). Raises ``AudioError`` for empty or non-1-D input.
    """
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise AudioError(f"<array>: expected a 1-D mono wave, got shape {tuple(wave.shape)}; call load_audio first")
    if wave.shape[0] == 0:
        raise AudioError("<array>: audio is empty (0 samples); nothing to split into windows")
    return [wave[start : start + WINDOW_SAMPLES] for start in range(0, wave.shape[0], WINDOW_SAMPLES)]


def _from_array(samples, rate, target_rate: int, name: str) -> np.ndarray:
    try:
        rate_value = float(rate)
    except (TypeError, ValueError):
        raise AudioError(f"{name}: sample rate must be a number of Hz, got {rate!r}") from None
    if not rate_value > 0 or not np.isfinite(rate_value) or rate_value != int(rate_value):
        raise AudioError(f"{name}: sample rate must be a positive whole number of Hz, got {rate!r}")
    x = np.asarray(samples)
    if x.dtype.kind in "iu":
        info = np.iinfo(x.dtype)
        # Map the integer range onto [-1, 1] the way soundfile does for PCM files.
        x = (x.astype(np.float64) - (info.max + 1 + info.min) / 2) / ((info.max - info.min + 1) / 2)
    elif x.dtype.kind == "b" or x.dtype.kind not in "f":
        raise AudioError(f"{name}: samples must be a float or integer array, got dtype {x.dtype}")
    if x.ndim == 2:
        x = x.mean(axis=1)  # (N, C) -> (N,)
    elif x.ndim != 1:
        raise AudioError(f"{name}: samples must be (N,) mono or (N, C) channels-last, got shape {tuple(x.shape)}")
    x = x.astype(np.float32, copy=False)
    if x.shape[0] == 0:
        raise AudioError(f"{name}: audio is empty (0 samples); pass a non-empty clip")
    if not np.all(np.isfinite(x)):
        raise AudioError(f"{name}: audio contains NaN or infinite samples; fix or re-encode the source")
    if int(rate_value) != target_rate:
        x = soxr.resample(x, int(rate_value), target_rate, quality=_RESAMPLE_QUALITY)
    return _finish(x, name)


def _decode(file, head: bytes, name: str, suffix: str, target_rate: int) -> np.ndarray:
    """Decode block by block (downmix, stream-resample) so hour-long files never sit in RAM at their source rate."""
    if len(head) == 0:
        raise AudioError(f"{name}: audio file is empty (0 bytes); pass a file that contains audio")
    try:
        with sf.SoundFile(file) as f:
            in_rate = int(f.samplerate)
            resampler = (
                soxr.ResampleStream(in_rate, target_rate, 1, dtype="float32", quality=_RESAMPLE_QUALITY)
                if in_rate != target_rate
                else None
            )
            pieces = []
            while True:
                block = f.read(_READ_BLOCK_FRAMES, dtype="float32", always_2d=True)  # (n, C)
                last = block.shape[0] < _READ_BLOCK_FRAMES
                mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
                if not np.all(np.isfinite(mono)):
                    raise AudioError(f"{name}: audio contains NaN or infinite samples; fix or re-encode the file")
                if resampler is not None:
                    mono = resampler.resample_chunk(np.ascontiguousarray(mono), last=last)
                pieces.append(np.array(mono, dtype=np.float32))
                if last:
                    break
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError, OSError) as exc:
        raise _classify_failure(name, head, suffix, exc) from None
    wave = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    if wave.shape[0] == 0:
        raise AudioError(f"{name}: audio is empty (the file decodes to 0 samples); pass a clip with sound in it")
    return _finish(wave, name)


def _classify_failure(name: str, head: bytes, suffix: str, exc: Exception) -> AudioError:
    container = _sniff(head)
    if container is not None or suffix in _SUPPORTED_SUFFIXES:
        kind = container or suffix.lstrip(".").upper()
        return AudioError(
            f"{name}: could not decode this {kind} audio: the file is corrupt, truncated or not really {kind} "
            f"({exc}); re-export or re-encode it (e.g. `ffmpeg -i IN -ar 16000 -ac 1 OUT.wav`)"
        )
    what = f"'{suffix}' files" if suffix else "this data"
    return AudioError(
        f"{name}: unsupported or unrecognised audio format: {what} cannot be decoded. "
        f"Supported: {SUPPORTED_FORMATS}; convert first (e.g. `ffmpeg -i IN -ar 16000 -ac 1 OUT.wav`)"
    )


def _sniff(head: bytes) -> str | None:
    """The container a file's first bytes announce, if it is one libsndfile reads."""
    if head[:4] in (b"RIFF", b"RIFX") or head[:4] == b"RF64":
        return "WAV"
    if head[:4] == b"fLaC":
        return "FLAC"
    if head[:4] == b"OggS":
        return "OGG"
    if head[:4] == b"FORM":
        return "AIFF"
    if head[:4] == b"caff":
        return "CAF"
    if head[:4] == b".snd":
        return "AU"
    if head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0):
        return "MP3"
    return None


def _finish(wave: np.ndarray, name: str) -> np.ndarray:
    if not np.all(np.isfinite(wave)):
        raise AudioError(f"{name}: audio contains NaN or infinite samples; fix or re-encode the source")
    # Float files may exceed full scale and resampling can overshoot a little: the contract is [-1, 1].
    return np.clip(wave, -1.0, 1.0).astype(np.float32, copy=False)
