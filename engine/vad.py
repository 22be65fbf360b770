"""Voice activity detection with Silero VAD: which stretches of a 16 kHz wave hold speech.

The ``silero-vad`` package ships its TorchScript model, so nothing is downloaded. We use the model's
own modules (STFT front end, conv encoder, output head) and the LSTM cell's weights, but run them
batched: the front end and encoder see one 512-sample frame (plus 64 samples of left context) at a time
and do not depend on the recurrent state, so all frames of a call go through them as one batch; only
the 128-unit LSTM cell runs step by step (one ``nn.LSTM`` call with the cell's weights). That is tens of
times faster than feeding the model frame by frame and matches it to ~3e-5 in probability.

The recurrent state lives in a ``VadState`` the caller holds; ``speech_probabilities`` starts every call
from ``VadState.initial()`` (what silero expects per file), so its result depends only on its input.
Never use silero's ``read_audio``/``save_audio``: they need torchaudio, which breaks CPU installs.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from lyra.constants import SAMPLE_RATE

__all__ = ["CONTEXT_SAMPLES", "FRAME_SAMPLES", "SpeechDetector", "SpeechRegion", "VadState"]

FRAME_SAMPLES = 512  # samples per VAD frame at 16 kHz (32 ms): one probability each
CONTEXT_SAMPLES = 64  # samples of the previous frame the model sees before each frame
_HIDDEN = 128  # Silero's LSTM width
_BATCH_FRAMES = 4096  # frames per batch in speech_probabilities (~2 min of audio, ~20 MB of activations)


class SpeechRegion(NamedTuple):
    """Speech between two sample offsets of the analysed wave: ``[start, end)`` at 16 kHz."""

    start: int
    end: int


@dataclass(frozen=True)
class VadState:
    """Everything the detector carries from one chunk of a stream to the next; immutable.

    Reset a stream by starting again from ``VadState.initial()``.
    """

    h: np.ndarray = field(repr=False)  # (128,) float32 LSTM hidden state
    c: np.ndarray = field(repr=False)  # (128,) float32 LSTM cell state
    context: np.ndarray = field(repr=False)  # (64,) float32 last samples of the previous frame (zeros at start)
    frames: int = 0  # frames analysed so far in this stream

    @staticmethod
    def initial() -> VadState:
        """The state at the start of a stream: zeros, as silero's ``reset_states``."""
        return VadState(h=np.zeros(_HIDDEN, np.float32), c=np.zeros(_HIDDEN, np.float32),
                        context=np.zeros(CONTEXT_SAMPLES, np.float32))


class _SileroNet(torch.nn.Module):
    """Silero's 16 kHz network, rearranged: the stateless front end runs all frames of a chunk as one batch."""

    def __init__(self, jit_model) -> None:
        super().__init__()
        inner = getattr(jit_model, "_model", None)  # the 16 kHz VADRNNJIT: stft, encoder, decoder(rnn, decoder)
        if inner is None or not all(hasattr(inner, n) for n in ("stft", "encoder", "decoder")):
            raise RuntimeError("unexpected Silero VAD model layout; install silero-vad>=6.2.2,<7")
        self.stft = inner.stft
        self.encoder = inner.encoder
        self.head = inner.decoder.decoder  # Dropout, ReLU, Conv1d(128, 1, 1), Sigmoid
        cell = inner.decoder.rnn  # LSTMCell(128, 128): the same gate layout as a one-layer nn.LSTM
        self.lstm = torch.nn.LSTM(_HIDDEN, _HIDDEN)
        with torch.no_grad():
            self.lstm.weight_ih_l0.copy_(cell.weight_ih)
            self.lstm.weight_hh_l0.copy_(cell.weight_hh)
            self.lstm.bias_ih_l0.copy_(cell.bias_ih)
            self.lstm.bias_hh_l0.copy_(cell.bias_hh)
        self.eval()

    def forward(self, frames: torch.Tensor, state: VadState) -> tuple[np.ndarray, VadState]:
        # frames: (F, 512) on the model's device -> probabilities (F,) float32 numpy
        device = frames.device
        context = torch.from_numpy(state.context).to(device)
        previous = torch.cat([context[None], frames[:-1, -CONTEXT_SAMPLES:]], dim=0)  # (F, 64)
        x = torch.cat([previous, frames], dim=1)  # (F, 576)
        features = self.encoder(self.stft(x)).squeeze(-1)  # (F, 128)
        h0 = torch.from_numpy(state.h).to(device)[None, None]  # (1, 1, 128)
        c0 = torch.from_numpy(state.c).to(device)[None, None]
        hidden, (h, c) = self.lstm(features[:, None, :], (h0, c0))  # (F, 1, 128): one step per frame
        probs = self.head(hidden[:, 0, :, None]).squeeze(1).mean(dim=-1)  # (F,)
        return probs.cpu().numpy().astype(np.float32, copy=False), VadState(
            h=h[0, 0].cpu().numpy().copy(), c=c[0, 0].cpu().numpy().copy(),
            context=frames[-1, -CONTEXT_SAMPLES:].cpu().numpy().copy(), frames=state.frames + frames.shape[0])


