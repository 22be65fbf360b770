"""Helpers shared by the benchmark scripts: process memory readings and their docs/benchmarks.md sections."""

from __future__ import annotations

import re
from pathlib import Path


def rss_bytes(field: str = "VmRSS", pid: int | str = "self") -> int:
    """Resident set size (or VmHWM, its high-water mark) of a process from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/{pid}/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def write_docs(section: str, path: Path, start: str, end: str) -> None:
    """Add or replace one benchmark's section (between the `start` and `end` markers), leaving the others alone."""
    block = f"{start}\n{section.rstrip()}\n{end}\n"
    if path.exists():
        text = path.read_text()
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
        if pattern.search(text):
            text = pattern.sub(lambda _: block, text, count=1)
        else:
            text = text.rstrip() + "\n\n" + block
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "# Benchmarks\n\nMeasured figures; each section is written by the script it names.\n\n" + block
    path.write_text(text)
