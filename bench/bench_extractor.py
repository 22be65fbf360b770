"""Prefill time and peak memory of the latent multi-modality extractor (LCME) on long speech.

A lecture-question prompt: a short chat header, `minutes` of speech as `<|speech_pad|>` placeholders
(20 windows x 300 = 6,000 speech tokens for 10 minutes), then a ~20-token question. The LLM prefill
(`model(..., use_cache=True, logits_to_keep=1)`, the first call of `stream_generate`) is timed with
the extractor off (keep_rate 1.0, gap 0), on but keeping everything (keep_rate 1.0, gap > 0: the
scoring overhead alone) and pruning (keep_rate 0.5 and 0.25), for the nano preset and a mini-shaped
model with random weights.

Speech enters as precomputed random embeddings (`speech_embeds=`): the Whisper encoder and projector
cost the same for every keep rate, so they are left out of the measured prefill (for nano the encoder
time is measured once and shown beside the table). Every configuration runs in a fresh subprocess
(this script with `--worker`), so its peak RSS is its own.

    python bench/bench_extractor.py --quick                     # smoke test, well under a minute
    python bench/bench_extractor.py                             # nano + mini, 10 minutes of speech
    python bench/bench_extractor.py --models mini --minutes 2 --mini-runs 1 --no-docs
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from _common import build_random, reset_peak_rss, rss_bytes, write_docs  # bench/ is the script's folder, first on sys.path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# GNU OpenMP spin-waits at barriers by default; when another job holds one of the cores, the spinning
# thread starves the working one (a 4-layer prefill went from 0.13 s to 2.8 s here). Passive waiting
# keeps timings meaningful on a shared machine. Set before torch is imported; workers inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
SECTION_START = "<!-- bench:extractor -->"
SECTION_END = "<!-- /bench:extractor -->"
RESULT_PREFIX = "BENCH_RESULT "

SPEECH_TOKENS_PER_WINDOW = 300  # 1500 Whisper frames / k=5 per 30 s window
WINDOWS_PER_MINUTE = 2  # 30 s windows
MIN_KEEP = 32  # the extractor's floor, as in the presets

# Qwen2 chat-template ids around the speech (the weights are random, so only the counts matter).
IM_START, IM_END, NEWLINE = 151644, 151645, 198
SYSTEM, USER, ASSISTANT = 8948, 872, 77091
HEADER = [IM_START, SYSTEM, NEWLINE, 2610, 525, 264, 10950, 17847, 13, IM_END, NEWLINE, IM_START, USER, NEWLINE]
TEMPLATE_TAIL = [IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE]


WARMUPS = {"full": "one untimed prefill of the same prompt", "short": "one untimed prefill of a 30 s prompt", "none": "none"}


@dataclass(frozen=True)
class ModelPlan:
    """How one model is benchmarked."""

    name: str  # preset name (nano, mini)
    dtype: str  # weights and activations: float32 or bfloat16
    runs: int  # timed prefills per configuration (the median is reported)
    warmup: str  # "full" (one untimed prefill of the same input), "short" (one 30 s window) or "none"
    shrink_towers: bool  # build the unused vision tower / Whisper encoder with one layer to save memory


@dataclass(frozen=True)
class Case:
    """One extractor setting."""

    keep_rate: float  # fraction of multimodal tokens kept at each pruning layer
    gap: int  # prune after layers with (i + 1) % gap == 0; 0 disables the extractor


# --------------------------------------------------------------------------------------------------
# Worker: one configuration in a fresh process.
# --------------------------------------------------------------------------------------------------
def build_model(plan: ModelPlan, attn: str):
    """A model of the preset's shape with small random weights, built on the meta device then filled."""
    import torch

    from lyra.presets import config_from_dict, read_preset

    data = read_preset(plan.name)
    if plan.shrink_towers:
        # Speech arrives as precomputed embeddings and there is no image: the towers only need to exist.
        data["backbone"]["vision"]["depth"] = 1
        data["speech"]["encoder_layers"] = 1
        data["speech"]["decoder_layers"] = 1
    config = config_from_dict(data)
    config._attn_implementation = attn
    dtype = getattr(torch, plan.dtype)
    return build_random(config, dtype)


