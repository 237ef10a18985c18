"""LoRA on any model part (LLM, tower, connector) through peft, injected in place so module names stay stable."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from vlm.weights import check_state_dict

ADAPTER = "default"


@dataclass
class LoRASettings:
    """What a stage says about LoRA on one part. `targets` are module-name suffixes (e.g. q_proj, v_proj);
    `layers`: which numbered blocks (`...layers.<i>...`) get adapters, negative indices counting from the last
    (e.g. [-8, -7, ..., -1]: the top 8 only; backpropagation then stops below them); None: every block."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    layers: list[int] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "LoRASettings":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown LoRA settings {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def has_lora(module: nn.Module) -> bool:
    return any("lora_" in name for name, _ in module.named_parameters())


def add_lora(module: nn.Module, settings: LoRASettings, part: str = "model") -> nn.Module:
    """Inject LoRA adapters into `module` (in place); every target must match at least one module."""
    names = [n for n, _ in module.named_modules()]
    missing = [t for t in settings.targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"{part}: LoRA targets {missing} match no module; module names end with e.g. "
                         f"{sorted({n.rsplit('.', 1)[-1] for n in names if n})[:12]}")
    layers = None
    if settings.layers is not None:
        blocks = {int(m.group(1)) for n in names if (m := re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", n))}
        if not blocks:
            raise ValueError(f"{part}: LoRA 'layers' needs numbered blocks (module names with 'layers.<i>'); found none")
        count = max(blocks) + 1
        layers = sorted({i % count for i in settings.layers if -count <= i < count})
        if len(layers) != len(set(settings.layers)):
            raise ValueError(f"{part}: LoRA layers {settings.layers} are not all among its {count} blocks "
                             f"(0..{count - 1}, or -{count}..-1 from the last)")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.targets), bias="none", layers_to_transform=layers,
                        layers_pattern="layers" if layers is not None else None)
    inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    return module


def lora_state_dict(module: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors of `module` (taken from `state`, the module's full state dict, when given)."""
    lora = get_peft_model_state_dict(module, state_dict=state, adapter_name=ADAPTER)
    return {k: v.detach().contiguous().cpu() for k, v in lora.items()}


def save_lora(module: nn.Module, settings: LoRASettings, folder: str | os.PathLike,
              state: dict[str, torch.Tensor] | None = None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lora.json").write_text(json.dumps(settings.to_dict(), indent=2))
    save_file(lora_state_dict(module, state), str(folder / "adapter.safetensors"))


def load_lora(module: nn.Module, folder: str | os.PathLike, part: str = "model") -> LoRASettings:
    """Inject the adapters saved in `folder` and load their weights strictly."""
    folder = Path(folder)
    settings = LoRASettings.from_dict(json.loads((folder / "lora.json").read_text()))
    add_lora(module, settings, part)
    state = load_file(str(folder / "adapter.safetensors"))
    expected = lora_state_dict(module)
    check_state_dict(expected, state, f"{part} LoRA ({folder})")
    set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
    return settings


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer's weights and put the plain layer back (in place): a model with
    no LoRA left, whose outputs equal the adapted model's (what an export writes)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, child in list(module.named_modules()):
        if isinstance(child, BaseTunerLayer):
            child.merge()
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, attr, child.get_base_layer())
    return module