_LOAD_LOCK = threading.Lock()


@contextmanager
def _torch_threads(n: int | None):
    """Run torch ops with ``n`` intra-op threads, then restore the previous count.

    With torch's OpenMP backend the setting belongs to the calling thread (other threads' running ops
    keep theirs), so this is safe next to a transcriber working in another thread.
    """
    previous = torch.get_num_threads()
    if n is None or n == previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _import_silero():
    """Import silero_vad without its side effect: its model module sets torch's threads to 1 globally."""
    threads = torch.get_num_threads()
    try:
        import silero_vad
        from silero_vad.utils_vad import get_speech_timestamps_from_probs
    except ImportError as exc:
        raise ImportError(
            "voice activity detection needs the `silero-vad` package, version 6.2.2 or later (it ships its "
            "model; no download): pip install 'silero-vad>=6.2.2,<7'  (never its [audio] extra: torchaudio "
            "breaks CPU installs)"
        ) from exc
    finally:
        torch.set_num_threads(threads)
    return silero_vad, get_speech_timestamps_from_probs


class SpeechDetector:
    """Silero VAD over 16 kHz mono float32 waves: per-frame speech probabilities and speech regions.

    Deterministic: the same samples always give the same answer. The model loads on first use (once);
    the detector keeps no per-stream state of its own (streams carry a ``VadState``).
    """

    def __init__(
        self,
        threshold: float = 0.5,
        min_silence_ms: int = 100,
        min_speech_ms: int = 250,
        speech_pad_ms: int = 30,
        device: str | torch.device = "cpu",
        num_threads: int | None = 1,
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be a probability in (0, 1), got {threshold}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 (or None to leave torch's setting), got {num_threads}")
        for label, value in (("min_silence_ms", min_silence_ms), ("min_speech_ms", min_speech_ms),
                             ("speech_pad_ms", speech_pad_ms)):
            if value < 0:
                raise ValueError(f"{label} must be >= 0 milliseconds, got {value}")
        self.threshold = threshold  # speech probability at or above which a frame is speech
        self.min_silence_ms = min_silence_ms  # silence shorter than this does not end a region (ms)
        self.min_speech_ms = min_speech_ms  # regions shorter than this are dropped (ms)
        self.speech_pad_ms = speech_pad_ms  # regions are widened by this much on each side (ms)
        self.device = torch.device(device)
        # Torch intra-op threads while the detector runs (restored after each call); None leaves torch alone.
        # One is fastest for this tiny model: extra threads mostly wait on each other, and on a busy
        # 2-core machine they made it 10-50x slower.
        self.num_threads = num_threads
        self._net: _SileroNet | None = None
        self._to_regions = None

    def _model(self) -> _SileroNet:
        if self._net is None:
            with _LOAD_LOCK:
                if self._net is None:
                    silero_vad, to_regions = _import_silero()
                    threads = torch.get_num_threads()
                    try:
                        jit = silero_vad.load_silero_vad(onnx=False)
                    finally:
                        torch.set_num_threads(threads)
                    self._to_regions = to_regions
                    self._net = _SileroNet(jit).to(self.device)
        return self._net

    @property
    def silence_threshold(self) -> float:
        """Probability below which a frame is silence (silero's exit threshold: threshold - 0.15)."""
        return max(self.threshold - 0.15, 0.01)

    def load(self) -> SpeechDetector:
        """Load the packaged model now rather than on the first call; returns self."""
        self._model()
        return self

    @torch.inference_mode()
    def stream_probabilities(self, samples: np.ndarray, state: VadState) -> tuple[np.ndarray, VadState]:
        """Speech probability of each 512-sample frame of ``samples``, continuing a stream from ``state``.

        ``samples``: (N,) float32 at 16 kHz with N a multiple of 512 (frames of a longer stream).
        Returns ((N // 512,) float32 probabilities, the state after the last frame). Chunked results match
        one call over the whole stream to float rounding (~1e-7), not bit for bit.
        """
        wave = _as_wave(samples)
        if wave.shape[0] % FRAME_SAMPLES:
            raise ValueError(f"stream chunks must hold whole {FRAME_SAMPLES}-sample frames, got {wave.shape[0]} samples")
        if wave.shape[0] == 0:
            return np.zeros(0, np.float32), state
        net = self._model()
        frames = torch.from_numpy(wave).to(self.device).view(-1, FRAME_SAMPLES)  # (F, 512)
        with _torch_threads(self.num_threads):
            return net(frames, state)

    def speech_probabilities(self, samples: np.ndarray) -> np.ndarray:
        """Speech probability per 512-sample frame of a whole wave, from a fresh state.

        ``samples``: (N,) float32 at 16 kHz. The last partial frame is zero-padded (as silero does).
        Returns (ceil(N / 512),) float32 in [0, 1]; frame i covers samples [512 i, 512 (i + 1)).
        """
        wave = _as_wave(samples)
        pad = -wave.shape[0] % FRAME_SAMPLES
        if pad:
            wave = np.concatenate([wave, np.zeros(pad, np.float32)])
        state, parts = VadState.initial(), []
        step = _BATCH_FRAMES * FRAME_SAMPLES  # fixed batches bound memory for hour-long waves
        for begin in range(0, wave.shape[0], step):
            probs, state = self.stream_probabilities(wave[begin : begin + step], state)
            parts.append(probs)
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def regions_from_probabilities(self, probs: np.ndarray, num_samples: int) -> list[SpeechRegion]:
        """Speech regions (sample offsets) of a wave of ``num_samples`` samples from its frame probabilities.

        Silero's own hysteresis: a region starts at a frame >= threshold, ends after ``min_silence_ms`` below
        threshold - 0.15, is dropped if shorter than ``min_speech_ms``, and is padded by ``speech_pad_ms``.
        """
        self._model()
        if num_samples <= 0:
            return []
        regions = self._to_regions(
            [float(p) for p in probs],
            sampling_rate=SAMPLE_RATE,
            threshold=self.threshold,
            min_speech_duration_ms=self.min_speech_ms,
            min_silence_duration_ms=self.min_silence_ms,
            speech_pad_ms=self.speech_pad_ms,
            audio_length_samples=int(num_samples),
        )
        return [SpeechRegion(int(r["start"]), int(r["end"])) for r in regions]

    def speech_regions(self, samples: np.ndarray) -> list[SpeechRegion]:
        """Where ``samples`` ((N,) float32, 16 kHz) holds speech: ``[start, end)`` sample offsets, in order."""
        wave = _as_wave(samples)
        return self.regions_from_probabilities(self.speech_probabilities(wave), wave.shape[0])

    def has_speech(self, samples: np.ndarray) -> bool:
        """Whether ``samples`` ((N,) float32, 16 kHz) holds at least one speech region."""
        return bool(self.speech_regions(samples))


def _as_wave(samples: np.ndarray) -> np.ndarray:
    wave = np.asarray(samples)
    if wave.ndim != 1:
        raise ValueError(f"VAD expects a (N,) mono 16 kHz wave, got shape {tuple(wave.shape)}")
    if wave.dtype.kind != "f":
        raise ValueError(f"VAD expects float samples in [-1, 1], got dtype {wave.dtype}")
    return np.ascontiguousarray(wave, dtype=np.float32)
