"""Transcript output in whisper's formats (txt, srt, vtt, json), whole or one segment at a time.

Long transcriptions print segments as windows finish and write the whole document at the end; both
paths go through `SegmentStream`, so the streamed text equals `render(...)` byte for byte for
txt, srt and vtt. json is a single document and cannot be streamed: streaming json prints one JSON
object per segment instead (JSON Lines), and the final file is the verbose document of `render`.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from .events import Segment

FORMATS = ("txt", "srt", "vtt", "json")

MS_PER_SECOND = 1000
MS_PER_MINUTE = 60 * MS_PER_SECOND
MS_PER_HOUR = 60 * MS_PER_MINUTE

VTT_HEADER = "WEBVTT\n\n"

_WHITESPACE = re.compile(r"\s+")


def format_timestamp(seconds: float, *, always_hours: bool = False, decimal_marker: str = ".") -> str:
    """`HH:MM:SS<marker>mmm`, or `MM:SS<marker>mmm` below one hour unless `always_hours`.

    SRT: `always_hours=True, decimal_marker=","` -> `00:01:02,345`; VTT: defaults -> `01:02.345`.
    Rounds half up to whole milliseconds of the number as written (0.0005 -> .001, 1.0005 -> .001) and
    carries into seconds, minutes and hours (59.9996 -> `01:00.000`, never `00:59.1000`). Hours have two
    or more digits (`100:00:00,000`).
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"timestamp must be a finite number of seconds >= 0, got {seconds!r}")
    # Decimal(repr) rounds the number people see, not its binary neighbour (1.0005 is 1.000499... in binary).
    total_ms = int(Decimal(repr(float(seconds))).scaleb(3).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    hours, rest = divmod(total_ms, MS_PER_HOUR)
    minutes, rest = divmod(rest, MS_PER_MINUTE)
    secs, ms = divmod(rest, MS_PER_SECOND)
    hours_part = f"{hours:02d}:" if always_hours or hours > 0 else ""
    return f"{hours_part}{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def clean_text(text: str) -> str:
    """Cue text: stripped, every run of whitespace (newlines included) collapsed to one space."""
    return _WHITESPACE.sub(" ", text).strip()


def _vtt_escape(text: str) -> str:
    # WebVTT cue text is HTML-like: `&` and `<` start entities and tags, and `-->` ends a cue payload.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _finite(value: float | None) -> float | None:
    # NaN and infinities are not JSON; whisper-style readers expect a number or null.
    return value if value is not None and math.isfinite(value) else None


def segment_to_dict(segment: Segment) -> dict:
    """Whisper's verbose segment keys: id, start, end, text (as decoded), avg_logprob, compression_ratio, window."""
    return {
        "id": segment.id,
        "start": segment.start,
        "end": segment.end,
        "text": segment.text,
        "avg_logprob": _finite(segment.avg_logprob),
        "compression_ratio": _finite(segment.compression_ratio),
        "window": segment.window,
    }


def segment_from_dict(data: dict) -> Segment:
    """Inverse of `segment_to_dict` (extra keys, such as whisper's `tokens`, are ignored)."""
    return Segment(
        id=int(data["id"]),
        start=float(data["start"]),
        end=float(data["end"]),
        text=str(data["text"]),
        window=int(data["window"]),
        avg_logprob=data.get("avg_logprob"),
        compression_ratio=data.get("compression_ratio"),
    )


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown transcript format {fmt!r}; choose one of {', '.join(FORMATS)}")


def has_cue(segment: Segment, fmt: str) -> bool:
    """Whether `segment` prints anything in `fmt`: txt, srt and vtt skip segments with no text."""
    _check_format(fmt)
    return fmt == "json" or bool(clean_text(segment.text))


def segment_lines(segment: Segment, fmt: str, index: int) -> str:
    """The text one segment adds to a streamed transcript, newline-terminated ("" when skipped).

    `index` is the number of cues already printed on this stream (0 for the first): srt numbers the
    cue `index + 1` and vtt puts the `WEBVTT` header before cue 0. Segments for which `has_cue` is
    false return "" and must not advance `index`; `SegmentStream` does this counting for you.
    txt: the cleaned text on one line. json: one compact JSON object (`segment_to_dict`) per line,
    i.e. JSON Lines, not the final document (use `render` for that).
    """
    _check_format(fmt)
    if fmt == "json":
        return json.dumps(segment_to_dict(segment), ensure_ascii=False, allow_nan=False) + "\n"
    text = clean_text(segment.text)
    if not text:
        return ""
    if fmt == "txt":
        return text + "\n"
    if fmt == "srt":
        start = format_timestamp(segment.start, always_hours=True, decimal_marker=",")
        end = format_timestamp(segment.end, always_hours=True, decimal_marker=",")
        return f"{index + 1}\n{start} --> {end}\n{text}\n\n"
    start, end = format_timestamp(segment.start), format_timestamp(segment.end)
    header = VTT_HEADER if index == 0 else ""
    return f"{header}{start} --> {end}\n{_vtt_escape(text)}\n\n"


@dataclass
class SegmentStream:
    """Streaming state of one transcript on one output: how many cues went out so far.

    `write(segment)` returns what to print now; `finish()` returns what an empty document still needs
    (the vtt header when no cue was printed). Concatenated, they equal `render(segments, fmt)` for
    txt, srt and vtt; for json they are JSON Lines.
    """

    fmt: str
    cues: int = field(default=0)  # cues printed so far (skipped empty segments do not count)

    def __post_init__(self) -> None:
        _check_format(self.fmt)

    def write(self, segment: Segment) -> str:
        if not has_cue(segment, self.fmt):
            return ""
        lines = segment_lines(segment, self.fmt, self.cues)
        self.cues += 1
        return lines

    def finish(self) -> str:
        return VTT_HEADER if self.fmt == "vtt" and self.cues == 0 else ""

    def reset(self) -> None:
        self.cues = 0


def full_text(segments: Iterable[Segment]) -> str:
    """The cleaned texts of the non-empty segments joined by single spaces."""
    return " ".join(t for t in (clean_text(s.text) for s in segments) if t)


def render(
    segments: Iterable[Segment],
    fmt: str,
    *,
    language: str = "en",
    duration: float | None = None,
    text: str | None = None,
) -> str:
    """The whole transcript document in `fmt`.

    json is whisper's verbose shape: {"text", "language", "duration", "segments": [segment_to_dict]},
    where `text` defaults to `full_text(segments)` and `duration` (seconds) to the last segment end.
    `language` and `duration` are used by json only.
    """
    _check_format(fmt)
    segments = list(segments)
    if fmt == "json":
        if duration is None:
            duration = max((s.end for s in segments), default=0.0)
        document = {
            "text": full_text(segments) if text is None else text,
            "language": language,
            "duration": duration,
            "segments": [segment_to_dict(s) for s in segments],
        }
        return json.dumps(document, ensure_ascii=False, allow_nan=False, indent=None) + "\n"
    stream = SegmentStream(fmt)
    return "".join(stream.write(s) for s in segments) + stream.finish()


def _new_file_mode(path: Path) -> int:
    # mkstemp makes 0600 files; keep the mode of the file we replace, else what open() would give.
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux reports it without the set-and-restore race of os.umask
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` so that readers see the old file or the whole new one, never a part.

    Writes a temporary file in the same directory, fsyncs it, `os.replace`s it over `path`, then fsyncs
    the directory. On any error the temporary file is removed and `path` is untouched. "-" (stdout) is
    not a path: callers print to stdout themselves.
    """
    if str(path) == "-":
        raise ValueError("write_atomic writes files; print to stdout yourself for '-'")
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(directory)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename or unlink in `directory` durable (no-op where directories cannot be opened)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
