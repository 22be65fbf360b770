"""Long-lecture ingest: the streaming engine against the reference approach, for 1 minute to 2 hours.

For each lecture length (synthetic espeak-ng speech, generated once into a cache folder) two ways of
getting the whole lecture into the LLM's KV cache are measured:

  streaming  what `lyra.engine.jobs.build_session` does: `open_audio` -> `iter_windows` (no VAD) in groups
             of `SESSION_BATCH_WINDOWS` through `prefetch`, cache room reserved from the file's duration,
             `LectureSession.ingest` over the groups (log-mel, one Whisper encoder batch, projector,
             incremental prefill into the cache, the encoder one group ahead), then `close_audio()`.
  reference  what the reference implementation does: `load_audio` (the whole file), log-mel of every
             window, `encode_speech` in batches of windows, concatenate, then one prefill
             `model(input_ids, speech_embeds=..., use_cache=True, logits_to_keep=1)` with the same prompt
             layout (chat header, then every speech token).

Every run is a fresh subprocess (this script with `--worker`), so its peak RSS (VmHWM, reset after the
model is loaded and warmed up) is its own. A reference run whose predicted memory exceeds
`--mem-limit-gib` is not started; the others run under an RSS watchdog and an address-space limit.

    python bench/bench_engine.py --quick                          # smoke test: 1 minute, nano, 1 run
    python bench/bench_engine.py                                  # nano 1..120 min, mini 1 min
    python bench/bench_engine.py --lengths 1,10 --models nano,mini --runs 1 --no-docs
    python bench/bench_engine.py --mini-lengths 1,10 --mini-runs 1 --json out.json   # the run in docs (~31 min)
    python bench/bench_engine.py --from-json out.json            # re-render table and docs, measure nothing
    python bench/bench_engine.py --from-json all.json again.json # merged: again.json's rows replace all.json's
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import io
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from _common import build_random, reset_peak_rss, rss_bytes, write_docs  # bench/ is the script's folder, first on sys.path
from lyra.constants import SAMPLE_RATE

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Passive OpenMP waiting: spinning threads starve the working one when another job holds a core
# (see bench_extractor.py). Set before torch is imported; workers inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
SECTION_START = "<!-- bench:engine -->"
SECTION_END = "<!-- /bench:engine -->"
RESULT_PREFIX = "BENCH_RESULT "
GIB = 2**30

WINDOW_SECONDS = 30  # one Whisper window
APPROACHES = ("streaming", "reference")
LECTURE_VERSION = 1  # bump when the generated audio changes (it is cached by name)

# A few lecture sentences, spoken in turn by two voices at three speeds, with pauses between them.
SENTENCES = (
    "Good morning, and welcome back to the second part of our lecture on signal processing.",
    "Last week we saw that any periodic signal can be written as a sum of sine waves.",
    "Today we ask what happens when the signal is sampled at a finite rate.",
    "If the sampling rate is less than twice the highest frequency, the spectrum folds over.",
    "This effect is called aliasing, and it cannot be undone after the samples are taken.",
    "In practice we place a low pass filter in front of the converter to prevent it.",
    "Let us work through an example with a tone of three kilohertz sampled at four kilohertz.",
    "Please write down the answer before we move on to the next slide.",
    "The same idea explains why wheels in old films sometimes seem to turn backwards.",
    "For the exam, remember the theorem, its assumptions, and one example of each kind.",
)
VOICES = (("en-us", 150), ("en-gb", 170), ("en-us", 185))  # (espeak-ng voice, words per minute)
PAUSE_SECONDS = (0.15, 0.9)  # silence after each sentence, drawn uniformly
WRITE_BLOCK = 1 << 16  # samples written per call when the lecture file is generated


@dataclass(frozen=True)
class ModelPlan:
    """How one model is built and run."""

    name: str  # preset: nano (untrained preset + real Whisper tiny.en) or mini (mini-shaped, random weights)
    dtype: str  # weights and activations: float32 or bfloat16
    attn: str  # attention kernel of the LLM and the Whisper encoder: sdpa or eager
    encode_batch: int  # windows per `encode_speech` call in the reference approach


# --------------------------------------------------------------------------------------------------
# Synthetic lectures (generated once per length, block by block, never whole in memory).
# --------------------------------------------------------------------------------------------------
def lecture_dir() -> Path:
    """`$LYRA_CACHE/bench` (else the default Lyra cache root's `bench`)."""
    from lyra.assets import default_cache_dir

    return default_cache_dir() / "bench"


def synthesize(text: str, voice: str, speed: int):
    """One sentence from espeak-ng as (n,) float32 at 16 kHz, peak 0.5."""
    import numpy as np
    import soundfile as sf
    import soxr

    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
                         capture_output=True, check=True).stdout
    x, rate = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    x = soxr.resample(x[:, 0], rate, SAMPLE_RATE) if rate != SAMPLE_RATE else x[:, 0]
    return (0.5 * x / max(float(np.abs(x).max()), 1e-6)).astype(np.float32)


