"""Per-modality LoRA adapters on the LLM, built with PEFT.

Every adapter named in the config is injected into the LLM's decoder layers at construction
(`peft.inject_adapter_in_model`, so the base weights live at `*.base_layer.weight`). Exactly one adapter
(or none) is active per forward pass. Adapters are exported and imported in PEFT's own on-disk format
(`adapter_config.json` + `adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`),
so `peft.PeftModel.from_pretrained(<Qwen2-VL text model>, folder)` reads what we write.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import peft
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from lyra.configuration import LoraAdapterConfig

PEFT_PREFIX = "base_model.model."  # what PeftModel puts in front of module paths when it saves


def peft_lora_config(adapter: LoraAdapterConfig) -> peft.LoraConfig:
    """The PEFT LoraConfig matching one of our adapter settings."""
    return peft.LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=list(adapter.targets),
        bias="none",
    )


class LoraAdapters:
    """The LoRA adapters of one LLM: activation, inference-time scaling and PEFT-format I/O.

    Args:
        llm: the module whose decoder layers get LoRA (the Qwen2-VL text model).
        adapters: adapter name -> settings.
    """

    def __init__(self, llm: nn.Module, adapters: dict[str, LoraAdapterConfig]):
        self.llm = llm
        self.configs = dict(adapters)
        for name, adapter in self.configs.items():
            with warnings.catch_warnings():
                # PEFT warns that a second adapter joins the first: several adapters are the point here.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                peft.inject_adapter_in_model(peft_lora_config(adapter), llm, adapter_name=name)
        self._active: str | None | bool = False  # False: never set yet
        self._scale = 1.0
        self.activate(None)

    @property
    def names(self) -> list[str]:
        return list(self.configs)

    @property
    def active(self) -> str | None:
        """The active adapter, or None when the LLM runs as plain Qwen2-VL."""
        return None if self._active is False else self._active

    def layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for path, module in self.llm.named_modules():
            if isinstance(module, LoraLayer):
                yield path, module

    def activate(self, name: str | None) -> None:
        """Turn one adapter on (all others off), or every adapter off with None."""
        if name == self._active:
            return
        if name is not None and name not in self.configs:
            raise KeyError(f"unknown LoRA adapter {name!r}; this model has {self.names}")
        for _, layer in self.layers():
            # Set the flags directly: PEFT's set_adapter would also flip requires_grad, which is the
            # training recipe's business, not the router's.
            layer._disable_adapters = name is None
            if name is not None:
                layer._active_adapter = [name]
        self._active = name

    @property
    def scale(self) -> float:
        return self._scale

    def set_scale(self, scale: float) -> None:
        """Scale every adapter's update by `scale` (1 = as trained).

        SALMONN's activation tuning: a scale below 1 weakens the instruction-tuned update and can bring
        back abilities (e.g. free-form answers) that the adapter suppressed.
        """
        if scale < 0:
            raise ValueError(f"LoRA scale must be >= 0, got {scale}")
        for _, layer in self.layers():
            for name in self.configs:
                layer.set_scale(name, scale)
        self._scale = float(scale)

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """One adapter's weights with PEFT's key names (adapter name stripped)."""
        self._check(name)
        out = {}
        for path, layer in self.layers():
            out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[name].weight.detach()
            out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[name].weight.detach()
        return out

    def load_state_dict(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Load PEFT-format weights into adapter `name`; every LoRA module must be covered."""
        self._check(name)
        expected = self.state_dict(name)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"adapter {name!r} does not match this model: {len(missing)} missing keys "
                f"(e.g. {missing[:2]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:2]})"
            )
        with torch.no_grad():
            for key, value in expected.items():
                if value.shape != state[key].shape:
                    raise ValueError(f"adapter {name!r}: {key} has shape {tuple(state[key].shape)}, "
                                     f"the model expects {tuple(value.shape)} (different rank r?)")
                value.copy_(state[key].to(value.dtype))

    def save(self, folder: str | Path, name: str) -> Path:
        """Write adapter `name` as a PEFT adapter folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        peft_lora_config(self.configs[name]).save_pretrained(str(folder))
        state = {k: v.contiguous().cpu() for k, v in self.state_dict(name).items()}
        save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        return folder

    def load(self, folder: str | Path, name: str) -> None:
        """Read a PEFT adapter folder (safetensors or .bin) into adapter `name`."""
        folder = Path(folder)
        config = peft.LoraConfig.from_pretrained(str(folder))
        ours = self.configs[name]
        if config.r != ours.r or config.lora_alpha != ours.alpha:
            raise ValueError(
                f"{folder}: adapter has r={config.r}, alpha={config.lora_alpha}; the model's {name!r} adapter "
                f"has r={ours.r}, alpha={ours.alpha}. Build the model with matching adapter settings."
            )
        self.load_state_dict(name, read_adapter_weights(folder))

    def _check(self, name: str) -> None:
        if name not in self.configs:
            raise KeyError(f"unknown LoRA adapter {name!r}; this model has {self.names}")


def read_adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter folder, from adapter_model.safetensors or adapter_model.bin."""
    if (folder / "adapter_model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(str(folder / "adapter_model.safetensors"))
    if (folder / "adapter_model.bin").exists():
        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} has no adapter_model.safetensors or adapter_model.bin")
