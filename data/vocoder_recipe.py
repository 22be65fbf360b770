"""Recipe: build the embedded nano vocoder (and its unit inventory) from the project's own speech, on a CPU.

    python -m lyra.data.vocoder_recipe --out lyra/checkpoints/nano_vocoder

1. Speech: sentences of the nano corpus (the words the model answers with: `lyra.data.corpus`, training split)
   and answers to drawn-image questions ("The circle is red."), in one voice (`--voice`: by default the spoken
   answers' `ANSWER_VOICE`, Piper without its sampling noise; or espeak-ng, or Piper with noise), at 16 kHz.
2. Units: 20 ms log-mel frames (pairs of Whisper's 10 ms frames, standardised) of the training speech,
   k-means (seeded), assigned along the cheapest path with a cost per change of unit (`--switch-cost`, in mean
   squared distances of a frame to its nearest centroid), so that runs do not flicker; see lyra/data/units.py.
3. Targets: per 10 ms, the spectral envelope (band powers) and voicing degree of the real audio
   (`NanoVocoder.analyze`); per collapsed unit, its run length in frames.
4. Training: the envelope stack (L1 on log band power + BCE on voicing) on random 2.5 s crops, and the
   duration predictor (MSE on log(frames + 1)), AdamW, about 16 minutes together on one thread. Twice the
   speech of the first Piper vocoder, four times its envelope steps, twice its duration steps and a duration
   predictor that sees 8 units on each side cut the spoken answers' ASR-WER from 48.4% to 43.6% (docs/nano.md,
   run 14).
5. Check: held-out sentences (other templates and words, and held-out corpus sentences and image answers) ->
   units -> durations -> audio -> Whisper tiny.en, word error rate against the text; the original audio is
   transcribed too, as the ceiling, and the units are rendered at their true lengths, to tell what the predicted
   durations cost.

The folder gets config.json, model.safetensors (fp16, with the k-means centroids as `kmeans.centroids`) and
recipe.json (the settings and measured figures).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lyra.data.corpus import SentenceGenerator
from lyra.data.speech_eval import WhisperTranscriber, word_error_rate
from lyra.data.synth_images import make_image_qa
from lyra.data.synth_speech import ANSWER_VOICE, Voice, Voices
from lyra.data.units import (
    CENTROIDS_KEY,
    FEATURES,
    FEATURES_KEY,
    MEAN_KEY,
    STD_KEY,
    SWITCH_COST_KEY,
    UnitExtractor,
    dedup,
    feature_extractor,
    fit_kmeans,
    log_mel_frames,
)
from tqdm import tqdm

from lyra.constants import SAMPLE_RATE
from lyra.vocoder import EMBEDDED_VOCODER, NanoVocoder, NanoVocoderConfig

SPEED = 160  # espeak-ng words per minute of `--voice espeak` (the first nano vocoder's voice)

# ---- sentences ---------------------------------------------------------------------------------------
_CORPUS_SEED = 1000  # the recipe's corpus sentences are drawn with this seed (+ the recipe's own seed)
HELD_OUT_CORPUS = 30  # held-out corpus sentences (its test split: never in any training set) ...
HELD_OUT_ANSWERS = 10  # ... and image answers of other drawings, for the second check
# Held out: other templates and many other words, so the check measures units, not memorised sentences.
HELD_OUT = [
    "Please remember to switch off the lights when you leave the office.",
    "The weather forecast says it will be sunny and warm tomorrow.",
    "Could you tell me how to get to the nearest train station?",
    "She bought a loaf of bread, some cheese and a bottle of milk.",
    "We are planning a trip to the mountains next summer.",
    "The meeting has been moved to Thursday afternoon at three o'clock.",
    "He plays the guitar every evening after dinner.",
    "This restaurant serves the best soup in town.",
    "I forgot my umbrella, so I got wet on the way home.",
    "The children were laughing and running around the playground.",
    "Turn left at the traffic lights and walk for five minutes.",
    "My favourite season is autumn because of the colourful leaves.",
    "The library closes early on Sundays.",
    "They watched a documentary about whales last night.",
    "Water boils at one hundred degrees Celsius.",
    "Let me know if you need any help with your homework.",
    "The train was delayed by twenty minutes this morning.",
    "A good night's sleep is important for your health.",
    "Our team won the football match by two goals.",
    "The museum has a famous collection of paintings.",
]


def corpus_sentences(n: int, answers: int, split: str, seed: int = 0) -> list[str]:
    """`n` distinct sentences of the nano corpus's `split` and `answers` whole answers to drawn-image questions
    (deterministic for a seed; another seed or split gives other sentences)."""
    texts = [s.text for s in SentenceGenerator(_CORPUS_SEED + seed).generate(n, split)]
    offset = 0 if split == "train" else 1 << 20
    texts += [make_image_qa(random.Random(f"vocoder-answer-{seed}-{offset + i}")).answer_sentence for i in range(answers)]
    return texts


def parse_voice(spec: str) -> Voice:
    """`espeak:160` (espeak-ng en-us, words per minute), `piper:1.0` (the Piper voice, length scale) or
    `piper:1.0:fixed` (the Piper voice without its sampling noise: every text spoken the same way each time)."""
    engine, _, rest = spec.partition(":")
    rate, _, flag = rest.partition(":")
    try:
        if flag not in ("", "fixed") or (flag and engine != "piper"):
            raise ValueError(f"unknown voice option {flag!r}")
        return Voice(engine, float(rate or (SPEED if engine == "espeak" else 1.0)), noise=flag != "fixed")
    except ValueError as exc:
        raise ValueError(f"--voice {spec!r}: {exc} (use espeak:WPM, piper:LENGTH_SCALE or "
                         "piper:LENGTH_SCALE:fixed)") from None


def voice_spec(voice: Voice) -> str:
    """The `--voice` spelling of a voice (the inverse of `parse_voice`)."""
    return f"{voice.engine}:{voice.rate:g}" + ("" if voice.noise or voice.engine != "piper" else ":fixed")


# ---- training ----------------------------------------------------------------------------------------
@dataclass
class RecipeSettings:
    """What the recipe ran with (saved to recipe.json)."""

    sentences: int = 2400  # training sentences of the nano corpus (with the answers below: about 3 hours)
    answers: int = 800  # training answers to drawn-image questions
    clusters: int = 512  # k-means units (a units_from run keeps that vocoder's)
    switch_cost: float = 1.0  # cost of a change of unit, in mean squared frame-to-nearest-centroid distances
    seed: int = 0  # seeds the sentences, k-means and training
    envelope_steps: int = 16000  # optimiser steps of the envelope stack
    duration_steps: int = 6000  # optimiser steps of the duration predictor
    batch: int = 16  # crops (envelope) or sentences (durations) per optimiser step
    crop_frames: int = 128  # envelope training crop, in 20 ms frames (2.56 s)
    lr: float = 2e-3  # peak learning rate (one-cycle schedule)
    threads: int = 1  # torch threads (Piper speaks with one)
    channels: int = 160  # envelope conv stack width
    duration_dropout: float = 0.1  # duration predictor dropout
    duration_kernel: int = 9  # duration predictor kernel (units): it sees 8 units on each side
    units_from: str = ""  # a nano vocoder folder whose units to keep (no k-means): a trained generator stays valid
    voice: str = voice_spec(ANSWER_VOICE)  # espeak:WPM, piper:LENGTH_SCALE or piper:LENGTH_SCALE:fixed


def estimate_f0(vocoder: NanoVocoder, waves: list[np.ndarray]) -> float:
    """Median pitch (Hz) of clearly voiced 32 ms frames: the lag of the autocorrelation peak (70-400 Hz)."""
    c = vocoder.config
    lo, hi = int(c.sample_rate / 400), int(c.sample_rate / 70)
    size = 2 * c.n_fft
    # The window's own autocorrelation tapers long lags; dividing by it avoids octave errors.
    wac = torch.fft.irfft(torch.fft.rfft(vocoder.window, size).abs() ** 2, size)[: c.n_fft]
    f0s = []
    for wave in waves:
        frames = torch.from_numpy(wave).unfold(0, c.n_fft, c.hop) * vocoder.window
        ac = torch.fft.irfft(torch.fft.rfft(frames, size).abs() ** 2, size)[:, : c.n_fft]
        r = (ac[:, lo:hi] / ac[:, :1].clamp(min=1e-9)) / (wac[lo:hi] / wac[0])
        peak, lag = r.max(1)
        voiced = (peak > 0.6) & (ac[:, 0] > ac[:, 0].max() * 1e-3)
        f0s.append(c.sample_rate / (lag[voiced] + lo).float())
    return float(torch.cat(f0s).median())


def _crops(units: torch.Tensor, log_power: torch.Tensor, voicing: torch.Tensor, size: int, batch: int,
           g: torch.Generator):
    starts = torch.randint(0, units.shape[0] - size, (batch,), generator=g)
    u = torch.stack([units[s:s + size] for s in starts])
    lp = torch.stack([log_power[2 * s:2 * (s + size)] for s in starts])
    v = torch.stack([voicing[2 * s:2 * (s + size)] for s in starts])
    return u, lp, v


def train_envelope(vocoder: NanoVocoder, data: list[dict], settings: RecipeSettings, log) -> float:
    """Fit the conv stack on the concatenated utterances; returns the final L1 of log band power."""
    units = torch.cat([d["frames"] for d in data])
    log_power = torch.cat([d["log_power"] for d in data])
    voicing = torch.cat([d["voicing"] for d in data])
    params = [p for n, p in vocoder.named_parameters() if not n.startswith(("duration", "duration_embed"))]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=settings.envelope_steps, pct_start=0.05)
    g = torch.Generator().manual_seed(settings.seed)
    vocoder.train()
    recent = []
    for step in range(settings.envelope_steps):
        u, lp, v = _crops(units, log_power, voicing, settings.crop_frames, settings.batch, g)
        pred_lp, pred_v = vocoder.envelope_logits(u)
        l1 = (pred_lp - lp).abs().mean()
        loss = l1 + 0.5 * F.binary_cross_entropy_with_logits(pred_v, v)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        recent.append(float(l1.detach()))
        if (step + 1) % 250 == 0:
            log(f"envelope step {step + 1}: L1 {np.mean(recent[-250:]):.3f}")
    vocoder.eval()
    return float(np.mean(recent[-100:]))


def train_durations(vocoder: NanoVocoder, data: list[dict], settings: RecipeSettings, log) -> float:
    """Fit the duration predictor on collapsed units and their run lengths; returns the final MSE."""
    seqs = [(torch.tensor(d["units"]), torch.tensor(d["counts"], dtype=torch.float)) for d in data]
    params = list(vocoder.duration.parameters()) + list(vocoder.duration_embed.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=settings.duration_steps, pct_start=0.05)
    rng = random.Random(settings.seed)
    vocoder.train()
    recent = []
    for step in range(settings.duration_steps):
        batch = rng.sample(seqs, min(settings.batch, len(seqs)))
        width = max(len(u) for u, _ in batch)
        units = torch.zeros(len(batch), width, dtype=torch.long)
        target = torch.zeros(len(batch), width)
        mask = torch.zeros(len(batch), width, dtype=torch.bool)
        for i, (u, c) in enumerate(batch):
            units[i, : len(u)], target[i, : len(u)], mask[i, : len(u)] = u, torch.log(c + 1), True
        pred = vocoder.predict_log_durations(units)
        loss = ((pred - target) ** 2)[mask].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        recent.append(float(loss.detach()))
        if (step + 1) % 250 == 0:
            log(f"duration step {step + 1}: MSE {np.mean(recent[-250:]):.4f}")
    vocoder.eval()
    return float(np.mean(recent[-100:]))


@torch.inference_mode()
def fit_duration_scale(vocoder: NanoVocoder, data: list[dict]) -> float:
    """The factor on predicted frames (before rounding) that makes the rounded total match the true total: the
    log-domain regression under-predicts long runs, so speech would come out faster than it was."""
    predicted = torch.cat([torch.exp(vocoder.predict_log_durations(torch.tensor(d["units"])[None])[0]) - 1 for d in data])
    true_total = sum(sum(d["counts"]) for d in data)
    scales = torch.linspace(0.8, 1.6, 161)
    totals = torch.stack([torch.round(predicted * s).clamp(min=1).sum() for s in scales])
    return round(float(scales[(totals - true_total).abs().argmin()]), 3)


def build(out: Path, settings: RecipeSettings, log=print) -> dict:
    """Run the whole recipe; writes the vocoder folder and returns the report."""
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    t0 = time.time()
    # A vocoder whose units are kept is read first: a wrong folder fails now, not after minutes of speech.
    kept = UnitExtractor.from_pretrained(settings.units_from) if settings.units_from else None
    voice = parse_voice(settings.voice)
    voices = Voices(piper_threads=1)

    def speak(text: str) -> np.ndarray:
        return voices(text, voice)

    texts = corpus_sentences(settings.sentences, settings.answers, "train", settings.seed)
    waves = [speak(t) for t in tqdm(texts, desc="speaking", unit="sentence", leave=False)]
    hours = sum(len(w) for w in waves) / SAMPLE_RATE / 3600
    log(f"{len(waves)} sentences, {hours * 60:.1f} min of speech ({time.time() - t0:.0f} s)")

    mel = feature_extractor()
    feats = [log_mel_frames(mel, w) for w in waves]
    everything = torch.cat(feats)
    log(f"log-mel features: {len(everything)} frames ({time.time() - t0:.0f} s)")
    if kept is not None:
        extractor = kept
        switch_cost = extractor.switch_cost
        log(f"units of {settings.units_from}: {extractor.num_units}, switch cost {switch_cost:.1f}")
    else:
        mean, std = everything.mean(0), everything.std(0) + 1e-5
        extractor = UnitExtractor(fit_kmeans((everything - mean) / std, settings.clusters, seed=settings.seed), mean, std)
        nearest = float(extractor.distances(everything).min(1).values.mean())
        extractor.switch_cost = switch_cost = settings.switch_cost * nearest
        log(f"k-means {settings.clusters}, switch cost {switch_cost:.1f} ({time.time() - t0:.0f} s)")

    probe = NanoVocoder(NanoVocoderConfig(num_units=extractor.num_units, channels=settings.channels,
                                          duration_dropout=settings.duration_dropout,
                                          duration_kernel=settings.duration_kernel))
    f0 = round(estimate_f0(probe, waves), 1)
    config = replace(probe.config, f0=f0)
    vocoder = NanoVocoder(config)
    log(f"median f0 {f0} Hz")
    data = []
    for wave, feat in zip(waves, feats):
        frames = extractor.assign(feat)
        env = vocoder.analyze(torch.from_numpy(wave))
        n = min(len(frames), env.log_power.shape[0] // 2)
        units, counts = dedup(frames[:n].tolist())
        data.append({"frames": frames[:n], "log_power": env.log_power[: 2 * n], "voicing": env.voicing[: 2 * n],
                     "units": units, "counts": counts})
    frames_per_unit = float(np.mean([c for d in data for c in d["counts"]]))
    log(f"{sum(len(d['units']) for d in data)} collapsed units, {frames_per_unit:.2f} frames each on average")

    t_train = time.time()
    envelope_l1 = train_envelope(vocoder, data, settings, log)
    duration_mse = train_durations(vocoder, data, settings, log)
    scale = fit_duration_scale(vocoder, data)
    fitted = NanoVocoder(replace(vocoder.config, duration_scale=scale))
    fitted.load_state_dict(vocoder.state_dict())
    vocoder = fitted.eval()
    log(f"duration scale {scale}")
    train_s = time.time() - t_train
    log(f"trained in {train_s:.0f} s")

    transcriber = WhisperTranscriber()
    checks = {"held_out": HELD_OUT,
              "held_out_corpus": corpus_sentences(HELD_OUT_CORPUS, HELD_OUT_ANSWERS, "test", settings.seed)}
    figures, examples = {}, []
    for name, held_out in checks.items():
        original, resynth, true_dur = [], [], []
        for text in tqdm(held_out, desc=name, unit="sentence", leave=False):
            wave = speak(text)
            frames = extractor.frame_units(wave)
            units, _ = dedup(frames.tolist())
            original.append(transcriber(wave))
            resynth.append(transcriber(vocoder.synthesize(units)))
            with torch.inference_mode():
                audio = vocoder.synthesize_frames(frames, 0).numpy()
            true_dur.append(transcriber(audio))
        prefix = "wer" if name == "held_out" else f"{name}_wer"
        figures.update({f"{name}_sentences": len(held_out),
                        f"{prefix}_original": round(word_error_rate(held_out, original), 4),
                        f"{prefix}_resynthesized": round(word_error_rate(held_out, resynth), 4),
                        f"{prefix}_resynthesized_true_durations": round(word_error_rate(held_out, true_dur), 4)})
        examples += [{"text": r, "original": o, "resynthesized": s}
                     for r, o, s in list(zip(held_out, original, resynth))[:5]]
    report = {
        "settings": asdict(settings),
        "voice": voice.to_json(),
        "training_minutes": round(hours * 60, 2),
        "f0_hz": f0,
        "frames_per_unit": round(frames_per_unit, 3),
        "envelope_l1": round(envelope_l1, 4),
        "duration_mse": round(duration_mse, 4),
        "duration_scale": scale,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t0, 1),
        "switch_cost": round(switch_cost, 3),
        **figures,
        "examples": examples,
        "parameters": sum(p.numel() for p in vocoder.parameters()),
    }
    log(json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=1))
    vocoder.save_pretrained(out, extra={CENTROIDS_KEY: extractor.centroids, MEAN_KEY: extractor.mean,
                                        STD_KEY: extractor.std, SWITCH_COST_KEY: torch.tensor(switch_cost)},
                            metadata={FEATURES_KEY: FEATURES})
    (out / "recipe.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _field_comments() -> dict[str, str]:
    """RecipeSettings' field comments, as --help text."""
    import inspect
    import re

    found = re.findall(r"^    (\w+): [^=]+= .+?  # (.+)$", inspect.getsource(RecipeSettings), re.MULTILINE)
    return dict(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=EMBEDDED_VOCODER, help="vocoder folder to write")
    comments = _field_comments()
    for f, default in asdict(RecipeSettings()).items():
        flag, help_text = f"--{f.replace('_', '-')}", comments.get(f, "")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_text)
    args = parser.parse_args(argv)
    settings = RecipeSettings(**{f: getattr(args, f) for f in asdict(RecipeSettings())})
    build(args.out, settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
