"""The `lyra` command line: parse, build a config, call a library function."""

from __future__ import annotations

import logging
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


def _load(model):
    from lyra.pretrained import load_pretrained

    return load_pretrained(model)


def _fail(error: Exception) -> None:
    raise click.ClickException(str(error)) from error




@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lyra")
@click.option("-v", "--verbose", is_flag=True, help="Log more detail to stderr.")
def main(verbose: bool) -> None:
    """Lyra: a speech-centric omni-model (Qwen2-VL + Whisper) with a long-speech engine."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


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
@KEEP_RATE_OPTION
@raw_options
@MODEL_OPTION
def ask(images, audio, text, context, session_dir, max_new_tokens, max_minutes, vad, keep_rate, raw_rate, raw_format,
        raw_channels, model):
    """Ask about images, a lecture (--context / --session) or nothing at all; the answer streams out."""
    from lyra.audio import AudioError
    from lyra.engine.answer import question_text, stream_text
    from lyra.engine.session import SessionError
    from lyra.processing import ImageError, PromptError

    if audio is None and not text and not images:
        raise click.UsageError("give a question: --text, --audio or --image")
    loaded = _load(model)
    _apply_keep_rate(loaded, keep_rate)
    raw = _raw_format(raw_rate, raw_format, raw_channels)
    try:
        save = session_dir if context is not None else None
        session = _context_session(loaded, context, None if context else session_dir, save, vad, raw, max_minutes)
        if session is not None:
            deltas = session.ask(text or "", audio=audio, images=images, max_new_tokens=max_new_tokens)
        else:
            prompt = loaded.processor.apply_chat_template(
                [{"role": "user", "content": question_text(text or "", images=len(images), audio=audio is not None)}]
            )
            inputs = loaded.processor(prompt, images=list(images) or None, audios=[audio] if audio else None)
            deltas = stream_text(loaded.model, loaded.processor, inputs, max_new_tokens=max_new_tokens)
        _print_answer(deltas)
    except (AudioError, ImageError, PromptError, SessionError) as error:
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


if __name__ == "__main__":
    main()
