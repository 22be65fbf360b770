"""Recipe: a small ASR test set of real (human) English speech, rebuilt from two pinned PyPI source archives.

    python -m lyra.data.real_speech --out data/real [--cache DIR]
    lyra eval --data data/real --tasks asr        # WER reported as asr/test_real

Every other test set of the project is synthetic speech; this one is 12 recordings of people (48 s in all)
that speech packages ship as test data, with transcripts the packages themselves give:

- pywhispercpp 1.5.1 (MIT): whisper.cpp's ``samples/jfk.wav``, J. F. Kennedy's 1961 inaugural address (a US
  federal government work, public domain). Transcript: the string ``tests/test-vad-full.cpp`` asserts.
- pocketsphinx 5.1.1 (CMU BSD-style licence): ``test/data/goforward.raw`` (transcript asserted by
  ``test/unit/test_jsgf.c``), five LibriVox clips of *Sense and Sensibility* (public-domain recordings;
  transcripts in their ``.txt`` files and in ``librivox/transcription``, which must agree) and five clips of
  spoken playing cards (transcripts in ``cards/cards.transcription``).

Left out on purpose: espnet's ``ctc_align_test.wav`` (where its audio comes from is undocumented) and
pocketsphinx's ``forever/input_2_16k.wav`` (origin unknown; possibly synthetic).

The archives are downloaded from files.pythonhosted.org into a cache (default ``~/.cache/lyra/real_speech``,
or ``$LYRA_CACHE/real_speech``) and checked against the sha256 pinned in ``ARCHIVES``; later runs reuse them.
Only the clips and transcript files are read from them (nothing is unpacked to disk). The transcripts pinned
in ``CLIPS`` (JFK, go forward) are checked against the test code that asserts them, so every transcript is
read from, or verified against, the archive. Layout under OUT::

    asr/test_real.jsonl        ASR records (the format of python -m lyra.data.build) + "source", "license"
    asr/audio/real/<id>.wav    16 kHz mono 16-bit PCM (all sources are already 16 kHz: samples kept exactly)
    SOURCES.md                 per clip: package, archive URL, path inside, licence, transcript, its evidence

Transcripts are verbatim (JFK has capitals and punctuation, pocketsphinx is lower case; one LibriVox reader
says "a more a amiable", and the reference keeps it); ``lyra eval`` normalises both sides before the WER.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from lyra.data.manifest import write_manifest
from lyra.data.synth_speech import write_audio
from lyra.engine.formats import write_atomic

from lyra.assets import default_cache_dir
from lyra.audio import AudioArray, AudioError, load_audio
from lyra.constants import ASR_PROMPT, SAMPLE_RATE

__all__ = ["ARCHIVES", "CLIPS", "Archive", "Clip", "RealSpeechError", "RealSpeechSet", "Transcript", "build",
           "default_cache", "extract", "fetch", "read_transcription", "verify_archive"]

MANIFEST = "asr/test_real.jsonl"  # lyra eval globs asr/test*.jsonl: this set is reported as asr/test_real
AUDIO_DIR = "audio/real"  # clips, relative to the manifest's folder (OUT/asr)
DOWNLOAD_TIMEOUT_S = 60.0  # seconds without progress before a download is given up
_CHUNK_BYTES = 1 << 20  # download and hashing block


class RealSpeechError(RuntimeError):
    """An archive cannot be downloaded, fails its checksum or lacks what the table expects; says the fix."""


@dataclass(frozen=True)
class Archive:
    """One pinned source distribution on PyPI."""

    package: str  # PyPI name
    version: str  # exact release
    url: str  # the sdist on files.pythonhosted.org (any urllib URL; tests use file://)
    sha256: str  # hex digest of the archive, as PyPI lists it
    license: str  # the package's licence and where its text is

    @property
    def filename(self) -> str:
        """The archive's file name (the cache keeps it under this name)."""
        return self.url.rsplit("/", 1)[-1]

    @property
    def pin(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Transcript:
    """Where a clip's transcript is found in its archive.

    kind: "text": the whole file; "sphinx": the line ``<s> words </s> (utterance)`` of a CMU Sphinx transcription
    file whose utterance id is the clip file's stem; "asserted": test code that contains ``pieces`` (its string
    literals, in order), which joined and stripped give the transcript.
    """

    file: str  # path inside the archive
    kind: str  # "text", "sphinx" or "asserted"
    pieces: tuple[str, ...] = ()  # "asserted" only: the string literals the test code compares with

    def __post_init__(self) -> None:
        if self.kind not in ("text", "sphinx", "asserted"):
            raise ValueError(f"transcript kind must be 'text', 'sphinx' or 'asserted', got {self.kind!r}")
        if (self.kind == "asserted") != bool(self.pieces):
            raise ValueError("an 'asserted' transcript needs its string pieces, and only it has them")


@dataclass(frozen=True)
class Clip:
    """One recording of the test set."""

    id: str  # record id (and file name) in the output
    archive: str  # key of ARCHIVES it comes from
    path: str  # file inside the archive: .wav (any rate and channels), or .raw (16 kHz s16le mono, pocketsphinx)
    transcripts: tuple[Transcript, ...]  # every one must give the same text
    how: str  # for SOURCES.md: how the transcript is known
    license: str  # licence of this clip (package and recording)


@dataclass(frozen=True)
class RealSpeechSet:
    """What `extract` / `build` wrote."""

    manifest: Path  # OUT/asr/test_real.jsonl
    sources: Path  # OUT/SOURCES.md
    clips: int  # records written
    seconds: float  # total audio


_PS = "pocketsphinx-5.1.1"
_PS_LICENSE = "BSD-2-Clause-style (CMU Sphinx licence, pocketsphinx-5.1.1/LICENSE)"
_LIBRIVOX_LICENSE = _PS_LICENSE + "; recording from LibriVox (public domain)"
_JFK_LICENSE = ("MIT (package); the recording (J. F. Kennedy inaugural address, 1961) is a US federal government "
                "work, public domain")

ARCHIVES: dict[str, Archive] = {
    "pocketsphinx": Archive(
        "pocketsphinx", "5.1.1",
        "https://files.pythonhosted.org/packages/61/e7/13e0e787ff467218de880310d79cba14424f13b87171ac44af0bde1e428c/"
        "pocketsphinx-5.1.1.tar.gz",
        "675778b309a22dfc9b7d37f7621976bba491d2a5f8c59696bd77fd6d07271355", _PS_LICENSE),
    "pywhispercpp": Archive(
        "pywhispercpp", "1.5.1",
        "https://files.pythonhosted.org/packages/9f/35/610787a277e177e6b7983277a35a2969c0876b46c0d889bc6a0c4b4ac4a7/"
        "pywhispercpp-1.5.1.tar.gz",
        "5df897e5dd9d9f16804fc937bd85b9f5880a0b29a55f8843585e0e03d76195e5",
        "MIT (pywhispercpp-1.5.1/LICENSE; vendored whisper.cpp: pywhispercpp-1.5.1/whisper.cpp/LICENSE)"),
}


def _librivox(n: str) -> Clip:
    stem = f"{_PS}/test/data/librivox/sense_and_sensibility_01_austen_64kb-{n}"
    return Clip(f"ps_librivox_{n}", "pocketsphinx", stem + ".wav",
                (Transcript(stem + ".txt", "text"), Transcript(f"{_PS}/test/data/librivox/transcription", "sphinx")),
                "the sibling .txt file, equal to its line in test/data/librivox/transcription (the reference of "
                "pocketsphinx's alignment tests); verbatim, the reader's repetitions kept", _LIBRIVOX_LICENSE)


def _cards(n: str) -> Clip:
    return Clip(f"ps_cards_{n}", "pocketsphinx", f"{_PS}/test/data/cards/{n}.wav",
                (Transcript(f"{_PS}/test/data/cards/cards.transcription", "sphinx"),),
                "test/data/cards/cards.transcription, the reference of test/regression/test-cards.sh", _PS_LICENSE)


CLIPS: tuple[Clip, ...] = (
    Clip("jfk", "pywhispercpp", "pywhispercpp-1.5.1/whisper.cpp/samples/jfk.wav",
         (Transcript("pywhispercpp-1.5.1/whisper.cpp/tests/test-vad-full.cpp", "asserted",
                     (" And so my fellow Americans, ask not what your country can do for you,",
                      " ask what you can do for your country.")),),
         "whisper.cpp/tests/test-vad-full.cpp asserts this exact string (strcmp with the first segment); it is "
         "also the well-known text of the address", _JFK_LICENSE),
    Clip("ps_goforward", "pocketsphinx", f"{_PS}/test/data/goforward.raw",
         (Transcript(f"{_PS}/test/unit/test_jsgf.c", "asserted", ("go forward ten meters",)),),
         'test/unit/test_jsgf.c asserts strcmp("go forward ten meters", hyp) (so do test_fsg.c and test_senfh.c)',
         _PS_LICENSE),
    *(_librivox(n) for n in ("0870", "0880", "0890", "0920", "0930")),
    *(_cards(n) for n in ("001", "002", "003", "004", "005")),
)

_SPHINX_LINE = re.compile(r"^\s*(?:<s>)?(?P<text>.*?)(?:</s>)?\s*\((?P<utt>[^()\s]+)\)\s*$")


# ---------------------------------------------------------------------- archives


def default_cache() -> Path:
    """Where downloaded archives are kept: ``<Lyra cache root>/real_speech`` (``~/.cache/lyra/real_speech``)."""
    return default_cache_dir() / "real_speech"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_archive(path: str | os.PathLike, archive: Archive) -> Path:
    """``path`` if it is the pinned archive (sha256), else a `RealSpeechError` naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise RealSpeechError(f"{path}: archive not found; run `python -m lyra.data.real_speech --out DIR` to "
                              f"download {archive.filename} from {archive.url}")
    digest = _sha256(path)
    if digest != archive.sha256:
        raise RealSpeechError(
            f"{path}: sha256 is {digest}, but the {archive.pin} sdist {archive.filename} pinned in "
            f"lyra.data.real_speech.ARCHIVES has {archive.sha256}; the file is damaged or a different file. "
            f"Delete it and run again to download it afresh from {archive.url}")
    return path


def fetch(archive: Archive, cache: str | os.PathLike, *, log: Callable[[str], None] | None = None,
          timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """The archive in ``cache`` (downloaded there first unless present), checked against its pinned sha256.

    The download goes to a ``.part`` file that becomes ``cache/<filename>`` only once its checksum is right,
    so an interrupted or wrong download never looks like a cached archive.
    """
    cache = Path(cache).expanduser()
    target = cache / archive.filename
    if target.exists():
        if log:
            log(f"{archive.filename}: cached in {cache}")
        return verify_archive(target, archive)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
    if log:
        log(f"{archive.filename}: downloading {archive.url}")
    try:
        with urllib.request.urlopen(archive.url, timeout=timeout) as response, open(tmp, "wb") as f:
            f.writelines(iter(lambda: response.read(_CHUNK_BYTES), b""))
    except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts and resets are OSErrors
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise RealSpeechError(
            f"could not download {archive.filename} from {archive.url} ({reason}). Check the network connection "
            f"and run again, or download the file by other means and put it at {target} (its sha256 must be "
            f"{archive.sha256})") from None
    digest = _sha256(tmp)
    if digest != archive.sha256:
        tmp.unlink(missing_ok=True)
        raise RealSpeechError(
            f"{archive.url}: the downloaded {archive.filename} has sha256 {digest}, but {archive.sha256} is pinned in "
            "lyra.data.real_speech.ARCHIVES; nothing was kept. Run again (a proxy or a broken transfer can corrupt a "
            "download); if it persists, the registry serves another file and the pin needs checking")
    os.replace(tmp, target)
    return target


def _read_members(path: Path, names: set[str]) -> dict[str, bytes]:
    """The bytes of ``names`` inside the tar archive ``path`` (one pass; nothing is written to disk)."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if member.name in names and member.isfile():
                    found[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise RealSpeechError(f"{path}: cannot read the archive ({exc}); delete it and run again") from None
    missing = sorted(names - set(found))
    if missing:
        raise RealSpeechError(f"{path}: has no {', '.join(missing)}; is it the pinned archive? Delete it and run "
                              "again, or fix the clip table lyra.data.real_speech.CLIPS")
    return found


# ---------------------------------------------------------------------- transcripts and audio


def read_transcription(text: str, utterance: str, *, source: str = "<transcription>") -> str:
    """The words of ``utterance`` in a CMU Sphinx transcription file (lines ``<s> words </s> (utterance)``)."""
    for line in text.splitlines():
        match = _SPHINX_LINE.match(line)
        if match and match["utt"] == utterance:
            return " ".join(match["text"].split())
    raise RealSpeechError(f"{source}: no line for utterance {utterance!r} (expected '<s> words </s> ({utterance})')")


def _transcript(clip: Clip, files: Mapping[str, bytes], archive: Path) -> str:
    """The clip's transcript; every source in ``clip.transcripts`` must give the same words."""
    texts = []
    for t in clip.transcripts:
        where = f"{archive.name}:{t.file}"
        body = files[t.file].decode("utf-8")
        if t.kind == "text":
            text = " ".join(body.split())
        elif t.kind == "sphinx":
            text = read_transcription(body, Path(clip.path).stem, source=where)
        else:
            missing = [p for p in t.pieces if p not in body]
            if missing:
                raise RealSpeechError(f"{where}: does not assert {missing[0]!r}, the transcript pinned for clip "
                                      f"{clip.id!r}; fix lyra.data.real_speech.CLIPS")
            text = "".join(t.pieces).strip()
        if not text:
            raise RealSpeechError(f"{where}: empty transcript for clip {clip.id!r}")
        texts.append((where, text))
    for where, text in texts[1:]:
        if text != texts[0][1]:
            raise RealSpeechError(f"transcripts of clip {clip.id!r} disagree: {texts[0][0]} says {texts[0][1]!r} "
                                  f"but {where} says {text!r}")
    return texts[0][1]


def _wave(clip: Clip, data: bytes, archive: Path) -> np.ndarray:
    """(N,) float32 at 16 kHz: .raw as 16 kHz s16le mono; anything else decoded, downmixed and resampled."""
    where = f"{archive.name}:{clip.path}"
    try:
        if clip.path.endswith(".raw"):
            if len(data) % 2:
                raise AudioError(f"{where}: raw 16-bit audio must have an even number of bytes, got {len(data)}")
            return load_audio(AudioArray(np.frombuffer(data, dtype="<i2"), SAMPLE_RATE))
        return load_audio(data)
    except AudioError as exc:
        raise RealSpeechError(f"{where}: cannot decode the clip ({exc})") from None


# ---------------------------------------------------------------------- the set


def extract(archives: Mapping[str, str | os.PathLike], out: str | os.PathLike, *,
            table: Mapping[str, Archive] | None = None, clips: Sequence[Clip] = CLIPS) -> RealSpeechSet:
    """Write the test set under ``out`` from archives already on disk (no network).

    ``archives`` maps each key of ``table`` (default ``ARCHIVES``) that ``clips`` use to its file; every file is
    checked against the table's sha256 first. Writes ``out/asr/test_real.jsonl``, ``out/asr/audio/real/*.wav``
    and ``out/SOURCES.md`` (each atomically).
    """
    table = ARCHIVES if table is None else table
    out = Path(out)
    asr = out / Path(MANIFEST).parent
    used = list(dict.fromkeys(c.archive for c in clips))
    unknown = [k for k in used if k not in table or k not in archives]
    if unknown:
        raise RealSpeechError(f"no archive given for {unknown}; pass a path for each of {used}")
    paths = {k: verify_archive(archives[k], table[k]) for k in used}
    records, rows = [], []
    for key in used:
        mine = [c for c in clips if c.archive == key]
        names = {c.path for c in mine} | {t.file for c in mine for t in c.transcripts}
        files = _read_members(paths[key], names)
        for clip in mine:
            text = _transcript(clip, files, paths[key])
            wave = _wave(clip, files[clip.path], paths[key])
            rel = f"{AUDIO_DIR}/{clip.id}.wav"
            write_audio(asr / rel, wave)
            seconds = round(len(wave) / SAMPLE_RATE, 3)
            records.append({"id": clip.id, "speech": rel, "speech_asr": text,
                            "conversations": [{"from": "human", "value": f"<speech>\n{ASR_PROMPT}"},
                                              {"from": "gpt", "value": text}],
                            "duration": seconds, "source": f"{table[key].pin}, {clip.path}",
                            "license": clip.license})
            rows.append((clip, table[key], text, seconds))
    order = {c.id: i for i, c in enumerate(clips)}
    records.sort(key=lambda r: order[r["id"]])
    rows.sort(key=lambda r: order[r[0].id])
    n = write_manifest(out / MANIFEST, records)
    sources = out / "SOURCES.md"
    write_atomic(sources, _sources_markdown(rows, [table[k] for k in used]))
    return RealSpeechSet(manifest=out / MANIFEST, sources=sources, clips=n,
                         seconds=round(sum(r["duration"] for r in records), 3))


def build(out: str | os.PathLike, cache: str | os.PathLike | None = None, *,
          table: Mapping[str, Archive] | None = None, clips: Sequence[Clip] = CLIPS,
          log: Callable[[str], None] | None = None) -> RealSpeechSet:
    """Download (or reuse from ``cache``, default `default_cache()`) the pinned archives, then `extract`."""
    table = ARCHIVES if table is None else table
    cache = default_cache() if cache is None else Path(cache)
    used = dict.fromkeys(c.archive for c in clips)
    archives = {k: fetch(table[k], cache, log=log) for k in used}
    return extract(archives, out, table=table, clips=clips)


def _sources_markdown(rows, archives: Sequence[Archive]) -> str:
    total = sum(r[3] for r in rows)
    lines = [
        "# Real English speech from PyPI source archives",
        "",
        (f"Built by `python -m lyra.data.real_speech`: {len(rows)} clips, {total:.1f} s, 16 kHz mono 16-bit PCM WAV "
         "(the sources are 16 kHz 16-bit already, so their samples are kept; `.raw` is read as 16 kHz little-endian "
         "int16 mono). Transcripts are verbatim as the packages give them; normalise before computing a WER "
         "(`lyra eval` does)."),
        "",
        "Archives (sha256 checked):",
    ]
    lines += [f"- {a.pin} sdist: {a.url}  \n  sha256 {a.sha256}; licence: {a.license}" for a in archives]
    lines += ["", "| id | seconds | package | path inside the archive | licence | transcript | how it is known |",
              "|---|---|---|---|---|---|---|"]
    for clip, archive, text, seconds in rows:
        cells = [clip.id, f"{seconds:.2f}", archive.pin, f"`{clip.path}`", clip.license, text, clip.how]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", ("Not included: espnet's `ctc_align_test.wav` (the provenance of its audio is undocumented) and "
                   "pocketsphinx's `test/data/forever/input_2_16k.wav` (origin unknown)."), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- command line


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output folder: OUT/asr/test_real.jsonl, OUT/asr/audio/real/*.wav and OUT/SOURCES.md.")
@click.option("--cache", type=click.Path(path_type=Path), default=None,
              help="Folder for the downloaded archives, reused by later runs "
                   "[default: ~/.cache/lyra/real_speech, or $LYRA_CACHE/real_speech].")
def main(out: Path, cache: Path | None) -> None:
    """Build a small ASR test set of real English speech (12 clips, 48 s) from two PyPI source archives.

    Downloads the pocketsphinx 5.1.1 and pywhispercpp 1.5.1 sdists (44 MB, sha256-pinned) once, reads the
    recordings and their transcripts from them, and writes them in Lyra's manifest format. Evaluate with
    `lyra eval --data OUT --tasks asr` (reported as asr/test_real).
    """
    try:
        result = build(out, cache, log=click.echo)
    except RealSpeechError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{result.clips} clips, {result.seconds:.1f} s of speech -> {result.manifest} (sources: "
               f"{result.sources})")


if __name__ == "__main__":
    main()
