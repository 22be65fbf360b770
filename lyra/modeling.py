"""LyraForConditionalGeneration: Qwen2-VL + Whisper encoder + speech projector + per-modality LoRA.

The backbone is transformers' own `Qwen2VLForConditionalGeneration` and the speech tower transformers'
own `WhisperEncoder`; this module only wires them together. The decoder layers are driven by a short
loop of our own (the same steps as `Qwen2VLTextModel.forward`) because the token extractor has to
drop tokens between layers and the cache then holds a different length per layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel, Qwen2VLForConditionalGeneration, WhisperConfig
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import create_causal_mask
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from lyra.adapters import LoraAdapters
from lyra.configuration import (
    LONG_SPEECH_ADAPTER,
    SPEECH_ADAPTER,
    ExtractorConfig,
    LyraConfig,
)
from lyra.constants import IGNORE_INDEX, TOKEN_TYPE_TEXT, ZERO_INIT
from lyra.attention import CHUNK_CAUSAL, LYRA_SDPA
from lyra.extractor import is_pruning_layer, mm_attention_scores, plan_compaction, query_mask_for
from lyra.generator import SpeechGenerator, answer_states
from lyra.regularizer import lcmr_loss
from lyra.speech import SpeechProjector, keep_window_tokens
from lyra.vision import ImagePositions

AUTO = "auto"  # adapter routing chosen from the input


class PlaceholderMismatchError(ValueError):
    """The prompt's placeholder tokens and the given image/speech features do not line up."""


@dataclass
class LyraCache:
    """Decoding state of one batch of streams, owned by the caller and passed back each step.

    kv: the per-layer key/value cache (layers may hold different lengths after token extraction).
    key_valid: per layer, (B, K_layer) bool: False for cached padding slots.
    next_position: (B,) long: the M-RoPE position the next token of each stream gets.
    adapter: the LoRA adapter chosen at the first chunk; later chunks and decoding keep it.
    """

    kv: DynamicCache
    key_valid: list[torch.Tensor]
    next_position: torch.Tensor
    adapter: str | None = None

    def cached_tokens(self, layer: int = -1) -> int:
        """Keys held by one layer (the last by default, the shortest after token extraction)."""
        return int(self.key_valid[layer].shape[1])

    def reserve(self, tokens: list[int]) -> None:
        """Reserve room for `tokens[i]` cached positions in layer i (the final lengths, when known).

        Later chunks then write into that room instead of re-concatenating the cache; beyond it the layer
        grows by concatenation as before. Ask for the expected total: after token extraction deeper layers
        need less.
        """
        if len(tokens) != len(self.kv.layers):
            raise ValueError(f"reserve needs one count per layer ({len(self.kv.layers)}), got {len(tokens)}")
        for i, n in enumerate(tokens):
            layer = self.kv.layers[i]
            if not isinstance(layer, ReservedLayer):
                reserved = ReservedLayer()
                if layer.is_initialized:
                    reserved.lazy_initialization(layer.keys, layer.values)
                    reserved.keys, reserved.values = layer.keys, layer.values
                self.kv.layers[i] = layer = reserved
            layer.capacity = max(layer.capacity, int(n))

    def mark(self) -> CacheMark:
        """Remember the current state, to come back to it with `rollback` (e.g. after answering a question)."""
        return CacheMark(
            lengths=tuple(int(v.shape[1]) for v in self.key_valid),
            next_position=self.next_position.clone(),
            adapter=self.adapter,
        )

    def rollback(self, mark: CacheMark) -> None:
        """Drop everything cached after `mark` (per layer: layers may hold different lengths)."""
        if len(mark.lengths) != len(self.key_valid):
            raise ValueError(f"mark has {len(mark.lengths)} layers, the cache {len(self.key_valid)}")
        new_valid: list[torch.Tensor] = []
        for i, n in enumerate(mark.lengths):
            if n > self.key_valid[i].shape[1]:
                raise ValueError(f"cannot roll layer {i} forward: mark holds {n} keys, the cache {self.key_valid[i].shape[1]}")
            layer = self.kv.layers[i]
            if layer.is_initialized:
                layer.keys = layer.keys[..., :n, :]
                layer.values = layer.values[..., :n, :]
            # Layers that shared one validity tensor keep sharing it (the decoder reuses masks by identity).
            shared = i > 0 and self.key_valid[i] is self.key_valid[i - 1] and n == mark.lengths[i - 1]
            new_valid.append(new_valid[-1] if shared else self.key_valid[i][:, :n])
        self.key_valid = new_valid
        self.next_position = mark.next_position.clone()
        self.adapter = mark.adapter


