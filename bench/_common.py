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


def build_random(config, dtype):
    """A model of `config`'s shape with N(0, 0.02) weights (norms 1, biases 0), built on the meta device and filled."""
    import torch
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, Qwen2VLVisionRotaryEmbedding

    from lyra import LyraForConditionalGeneration

    with torch.device("meta"):
        model = LyraForConditionalGeneration(config)
    model.to_empty(device="cpu")
    model.to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or name.endswith("ln.weight")):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=generator)
    # Rotary tables are buffers computed in __init__; to_empty left them uninitialised.
    for path, module in list(model.named_modules()):
        if isinstance(module, (Qwen2VLRotaryEmbedding, Qwen2VLVisionRotaryEmbedding)):
            parent_path, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent_path), attr, type(module)(module.config))
    others = [n for n, _ in model.named_buffers() if not n.endswith("inv_freq")]
    if others:
        raise RuntimeError(f"buffers the meta build does not initialise: {others}")
    if config.tie_word_embeddings:
        model.backbone.lm_head.weight = model.get_input_embeddings().weight
    return model.eval()