def make_lecture(minutes: float, folder: Path) -> Path:
    """A `minutes`-long 16 kHz mono PCM-16 wav of espeak-ng sentences and pauses (cached by name)."""
    import numpy as np
    import soundfile as sf

    path = folder / f"lecture-{minutes:g}min-v{LECTURE_VERSION}.wav"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    clips = [synthesize(s, *VOICES[i % len(VOICES)]) for i, s in enumerate(SENTENCES)]
    rng = np.random.default_rng(0)
    total = round(minutes * 60 * SAMPLE_RATE)
    written = 0
    fd, tmp = tempfile.mkstemp(suffix=".wav", dir=folder)
    os.close(fd)
    try:
        with sf.SoundFile(tmp, "w", samplerate=SAMPLE_RATE, channels=1, subtype="PCM_16") as f:
            while written < total:
                clip = clips[int(rng.integers(len(clips)))]
                pause = np.zeros(round(rng.uniform(*PAUSE_SECONDS) * SAMPLE_RATE), np.float32)
                for piece in (clip, pause):
                    for start in range(0, piece.shape[0], WRITE_BLOCK):
                        block = piece[start : start + WRITE_BLOCK][: total - written]
                        f.write(block)
                        written += block.shape[0]
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# --------------------------------------------------------------------------------------------------
# Worker: one run of one approach in a fresh process.
# --------------------------------------------------------------------------------------------------
def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so the RSS after loading is what is really held."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def kv_cache_bytes(cache) -> int:
    """Bytes held by the keys and values of every layer."""
    total = 0
    for layer in cache.kv.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def mini_config(attn: str):
    """Mini's config with a one-layer vision tower (no image is ever given; the Whisper encoder stays full size)."""
    from lyra.presets import config_from_dict, read_preset

    data = read_preset("mini")
    data["backbone"]["vision"]["depth"] = 1
    config = config_from_dict(data)
    config._attn_implementation = attn
    return config


def load_model(plan: ModelPlan):
    """(model, processor, source description) for a plan."""
    import torch

    from lyra import assets
    from lyra.pretrained import load_pretrained
    from lyra.processing import LyraProcessor

    dtype = getattr(torch, plan.dtype)
    if plan.name == "nano":
        loaded = load_pretrained(dtype=dtype, attn_implementation=plan.attn)
        return loaded.model, loaded.processor, loaded.source
    if plan.name == "mini":
        config = mini_config(plan.attn)
        model = build_random(config, dtype)
        return model, LyraProcessor.for_model(config, assets.qwen2_tokenizer()), "mini-shaped, random weights"
    raise ValueError(f"unknown model {plan.name!r}")


def prompt_before_speech(processor) -> str:
    """The chat text a lecture session prefills before the speech (the same split as `LectureSession`)."""
    from lyra.constants import SPEECH_PLACEHOLDER

    prompt = processor.apply_chat_template([{"role": "user", "content": f"{SPEECH_PLACEHOLDER}\nquestion"}],
                                           add_generation_prompt=True)
    return prompt.split(SPEECH_PLACEHOLDER)[0]


def warm_up(model, processor, adapter) -> None:
    """The same untimed work before either approach: one encoder window and one short prefill."""
    import numpy as np
    import torch

    features = torch.from_numpy(processor.window_features([np.zeros(SAMPLE_RATE, np.float32)]))
    with torch.inference_mode():
        model.encode_speech(features, adapter=adapter)
        ids = torch.tensor([processor.tokenizer(prompt_before_speech(processor), add_special_tokens=False)["input_ids"]])
        model(ids, use_cache=True, adapter=adapter, logits_to_keep=1)


class _Timed:
    """Wraps a bound method on an instance and accumulates its seconds per call (measurement only)."""

    def __init__(self, owner, name: str):
        self.owner, self.name, self.inner, self.calls = owner, name, getattr(owner, name), []
        setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.calls.append(time.perf_counter() - t)

    def restore(self) -> None:
        delattr(self.owner, self.name)


def run_streaming(model, processor, audio: Path) -> dict:
    """`build_session`'s loop (no VAD), timed window by window."""
    import torch
    from lyra.engine.ingest import iter_windows, open_audio
    from lyra.engine.jobs import PREFETCH_WINDOWS, SESSION_BATCH_WINDOWS
    from lyra.engine.pipeline import batched, prefetch
    from lyra.engine.session import LectureSession

    encode = _Timed(model, "encode_speech")
    featurize = _Timed(processor, "window_features")
    window_s, sizes = [], []  # per group: seconds from one prefilled group to the next, windows in the group
    t0 = time.perf_counter()
    source = open_audio(str(audio))
    session = LectureSession(model, processor, source=source.name)
    session.expect_seconds(source.duration)
    try:
        groups = prefetch(batched(iter_windows(source, vad=None), SESSION_BATCH_WINDOWS), depth=PREFETCH_WINDOWS)
        t, done = time.perf_counter(), 0
        for _ in session.ingest(groups):  # encodes group k+1, then prefills group k
            window_s.append(time.perf_counter() - t)
            sizes.append(session.info.windows - done)
            t, done = time.perf_counter(), session.info.windows
    finally:
        source.close()
    info = session.close_audio()
    wall = time.perf_counter() - t0
    encode.restore()
    featurize.restore()

    def per_window(per_group: list[float]) -> list[float]:  # a group's time shared evenly by its windows
        return [t / n for t, n in zip(per_group, sizes) for _ in range(n)]

    def per_interval(calls: list[float]) -> list[float]:
        """Encoder-side calls (one per group) regrouped by the intervals between `ingest`'s yields: the first
        interval encodes groups 0 and 1, interval k encodes group k + 1, the last encodes nothing."""
        if len(calls) != len(sizes) or len(calls) < 2:
            return calls
        return [calls[0] + calls[1], *calls[2:], 0.0]

    return {
        "wall_s": wall,
        "audio_s": info.audio_seconds,
        "windows": info.windows,
        "speech_tokens": info.speech_tokens,
        "cached_tokens": info.cached_tokens,
        "kv_bytes": kv_cache_bytes(session.cache),
        "adapter": info.adapter,
        "window_s": per_window(window_s),
        "encode_s": per_window(per_interval(encode.calls)),
        "encode_attribution": "interval",  # saved runs without it spread encoder time by group (not comparable)
        "featurize_s": per_window(per_interval(featurize.calls)),
        "phases": {"encode": sum(encode.calls), "featurize": sum(featurize.calls),
                   "llm_and_rest": sum(window_s) - sum(encode.calls) - sum(featurize.calls),
                   "waiting_for_audio": wall - sum(window_s)},
        "threads": torch.get_num_threads(),
        "_session": session,
    }


