"""The LLM side: loading (HF folder / hub id / GGUF / packaged SmolLM2), LoRA, chat template + labels."""

from vlm.llm.load import load_llm, packaged_smollm2_folder, register_llm_loader
from vlm.llm.lora import LoRASettings, add_lora
from vlm.llm.template import IGNORE_INDEX, VISUAL_TOKEN, ChatTemplate, TemplateMismatchError

__all__ = ["load_llm", "packaged_smollm2_folder", "register_llm_loader", "LoRASettings", "add_lora",
           "IGNORE_INDEX", "VISUAL_TOKEN", "ChatTemplate", "TemplateMismatchError"]