class ReservedLayer(DynamicLayer):
    """A cache layer that writes new keys into storage reserved up front.

    `DynamicLayer` concatenates on every update, copying the whole layer each time (quadratic over a long
    recording) and briefly holding it twice. With `capacity` set, updates write in place into one buffer of
    that many positions and `keys`/`values` are views of its filled part; past the capacity (or after the
    keys were replaced from outside) it falls back to concatenation.
    """

    def __init__(self, capacity: int = 0):
        super().__init__()
        self.capacity = capacity  # positions to reserve at the next allocation
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        filled = self.get_seq_length()
        need = filled + key_states.shape[-2]
        if not self._writes_in_place(need):
            if need > self.capacity:
                return super().update(key_states, value_states, *args, **kwargs)
            self._allocate(key_states, value_states, filled)
        self._key_buffer[..., filled:need, :] = key_states
        self._value_buffer[..., filled:need, :] = value_states
        self.keys = self._key_buffer[..., :need, :]
        self.values = self._value_buffer[..., :need, :]
        return self.keys, self.values

    def _writes_in_place(self, need: int) -> bool:
        """True when `keys` is still the start of our buffer (also after a crop) and `need` fits."""
        buffer = self._key_buffer
        return (
            buffer is not None
            and need <= buffer.shape[-2]
            and self.keys.dim() == 4
            and self.keys.data_ptr() == buffer.data_ptr()
            and self.values.data_ptr() == self._value_buffer.data_ptr()
        )

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, filled: int) -> None:
        b, h, _, d = key_states.shape
        keys = key_states.new_empty(b, h, self.capacity, d)
        values = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        if filled:
            keys[..., :filled, :] = self.keys
            values[..., :filled, :] = self.values
        self._key_buffer, self._value_buffer = keys, values
        self.keys, self.values = keys[..., :filled, :], values[..., :filled, :]


@dataclass(frozen=True)
class CacheMark:
    """A point in a `LyraCache`'s history: per-layer lengths, next position and adapter."""

    lengths: tuple[int, ...]
    next_position: torch.Tensor
    adapter: str | None


@dataclass
class LyraOutput:
    """What one forward pass returns.

    logits: (B, L', V) with L' the chunk length after token extraction (or the last `logits_to_keep`).
    hidden_states: (B, L', D) final normed LLM states of the same positions.
    token_index: (B, L') index of each surviving position in the input chunk (-1 for extractor padding).
    loss = ce_loss + lambda * lcmr_loss when labels (and transcripts) are given, plus the speech generator's
    weighted CTC loss (unit_loss) when unit targets are given.
    """

    logits: torch.Tensor
    hidden_states: torch.Tensor
    token_index: torch.Tensor
    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    lcmr_loss: torch.Tensor | None = None
    unit_loss: torch.Tensor | None = None
    cache: LyraCache | None = None
    adapter: str | None = None


@dataclass
class GenerationStep:
    """One decoding step of `stream_generate`: the new token of each stream and its state."""

    tokens: torch.Tensor  # (B,) sampled ids (pad id for streams already finished)
    finished: torch.Tensor  # (B,) bool: the stream produced EOS at or before this step
    hidden_states: torch.Tensor  # (B, D) final normed LLM state that predicted `tokens`
    cache: LyraCache  # the decoding state after this step's prediction
    logprobs: torch.Tensor | None = None  # (B,) log-probability of `tokens` under the model (temperature 1)
    # Last step only: (B, D) final normed state at the position of `tokens` itself (what the speech generator
    # reads). For earlier steps that state is the next step's `hidden_states`.
    final_hidden_states: torch.Tensor | None = None


