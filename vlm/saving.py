"""Saving and loading a VideoLLM: the whole model (`save_pretrained` / `from_pretrained`) and a stage-1 connector
with the record that checks it is re-attached to the tower and LLM it was trained for."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from vlm import __version__
from vlm.dispatch import dispatch
from vlm.llm.lora import LoRASettings, has_lora, load_lora, save_lora
from vlm.llm.lora import merge_lora as fold_lora
from vlm.model_config import saved_config
from vlm.processor import CONFIG_NAME, VideoLLMProcessor
from vlm.towers.common import placement
from vlm.weights import CheckpointMismatchError, atomic_dir, load_module, save_tensors

log = logging.getLogger(__name__)


class SavingMixin:
    """`VideoLLM`'s save and load methods (the class supplies `from_config`, `part`, `config`, `modes`)."""

    def part_state(self, part: str, state_dict: dict[str, torch.Tensor] | None = None, *,
                   base: bool = False) -> dict[str, torch.Tensor]:
        """One part's weights, from the live module or from a full (e.g. ZeRO-3-gathered) `state_dict`.
        base=True: without LoRA tensors and under the pre-LoRA key names."""
        if state_dict is None:
            state = self.part(part).state_dict()
        else:
            prefix = part + "."
            state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if base:
            state = {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write config.json, the connector, the trained or non-rebuildable parts, adapters and the processor
        (processor_config.json + tokenizer/).

        `state_dict`: the full model state when the live modules are partitioned (ZeRO-3), gathered beforehand.
        """
        folder = Path(folder)
        saved: list[str] = []
        with atomic_dir(folder) as tmp:
            save_tensors(self.part_state("connector", state_dict), tmp / "connector.safetensors")
            saved.append("connector")
            for part, module in (("tower", self.tower), ("llm", self.llm)):
                if has_lora(module):
                    save_lora(module, LoRASettings.from_dict(self.config.lora[part]), tmp / f"{part}_lora",
                              None if state_dict is None else self.part_state(part, state_dict))
                    saved.append(f"{part}_lora")
                rebuildable = (getattr(self.tower, "loaded_from_checkpoint", False) if part == "tower"
                               else self.config.llm.get("loader") != "random")
                if self.modes[part] == "full" or not rebuildable:
                    save_tensors(self.part_state(part, state_dict, base=True), tmp / f"{part}.safetensors")
                    saved.append(part)
            meta = {"vlm_version": __version__, "config": self.config.to_dict(), "saved_parts": saved,
                    "modes": self.modes, "num_visual_tokens": self.num_visual_tokens(self.config.num_frames)}
            (tmp / "config.json").write_text(json.dumps(meta, indent=2))
            self.processor.save_pretrained(tmp)
        log.info("saved %s (%s)", folder, ", ".join(saved))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, device_map: str | dict[str, Any] | None = None,
                        max_memory: dict[Any, Any] | None = None, offload_folder: str | None = None,
                        merge_lora: bool = False) -> "VideoLLM":
        """Rebuild from config.json and load the saved parts strictly (mismatches name part and key). The processor
        is the saved one; a folder saved without one gets a processor built from config.json. `merge_lora` folds
        saved adapters into their base weights (in float32, before any cast): the same outputs, one matmul per
        adapted layer instead of three, for inference (the evaluation, chat and serving entry points set it); the
        part is then a plain full part and cannot be tuned further as LoRA. Every part is moved
        to `device` in `dtype` (defaults: `vlm.towers.common.placement`, CUDA + bfloat16 when a GPU is present), or
        spread over devices by `device_map` ("auto": accelerate's big-model inference, see `vlm.dispatch`)."""
        folder = Path(folder)
        config, meta = saved_config(folder)
        lora = config.lora
        config.lora = {}
        processor = VideoLLMProcessor.from_pretrained(folder) if (folder / CONFIG_NAME).is_file() else None
        model = cls.from_config(config, processor)
        if model.processor.preprocessor != model.tower.preprocessor:
            raise CheckpointMismatchError(f"{folder}: {CONFIG_NAME} preprocesses frames as {model.processor.preprocessor}, "
                                          f"the tower expects {model.tower.preprocessor}")
        saved = set(meta["saved_parts"])
        for part in ("tower", "llm"):
            module = model.part(part)
            if part in saved:
                load_module(module, folder / f"{part}.safetensors", part)  # LoRA is added after its base
            if f"{part}_lora" in saved:
                settings = load_lora(module, folder / f"{part}_lora", part)
                model.config.lora[part] = settings.to_dict()
            elif part in lora:
                raise CheckpointMismatchError(f"{folder}: config lists LoRA on {part} but {part}_lora/ is missing")
        load_module(model.connector, folder / "connector.safetensors", "connector")
        for part, mode in meta.get("modes", {}).items():
            model.modes[part] = mode
        if merge_lora:
            for part in model.config.lora:
                fold_lora(model.part(part))
                model.modes[part] = "full"  # a save writes the merged weights
            model.config.lora = {}
        dev, dt = placement(device, dtype)
        if device_map is None:
            return model.to(device=dev, dtype=dt).eval()
        return dispatch(model, device_map, dt, max_memory=max_memory, offload_folder=offload_folder).eval()

    def connector_record(self) -> dict[str, Any]:
        """What a stage-1 connector needs to be re-attached: tower, dims, frames, connector config."""
        n = self.config.num_frames
        return {"vlm_version": __version__, "tower": self.config.tower, "tower_hidden_size": self.tower.hidden_size,
                "preprocessor": self.tower.preprocessor.to_dict(), "num_frames": n,
                "grid": list(self.tower.grid_for(n, *self.tower.preprocessor.hw)), "connector": self.config.connector,
                "num_visual_tokens": self.num_visual_tokens(n), "llm": self.config.llm,
                "llm_hidden_size": self.llm.get_input_embeddings().embedding_dim, "time_stamps": self.config.time_stamps}

    def save_connector(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Connector-only save (stage 1): connector.safetensors + connector.json."""
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            save_tensors(self.part_state("connector", state_dict), tmp / "connector.safetensors")
            (tmp / "connector.json").write_text(json.dumps(self.connector_record(), indent=2))
        return folder

    def load_connector(self, folder: str | Path) -> None:
        """Attach a connector saved by `save_connector`, after checking it was trained for this tower and LLM."""
        folder = Path(folder)
        record = json.loads((folder / "connector.json").read_text())
        mine = self.connector_record()
        for key in ("tower", "tower_hidden_size", "connector", "llm_hidden_size", "preprocessor"):
            if record.get(key) != mine[key]:
                raise CheckpointMismatchError(
                    f"connector ({folder}): '{key}' was {record.get(key)!r} when it was trained, this model has {mine[key]!r}")
        load_module(self.connector, folder / "connector.safetensors", "connector")

    @classmethod
    def from_connector(cls, folder: str | Path, **overrides: Any) -> "VideoLLM":
        """A model rebuilt from a connector-only save: the recorded tower and LLM, with the connector attached."""
        record = json.loads((Path(folder) / "connector.json").read_text())
        cfg = {"tower": record["tower"], "connector": record["connector"], "llm": record["llm"],
               "num_frames": record["num_frames"], "time_stamps": record.get("time_stamps", False)} | overrides
        (model := cls.from_config(cfg)).load_connector(folder)
        return model
