"""CTC speech generator: the LLM's answer states -> discrete speech units, offline and incrementally.

The design is the reference's (Lyra / LLaMA-Omni `SpeechGeneratorCTC`): each answer-token state (final, normed
LLM hidden state) is repeated `upsample` times, projected (`input_proj`), run through a few causal Qwen2 decoder
layers and projected to the units plus a CTC blank (`output_proj`); training uses CTC against the answer's speech
units. The parameter names match the reference's `speech_generator.*` weights, so released weights load as is.

Differences from the reference:
- Positions. Training reads the state at each answer token's own position (where `labels` hold the token); so
  does inference here. The reference's inference feeds the states that *predict* the answer tokens, one position
  earlier than what it was trained on.
- Streaming. The decoder layers are causal, so the frames of answer token t depend only on tokens <= t. A
  `GeneratorStream` keeps the layers' key/value cache and the last frame's prediction; each new token costs
  `upsample` frames of work. The reference re-runs the whole head over all states after every token
  (quadratic in the answer length) and emits the units past the ones it already sent.
- Frame positions (optional, `GeneratorConfig.frame_positions`). The `upsample` copies of one state differ only
  through what they attend to before them, and the first answer token's copies see nothing but each other: equal
  inputs to causal layers give equal outputs, so the first token says one unit at most (the nano model lost the
  first word of its sentences and spoke one-word answers as silence). A learned embedding of each frame's place
  within its token, added after `input_proj`, tells the copies apart.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, Qwen2Config
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from lyra.configuration import GeneratorConfig
from lyra.constants import IGNORE_INDEX, ZERO_INIT


@dataclass
class GeneratorOutput:
    """What the generator's offline forward returns.

    logits: (B, F, num_units + 1) per-frame unit logits (the last id is the CTC blank).
    frame_mask: (B, F) bool, False for padding frames.
    loss: CTC loss (summed over the batch, divided by the number of target units), when targets were given.
    """

    logits: torch.Tensor
    frame_mask: torch.Tensor
    loss: torch.Tensor | None = None


@dataclass
class GeneratorStream:
    """Incremental state of B answers spoken together; start a fresh one per answer (`SpeechGenerator.start`).

    kv: the decoder layers' key/value cache: num_layers x 2 x (B, heads, frames, head_dim). It grows by
        `upsample` frames per answer token, so memory is bounded by the answer length (max_new_tokens).
    frames: frames decoded so far (every stream advances together).
    last_frame: (B,) the previous frame's prediction (the blank before the first), for CTC collapse.
    """

    kv: DynamicCache
    frames: int
    last_frame: torch.Tensor
    kv_config: Qwen2Config | None = None  # the layers' config, to rebuild the cache on reset
    blank: int = 0  # id of the CTC blank

    def reset(self) -> None:
        """Forget everything: the next state starts a new answer."""
        self.kv = DynamicCache(config=self.kv_config)
        self.frames = 0
        self.last_frame = torch.full_like(self.last_frame, self.blank)


@dataclass
class StreamStep:
    """Output of one `SpeechGenerator.step`: the raw frame predictions and the new collapsed units."""

    frames: torch.Tensor  # (B, n * upsample) argmax per frame, blank included
    units: list[list[int]]  # per stream, the units these frames add after CTC collapse (may be empty)


def ctc_collapse(frames: torch.Tensor, blank: int, previous: torch.Tensor | None = None) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy CTC collapse of frame predictions (B, F): merge repeats, drop blanks.

    `previous` (B,) is the last frame of the preceding chunk (None or blank at the start), so a unit that
    straddles a chunk border is emitted once. Returns the units per stream and the new last frame (B,).
    """
    b, n = frames.shape
    if previous is None:
        previous = torch.full((b,), blank, dtype=frames.dtype, device=frames.device)
    if n == 0:
        return [[] for _ in range(b)], previous
    before = torch.cat([previous[:, None].to(frames.dtype), frames[:, :-1]], dim=1)
    keep = (frames != blank) & (frames != before)
    units = [frames[i][keep[i]].tolist() for i in range(b)]
    return units, frames[:, -1].clone()