@dataclass
class LyraGeneration:
    """Result of `generate`: new tokens only (prompt excluded) and the cache to continue from."""

    sequences: torch.Tensor  # (B, T) new token ids, right-padded with the pad id
    cache: LyraCache
    hidden_states: list[torch.Tensor] = field(default_factory=list)  # T tensors of (B, D)


class LyraPreTrainedModel(PreTrainedModel):
    config_class = LyraConfig
    base_model_prefix = "lyra"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock", "WhisperEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        if isinstance(module, SpeechProjector):
            std = 0.02
            for linear in (module.linear1, module.linear2):
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)
        elif getattr(module, ZERO_INIT, False):
            nn.init.zeros_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class LyraForConditionalGeneration(LyraPreTrainedModel):
    """The Lyra omni-model.

    Inputs come from `LyraProcessor`: `input_ids`/`attention_mask` (B, L) with `<|image_pad|>` and
    `<|speech_pad|>` placeholders, `mm_token_type_ids` (B, L), `pixel_values`/`image_grid_thw` for images,
    `input_features` (W, n_mels, 3000) for every 30 s speech window with `speech_token_counts` (W,) and
    `speech_clip_windows` (C,). Images get Qwen2-VL's 3-D M-RoPE positions; speech tokens are typed as
    text and so get plain 1-D positions on all three axes.
    """

    def __init__(self, config: LyraConfig):
        super().__init__(config)
        settings = config.settings
        config.backbone_config._attn_implementation = config._attn_implementation
        config.speech_config._attn_implementation = config._attn_implementation
        self.backbone = Qwen2VLForConditionalGeneration._from_config(config.backbone_config)
        text_config = self.backbone.config.text_config
        if text_config._attn_implementation == "sdpa":
            # HF's SDPA plus a mask-free path for chunks prefilled after a long cache (lyra/attention.py).
            text_config._attn_implementation = LYRA_SDPA
        self.speech_encoder = WhisperEncoder._from_config(config.speech_config)
        # One projector per adapter, as in the reference, where each training stage (speech, long speech)
        # brings its own projector along with its LoRA. With no adapters there is one, named "speech".
        self.speech_projectors = nn.ModuleDict({
            name: SpeechProjector(
                encoder_dim=config.speech_config.d_model,
                llm_dim=config.text_config.hidden_size,
                k=settings.projector.k,
                hidden_size=settings.projector.hidden_size,
            )
            for name in (list(settings.adapters) or [SPEECH_ADAPTER])
        })
        self.adapters = LoraAdapters(self.language_model, settings.adapters)
        self.extractor_config: ExtractorConfig = settings.extractor
        # CTC speech generator on the final LLM states (lyra/generator.py); None: text answers only.
        self.speech_generator = (
            SpeechGenerator(settings.speech_generator, config.text_config, config._attn_implementation)
            if settings.speech_generator.enabled else None
        )
        # Image-token positions as content (lyra/vision.py); None: M-RoPE alone places image tokens, as in Qwen2-VL.
        self.image_positions = (
            ImagePositions(settings.image_positions, config.text_config.hidden_size,
                           config.backbone_config.vision_config.spatial_merge_size)
            if settings.image_positions.enabled else None
        )
        self.post_init()

    # ---- structure -------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.backbone.model.language_model

    @property
    def visual(self) -> nn.Module:
        return self.backbone.model.visual

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.backbone.lm_head

    @property
    def _tied_weights_keys(self):
        if self.config.tie_word_embeddings:
            return {"backbone.lm_head.weight": "backbone.model.language_model.embed_tokens.weight"}
        return {}

    def projector_for(self, adapter: str | None) -> SpeechProjector:
        """The speech projector that goes with an adapter (the "speech" one when adapters are off)."""
        if adapter in self.speech_projectors:
            return self.speech_projectors[adapter]
        if SPEECH_ADAPTER in self.speech_projectors:
            return self.speech_projectors[SPEECH_ADAPTER]
        return next(iter(self.speech_projectors.values()))

    @property
    def speech_projector(self) -> SpeechProjector:
        """The projector of short speech (the "speech" adapter's)."""
        return self.projector_for(SPEECH_ADAPTER)

    def set_extractor(self, extractor: ExtractorConfig) -> None:
        """Change the token extractor's settings at inference (e.g. keep_rate 0.5)."""
        self.extractor_config = extractor

    def set_lora_scale(self, scale: float) -> None:
        """SALMONN's activation tuning: scale every LoRA update (1 = as trained)."""
        self.adapters.set_scale(scale)

    def save_adapter(self, folder: str | Path, name: str) -> Path:
        """Write one LoRA adapter in PEFT's format."""
        return self.adapters.save(folder, name)

    def load_adapter(self, folder: str | Path, name: str) -> None:
        """Read one LoRA adapter from a PEFT adapter folder."""
        self.adapters.load(folder, name)

    # ---- encoders --------------------------------------------------------------------------------
    def encode_speech(
        self,
        input_features: torch.Tensor,
        speech_token_counts: torch.Tensor | None = None,
        adapter: str | None = SPEECH_ADAPTER,
    ) -> torch.Tensor:
        """Speech windows -> LLM-width speech tokens.

        input_features (W, n_mels, 3000) log-mel of padded 30 s windows; speech_token_counts (W,) how many
        tokens each window keeps (all 300 when None); `adapter` picks the projector. Returns (sum(counts), D).
        """
        dtype = next(self.speech_encoder.parameters()).dtype
        frames = self.speech_encoder(input_features.to(dtype)).last_hidden_state  # (W, 1500, d_model)
        projector = self.projector_for(adapter)
        tokens = projector(frames.to(projector.linear1.weight.dtype))  # (W, 300, D)
        if speech_token_counts is None:
            return tokens.reshape(-1, tokens.shape[-1])
        return keep_window_tokens(tokens, speech_token_counts)

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Images -> LLM-width tokens with the Qwen2-VL vision tower and merger (+ their positions where the model
        has `image_positions`): (N, D)."""
        out = self.backbone.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        tokens = torch.cat(out.pooler_output, dim=0)
        if self.image_positions is not None:
            tokens = tokens + self.image_positions(image_grid_thw).to(tokens.dtype)
        return tokens

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        speech_token_counts: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        speech_embeds: torch.Tensor | None = None,
        adapter: str | None = SPEECH_ADAPTER,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings with image and speech features scattered into their placeholders.

        Precomputed `image_embeds` / `speech_embeds` (N, D) may be given instead of raw inputs; `adapter`
        picks the speech projector.
        Returns (inputs_embeds (B, L, D), speech_embeds or None).
        """
        embeds = self.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.backbone.config.image_token_id
        speech_mask = input_ids == self.config.speech_token_id
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.encode_images(pixel_values, image_grid_thw)
        embeds = _scatter(embeds, image_mask, image_embeds, "image", "<|image_pad|>")
        if speech_embeds is None and input_features is not None:
            speech_embeds = self.encode_speech(input_features, speech_token_counts, adapter)
        embeds = _scatter(embeds, speech_mask, speech_embeds, "speech", "<|speech_pad|>")
        return embeds, speech_embeds

    # ---- routing and positions -------------------------------------------------------------------
    def route_adapter(self, input_ids: torch.Tensor, speech_clip_windows: torch.Tensor | None = None) -> str | None:
        """No speech: adapters off (plain Qwen2-VL). Speech within one 30 s window: "speech".
        Any clip spanning several windows: "long_speech". A missing adapter falls back to the other."""
        n_speech = (input_ids == self.config.speech_token_id).sum(1)
        if not bool((n_speech > 0).any()):
            return None
        if speech_clip_windows is not None and speech_clip_windows.numel():
            is_long = int(speech_clip_windows.max()) > 1
        else:
            is_long = int(n_speech.max()) > self.config.settings.projector.tokens_per_window
        preference = [LONG_SPEECH_ADAPTER, SPEECH_ADAPTER] if is_long else [SPEECH_ADAPTER, LONG_SPEECH_ADAPTER]
        for name in preference:
            if name in self.adapters.names:
                return name
        return None

    def position_ids(
        self,
        input_ids: torch.Tensor,
        valid: torch.Tensor,
        mm_token_type_ids: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        offset: torch.Tensor | None,
    ) -> torch.Tensor:
        """(3, B, L) M-RoPE positions of a chunk, continuing at `offset` (B,) when given."""
        if image_grid_thw is None:
            pos = (valid.long().cumsum(1) - 1).clamp(min=0)
            pos = pos[None].expand(3, -1, -1)
        else:
            if mm_token_type_ids is None:
                mm_token_type_ids = torch.full_like(input_ids, TOKEN_TYPE_TEXT, dtype=torch.int)
            pos, _ = self.backbone.model.get_rope_index(
                input_ids,
                mm_token_type_ids=mm_token_type_ids,
                image_grid_thw=image_grid_thw,
                attention_mask=valid.long(),
            )
        if offset is not None:
            pos = pos + offset.to(pos.device)[None, :, None]
        return pos

    # ---- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        speech_token_counts: torch.Tensor | None = None,
        speech_clip_windows: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        transcript_ids: torch.Tensor | None = None,
        transcript_mask: torch.Tensor | None = None,
        has_transcript: torch.Tensor | None = None,
        cache: LyraCache | None = None,
        use_cache: bool = False,
        adapter: str | None = AUTO,
        logits_to_keep: int = 0,
        image_embeds: torch.Tensor | None = None,
        speech_embeds: torch.Tensor | None = None,
        unit_targets: torch.Tensor | None = None,
        **unused,
    ) -> LyraOutput:
        """Run one chunk (a whole prompt, a prompt continuation, or one decoding step).

        With `cache` the chunk continues an earlier one: positions carry on and the cache grows.
        `adapter` is "auto" (routed from the input, or the cache's), a name, or None for plain Qwen2-VL.
        `unit_targets` (B, U): speech units of each answer (padded with IGNORE_INDEX); the speech generator then
        reads the states at the answer tokens' own positions (where `labels` hold them) and adds its CTC loss.
        """
        b, length = input_ids.shape
        device = input_ids.device
        valid = torch.ones(b, length, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()

        if adapter == AUTO:
            adapter = cache.adapter if cache is not None and cache.adapter is not None else None
            adapter = adapter or self.route_adapter(input_ids, speech_clip_windows)
        self.adapters.activate(adapter)
        embeds, speech_embeds = self.embed_inputs(
            input_ids, pixel_values, image_grid_thw, input_features, speech_token_counts, image_embeds, speech_embeds,
            adapter=adapter,
        )

        n_layers = len(self.language_model.layers)
        if cache is None and use_cache:
            empty = torch.zeros(b, 0, dtype=torch.bool, device=device)
            cache = LyraCache(
                kv=DynamicCache(config=self.config.text_config),
                key_valid=[empty] * n_layers,
                next_position=torch.zeros(b, dtype=torch.long, device=device),
                adapter=adapter,
            )
        offset = cache.next_position if cache is not None else None
        positions = self.position_ids(input_ids, valid, mm_token_type_ids, image_grid_thw, offset)
        next_position = positions.masked_fill(~valid[None], -1).amax(dim=(0, 2)) + 1  # (B,)
        if cache is not None:  # a stream whose chunk is all padding keeps its place
            next_position = torch.where(valid.any(1), next_position, cache.next_position)

        mm_mask = (
            (input_ids == self.backbone.config.image_token_id)
            | (input_ids == self.backbone.config.video_token_id)
            | (input_ids == self.config.speech_token_id)
        )
        hidden, _, token_index, labels_out, new_key_valid = self._decoder(
            embeds, positions, valid, mm_mask, labels, cache
        )
        hidden = self.language_model.norm(hidden)
        # contiguous(): on a strided slice, bf16 F.linear on CPU copies the whole (vocab, hidden) weight
        # (1.6 s vs 0.02 s per prefill for mini, measured by bench/bench_extractor.py).
        head_in = hidden[:, -logits_to_keep:].contiguous() if logits_to_keep else hidden
        logits = self.backbone.lm_head(head_in)

        if cache is not None:
            cache.key_valid = new_key_valid
            cache.next_position = next_position
            cache.adapter = adapter

        ce = lcmr = loss = None
        if labels is not None:
            ce = _causal_lm_loss(logits if not logits_to_keep else self.backbone.lm_head(hidden), labels_out)
            loss = ce
            weight = self.config.settings.lcmr.weight
            if transcript_ids is not None and weight > 0 and speech_embeds is not None:
                lcmr = self._lcmr(input_ids, speech_embeds, transcript_ids, transcript_mask, has_transcript)
                loss = ce + weight * lcmr
        unit_loss = None
        if unit_targets is not None:
            unit_loss = self._unit_loss(hidden, labels_out, unit_targets)
            loss = loss + self.config.settings.speech_generator.loss_weight * unit_loss
        return LyraOutput(
            logits=logits,
            hidden_states=hidden,
            token_index=token_index,
            loss=loss,
            ce_loss=ce,
            lcmr_loss=lcmr,
            unit_loss=unit_loss,
            cache=cache,
            adapter=adapter,
        )

    def _unit_loss(self, hidden, labels, unit_targets):
        """The speech generator's CTC loss on the answer tokens' own states (the same positions inference uses)."""
        if self.speech_generator is None:
            raise ValueError("unit_targets were given but this model has no speech generator (config speech_generator.enabled)")
        if labels is None:
            raise ValueError("unit_targets need labels: the generator reads the states where labels mark answer tokens")
        states, state_mask = answer_states(hidden, labels)
        return self.speech_generator(states, state_mask, unit_targets).loss

    def _decoder(self, hidden, positions, valid, mm_mask, labels, cache):
        """The decoder-layer loop (as in `Qwen2VLTextModel.forward`) with token extraction between layers."""
        lm = self.language_model
        layers = lm.layers
        text_config = self.config.text_config
        b, length = valid.shape
        cos, sin = lm.rotary_emb(hidden, positions)
        token_index = torch.arange(length, device=hidden.device).expand(b, -1)
        labels_cur = labels
        extractor = self.extractor_config
        prefill_with_mm = bool(mm_mask.any()) and extractor.enabled
        query = query_mask_for(mm_mask, valid, labels) if prefill_with_mm else None

        # A chunk after a cache, with no padding: the past needs no mask (see lyra/attention.py).
        chunk_causal = (
            cache is not None and length > 1 and not self.training and text_config._attn_implementation == LYRA_SDPA
        )
        new_key_valid: list[torch.Tensor] = []
        past_valid_prev = chunk_valid_prev = mask = None
        no_past = valid[:, :0]
        for i, layer in enumerate(layers):
            # Layers that saw the same tokens share one mask tensor object, so the mask is rebuilt only
            # where token extraction changed the lengths.
            past_valid = cache.key_valid[i] if cache is not None else no_past
            if mask is None or past_valid is not past_valid_prev or valid is not chunk_valid_prev:
                key_valid = torch.cat([past_valid, valid], dim=1)
                if chunk_causal and past_valid.shape[1] and bool(key_valid.all()):
                    mask = CHUNK_CAUSAL
                else:
                    mask = create_causal_mask(
                        config=text_config,
                        inputs_embeds=hidden,
                        attention_mask=None if bool(key_valid.all()) else key_valid,
                        past_key_values=cache.kv if cache is not None else None,
                        position_ids=None,
                        layer_idx=i if cache is not None else None,
                    )
                    mask = mask if mask is not None else _NO_MASK
                joined = key_valid
            past_valid_prev, chunk_valid_prev = past_valid, valid
            new_key_valid.append(joined)

            prune = prefill_with_mm and is_pruning_layer(i, len(layers), extractor) and bool(query.any())
            if prune:
                scores = mm_attention_scores(layer, hidden, cos, sin, query, valid)
            hidden = layer(
                hidden,
                attention_mask=None if mask is _NO_MASK else mask,
                position_embeddings=(cos, sin),
                position_ids=None,
                past_key_values=cache.kv if cache is not None else None,
                use_cache=cache is not None,
            )
            if prune:
                plan = plan_compaction(scores, mm_mask, valid, extractor)
                if plan is not None:
                    hidden = plan.gather(hidden)
                    cos, sin = plan.gather(cos), plan.gather(sin)
                    valid = plan.gather(valid, False) & plan.valid
                    mm_mask = plan.gather(mm_mask, False)
                    query = plan.gather(query, False)
                    token_index = plan.gather(token_index, -1)
                    if labels_cur is not None:
                        labels_cur = plan.gather(labels_cur, IGNORE_INDEX)
        # The cached keys of layer i cover the chunk as it was when layer i ran.
        return hidden, valid, token_index, labels_cur, new_key_valid

    def _lcmr(self, input_ids, speech_embeds, transcript_ids, transcript_mask, has_transcript):
        speech_mask = input_ids == self.config.speech_token_id
        counts = speech_mask.sum(1)
        width = int(counts.max())
        d = speech_embeds.shape[-1]
        speech = speech_embeds.new_zeros(input_ids.shape[0], width, d)
        slot_valid = torch.arange(width, device=input_ids.device)[None] < counts[:, None]
        speech[slot_valid] = speech_embeds.to(speech.dtype)
        text = self.get_input_embeddings()(transcript_ids)
        if transcript_mask is None:
            transcript_mask = torch.ones_like(transcript_ids, dtype=torch.bool)
        if has_transcript is None:
            has_transcript = transcript_mask.any(1)
        has_transcript = has_transcript.bool() & (counts > 0)
        lcmr = self.config.settings.lcmr
        return lcmr_loss(
            speech.float(), slot_valid, text.float(), transcript_mask.bool(), has_transcript, tau=lcmr.tau, gamma=lcmr.gamma
        )

    # ---- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def stream_generate(
        self,
        inputs: Mapping[str, torch.Tensor],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        cache: LyraCache | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[GenerationStep]:
        """Prefill `inputs` (processor output) and yield one `GenerationStep` per new token.

        Decoding reuses the KV cache; with `cache` the prompt continues an earlier conversation.
        Greedy when temperature is 0, else temperature + nucleus (top_p) sampling. Stops when every
        stream has produced EOS or after `max_new_tokens`; the cache then holds every emitted token.
        """
        eos = _as_list(eos_token_id if eos_token_id is not None else self.config.text_config.eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (self.config.text_config.pad_token_id or eos[0])
        out = self(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache
        b = out.logits.shape[0]
        finished = torch.zeros(b, dtype=torch.bool, device=out.logits.device)
        hidden = out.hidden_states[:, -1]
        logits = out.logits[:, -1]
        for i in range(max_new_tokens):
            tokens = _sample(logits, temperature, top_p, generator)
            tokens = torch.where(finished, torch.full_like(tokens, pad), tokens)
            logprobs = logits.float().log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
            finished = finished | torch.isin(tokens, torch.tensor(eos, device=tokens.device))
            step = GenerationStep(
                tokens=tokens, finished=finished.clone(), hidden_states=hidden, cache=cache, logprobs=logprobs
            )
            if bool(finished.all()) or i == max_new_tokens - 1:
                # The last token enters the cache before it is handed out, so its own state comes with it.
                out = self(tokens[:, None], cache=cache, use_cache=True)
                step.final_hidden_states = out.hidden_states[:, -1]
                yield step
                return
            yield step
            # Every emitted token (EOS included) enters the cache, so a next turn continues right after
            # it. Finished streams keep decoding pad tokens so the batch stays rectangular.
            out = self(tokens[:, None], cache=cache, use_cache=True)
            hidden, logits = out.hidden_states[:, -1], out.logits[:, -1]

    @torch.no_grad()
    def generate(self, inputs: Mapping[str, torch.Tensor], **kwargs) -> LyraGeneration:
        """Run `stream_generate` to the end; returns the new tokens (B, T) and the cache."""
        steps = list(self.stream_generate(inputs, **kwargs))
        if not steps:
            raise ValueError("max_new_tokens must be at least 1")
        sequences = torch.stack([s.tokens for s in steps], dim=1)
        return LyraGeneration(sequences=sequences, cache=steps[-1].cache, hidden_states=[s.hidden_states for s in steps])

    # ---- building from separate checkpoints -------------------------------------------------------
    @classmethod
    def from_base(
        cls,
        backbone_path: str | Path,
        speech_path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        **settings,
    ) -> LyraForConditionalGeneration:
        """Build a Lyra model from a Qwen2-VL checkpoint folder (or hub id) and a Whisper one.

        The projector and LoRA adapters start fresh (LoRA B = 0, so the model behaves as the backbone
        until trained); `settings` are LyraConfig fields (projector, adapters, lcmr, extractor).
        """
        backbone = Qwen2VLForConditionalGeneration.from_pretrained(backbone_path, dtype=dtype or torch.float32)
        speech_config = WhisperConfig.from_pretrained(speech_path)
        config = LyraConfig(
            backbone_config=backbone.config.to_dict(), speech_config=speech_config.to_dict(), **settings
        )
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        model = cls(config)
        load_backbone_state(model, backbone.state_dict())
        del backbone
        model.speech_encoder.load_state_dict(read_whisper_encoder_state(speech_path))
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()


_NO_MASK = object()  # create_causal_mask returned None (the kernel's own causal path is used)


def _scatter(embeds, mask, features, what: str, token: str):
    n_slots = int(mask.sum())
    n_feats = 0 if features is None else int(features.shape[0])
    if n_slots != n_feats:
        raise PlaceholderMismatchError(
            f"the prompt has {n_slots} {token} placeholder tokens but {n_feats} {what} feature vectors were given; "
            f"build inputs with LyraProcessor so each <{what}> placeholder expands to exactly its feature count"
        )
    if n_slots == 0:
        return embeds
    return embeds.masked_scatter(mask[..., None], features.to(embeds.dtype))


def _causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits at t predict labels at t + 1; IGNORE_INDEX positions skipped."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    if bool((shift_labels == IGNORE_INDEX).all()):
        return shift_logits.sum() * 0.0
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [int(x)]


def load_backbone_state(model: LyraForConditionalGeneration, state: Mapping[str, torch.Tensor]) -> None:
    """Load a plain `Qwen2VLForConditionalGeneration` state dict into a model whose LLM carries LoRA.

    PEFT moved every wrapped weight to `<module>.base_layer.weight`; this maps the plain names there.
    Every backbone weight must be covered.
    """
    own = model.backbone.state_dict()
    mapped = {}
    for key, value in state.items():
        if key in own:
            mapped[key] = value
            continue
        module, _, leaf = key.rpartition(".")
        wrapped = f"{module}.base_layer.{leaf}"
        if wrapped not in own:
            raise KeyError(f"backbone weight {key} has no place in the Lyra model")
        mapped[wrapped] = value
    missing = [k for k in own if k not in mapped and ".lora_" not in k]
    if model.config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing:
        raise KeyError(f"the backbone checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    model.backbone.load_state_dict(mapped, strict=False)
    if model.config.tie_word_embeddings:
        model.backbone.lm_head.weight = model.get_input_embeddings().weight


WHISPER_ENCODER_PREFIXES = ("model.encoder.", "encoder.")  # WhisperForConditionalGeneration, WhisperModel


def read_whisper_encoder_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The encoder weights of a Whisper checkpoint (keys relative to `WhisperEncoder`), as float32.

    Safetensors folders are read tensor by tensor, so the decoder (half of large-v3) is never loaded;
    anything else (a .bin checkpoint, a hub id) goes through `WhisperModel.from_pretrained`.
    """
    from safetensors import safe_open

    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                for prefix in WHISPER_ENCODER_PREFIXES:
                    if key.startswith(prefix):
                        state[key[len(prefix):]] = f.get_tensor(key).float()
    if state:
        return state
    from transformers import WhisperModel

    return WhisperModel.from_pretrained(path, dtype=torch.float32).encoder.state_dict()

