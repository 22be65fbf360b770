"""Spoken answers: time to the first audio chunk and total time, incremental speech generator vs the reference's
re-run-everything streaming, same run, same weights.

The whole spoken-answer path of the engine runs (`lyra.engine.speak.spoken_events`): LLM decoding, the CTC
speech generator on each token's own state, chunked synthesis with the embedded nano vocoder, events out. Only
the generator's streaming differs:

- incremental (ours): each new token's state is run through the generator once (25 frames, KV cache);
- rerun (reference): after every token the generator is re-run over all states so far and the units past the
  ones already sent are emitted (Lyra / LLaMA-Omni `GenerationWithCTC` streaming), quadratic in the answer.

Model: the nano preset with random weights (LLM hidden 256, generator 2 x 256, upsample 25), EOS disabled so
answers have exactly 50 / 200 / 500 tokens. The random generator's output projection is replaced by a fixed
quantizer so it emits a speech-like number of units per token (`quantizer_head`, reported). Both modes emit the same units and the same audio (checked).
The rerun of long answers is stopped at a time budget; its total is then a lower bound, and the per-token
generator cost at answer positions 50 / 200 / 500 (one isolated step each) shows the growth.

    OMP_NUM_THREADS=1 python bench/bench_speech.py            # a few minutes
    python bench/bench_speech.py --quick --no-docs           # smoke test
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import build_random, write_docs  # bench/ is the script's folder, first on sys.path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION_START = "<!-- bench:speech -->"
SECTION_END = "<!-- /bench:speech -->"
TARGET_UNITS_PER_TOKEN = 8.0  # about what English speech needs: ~3.5 tokens and ~30 collapsed units per second


@dataclass
class Run:
    first_audio_s: float | None  # from the call to the first SpeechChunk (prefill included)
    first_text_s: float | None
    total_s: float  # to the last event (or to the stop)
    tokens: int  # answer tokens decoded
    audio_s: float  # seconds of audio handed out
    stopped: bool = False  # the time budget ran out before the answer ended


@dataclass
class Row:
    tokens: int
    mode: str
    runs: list[Run] = field(default_factory=list)

    def median(self, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.runs if getattr(r, attr) is not None]
        return statistics.median(values) if values else None


def build(args):
    from lyra import LyraProcessor, assets
    from lyra.presets import build_config
    from lyra.vocoder import EMBEDDED_VOCODER, NanoVocoder

    config = build_config("nano")
    config._attn_implementation = "sdpa"
    model = build_random(config, torch.float32)
    processor = LyraProcessor.for_model(config, assets.qwen2_tokenizer())
    vocoder = NanoVocoder.from_pretrained(EMBEDDED_VOCODER)
    if vocoder.num_units != config.settings.speech_generator.num_units:
        raise SystemExit("the embedded nano vocoder does not match the nano generator's units")
    inputs = processor(processor.apply_chat_template([{"role": "user", "content": "Tell me about the harbour."}]))
    # Sampled answers must not hit special tokens (an image or speech placeholder would need features).
    first_special = min(processor.tokenizer.all_special_ids + [config.speech_token_id])
    model.backbone.lm_head.register_forward_hook(lambda m, args, out: out.index_fill(-1, torch.arange(
        first_special, out.shape[-1]), float("-inf")))
    return model, processor, vocoder, inputs


def quantizer_head(model, inputs, tokens: int = 48) -> tuple[float, float]:
    """Give the random generator a hand-built output projection that emits a speech-like number of units.

    Random weights emit the same unit for all 25 frames of a token (about one unit per token, mostly fewer); a
    trained head emits several. Here the generator's layers keep their random weights and output_proj becomes a
    quantizer of one direction d of its input (the main direction of within-token variation on a sample answer):
    logit_u = u (d.h - t0) - k u^2 / 2, so the argmax is round((d.h - t0) / k); k is chosen so a sample answer
    gets TARGET_UNITS_PER_TOKEN units per token. The cost of every step is that of any weights of these sizes.
    Returns (k, units per token on a second sample answer).
    """
    generator = model.speech_generator
    captured = []
    hook = generator.output_proj.register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))

    def sample_states(seed):
        torch.manual_seed(seed)
        steps = list(model.stream_generate(inputs, max_new_tokens=tokens, temperature=1.0, eos_token_id=-1))
        return torch.stack([s.hidden_states for s in steps[1:]] + [steps[-1].final_hidden_states], dim=1)

    states = sample_states(0)  # the benchmark's own answers start like this one (same seed)
    generator.predict(states)
    hook.remove()
    h = captured[-1][0].float()  # (tokens * 25, width): the output projection's input per frame
    per_token = h.reshape(tokens, generator.upsample, -1)
    within = (per_token - per_token.mean(1, keepdim=True)).reshape(-1, h.shape[-1])
    d = torch.linalg.svd(within, full_matrices=False).Vh[0]
    t = h @ d
    units = generator.settings.num_units
    best = None
    for k in torch.logspace(-4, 1, 120).tolist():
        q = torch.round((t - t.min()) / k).clamp(max=units - 1)
        rate = (1 + int((q[1:] != q[:-1]).sum())) / tokens
        if best is None or abs(rate - TARGET_UNITS_PER_TOKEN) < abs(best[1] - TARGET_UNITS_PER_TOKEN):
            best = (k, rate)
    k = best[0]
    t0 = float(t.min())
    u = torch.arange(units, dtype=torch.float32)
    with torch.no_grad():
        generator.output_proj.weight.zero_()
        generator.output_proj.weight[:units] = u[:, None] * d[None]
        generator.output_proj.bias[:units] = -u * t0 - k * u**2 / 2
        generator.output_proj.bias[units] = -1e4  # never blank: every frame carries a unit, runs collapse
    check = sample_states(0)
    return k, len(generator.units(check)[0]) / tokens


def answer(model, processor, vocoder, inputs, tokens: int, rerun: bool, budget: float | None) -> Run:
    from lyra.engine.events import SpeechChunk, TextDelta
    from lyra.engine.speak import spoken_events

    torch.manual_seed(0)  # sampled answer (temperature 1): varied tokens; the same in every run and mode
    start = time.perf_counter()
    steps = model.stream_generate(inputs, max_new_tokens=tokens, temperature=1.0, eos_token_id=-1)
    counted = {"tokens": 0}

    def counting(steps):
        for s in steps:
            counted["tokens"] += 1
            yield s

    events = spoken_events("bench", model, processor, counting(steps), vocoder, rerun=rerun)
    first_audio = first_text = None
    samples = 0
    stopped = False
    for event in events:
        now = time.perf_counter() - start
        if isinstance(event, SpeechChunk):
            samples += len(event.samples)
            first_audio = first_audio if first_audio is not None else now
        elif isinstance(event, TextDelta) and first_text is None:
            first_text = now
        if budget is not None and now > budget:
            stopped = True
            events.close()
            break
    total = time.perf_counter() - start
    return Run(first_audio, first_text, total, counted["tokens"], samples / 16000, stopped)


def generator_step_costs(model, positions: list[int], repeats: int = 3) -> dict[int, tuple[float, float]]:
    """Seconds the generator spends on the token at answer position t: one incremental step (cache of t - 1
    tokens) vs one reference re-run over t states."""
    generator = model.speech_generator
    d = model.config.text_config.hidden_size
    g = torch.Generator().manual_seed(0)
    out = {}
    for t in positions:
        states = torch.randn(1, t, d, generator=g)
        incremental, rerun = [], []
        for _ in range(repeats):
            stream = generator.start(1)
            if t > 1:
                generator.step(states[:, : t - 1], stream)
            t0 = time.perf_counter()
            generator.step(states[:, t - 1:], stream)
            incremental.append(time.perf_counter() - t0)
        for _ in range(1 if t >= 300 else repeats):
            t0 = time.perf_counter()
            generator.rerun(states, 0)
            rerun.append(time.perf_counter() - t0)
        out[t] = (statistics.median(incremental), statistics.median(rerun))
    return out


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def docs_section(args, rows, costs, calibration, units_check, started, elapsed, command) -> str:
    from lyra.presets import build_config

    units = build_config("nano").settings.speech_generator.num_units
    threads = torch.get_num_threads()
    lines = [
        "## Spoken answers: incremental speech generator vs re-running it (reference)",
        "",
        f"Written by `bench/bench_speech.py` on {started:%Y-%m-%d %H:%M} UTC (whole run {elapsed / 60:.1f} min).",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({threads} thread{'s' if threads != 1 else ''}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}: "
        "other jobs shared the 2 cores, so timings carry noise), Python "
        f"{platform.python_version()}. GPU part: not run (no GPU on this task).",
        "",
        "Model: nano preset, random weights (LLM 4 x 256, generator 2 layers x 256, 4 heads, FFN 1024, "
        f"upsample 25, {units} units), float32, SDPA; embedded nano vocoder (trained). Answers are sampled (temperature 1, "
        "same seed in every run and mode) with EOS disabled, so every answer has exactly the listed number of tokens. The generator's random output projection is replaced by a "
        f"fixed quantizer of one direction of its input (`quantizer_head`), so it emits {calibration[1]:.1f} units "
        f"per token like a trained head would (target {TARGET_UNITS_PER_TOKEN:g}; random weights emit about one). "
        "Measured: the whole "
        "engine path (`spoken_events`: decoding, generator, chunked synthesis of 0.2 s then 0.8 s chunks with "
        "full receptive-field lookahead) from the call to the first `SpeechChunk` and to the last event. "
        f"Median of {args.runs} runs where not stopped; the re-run reference is stopped after "
        f"{args.budget:.0f} s (total then reads `> x`).",
        "",
        "| answer tokens | streaming | first text s | first audio s | total s | tokens done | audio s | runs | total ratio (rerun / incremental) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r.tokens, r.mode): r for r in rows}
    for r in rows:
        total = r.median("total_s")
        stopped = any(run.stopped for run in r.runs)
        ratio = ""
        if r.mode == "rerun" and (r.tokens, "incremental") in by_key:
            base = by_key[(r.tokens, "incremental")].median("total_s")
            ratio = (">" if stopped else "") + f"{total / base:.1f}x"
        lines.append(
            f"| {r.tokens} | {r.mode} | {fmt(r.median('first_text_s'))} | {fmt(r.median('first_audio_s'))} | "
            f"{'> ' if stopped else ''}{fmt(total)} | {min(run.tokens for run in r.runs)} | "
            f"{fmt(r.median('audio_s'), 1)} | {len(r.runs)} | {ratio} |"
        )
    lines += [
        "",
        "Generator cost of the token at answer position t (one isolated step, median): the incremental step "
        "runs 25 new frames against a cache; the reference re-runs all 25 t frames.",
        "",
        "| position t | incremental ms | rerun ms | ratio |",
        "|---|---|---|---|",
    ]
    for t, (inc, rerun) in costs.items():
        lines.append(f"| {t} | {inc * 1000:.1f} | {rerun * 1000:.1f} | {rerun / inc:.0f}x |")
    lines += ["", units_check]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokens", default="50,200,500", help="answer lengths")
    p.add_argument("--runs", type=int, default=3, help="runs per configuration (the stopped rerun runs once)")
    p.add_argument("--budget", type=float, default=90.0, help="seconds after which a rerun answer is stopped")
    p.add_argument("--positions", default="50,200,500", help="answer positions of the isolated generator-step costs")
    p.add_argument("--docs", type=Path, default=DOCS)
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--quick", action="store_true", help="20/60 tokens, one run, short budget")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.tokens, args.runs, args.budget, args.positions = "20,60", 1, 20.0, "20,60"
    started = dt.datetime.now(dt.timezone.utc)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    model, processor, vocoder, inputs = build(args)
    calibration = quantizer_head(model, inputs)
    print(f"quantizer head k={calibration[0]:.3g}: {calibration[1]:.1f} units per token", flush=True)
    answer(model, processor, vocoder, inputs, 8, rerun=False, budget=None)  # warm-up

    rows = []
    check = {}
    with torch.inference_mode():
        for tokens in [int(t) for t in args.tokens.split(",")]:
            for mode in ("incremental", "rerun"):
                row = Row(tokens, mode)
                for i in range(args.runs):
                    run = answer(model, processor, vocoder, inputs, tokens, rerun=mode == "rerun",
                                 budget=args.budget if mode == "rerun" else None)
                    row.runs.append(run)
                    print(f"{tokens:4d} {mode:11s} first audio {fmt(run.first_audio_s)} s, total {run.total_s:.2f} s"
                          f"{' (stopped at token %d)' % run.tokens if run.stopped else ''}, audio {run.audio_s:.1f} s",
                          flush=True)
                    if run.stopped:
                        break
                    check.setdefault(tokens, set()).add(round(run.audio_s, 4))
                rows.append(row)
        costs = generator_step_costs(model, [int(t) for t in args.positions.split(",")])
    for t, (inc, rerun) in costs.items():
        print(f"position {t}: incremental {inc * 1000:.1f} ms, rerun {rerun * 1000:.1f} ms", flush=True)
    same = all(len(v) == 1 for v in check.values())
    units_check = ("Both modes produced audio of the same length for every completed answer (same units)."
                   if same else f"WARNING: audio lengths differ between modes: {check}")
    print(units_check)
    elapsed = time.perf_counter() - t_start
    command = "OMP_NUM_THREADS=%s python bench/bench_speech.py %s" % (
        os.environ.get("OMP_NUM_THREADS", ""), shlex.join(sys.argv[1:] if argv is None else argv))
    section = docs_section(args, rows, costs, calibration, units_check, started, elapsed, command.strip())
    print(section)
    if not args.no_docs:
        write_docs(section, args.docs, SECTION_START, SECTION_END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