def make_inputs(config, minutes: float, question_tokens: int, dtype, seed: int = 0) -> dict:
    """Prompt ids (1, L): header, speech placeholders, question + template tail; random speech embeds."""
    import torch

    n_speech = round(minutes * WINDOWS_PER_MINUTE) * SPEECH_TOKENS_PER_WINDOW
    if n_speech < SPEECH_TOKENS_PER_WINDOW:
        raise ValueError(f"--minutes {minutes} is shorter than one 30 s window")
    n_words = max(1, question_tokens - len(TEMPLATE_TAIL))
    g = torch.Generator().manual_seed(seed)
    question = torch.randint(1000, 100_000, (n_words,), generator=g).tolist() + TEMPLATE_TAIL
    ids = HEADER + [config.speech_token_id] * n_speech + question
    hidden = config.text_config.hidden_size
    speech = torch.randn(n_speech, hidden, generator=g).mul_(0.02).to(dtype)  # (N, D) like projector output
    return {"input_ids": torch.tensor([ids]), "speech_embeds": speech}


def kv_cache_bytes(cache) -> int:
    """Bytes held by the keys and values of every layer."""
    total = 0
    for layer in cache.kv.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def time_encoder(model, windows: int, runs: int) -> float:
    """Median seconds of `encode_speech` on `windows` padded 30 s windows of random log-mel."""
    import torch

    n_mels = model.config.speech_config.num_mel_bins
    feats = torch.randn(windows, n_mels, 3000)
    model.encode_speech(feats[:1])  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model.encode_speech(feats)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def lm_head_probe(model, length: int, dtype, reps: int = 3) -> dict:
    """Seconds of the LM head on the last position: the strided slice the model uses vs the same row re-viewed.

    `hidden[:, -1:]` of a (1, L, D) tensor keeps the batch stride L * D; on CPU in bf16 that sends
    `F.linear` down a path that copies the whole (V, D) weight. A reshape gives the same values the
    standard strides.
    """
    import torch

    hidden = torch.randn(1, length, model.config.text_config.hidden_size).mul_(0.02).to(dtype)
    head = model.backbone.lm_head
    out = {}
    for name, x in (("head_slice_s", hidden[:, -1:]), ("head_reshape_s", hidden[:, -1:].reshape(1, 1, -1))):
        head(x)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            head(x)
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
    return out


def matmul_probe(reps: int = 3) -> dict:
    """GFLOP/s of one mini-sized MLP matmul, (2048, 1536) x (1536, 8960), in float32 and bfloat16."""
    import torch

    out = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            x, w = torch.randn(2048, 1536).to(dtype), torch.randn(8960, 1536).to(dtype)
            torch.nn.functional.linear(x, w)
            t = time.perf_counter()
            for _ in range(reps):
                torch.nn.functional.linear(x, w)
            out[str(dtype).removeprefix("torch.")] = 2 * 2048 * 1536 * 8960 * reps / (time.perf_counter() - t) / 1e9
    return out


def worker(spec: dict) -> list[dict]:
    """Build the model once, then for each extractor setting in `spec["cases"]` prefill `runs` times.

    Normally a worker gets one case (a fresh process per configuration); `--shared-process` gives it all
    of a model's cases, with the RSS high-water mark reset before each.
    """
    import torch

    plan = ModelPlan(**spec["plan"])
    t0 = time.perf_counter()
    model = build_model(plan, spec["attn"])
    dtype = getattr(torch, plan.dtype)
    inputs = make_inputs(model.config, spec["minutes"], spec["question_tokens"], dtype)
    build_s = time.perf_counter() - t0
    results = []
    for i, case in enumerate(Case(**c) for c in spec["cases"]):
        result = measure_case(model, plan, case, inputs, spec)
        result["build_s"] = build_s
        if i == 0 and spec.get("encoder_windows"):
            with torch.inference_mode():
                result["encoder_s"] = time_encoder(model, spec["encoder_windows"], spec["encoder_runs"])
        results.append(result)
    return results


