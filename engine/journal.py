"""A crash-safe record of finished windows, so a long transcription can `--resume` where it stopped.

The journal is a JSON Lines sidecar file:

    {"lyra_journal": 1, "identity": {"audio": ..., "size": ..., "mtime_ns": ..., "fingerprint": ...,
                                     "model": ..., "settings": {...}}}
    {"window": 0, "segments": [{"id": 0, "start": 0.0, "end": 2.5, "text": ..., ...}, ...]}
    {"window": 1, "segments": []}
    ...

The header names the job (which audio, byte for byte, which model, which settings); every later line is
one finished window with its segments (whisper's verbose segment keys, `formats.segment_to_dict`). Each
line is written with one write, flushed and fsynced, so a killed process leaves at worst a torn last
line, which reading ignores and resuming cuts off before appending.

Where it lives (`journal_path`): next to the output file as `OUT.lyra-journal.jsonl`; when the output is
stdout ("-" or None), in Lyra's cache root (`$LYRA_CACHE`, else `$XDG_CACHE_HOME/lyra`, else
`~/.cache/lyra`) as `journals/<audio name>.<hash of its absolute path>.lyra-journal.jsonl`, because the
audio's own folder may be read-only.

Life cycle, as the transcribe loop uses it:

    journal, done = TranscriptJournal.open(journal_path(output, audio), JobIdentity.of(audio, model, settings),
                                           resume=resume)
    for window in windows:
        if window.index in done: reuse done[window.index]; continue
        segments = decode(window); journal.record(window.index, segments)
    write_atomic(output, render(all_segments, fmt))
    journal.close(completed=True)  # removes the journal; close(completed=False) keeps it for --resume
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .events import Segment
from .formats import fsync_directory, segment_from_dict, segment_to_dict, write_atomic

JOURNAL_VERSION = 1  # bump when the line format changes; older journals then refuse to resume
JOURNAL_SUFFIX = ".lyra-journal.jsonl"
FINGERPRINT_BYTES = 1 << 20  # hash this much from the start and from the end of the audio file


class JournalError(RuntimeError):
    """A journal file that cannot be used (corrupt in the middle, or of another format version)."""


class JournalMismatch(JournalError):
    """The journal belongs to another job: other audio, model or settings."""


def journal_path(output: str | os.PathLike | None, audio: str | os.PathLike) -> Path:
    """Where the journal of the job that writes `output` from `audio` lives (see the module docstring)."""
    if output is not None and str(output) != "-":
        return Path(str(output) + JOURNAL_SUFFIX)
    from lyra.assets import default_cache_dir  # lazy: only stdout jobs need it

    audio = Path(audio).resolve()
    key = hashlib.sha256(str(audio).encode("utf-8")).hexdigest()[:16]
    return default_cache_dir() / "journals" / f"{audio.name}.{key}{JOURNAL_SUFFIX}"


def audio_fingerprint(path: str | os.PathLike, size: int | None = None) -> str:
    """sha256 (hex) of the file size, its first MiB and its last MiB: cheap even for hour-long files."""
    size = os.path.getsize(path) if size is None else size
    digest = hashlib.sha256(str(size).encode("ascii") + b"\n")
    with open(path, "rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(f.read(FINGERPRINT_BYTES))
    return digest.hexdigest()


@dataclass(frozen=True)
class JobIdentity:
    """What must be unchanged for finished windows to be reused."""

    audio: str  # absolute path of the audio file
    size: int  # audio file size, bytes
    mtime_ns: int  # audio file modification time, ns since the epoch
    fingerprint: str  # audio_fingerprint(): sha256 of size, first MiB and last MiB
    model: str  # model id or checkpoint path
    settings: dict[str, Any] = field(default_factory=dict)  # everything else that changes the transcript

    def __post_init__(self) -> None:
        # Compare settings as they read back from JSON (tuples become lists, keys become strings).
        try:
            normalised = json.loads(json.dumps(self.settings, sort_keys=True, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise TypeError(f"journal settings must be JSON values (str, number, bool, None, list, dict): {e}") from e
        object.__setattr__(self, "settings", normalised)

    @classmethod
    def of(cls, audio: str | os.PathLike, model: str, settings: dict[str, Any] | None = None) -> JobIdentity:
        """The identity of transcribing `audio` (read from disk now) with `model` and `settings`."""
        path = Path(audio).resolve()
        stat = path.stat()
        return cls(
            audio=str(path),
            size=stat.st_size,
            mtime_ns=stat.st_mtime_ns,
            fingerprint=audio_fingerprint(path, stat.st_size),
            model=str(model),
            settings=dict(settings or {}),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobIdentity:
        return cls(**{name: data.get(name) for name in ("audio", "size", "mtime_ns", "fingerprint", "model")},
                   settings=data.get("settings") or {})

    def differences(self, other: JobIdentity) -> list[str]:
        """One line per field that differs, `self` being the journal's and `other` this job's."""
        out = []
        labels = {"audio": "audio file path", "size": "audio file size (bytes)",
                  "mtime_ns": "audio file modification time (ns)", "fingerprint": "audio content fingerprint",
                  "model": "model"}
        for name, label in labels.items():
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{label}: journal has {mine!r}, this job has {theirs!r}")
        for key in sorted(set(self.settings) | set(other.settings)):
            missing = "<not set>"
            mine, theirs = self.settings.get(key, missing), other.settings.get(key, missing)
            if mine != theirs:
                out.append(f"setting {key!r}: journal has {mine!r}, this job has {theirs!r}")
        return out


@dataclass(frozen=True)
class _Contents:
    identity: JobIdentity | None  # None when even the header line is torn or missing
    windows: dict[int, list[Segment]]  # window index -> its segments, in window order
    good_bytes: int  # length of the intact prefix (everything after it is a torn line)


def _read(path: Path) -> _Contents:
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline, a torn write if not empty
    identity, windows, good_bytes = None, {}, 0
    for number, raw in enumerate(complete, start=1):
        try:
            record = json.loads(raw)
            if number == 1:
                if record.get("lyra_journal") != JOURNAL_VERSION:
                    raise JournalError(
                        f"{path} is a journal of format version {record.get('lyra_journal')!r}, this Lyra "
                        f"reads version {JOURNAL_VERSION}; run without --resume to start over")
                identity = JobIdentity.from_dict(record["identity"])
            else:
                windows[int(record["window"])] = [segment_from_dict(s) for s in record["segments"]]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if number == len(complete) and not tail:
                break  # a torn last line that happened to end in a newline byte
            raise JournalError(f"{path} line {number} is corrupt ({e}); delete it, or run without --resume "
                               "to start over") from e
        good_bytes += len(raw) + 1
    return _Contents(identity, dict(sorted(windows.items())), good_bytes)


class TranscriptJournal:
    """Append-only, fsynced record of finished windows of one transcription job. Use `open`."""

    def __init__(self, path: Path, identity: JobIdentity, file) -> None:
        self.path = path
        self.identity = identity
        self._file = file  # binary, append mode; None once closed

    @classmethod
    def open(cls, path: str | os.PathLike, identity: JobIdentity,
             resume: bool) -> tuple[TranscriptJournal, dict[int, list[Segment]]]:
        """Open the journal at `path` for `identity`; return it and the windows already finished.

        resume=True: an existing journal of the same identity gives back its finished windows
        (window index -> segments) and is appended to; a torn last line is dropped first. A journal of
        another identity raises `JournalMismatch` naming every differing field. No journal, or one
        without an intact header, starts empty. resume=False: any existing journal is replaced.
        """
        path = Path(path)
        if resume and path.exists():
            contents = _read(path)
            if contents.identity is not None:
                diffs = contents.identity.differences(identity)
                if diffs:
                    raise JournalMismatch(
                        f"cannot resume from {path}: it was written for another job.\n  "
                        + "\n  ".join(diffs)
                        + f"\nRun without --resume to start over (this replaces the journal), or delete {path}.")
                file = open(path, "r+b")  # noqa: SIM115 (held open by the journal until close())
                file.truncate(contents.good_bytes)  # cut a torn last line, or the next record would extend it
                file.seek(contents.good_bytes)
                os.fsync(file.fileno())
                return cls(path, identity, file), contents.windows
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"lyra_journal": JOURNAL_VERSION, "identity": asdict(identity)}
        write_atomic(path, json.dumps(header, ensure_ascii=False, allow_nan=False) + "\n")
        return cls(path, identity, open(path, "ab")), {}

    def record(self, window_index: int, segments: list[Segment]) -> None:
        """Durably note that window `window_index` finished with `segments` (may be empty: silence)."""
        if self._file is None:
            raise JournalError(f"journal {self.path} is closed")
        line = {"window": int(window_index), "segments": [segment_to_dict(s) for s in segments]}
        self._file.write((json.dumps(line, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self, completed: bool) -> None:
        """Stop recording. completed=True (call it after the final output was written) removes the journal;
        completed=False keeps it for `--resume`. Closing twice is harmless."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if completed and self.path.exists():
            self.path.unlink()
            fsync_directory(self.path.parent)

    def __enter__(self) -> TranscriptJournal:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc) -> None:
        self.close(completed=False)  # completion must be explicit; leaving by an error keeps the journal