def run_reference(model, processor, audio: Path, batch: int) -> dict:
    """Whole file in memory, every window encoded, concatenated, one prefill."""
    import torch

    from lyra.audio import load_audio, split_windows
    from lyra.configuration import LONG_SPEECH_ADAPTER

    adapter = LONG_SPEECH_ADAPTER if LONG_SPEECH_ADAPTER in model.adapters.names else None
    t0 = time.perf_counter()
    wave = load_audio(str(audio))
    t_load = time.perf_counter()
    windows = split_windows(wave)
    counts = [processor.window_token_count(len(w)) for w in windows]
    features = torch.from_numpy(processor.window_features(windows))  # (W, n_mels, 3000)
    t_feat = time.perf_counter()
    with torch.inference_mode():
        pieces = [
            model.encode_speech(features[i : i + batch], torch.tensor(counts[i : i + batch]), adapter=adapter)
            for i in range(0, len(windows), batch)
        ]
        speech = torch.cat(pieces)  # (N, D)
        del pieces
        t_enc = time.perf_counter()
        head = processor.tokenizer(prompt_before_speech(processor), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([head + [processor.speech_token_id] * speech.shape[0]])
        out = model(ids, speech_embeds=speech, use_cache=True, adapter=adapter, logits_to_keep=1)
    t_end = time.perf_counter()
    return {
        "wall_s": t_end - t0,
        "audio_s": round(wave.shape[0] / SAMPLE_RATE, 3),
        "windows": len(windows),
        "speech_tokens": int(speech.shape[0]),
        "cached_tokens": out.cache.cached_tokens(),
        "kv_bytes": kv_cache_bytes(out.cache),
        "adapter": out.adapter,
        "phases": {"load_audio": t_load - t0, "featurize": t_feat - t_load, "encode": t_enc - t_feat,
                   "prefill": t_end - t_enc},
        "threads": torch.get_num_threads(),
        "_cache": out.cache,
    }


def worker(spec: dict) -> dict:
    """Load the model, warm up, reset the RSS high-water mark, run one approach once."""
    import torch

    from lyra.configuration import LONG_SPEECH_ADAPTER

    plan = ModelPlan(**spec["plan"])
    if spec.get("mem_limit_bytes"):
        # Backstop under the parent's RSS watchdog: allocations past this fail with a clean MemoryError.
        limit = int(spec["mem_limit_bytes"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    t0 = time.perf_counter()
    model, processor, source = load_model(plan)
    adapter = LONG_SPEECH_ADAPTER if LONG_SPEECH_ADAPTER in model.adapters.names else None
    warm_up(model, processor, adapter)
    load_s = time.perf_counter() - t0
    trim_heap()
    loaded = rss_bytes()
    peak_reset = reset_peak_rss()
    load_start = os.getloadavg()[0]
    audio = Path(spec["audio"])
    if spec["approach"] == "streaming":
        result = run_streaming(model, processor, audio)
    else:
        result = run_reference(model, processor, audio, plan.encode_batch)
    result.pop("_session", None)
    result.pop("_cache", None)
    result.update(
        loaded_rss=loaded,
        peak_rss=rss_bytes("VmHWM") if peak_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        peak_source="VmHWM since load" if peak_reset else "ru_maxrss (includes loading)",
        ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        load_s=load_s,
        source=source,
        attn=model.language_model.config._attn_implementation,
        loadavg_start=load_start,
        loadavg_end=os.getloadavg()[0],
        torch_threads=torch.get_num_threads(),
    )
    return result


def parity(spec: dict) -> dict:
    """Both approaches in one process on the same audio: do they leave the same KV cache?"""
    plan = ModelPlan(**spec["plan"])
    model, processor, _ = load_model(plan)
    audio = Path(spec["audio"])
    streamed = run_streaming(model, processor, audio)["_session"].cache
    offline = run_reference(model, processor, audio, plan.encode_batch)["_cache"]
    worst, scale = 0.0, 0.0
    lengths = []
    for a, b in zip(streamed.kv.layers, offline.kv.layers):
        lengths.append((int(a.keys.shape[-2]), int(b.keys.shape[-2])))
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            if x.shape != y.shape:
                return {"same_shape": False, "lengths": lengths}
            worst = max(worst, float((x.float() - y.float()).abs().max()))
            scale = max(scale, float(y.float().abs().max()))
    return {"same_shape": True, "lengths": lengths, "max_abs_diff": worst, "max_abs": scale}


# --------------------------------------------------------------------------------------------------
# Memory prediction of the reference approach (checked before it is started).
# --------------------------------------------------------------------------------------------------
def model_shape(name: str, attn: str):
    """The LyraConfig a plan runs and its parameter count (built on the meta device: no memory)."""
    import torch

    from lyra import LyraForConditionalGeneration
    from lyra.presets import build_config

    config = build_config("nano") if name == "nano" else mini_config(attn)
    config._attn_implementation = attn
    with torch.device("meta"):
        model = LyraForConditionalGeneration(config)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return config, params


def predict_reference(config, params: int, plan: ModelPlan, minutes: float) -> dict:
    """Predicted bytes of the reference approach (an upper estimate): weights + every phase of the run.

    Audio: `load_audio` holds its decoded blocks, their concatenation and the clipped copy at once (3 x 4 B per
    sample). Then log-mel of every window (float32), one encoder batch, every speech token (list + concatenation)
    and the prefill: per token the input embeddings, a few hidden states, q/k/v, the GQA-expanded keys and
    values, the MLP's gate/up/product and the KV cache of all layers. Attention: SDPA with no mask (a single
    causal prefill) runs a blocked kernel on CPU (O(N) memory); eager attention materialises heads x N x N
    float32 scores.
    """
    dtype_bytes = 2 if plan.dtype == "bfloat16" else 4
    text, speech = config.text_config, config.speech_config
    seconds = minutes * 60
    windows = math.ceil(seconds / WINDOW_SECONDS)
    tokens = windows * (1500 // config.settings.projector.k)  # upper bound (last window may be trimmed)
    hidden, inter, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = hidden // heads
    weights = params * dtype_bytes
    audio = seconds * SAMPLE_RATE * (3 * 4 + 1)
    features = windows * speech.num_mel_bins * 3000 * 4
    b = min(plan.encode_batch, windows)
    encoder = b * 1500 * (speech.encoder_ffn_dim + 6 * speech.d_model) * dtype_bytes + b * speech.d_model * 3000 * 4
    speech_tokens = 2 * tokens * hidden * dtype_bytes
    kv = layers * 2 * tokens * kv_heads * head_dim * dtype_bytes
    per_token = (4 * hidden + (heads + 2 * kv_heads) * head_dim + 2 * heads * head_dim + heads * head_dim
                 + 3 * inter) * dtype_bytes + 2 * head_dim * 4 * 3
    prefill = tokens * per_token
    scores = heads * tokens * tokens * 4 if plan.attn == "eager" else 0
    # Phases summed, not their maximum: memory freed between phases is not always returned to the OS
    # (glibc keeps heap chunks), so an upper estimate is the safe one for deciding whether to start.
    extra = audio + features + encoder + speech_tokens + kv + prefill + scores
    return {"weights": weights, "extra": extra, "total": weights + extra, "kv": kv, "scores": scores,
            "tokens": tokens}


# --------------------------------------------------------------------------------------------------
# Driver: one subprocess per run, an RSS watchdog, then the table and the docs section.
# --------------------------------------------------------------------------------------------------
def run_worker(spec: dict, mem_limit: int, what: str = "--worker") -> dict:
    """Run one worker in a fresh interpreter under an RSS watchdog and parse its result line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), what, json.dumps(spec)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=REPO)
        seen, killed = 0, False
        while proc.poll() is None:
            try:
                rss = rss_bytes("VmRSS", proc.pid)
            except (OSError, RuntimeError):
                rss = 0
            seen = max(seen, rss)
            if rss > mem_limit:
                proc.kill()  # our own child, by its pid
                killed = True
                proc.wait()
                break
            time.sleep(0.05)
        process_s = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if killed:
        return {"failed": f"killed by the watchdog at {seen / GIB:.1f} GiB RSS (limit {mem_limit / GIB:.1f} GiB)"}
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (stdout + stderr).strip().splitlines()[-15:]
        sys.stderr.write("\n".join(tail) + "\n")
        reason = next((l for l in reversed(tail) if "Error" in l), f"exit {proc.returncode}")
        return {"failed": reason.strip()[:200]}
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result.update(process_s=process_s, watchdog_max_rss=seen)
    return result


def machine_info() -> dict:
    import torch
    import transformers

    cpu, flags, mem = "unknown", "", 0
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = ", ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in have)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {"cpu": cpu, "flags": flags, "cores": os.cpu_count(), "ram_gib": mem / GIB, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}


def summarize(runs: list[dict]) -> dict:
    """One row from the runs of a configuration: the median wall time, memory of the median run."""
    ok = [r for r in runs if "failed" not in r]
    if not ok:
        return {"failed": runs[0]["failed"] if runs else "not run"}
    times = [r["wall_s"] for r in ok]
    median = statistics.median(times)
    rep = min(ok, key=lambda r: abs(r["wall_s"] - median))  # the run whose memory figures are shown
    row = {k: v for k, v in rep.items() if k not in ("wall_s",)}
    row.update(times=times, median_s=median, rtf=rep["audio_s"] / median,
               peak_rss=statistics.median(r["peak_rss"] for r in ok),
               loaded_rss=statistics.median(r["loaded_rss"] for r in ok),
               failed_runs=len(runs) - len(ok))
    row["excess"] = row["peak_rss"] - row["kv_bytes"] - row["loaded_rss"]
    return row


def window_split(row: dict) -> tuple[list[float], list[float], list[float]] | None:
    """A streaming run's seconds per window: (whole window, encoder, log-mel); None when the run has too few
    windows, or was saved before encoder time was attributed by interval (its per-window split is skewed)."""
    w, e, f = row.get("window_s", []), row.get("encode_s", []), row.get("featurize_s", [])
    if len(w) < 10 or len(e) != len(w) or len(f) != len(w) or row.get("encode_attribution") != "interval":
        return None
    return w, e, f


def window_growth(row: dict) -> str:
    """Seconds per window early vs late in a streaming run: LLM part (window - encoder - log-mel) and encoder."""
    split = window_split(row)
    if split is None:
        return ""
    w, e, f = split
    k = max(3, len(w) // 10)
    llm = [a - b - c for a, b, c in zip(w, e, f)]
    med = statistics.median
    return (f"LLM {med(llm[1:k + 1]):.3f} -> {med(llm[-k - 1:-1]):.3f} s/window, encoder {med(e[1:k + 1]):.3f} -> "
            f"{med(e[-k - 1:-1]):.3f} s/window (median of windows 2-{k + 1} vs the last {k} full windows)")


def fmt_gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def table(rows: list[dict]) -> str:
    head = ("| model | minutes | approach | windows | speech tokens | runs | wall s, median (runs) | RTF (audio s / wall s)"
            " | loaded GiB | peak GiB | KV cache MiB | peak - KV - loaded MiB | throughput vs reference |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lead = f"| {r['model']} | {r['minutes']:g} | {r['approach']} |"
        if "failed" in r:
            lines.append(f"{lead} - | - | - | {r['failed']} | - | - | - | - | - | - |")
            continue
        times = ", ".join(f"{t:.1f}" for t in r["times"])
        ratio = f"{r['throughput_ratio']:.2f}x" if r.get("throughput_ratio") else "-"
        lines.append(
            f"{lead} {r['windows']} | {r['speech_tokens']} | {len(r['times'])} | {r['median_s']:.1f} ({times})"
            f" | {r['rtf']:.1f} | {fmt_gib(r['loaded_rss'])} | {fmt_gib(r['peak_rss'])} | {r['kv_bytes'] / 2**20:.1f}"
            f" | {r['excess'] / 2**20:.0f} | {ratio} |"
        )
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, evaluated on the streaming rows (memory) and both approaches (throughput)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = {(r["minutes"], r["approach"]): r for r in rows if r["model"] == model and "failed" not in r}
        stream = {m: r for (m, a), r in mine.items() if a == "streaming"}
        if 10 in stream and len(stream) > 1:
            base = stream[10]
            for m in sorted(stream):
                if m <= 10:
                    continue
                r = stream[m]
                literal = (r["peak_rss"] - r["kv_bytes"]) / (base["peak_rss"] - base["kv_bytes"])
                strict = r["excess"] / base["excess"] if base["excess"] > 0 else float("inf")
                verdict = f"target <= 1.2: {'met' if literal <= 1.2 else 'MISSED'}" if m == 120 else "for the trend"
                out.append(
                    f"{model} streaming, {m:g} vs 10 min: peak RSS without the KV cache {fmt_gib(r['peak_rss'] - r['kv_bytes'])}"
                    f" vs {fmt_gib(base['peak_rss'] - base['kv_bytes'])} GiB = {literal:.3f}x ({verdict}); above the"
                    f" loaded model (peak - KV - loaded) {r['excess'] / 2**20:.0f} vs {base['excess'] / 2**20:.0f} MiB"
                    f" = {strict:.2f}x; KV cache {r['kv_bytes'] / 2**20:.0f} vs {base['kv_bytes'] / 2**20:.0f} MiB")
        for m in sorted({m for m, _ in mine}):
            s, ref = mine.get((m, "streaming")), mine.get((m, "reference"))
            if s and ref:
                ratio = ref["median_s"] / s["median_s"]
                out.append(f"{model}, {m:g} min: throughput streaming / reference = {ratio:.2f}x "
                           f"(target >= 1: {'met' if ratio >= 1 else 'MISSED'})")
    return out


def docs_section(info, rows, notes, started, elapsed, command) -> str:
    loads = [r[k] for r in rows if "failed" not in r for k in ("loadavg_start", "loadavg_end")]
    load_line = f" Load average during the runs {min(loads):.1f}-{max(loads):.1f}." if loads else ""
    target_lines = "\n".join(f"- {t}." for t in targets(rows)) or "- (no pair of rows to evaluate)"
    note_lines = "\n".join(f"- {n}" for n in notes)
    return f"""## Long-lecture ingest: streaming engine vs the reference approach

Written by `bench/bench_engine.py` on {started} (whole run {elapsed / 60:.1f} min).

```
{command}
```

Machine: {info['cpu']} ({info['flags']}), {info['cores']} cores, {info['ram_gib']:.1f} GiB RAM, torch {info['torch']}
({info['threads']} threads, OMP_WAIT_POLICY={info['omp_wait_policy']}), transformers {info['transformers']}, Python {info['python']}.{load_line}

Audio: synthetic lectures (espeak-ng sentences in two voices and three speeds, 0.15-0.9 s pauses, 16 kHz mono
PCM-16 wav, generated once per length). Wall time covers reading the file to the last cached token (model
loading and one warm-up window excluded, identical for both). RTF = audio seconds / wall seconds (higher is
faster). Every run is its own fresh process; "runs" is how many ran, the wall time is their median and memory is
the median over runs. Peak = VmHWM from the end of loading (reset via clear_refs) to the end of the ingest;
loaded = RSS after loading and warm-up; KV cache = bytes of every layer's keys and values after the ingest.
Throughput vs reference = reference median wall / streaming median wall at the same length.

{table(rows)}

Targets:
{target_lines}

Notes:
{note_lines}
"""


def llm_slope(row: dict) -> tuple[float, float] | None:
    """Least-squares fit of a streaming run's LLM seconds per window against the tokens already cached.

    Returns (seconds per 1000 cached tokens, seconds at an empty cache); windows 2 .. n-1 (the first also
    prefills the chat header, the last may be short).
    """
    split = window_split(row)
    if split is None:
        return None
    w, e, f = split
    per_window = row["speech_tokens"] / row["windows"]
    xs = [i * per_window / 1000 for i in range(1, len(w) - 1)]
    ys = [w[i] - e[i] - f[i] for i in range(1, len(w) - 1)]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def auto_notes(rows: list[dict], settings: dict, info: dict) -> list[str]:
    """Notes derived from the measurements: models, load, growth per window, phases, predictions, what was left out."""
    ok = [r for r in rows if "failed" not in r]
    notes = []
    for model in dict.fromkeys(r["model"] for r in ok):
        r = next(x for x in ok if x["model"] == model)
        what = ("the untrained nano preset from `load_pretrained()` (real Whisper tiny.en encoder, random 4-layer"
                " LLM, hidden 256)" if model == "nano" else
                "mini-shaped with random weights (Qwen2-VL-2B's 28-layer LLM, hidden 1536, and a full-size Whisper"
                " large-v3-turbo encoder, 32 layers, d_model 1280; the unused vision tower has one layer)")
        notes.append(f"{model}: {what}, {r['dtype']}, attention `{r['attn']}`, LoRA adapter `{r['adapter']}`"
                     f" active (source: {r['source']}).")
    loads = [r[k] for r in ok for k in ("loadavg_start", "loadavg_end")]
    if loads and max(loads) > info["cores"] + 0.5:
        notes.append(f"Other jobs shared this {info['cores']}-core machine during the run (1-minute load average up to"
                     f" {max(loads):.1f}, one run itself accounts for about 2): absolute times are inflated and the"
                     " two approaches of a length ran minutes apart, so ratios within about 10% are noise; the 1-minute"
                     " runs last about a second each.")
    for model in dict.fromkeys(r["model"] for r in ok):
        stream = [r for r in ok if r["model"] == model and r["approach"] == "streaming"]
        fits = [(r, fit) for r in stream if (fit := llm_slope(r))]
        if fits:
            r, (slope, base) = max(fits, key=lambda x: x[0]["minutes"])
            ref = next((x for x in ok if x["model"] == model and x["approach"] == "reference"
                        and x["minutes"] == r["minutes"]), None)
            vs = (f"; its LLM part summed to {r['phases']['llm_and_rest']:.0f} s against {ref['phases']['prefill']:.0f} s"
                  f" for the reference's one prefill of the same tokens" if ref else "")
            notes.append(
                f"{model} streaming: the LLM time per window (window minus encoder minus log-mel) grows linearly with"
                f" the cache, {slope * 1000:.1f} ms per 1000 cached tokens on top of {base:.2f} s (fit over the"
                f" {r['minutes']:g}-minute run), so the total is quadratic in the lecture length{vs}. The encoder"
                f" time per window stays flat.")
        if len(stream) > 1:
            lo, hi = min(stream, key=lambda r: r["minutes"]), max(stream, key=lambda r: r["minutes"])
            if hi["kv_bytes"] > lo["kv_bytes"]:
                per_kv = (hi["excess"] - lo["excess"]) / (hi["kv_bytes"] - lo["kv_bytes"])
                span = (f"({lo['minutes']:g} -> {hi['minutes']:g} min: {lo['excess'] / 2**20:.0f} -> "
                        f"{hi['excess'] / 2**20:.0f} MiB above the loaded model and the KV cache)")
                notes.append(
                    f"{model} streaming memory: besides the KV cache, the peak grows by {per_kv:.2f} MiB per MiB of KV"
                    f" cache {span}: per-window buffers sized by the cache (attention over every cached key), not"
                    " buffered audio." if per_kv > 0.25 else
                    f"{model} streaming memory: besides the KV cache, the peak stays flat {span}: the buffers of one"
                    " window (encoder activations) outweigh those that grow with the cache at these lengths.")
    for r in ok:
        per_token = r["kv_bytes"] / max(r["cached_tokens"], 1)
        phases = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in r["phases"].items())
        line = (f"{r['model']} {r['minutes']:g} min {r['approach']}: {phases}; KV {per_token / 1024:.1f} KiB per cached"
                f" token ({r['cached_tokens']} tokens)")
        if r["approach"] == "streaming" and (growth := window_growth(r)):
            line += f"; {growth}"
        if r["approach"] == "reference" and "predicted_gib" in r:
            line += (f"; memory predicted before the run {r['predicted_gib']:.2f} GiB, measured peak"
                     f" {fmt_gib(r['peak_rss'])} GiB")
        notes.append(line + ".")
    runs, mini_runs = settings.get("runs"), settings.get("mini_runs")
    notes.append("Runs: " + (f"--runs {runs}" if runs else
                             "3 per configuration up to 10 min, 1 for longer lectures (one 2-hour run per approach"
                             " already takes minutes on this machine)")
                 + (f"; mini: --mini-runs {mini_runs} (a mini process spends about 40 s building and warming up"
                    " before its run)" if mini_runs else "") + ".")
    if settings.get("skipped_mini"):
        notes.append(f"mini at {', '.join(f'{m:g}' for m in settings['skipped_mini'])} min: not run (--mini-lengths"
                     f" {settings['mini_lengths']}); a 10-minute mini run per approach takes about 4 minutes here and the"
                     " whole benchmark must fit in about 45 minutes on this 2-core machine.")
    notes.append("Streaming `ingest` computes the log-mel in the consumer thread (the prefetch thread only"
                 " decodes and cuts windows), exactly as `build_session` does. Per-window times are a group's time"
                 " (from one prefilled group to the next) shared evenly by its windows.")
    notes.append("The reference keeps the whole wave, every window's log-mel and every speech token in memory and runs"
                 " one prefill over all tokens; on CPU, SDPA with no mask (a single causal prefill) uses a blocked"
                 " kernel, so its attention is O(N) in memory but still O(N^2) in time, like the streaming path.")
    return notes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Streaming lecture ingest vs the reference (whole file, one prefill): time, RTF, peak RSS.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--lengths", default="1,10,30,60,120", help="lecture lengths in minutes")
    p.add_argument("--models", default="nano,mini", help="nano (untrained preset, real Whisper tiny.en) and/or mini")
    p.add_argument("--mini-lengths", default="1", help="lengths (minutes) at which mini runs; mini at 2 h does not fit the time")
    p.add_argument("--approaches", default="streaming,reference", help="which approaches to run")
    p.add_argument("--runs", type=int, default=None,
                   help="runs per configuration (default: 3 for lengths <= 10 min, 1 for longer ones)")
    p.add_argument("--mini-runs", type=int, default=None, help="runs per mini configuration (default: as --runs)")
    p.add_argument("--nano-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--mini-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention kernel")
    p.add_argument("--encode-batch", type=int, default=8, help="windows per encode_speech call in the reference")
    p.add_argument("--mem-limit-gib", type=float, default=18.0,
                   help="reference runs predicted above this are skipped; any run whose RSS passes it is killed")
    p.add_argument("--no-parity", action="store_true", help="skip the 1-minute KV-cache parity check of the two approaches")
    p.add_argument("--docs", type=Path, default=DOCS, help="markdown file whose engine section is (re)written")
    p.add_argument("--no-docs", action="store_true", help="print only; do not touch the docs file")
    p.add_argument("--json", type=Path, default=None, help="also write every measurement as JSON here")
    p.add_argument("--from-json", type=Path, nargs="+", default=None,
                   help="measure nothing: print and write the docs section from --json files of earlier runs (a"
                        " later file's rows replace the same model/length/approach of an earlier one)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 minute, nano, 1 run, docs untouched")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--parity-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.models, args.runs, args.no_docs = "1", "nano", 1, True
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.parity_worker:
        print(RESULT_PREFIX + json.dumps(parity(json.loads(args.parity_worker))), flush=True)
        return 0
    if args.from_json:
        saved = merge_runs([json.loads(path.read_text()) for path in args.from_json])
        saved["rendered_from_json"] = True
        return report(saved, args)

    command = "python bench/bench_engine.py" + ("" if len(sys.argv) <= 1 else " " + shlex.join(sys.argv[1:]))
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t_start = time.perf_counter()
    info = machine_info()
    print(f"# {command}\n# {info['cpu']}, {info['cores']} cores, {info['ram_gib']:.1f} GiB, torch {info['torch']}",
          flush=True)
    lengths = [float(x) for x in args.lengths.split(",") if x.strip()]
    mini_lengths = {float(x) for x in args.mini_lengths.split(",") if x.strip()}
    approaches = [a.strip() for a in args.approaches.split(",") if a.strip()]
    mem_limit = int(args.mem_limit_gib * GIB)
    folder = lecture_dir()
    audio = {}
    for m in lengths:
        t = time.perf_counter()
        audio[m] = make_lecture(m, folder)
        print(f"# lecture {m:g} min: {audio[m]} ({time.perf_counter() - t:.1f} s)", flush=True)

    rows, notes, skipped_mini = [], [], []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in ("nano", "mini"):
            raise SystemExit(f"--models: unknown model {name!r} (choose nano and/or mini)")
        plan = ModelPlan(name, args.nano_dtype if name == "nano" else args.mini_dtype, args.attn, args.encode_batch)
        config, params = model_shape(name, args.attn)
        print(f"# {name}: {params / 1e6:.0f} M parameters, {plan.dtype}, attention {plan.attn}", flush=True)
        if name == "nano" and not args.no_parity and 1.0 in audio:
            check = run_worker({"plan": asdict(plan), "audio": str(audio[1.0])}, mem_limit, "--parity-worker")
            if "failed" in check:
                notes.append(f"KV parity check ({name}, 1 min) failed to run: {check['failed']}.")
            elif check["same_shape"]:
                notes.append(
                    f"Both approaches leave the same KV cache ({name}, 1 min, one process): {check['lengths'][0][0]}"
                    f" keys per layer, max |difference| {check['max_abs_diff']:.2e} against values up to"
                    f" {check['max_abs']:.2f} (batched vs single-window encoder and chunked vs single prefill"
                    f" round differently).")
            else:
                notes.append(f"KV parity check ({name}, 1 min): different cache lengths {check['lengths']}.")
            print(f"  parity: {check}", flush=True)
        for minutes in lengths:
            if name == "mini" and minutes not in mini_lengths:
                skipped_mini.append(minutes)
                continue
            runs = (args.mini_runs if name == "mini" else None) or args.runs or (3 if minutes <= 10 else 1)
            pair = {}
            for approach in approaches:
                row = {"model": name, "minutes": minutes, "approach": approach, "dtype": plan.dtype}
                if approach == "reference":
                    pred = predict_reference(config, params, plan, minutes)
                    # The process before the run: the streaming run's loaded RSS when there is one, else the
                    # weights plus what torch, Python and the tokenizer hold (about 0.5 GiB here).
                    s = pair.get("streaming")
                    base = s["loaded_rss"] if s and "failed" not in s else pred["weights"] + GIB // 2
                    total = base + pred["extra"]
                    row.update(predicted_gib=total / GIB, predicted_extra_gib=pred["extra"] / GIB)
                    print(f"  {name} {minutes:g} min reference: predicted {total / GIB:.2f} GiB"
                          f" (loaded {base / GIB:.2f}, run {pred['extra'] / GIB:.2f}, of which"
                          f" KV {pred['kv'] / GIB:.2f}, attention scores {pred['scores'] / GIB:.2f})", flush=True)
                    if total > mem_limit:
                        row["failed"] = f"does not fit (predicted {total / GIB:.1f} GiB)"
                        rows.append(row)
                        continue
                spec = {"plan": asdict(plan), "audio": str(audio[minutes]), "approach": approach,
                        "mem_limit_bytes": mem_limit + 8 * GIB}
                results = []
                for i in range(runs):
                    r = run_worker(spec, mem_limit)
                    results.append(r)
                    if "failed" in r:
                        print(f"  {name} {minutes:g} min {approach} run {i + 1}: FAILED {r['failed']}", flush=True)
                        break
                    print(f"  {name} {minutes:g} min {approach} run {i + 1}: {r['wall_s']:.1f} s"
                          f" ({r['audio_s'] / r['wall_s']:.1f}x real time), peak {fmt_gib(r['peak_rss'])} GiB,"
                          f" loaded {fmt_gib(r['loaded_rss'])}, KV {r['kv_bytes'] / 2**20:.1f} MiB,"
                          f" phases {', '.join(f'{k} {v:.2f}' for k, v in r['phases'].items())},"
                          f" load {r['load_s']:.1f} s, process {r['process_s']:.0f} s", flush=True)
                row.update(summarize(results))
                if "failed" not in row and approach == "reference":
                    row["prediction_error"] = row["predicted_gib"] * GIB / row["peak_rss"]
                pair[approach] = row
                rows.append(row)
            s, ref = pair.get("streaming"), pair.get("reference")
            if s and ref and "failed" not in s and "failed" not in ref:
                s["throughput_ratio"] = ref["median_s"] / s["median_s"]
                ref["throughput_ratio"] = 1.0
            if s and "failed" not in s and (growth := window_growth(s)):
                print(f"  {name} {minutes:g} min streaming per window: {growth}", flush=True)

    elapsed = time.perf_counter() - t_start
    settings = {"runs": args.runs, "mini_runs": args.mini_runs, "mini_lengths": args.mini_lengths,
                "skipped_mini": skipped_mini}
    saved = {"command": command, "started": started, "elapsed_s": elapsed, "machine": info, "settings": settings,
             "rows": rows, "notes": notes}
    if args.json:
        args.json.write_text(json.dumps(saved, indent=1))
    return report(saved, args)


def merge_runs(runs: list[dict]) -> dict:
    """Several saved runs as one: a later run's rows replace the earlier rows of the same model, length and
    approach (e.g. a length re-measured on a quieter machine); commands and notes are kept from all runs."""
    if len(runs) == 1:
        return runs[0]
    merged = dict(runs[0])
    rows = {(r["model"], r["minutes"], r["approach"]): r for r in runs[0]["rows"]}
    for run in runs[1:]:
        rows.update({(r["model"], r["minutes"], r["approach"]): r for r in run["rows"]})
        merged["notes"] = merged["notes"] + [n for n in run["notes"] if n not in merged["notes"]]
    merged["rows"] = sorted(rows.values(), key=lambda r: (r["model"] != "nano", r["minutes"],
                                                         APPROACHES.index(r["approach"])))
    for row in merged["rows"]:  # ratios within the merged rows
        if row["approach"] == "streaming" and "failed" not in row:
            ref = rows.get((row["model"], row["minutes"], "reference"))
            if ref and "failed" not in ref:
                row["throughput_ratio"] = ref["median_s"] / row["median_s"]
    merged["command"] = "\n".join(run["command"] for run in runs)
    merged["started"] = ", ".join(run["started"] for run in runs)
    merged["elapsed_s"] = sum(run["elapsed_s"] for run in runs)
    merged["notes"] = merged["notes"] + [
        "Rows from several runs (commands above, in order): a later run's rows replace the same model, length and"
        " approach of an earlier one."]
    return merged


def report(saved: dict, args) -> int:
    """Print the table and the targets; write the docs section unless --no-docs."""
    rows = saved["rows"]
    print()
    print(table(rows))
    print()
    for t in targets(rows):
        print(f"- {t}")
    print(f"\nwhole run {saved['elapsed_s'] / 60:.1f} min")
    if not args.no_docs:
        notes = saved["notes"] + auto_notes(rows, saved["settings"], saved["machine"])
        when = saved["started"] + (", section re-rendered from its saved measurements with `--from-json`"
                                    if saved.get("rendered_from_json") else "")
        write_docs(docs_section(saved["machine"], rows, notes, when, saved["elapsed_s"], saved["command"]), args.docs,
                   SECTION_START, SECTION_END)
        print(f"wrote the engine section of {args.docs}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