def measure_case(model, plan: ModelPlan, case: Case, inputs: dict, spec: dict) -> dict:
    """Warm-up, then `plan.runs` timed prefills under one extractor setting; times, tokens, memory."""
    import torch

    from lyra import ExtractorConfig

    dtype = getattr(torch, plan.dtype)
    model.set_extractor(ExtractorConfig(gap=case.gap, keep_rate=case.keep_rate, min_keep=spec["min_keep"]))
    gc.collect()
    loaded = rss_bytes()
    peak_reset = reset_peak_rss()
    is_speech = inputs["input_ids"][0] == model.config.speech_token_id
    result = {"loaded_rss": loaded, "times": [], "loadavg_start": os.getloadavg()[0]}
    with torch.inference_mode():
        if plan.warmup != "none":
            warm = inputs if plan.warmup == "full" else make_inputs(model.config, 0.5, spec["question_tokens"], dtype)
            out = model(**warm, use_cache=True, logits_to_keep=1)
            del out
        for _ in range(plan.runs):
            gc.collect()
            t = time.perf_counter()
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            result["times"].append(time.perf_counter() - t)
            if not torch.isfinite(out.logits).all():
                raise FloatingPointError("non-finite logits: the random weights overflowed")
            kept = out.token_index[0]
            result.update(
                tokens_in=int(inputs["input_ids"].shape[1]),
                speech_in=int(is_speech.sum()),
                tokens_per_layer=[int(v.shape[1]) for v in out.cache.key_valid],
                tokens_last=int(out.cache.key_valid[-1].shape[1]),
                speech_last=int(is_speech[kept[kept >= 0]].sum()),
                kv_bytes=kv_cache_bytes(out.cache),
            )
            del out, kept
    result["peak_rss"] = rss_bytes("VmHWM") if peak_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["peak_source"] = "VmHWM since load" if peak_reset else "ru_maxrss (includes loading)"
    result["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["loadavg_end"] = os.getloadavg()[0]
    result["threads"] = torch.get_num_threads()
    result["attn"] = model.language_model.config._attn_implementation
    result["adapter"] = model.route_adapter(inputs["input_ids"])
    result["n_layers"] = len(model.language_model.layers)
    with torch.inference_mode():
        result.update(lm_head_probe(model, result["tokens_last"], dtype))
    return result


# --------------------------------------------------------------------------------------------------
# Driver: one subprocess per (model, case) (or per model), then the table and the docs section.
# --------------------------------------------------------------------------------------------------
def run_worker(spec: dict) -> list[dict]:
    """Run one worker in a fresh interpreter and parse its result line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise RuntimeError(f"worker failed (exit {proc.returncode}) for {spec['plan']['name']} {spec['cases']}")
    results = json.loads(lines[-1][len(RESULT_PREFIX):])
    for r in results:
        r["wall_s"] = (time.perf_counter() - t0) / len(results)
    return results


def default_gap(n_layers: int) -> int:
    """Three pruning points at quarter depths: gap 1 for nano's 4 layers, 7 for mini's 28."""
    return max(1, n_layers // 4)


def machine_info() -> dict:
    import torch
    import transformers

    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have)
                break
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {
        "cpu": cpu,
        "flags": flags,
        "cores": os.cpu_count(),
        "ram_gib": mem / 2**30,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }


def fmt_gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def table(rows: list[dict]) -> str:
    head = (
        "| model | dtype | keep_rate | gap | tokens in | tokens at last layer | speech kept | median prefill s (runs)"
        " | speed-up | speed-up of fastest runs | token-layer ratio | peak RSS GiB | peak ratio | peak - loaded GiB | KV cache MB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        times = ", ".join(f"{t:.2f}" for t in r["times"])
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['keep_rate']:g} | {r['gap']} | {r['tokens_in']} | {r['tokens_last']}"
            f" | {r['speech_last']} / {r['speech_in']} | {r['median_s']:.2f} ({times}) | {r['speedup']:.2f}x"
            f" | {r['speedup_min']:.2f}x | {r['token_layer_ratio']:.2f}x"
            f" | {fmt_gib(r['peak_rss'])} | {r['peak_ratio']:.3f} | {fmt_gib(r['peak_rss'] - r['loaded_rss'])}"
            f" | {r['kv_bytes'] / 1e6:.1f} |"
        )
    return "\n".join(lines)


def docs_section(args, info: dict, rows: list[dict], encoder: dict, started: str, elapsed: float, command: str) -> str:
    minutes = args.minutes
    n_speech = round(minutes * WINDOWS_PER_MINUTE) * SPEECH_TOKENS_PER_WINDOW
    plans = {}
    for r in rows:
        plans.setdefault(r["model"], r)  # the model's baseline row
    notes = []
    for name, r in plans.items():
        stages = " -> ".join(str(n) for n in sorted(set(rows_for(rows, name)[-1]["tokens_per_layer"]), reverse=True))
        mine = rows_for(rows, name)
        kv = ", ".join(f"{x['kv_bytes'] / r['kv_bytes']:.0%} at keep_rate {x['keep_rate']:g}" for x in mine if x["keep_rate"] < 1)
        peaks = ", ".join(f"{x['peak_ratio']:.2f}" for x in mine if x["keep_rate"] < 1)
        notes.append(
            f"{name}: the layers up to the first pruning point see every token, so they set the prefill's peak memory"
            f" (peak ratio {peaks}); the KV cache kept for decoding shrinks to {kv} of the baseline"
        )
        notes.append(
            f"{name}: {r['n_layers']} layers, {r['dtype']}, attention `{r['attn']}`, LoRA adapter `{r['adapter']}` active,"
            f" warm-up: {WARMUPS[r['warmup']]}, {len(r['times'])} timed run(s); keep_rate {rows_for(rows, name)[-1]['keep_rate']:g}"
            f" keeps {stages} tokens per layer group"
        )
    enc = ""
    if encoder:
        enc = "\n".join(
            f"- Whisper encoder of the {m} preset (random weights, same shape), {e['windows']} padded 30 s windows:"
            f" {e['seconds']:.2f} s (median of one batched `encode_speech` call each). Identical for every keep rate and"
            f" not part of the prefill above."
            for m, e in encoder.items()
        ) + "\n"
    loads = [r["loadavg_start"] for r in rows] + [r["loadavg_end"] for r in rows]
    gf = info.get("gflops", {})
    isolation = (
        "all configurations of a model in one process (`--shared-process`), the RSS high-water mark reset before each"
        if args.shared_process else "each configuration in its own fresh process"
    )
    head = "".join(
        f"- Included in every {name} row: the LM head on the last position, `hidden[:, -1:]`, took"
        f" {r['head_slice_s']:.2f} s ({r['dtype']}), the same row re-viewed with standard strides"
        f" (`.reshape(1, 1, -1)`) {r['head_reshape_s']:.3f} s. In bf16 the strided slice makes `F.linear` copy the"
        f" whole (vocab, hidden) weight; a fixed cost per prefill that shrinks the measured speed-ups.\n"
        for name, r in plans.items()
        if r["head_slice_s"] > 5 * r["head_reshape_s"] and r["head_slice_s"] > 0.2
    )
    return f"""## Token extractor (LCME): prefill time and memory on long speech

Written by `bench/bench_extractor.py` on {started} (whole run {elapsed / 60:.1f} min).

```
{command}
```

Machine: {info['cpu']} ({info['flags']}), {info['cores']} cores, {info['ram_gib']:.1f} GiB RAM, torch {info['torch']}
({info['threads']} threads, OMP_WAIT_POLICY={info['omp_wait_policy']}), transformers {info['transformers']}, Python {info['python']}. Load average during the
runs {min(loads):.1f}-{max(loads):.1f} (other jobs shared the CPU, so timings carry some noise).

Prompt: {len(HEADER)} header tokens, {minutes:g} min of speech = {n_speech} `<|speech_pad|>` tokens, then
{args.question_tokens} question tokens (question + chat-template tail; these are the extractor's text queries).
Measured: one `model(input_ids, speech_embeds=..., use_cache=True, logits_to_keep=1)` call, the prefill of
`stream_generate`, under `torch.inference_mode()`; {isolation}.

{table(rows)}

- speed-up = baseline median / median, peak ratio = peak RSS / baseline peak RSS, both against keep_rate 1.0 with
  gap 0 (extractor off) of the same model in the same run. "tokens at last layer" is the sequence the last decoder
  layer saw (and cached); "speech kept" counts speech tokens among them. "token-layer ratio" is the speed-up
  a cost linear in tokens per layer would give (sum over layers of the tokens each saw, baseline / this row);
  attention is quadratic, so pruning saves a bit more there, while fixed costs (LM head, Python) save nothing.
  Other jobs only ever add time, so on a shared machine the fastest-run ratio is the steadier one; a speed-up far
  from the token-layer ratio usually means one side's runs were slowed by contention.
- Peak RSS is the process's high-water mark from the end of loading (model + inputs) to the end of the runs
  ({rows[0]['peak_source']}); "peak - loaded" is its rise above the RSS right after loading (weights + inputs).
  KV cache MB = bytes of every layer's keys and values after the prefill (layers after a pruning point hold fewer).
- Speech enters as precomputed random embeddings (`speech_embeds=`): the Whisper encoder and projector run once
  per 30 s window whatever the keep rate, so they are excluded.
{enc}- Models have random weights (N(0, 0.02), norms 1), built on the meta device and filled in place. The mini model
  is mini-shaped: Qwen2-VL-2B's LLM (28 layers, hidden 1536) with mini's projector and both LoRA adapters, but
  the unused vision tower and Whisper encoder are built with one layer each so memory is the LLM's. Mini runs in
  {args.mini_dtype}: on this CPU a mini-sized linear (2048x1536 by 1536x8960) ran at {gf.get('bfloat16', 0):.0f} GFLOP/s in bf16
  vs {gf.get('float32', 0):.0f} in fp32 (measured at the start of this run), and bf16 halves the weights; nano runs in
  {args.nano_dtype} (the CPU serving default).
{head}- Gap: three pruning points at quarter depths (gap = layers // 4 unless `--gap`); min_keep {args.min_keep}. keep_rate
  applies at every pruning point, so the speech tokens shrink geometrically with depth.
{chr(10).join('- ' + n + '.' for n in notes)}
- With random weights the choice of kept tokens is meaningless; only the cost is measured here. Quality of pruned
  prefill needs trained weights (the reference ships the extractor disabled).
"""


def rows_for(rows: list[dict], name: str) -> list[dict]:
    return [r for r in rows if r["model"] == name]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Prefill time and peak memory of the token extractor (keep_rate 1.0 / 0.5 / 0.25) on long speech.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--minutes", type=float, default=10.0, help="speech length (30 s windows of 300 tokens)")
    p.add_argument("--models", default="nano,mini", help="comma-separated presets to benchmark (nano, mini)")
    p.add_argument("--keep-rates", default="0.5,0.25", help="pruning keep rates (the keep_rate 1.0 baseline always runs)")
    p.add_argument("--gap", type=int, default=None, help="pruning gap for every model (default: layers // 4)")
    p.add_argument("--no-overhead", action="store_true", help="skip keep_rate 1.0 with gap > 0 (scoring overhead)")
    p.add_argument("--runs", type=int, default=3, help="timed prefills per configuration for nano")
    p.add_argument("--mini-runs", type=int, default=3, help="timed prefills per configuration for mini")
    p.add_argument("--mini-warmup", choices=["full", "short", "none"], default="short",
                   help="mini warm-up: a full untimed prefill, one 30 s window, or none (nano always does full)")
    p.add_argument("--mini-dtype", choices=["bfloat16", "float32"], default="bfloat16", help="mini weights/activations")
    p.add_argument("--nano-dtype", choices=["bfloat16", "float32"], default="float32", help="nano weights/activations")
    p.add_argument("--question-tokens", type=int, default=20, help="text tokens after the speech")
    p.add_argument("--min-keep", type=int, default=MIN_KEEP, help="extractor floor on kept multimodal tokens")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention kernel of the LLM")
    p.add_argument("--no-encoder", action="store_true", help="skip timing nano's Whisper encoder on the windows")
    p.add_argument("--docs", type=Path, default=DOCS, help="markdown file whose extractor section is (re)written")
    p.add_argument("--no-docs", action="store_true", help="print only; do not touch the docs file")
    p.add_argument("--json", type=Path, default=None, help="also write every measurement as JSON here")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 minute, nano only, 1 run, one shared process, no encoder timing, docs untouched")
    p.add_argument("--shared-process", action="store_true",
                   help="run all of a model's configurations in one process (faster; peaks then share an allocator)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.models, args.runs, args.no_encoder, args.no_docs = 1.0, "nano", 1, True, True
        args.shared_process = True
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    from lyra.presets import read_preset

    command = "python bench/bench_extractor.py" + ("" if len(sys.argv) <= 1 else " " + shlex.join(sys.argv[1:]))
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t_start = time.perf_counter()
    info = machine_info()
    info["gflops"] = matmul_probe()
    print(f"# {command}\n# {info['cpu']}, {info['cores']} cores, {info['ram_gib']:.1f} GiB, torch {info['torch']};"
          f" linear GFLOP/s {', '.join(f'{k} {v:.0f}' for k, v in info['gflops'].items())}", flush=True)
    keep_rates = [float(k) for k in args.keep_rates.split(",") if k.strip()]
    rows, encoder = [], {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "nano":
            plan = ModelPlan(name, args.nano_dtype, args.runs, "full", shrink_towers=False)
        elif name == "mini":
            plan = ModelPlan(name, args.mini_dtype, args.mini_runs, args.mini_warmup, shrink_towers=True)
        else:
            raise SystemExit(f"--models: unknown model {name!r} (choose nano and/or mini)")
        n_layers = read_preset(name)["backbone"]["text"]["num_hidden_layers"]
        gap = args.gap if args.gap is not None else default_gap(n_layers)
        cases = [Case(1.0, 0)] + ([] if args.no_overhead else [Case(1.0, gap)]) + [Case(k, gap) for k in keep_rates]
        print(f"# {name}: {n_layers} layers, gap {gap} (prune after layers "
              f"{[i for i in range(n_layers - 1) if (i + 1) % gap == 0]}), {plan.dtype}, {plan.runs} run(s)", flush=True)
        spec = {"plan": asdict(plan), "minutes": args.minutes, "attn": args.attn,
                "question_tokens": args.question_tokens, "min_keep": args.min_keep}
        if name == "nano" and not args.no_encoder:
            spec.update(encoder_windows=round(args.minutes * WINDOWS_PER_MINUTE), encoder_runs=args.runs)
        groups = [cases] if args.shared_process else [[c] for c in cases]
        base = None
        for group in groups:
            for case, r in zip(group, run_worker({**spec, "cases": [asdict(c) for c in group]})):
                spec.pop("encoder_windows", None)  # the encoder is timed once per model
                r.update(model=name, dtype=plan.dtype, keep_rate=case.keep_rate, gap=case.gap, warmup=plan.warmup,
                         median_s=statistics.median(r["times"]), shared_process=args.shared_process)
                base = base or r
                r["speedup"] = base["median_s"] / r["median_s"]
                r["speedup_min"] = min(base["times"]) / min(r["times"])
                r["peak_ratio"] = r["peak_rss"] / base["peak_rss"]
                r["token_layer_ratio"] = sum(base["tokens_per_layer"]) / sum(r["tokens_per_layer"])
                if "encoder_s" in r:
                    encoder[name] = {"windows": round(args.minutes * WINDOWS_PER_MINUTE), "seconds": r["encoder_s"]}
                rows.append(r)
                print(f"  keep {case.keep_rate:g} gap {case.gap}: median {r['median_s']:.2f} s"
                      f" [{', '.join(f'{t:.2f}' for t in r['times'])}] speed-up {r['speedup']:.2f}x,"
                      f" tokens {r['tokens_in']} -> {r['tokens_last']} (speech {r['speech_last']}),"
                      f" peak {fmt_gib(r['peak_rss'])} GiB (+{fmt_gib(r['peak_rss'] - r['loaded_rss'])}),"
                      f" KV {r['kv_bytes'] / 1e6:.1f} MB, lm_head {r['head_slice_s']:.2f} s"
                      f" (re-viewed {r['head_reshape_s']:.3f} s), build {r['build_s']:.1f} s,"
                      f" process {r['wall_s']:.0f} s", flush=True)
    elapsed = time.perf_counter() - t_start
    print()
    print(table(rows))
    for m, e in encoder.items():
        print(f"\n{m} Whisper encoder, {e['windows']} windows: {e['seconds']:.2f} s (same for every keep rate; not in prefill)")
    print(f"\nwhole run {elapsed / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "machine": info, "rows": rows, "encoder": encoder}, indent=1))
    if not args.no_docs:
        write_docs(docs_section(args, info, rows, encoder, started, elapsed, command), args.docs,
                   SECTION_START, SECTION_END)
        print(f"wrote the extractor section of {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
