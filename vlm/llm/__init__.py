"""The LLM side: loading (HF folder / hub id / GGUF / packaged SmolLM2), LoRA, chat template + labels."""

from vlm.data.conversation import TemplateMismatchError
from vlm.llm.load import LLM_LOADERS, load_llm, packaged_smollm2_folder, register_llm_loader
from vlm.llm.lora import LoRASettings, add_lora
from vlm.llm.template import IGNORE_INDEX, VISUAL_TOKEN, ChatTemplate
