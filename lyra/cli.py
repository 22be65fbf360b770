"""The `lyra` command line: parse, build a config, call a library function."""

from __future__ import annotations

import logging
from pathlib import Path

import click

DTYPES = ("float32", "float16", "bfloat16")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lyra")
@click.option("-v", "--verbose", is_flag=True, help="Log more detail to stderr.")
def main(verbose: bool) -> None:
    """Lyra: a speech-centric omni-model (Qwen2-VL + Whisper) with a long-speech engine."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--model", default=None, help="Model folder or hub id (default: the embedded nano checkpoint).")
@click.option("--max-new-tokens", default=24, show_default=True, help="Length limit of the answer.")
def demo(model: str | None, max_new_tokens: int) -> None:
    """Ask a spoken question about a drawn image and stream the answer."""
    from lyra.demo import run_demo

    run_demo(model, max_new_tokens=max_new_tokens)


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