def answer_states(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The states at the answer tokens' own positions: where `labels` (B, L) hold a token, not IGNORE_INDEX.

    hidden (B, L, D) are the final normed LLM states. Returns left-aligned (B, T, D) states and a (B, T) mask.
    """
    keep = labels != IGNORE_INDEX
    counts = keep.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    out = hidden.new_zeros(hidden.shape[0], width, hidden.shape[-1])
    mask = torch.arange(width, device=hidden.device)[None] < counts[:, None]
    out[mask] = hidden[keep]
    return out, mask


def layer_config(settings: GeneratorConfig, text_config, attn_implementation: str | None) -> Qwen2Config:
    """The Qwen2 config of the generator's decoder layers (RMSNorm eps and RoPE base from the LLM, as in the
    reference, which deep-copies the LLM config and changes the sizes)."""
    rope = getattr(text_config, "rope_parameters", None) or {}
    config = Qwen2Config(
        vocab_size=settings.num_units + 1,
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        rms_norm_eps=text_config.rms_norm_eps,
        hidden_act="silu",
        max_position_embeddings=1 << 20,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope.get("rope_theta", 1e6))},
        attention_dropout=0.0,
        use_sliding_window=False,
    )
    config._attn_implementation = attn_implementation or "sdpa"
    return config


class SpeechGenerator(nn.Module):
    """CTC head: answer-token states (B, T, D_llm) -> unit logits at `upsample` frames per token.

    Args:
        settings: sizes, unit inventory and upsampling (`GeneratorConfig`).
        text_config: the LLM's config (its width is the input width; RMSNorm eps and RoPE base are shared).
        attn_implementation: "eager", "sdpa" or "flash_attention_2", usually the LLM's.
    """

    def __init__(self, settings: GeneratorConfig, text_config, attn_implementation: str | None = None):
        super().__init__()
        self.settings = settings
        self.upsample = settings.upsample
        self.blank = settings.blank
        self.config = layer_config(settings, text_config, attn_implementation)
        self.input_proj = nn.Linear(text_config.hidden_size, settings.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(self.config, i) for i in range(settings.num_layers))
        self.output_proj = nn.Linear(settings.hidden_size, settings.num_units + 1)
        self.frame_embed = None
        if settings.frame_positions:
            self.frame_embed = nn.Embedding(settings.upsample, settings.hidden_size)
            setattr(self.frame_embed, ZERO_INIT, True)  # a generator gains it without changing what it says

    def resize_units(self, num_units: int) -> bool:
        """Give the head a fresh output layer for another unit inventory (a vocoder with `num_units` units);
        the input projection and decoder layers stay. Returns whether anything changed."""
        if num_units == self.settings.num_units:
            return False
        if num_units < 1:
            raise ValueError(f"num_units must be at least 1, got {num_units}")
        old = self.output_proj
        self.settings = replace(self.settings, num_units=num_units)
        self.blank = self.settings.blank
        self.config.vocab_size = num_units + 1
        self.output_proj = nn.Linear(old.in_features, num_units + 1, device=old.weight.device, dtype=old.weight.dtype)
        return True

    # ---- shared decoder ----------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (1, F, head_dim) of 1-D positions, computed in fp32 as Qwen2's default RoPE does (no buffer:
        nothing to re-initialise after a meta-device build)."""
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        theta = self.config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=like.device) / head_dim))
        freqs = positions.float()[:, None] * inv_freq[None]
        emb = torch.cat([freqs, freqs], dim=-1)[None]
        return emb.cos().to(like.dtype), emb.sin().to(like.dtype)

    def _decode(self, x: torch.Tensor, first_position: int, kv: DynamicCache | None) -> torch.Tensor:
        """Frames (B, F, hidden) at positions first_position.. -> logits (B, F, units + 1); causal, cached if `kv`."""
        positions = torch.arange(first_position, first_position + x.shape[1], device=x.device)
        cos, sin = self._rope(positions, x)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=x, attention_mask=None, past_key_values=kv, position_ids=None,
            layer_idx=0 if kv is not None else None,
        )
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_embeddings=(cos, sin), past_key_values=kv, use_cache=kv is not None)
        return self.output_proj(x)

    # ---- offline -----------------------------------------------------------------------------------
    def upsample_states(
        self, states: torch.Tensor, state_mask: torch.Tensor, target_lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Repeat each state `upsample` times: (B, T, D) -> frames (B, F, D), their (B, F) mask and each frame's
        place within its state's copies (B, F) (0 .. upsample-1).

        With `target_lengths` (B,) a sample whose units outnumber its frames is stretched to as many frames
        (states spread uniformly), as the reference does so CTC stays feasible; inference never stretches. A
        stretched state's copies past `upsample` keep the last place.
        """
        counts = state_mask.sum(1)
        lengths = counts * self.upsample
        if target_lengths is not None:
            lengths = torch.maximum(lengths, target_lengths.to(lengths.device))
        width = int(lengths.max()) if lengths.numel() else 0
        t = torch.arange(width, device=states.device)[None]
        frame_mask = t < lengths[:, None]
        index = (t * counts[:, None]) // lengths.clamp(min=1)[:, None]  # uniform assignment, exact for whole multiples
        index = index.masked_fill(~frame_mask, 0)
        # each frame's state starts at frame ceil(index * lengths / counts)
        first = (index * lengths[:, None] + counts[:, None] - 1) // counts.clamp(min=1)[:, None]
        places = (t - first).clamp(0, self.upsample - 1).masked_fill(~frame_mask, 0)
        frames = torch.gather(states, 1, index[..., None].expand(-1, -1, states.shape[-1]))
        return frames.masked_fill(~frame_mask[..., None], 0.0), frame_mask, places

    def _project(self, frames: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
        """Upsampled states (B, F, D_llm) -> the decoder's inputs (B, F, hidden), with frame positions if any."""
        x = self.input_proj(frames.to(self.input_proj.weight.dtype))
        if self.frame_embed is not None:
            x = x + self.frame_embed(places)
        return x

    def forward(
        self, states: torch.Tensor, state_mask: torch.Tensor | None = None, unit_targets: torch.Tensor | None = None
    ) -> GeneratorOutput:
        """Offline pass over whole answers.

        states (B, T, D_llm) left-aligned answer states with `state_mask` (B, T) (all valid when None);
        unit_targets (B, U) speech units padded with IGNORE_INDEX. Samples without answer states are left out
        of the loss.
        """
        if state_mask is None:
            state_mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        target_lengths = None if unit_targets is None else (unit_targets != IGNORE_INDEX).sum(1)
        frames, frame_mask, places = self.upsample_states(states, state_mask, target_lengths)
        logits = self._decode(self._project(frames, places), 0, None)
        loss = None
        if unit_targets is not None:
            loss = self.ctc_loss(logits, frame_mask, unit_targets, state_mask.any(1))
        return GeneratorOutput(logits=logits, frame_mask=frame_mask, loss=loss)

    def ctc_loss(
        self, logits: torch.Tensor, frame_mask: torch.Tensor, unit_targets: torch.Tensor, has_states: torch.Tensor
    ) -> torch.Tensor:
        """CTC loss summed over samples, divided by the number of target units (the reference's normalisation)."""
        targets = unit_targets.to(logits.device)
        target_mask = targets != IGNORE_INDEX
        bad = targets[target_mask]
        if bad.numel() and (int(bad.min()) < 0 or int(bad.max()) >= self.blank):
            raise ValueError(f"unit targets must lie in [0, {self.blank}), got values in [{int(bad.min())}, {int(bad.max())}]")
        if not bool(has_states.any()):
            return logits.sum() * 0.0
        keep = has_states.nonzero().squeeze(1)
        logits, frame_mask, targets, target_mask = logits[keep], frame_mask[keep], targets[keep], target_mask[keep]
        log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (F, B, C)
        target_lengths = target_mask.sum(1)
        loss = F.ctc_loss(
            log_probs, targets[target_mask], frame_mask.sum(1), target_lengths,
            blank=self.blank, reduction="sum", zero_infinity=True,
        )
        return loss / target_lengths.sum().clamp(min=1)

    @torch.no_grad()
    def predict(self, states: torch.Tensor, state_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy frame predictions (B, T * upsample) for whole answers; padding frames are blank."""
        if state_mask is None:
            state_mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        out = self(states, state_mask)
        return out.logits.argmax(-1).masked_fill(~out.frame_mask, self.blank)

    @torch.no_grad()
    def units(self, states: torch.Tensor, state_mask: torch.Tensor | None = None) -> list[list[int]]:
        """Collapsed units of whole answers (B, T, D) -> one list per answer."""
        return ctc_collapse(self.predict(states, state_mask), self.blank)[0]

    # ---- streaming ---------------------------------------------------------------------------------
    def start(self, batch_size: int = 1, device: torch.device | str | None = None) -> GeneratorStream:
        """A fresh streaming state for `batch_size` answers."""
        device = device if device is not None else self.output_proj.weight.device
        return GeneratorStream(
            kv=DynamicCache(config=self.config),
            frames=0,
            last_frame=torch.full((batch_size,), self.blank, dtype=torch.long, device=device),
            kv_config=self.config,
            blank=self.blank,
        )

    @torch.no_grad()
    def step(self, states: torch.Tensor, stream: GeneratorStream) -> StreamStep:
        """Feed the next answer states (B, n, D) (usually n = 1: the token just decoded) and get their units.

        Only the new `n * upsample` frames are computed; earlier frames are in the stream's cache. The frames
        equal `predict` over the whole answer so far, and the units its collapse (borders included).
        """
        if states.dim() == 2:
            states = states[:, None]
        if states.shape[0] != stream.last_frame.shape[0]:
            raise ValueError(f"the stream holds {stream.last_frame.shape[0]} answers, got states for {states.shape[0]}")
        frames = states.repeat_interleave(self.upsample, dim=1)
        places = torch.arange(self.upsample, device=states.device).repeat(states.shape[1])[None]
        preds = self._decode(self._project(frames, places), stream.frames, stream.kv).argmax(-1)
        units, stream.last_frame = ctc_collapse(preds, self.blank, stream.last_frame)
        stream.frames += preds.shape[1]
        return StreamStep(frames=preds, units=units)

    @torch.no_grad()
    def rerun(self, states: torch.Tensor, emitted: int) -> tuple[torch.Tensor, list[int]]:
        """The reference's streaming, for comparison: re-run the head over all states so far (1, T, D) and
        return (frames, the units past the first `emitted`). Quadratic over an answer; benchmarks only."""
        frames = self.predict(states)
        units = ctc_collapse(frames, self.blank)[0][0]
        return frames, units[emitted:]


__all__ = [
    "GeneratorOutput",
    "GeneratorStream",
    "SpeechGenerator",
    "StreamStep",
    "answer_states",
    "ctc_collapse",
    "layer_config",
]
