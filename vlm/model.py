"""VideoLLM: vision tower + connector + causal LLM, assembled from a config of registry keys.

    pixels [B, T, 3, H, W] -> tower -> VisualFeatures [B, T', N, D_vis] -> connector -> [B, L, D_llm]
    -> spliced into the LLM's input embeddings at the <video>/<image> placeholder -> loss / generate
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

import vlm.connectors  # noqa: F401  (registers built-in connectors)
import vlm.towers  # noqa: F401  (registers built-in towers)
from vlm import __version__
from vlm.weights import CheckpointMismatchError, atomic_dir, load_module, save_tensors
from vlm.connectors.base import Instruction, VisualTokens, build_connector
from vlm.data.conversation import PLACEHOLDERS, Turn
from vlm.llm.load import load_llm
from vlm.llm.lora import LoRASettings, add_lora, has_lora, load_lora, save_lora
from vlm.llm.template import IGNORE_INDEX, VISUAL_TOKEN, ChatTemplate
from vlm.scoring import ScoringMixin
from vlm.towers.base import VisionTower, VisualFeatures, build_tower

log = logging.getLogger(__name__)
PARTS = ("tower", "connector", "llm")
MODES = ("frozen", "lora", "full")


@dataclass
class VideoLLMConfig:
    """Everything needed to rebuild a model: parts by registry key + kwargs, and the video settings."""

    tower: dict[str, Any]  # {"name": "siglip", "model": "google/siglip-so400m-patch14-384", ...}
    connector: dict[str, Any]  # {"name": "stc", "downsample": [2, 2, 2], "reduce": [...]}
    llm: dict[str, Any]  # {"loader": "hf", "path": "Qwen/Qwen2-7B-Instruct", "dtype": "bfloat16"}
    num_frames: int = 16
    sampling: str = "uniform"
    time_stamps: bool = False  # "Time: 1.5s" before each temporal group of visual tokens
    max_length: int = 2048
    system_prompt: str | None = None
    lora: dict[str, dict[str, Any]] = field(default_factory=dict)  # part -> LoRA settings in use

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VideoLLMConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
        for part in PARTS:
            if part not in d:
                raise ValueError(f"model config needs '{part}'")
        return cls(**copy.deepcopy(d))


@dataclass
class Batch:
    """Model inputs for a batch of conversations; pixel tensors only for samples that have media."""

    input_ids: torch.Tensor  # [B, S] with VISUAL_TOKEN at visual positions
    attention_mask: torch.Tensor  # [B, S]
    labels: torch.Tensor | None  # [B, S] or None for generation
    pixel_values: list[torch.Tensor]  # per media sample, [T, 3, H, W] (empty when features are cached)
    timestamps: list[torch.Tensor]  # per media sample, [T]
    features: list[torch.Tensor] = field(default_factory=list)  # cached tower outputs [T', N, D] (instead of pixels)
    grids: list[tuple[int, int, int]] = field(default_factory=list)  # the grid of each cached feature tensor
    instruction_ids: torch.Tensor | None = None  # [B_media, S_i] for instruction-aware connectors
    instruction_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.labels),
                     [p.to(device) for p in self.pixel_values], [t.to(device) for t in self.timestamps],
                     [f.to(device) for f in self.features], list(self.grids),
                     move(self.instruction_ids), move(self.instruction_mask))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pad_sequences(seqs: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if left:
                out[i, width - len(s):] = torch.as_tensor(s)
            else:
                out[i, : len(s)] = torch.as_tensor(s)
    return out


class VideoLLM(ScoringMixin, nn.Module):
    """The model. Parameter groups are its three children, `tower`, `connector` and `llm`."""

    def __init__(self, config: VideoLLMConfig, tower: VisionTower, connector: nn.Module, llm: nn.Module, tokenizer: Any):
        super().__init__()
        self.config = config
        self.tower = tower
        self.connector = connector
        self.llm = llm
        self.tokenizer = tokenizer
        self.template = ChatTemplate(tokenizer, config.system_prompt)
        self.modes: dict[str, str] = {"tower": "frozen", "connector": "full", "llm": "frozen"}

    # ---------------------------------------------------------------- building
    @classmethod
    def from_config(cls, config: VideoLLMConfig | dict[str, Any]) -> "VideoLLM":
        if isinstance(config, dict):
            config = VideoLLMConfig.from_dict(config)
        tower_cfg = dict(config.tower)
        tower = build_tower(tower_cfg.pop("name"), **tower_cfg)
        llm, tokenizer = load_llm(**config.llm)
        conn_cfg = dict(config.connector)
        connector = build_connector(conn_cfg.pop("name"), in_dim=tower.hidden_size,
                                    out_dim=llm.get_input_embeddings().embedding_dim, **conn_cfg)
        norm = getattr(connector, "output_norm", None)
        if norm is not None:  # visual tokens at the per-channel RMS of the text embeddings
            with torch.no_grad():
                norm.scale.fill_(float(llm.get_input_embeddings().weight.float().pow(2).mean().sqrt()))
        model = cls(config, tower, connector, llm, tokenizer)
        for part, mode in model.modes.items():  # defaults: tower and LLM frozen, connector trained
            model.set_mode(part, mode)
        for part, settings in list(config.lora.items()):
            model.set_mode(part, "lora", settings)
        return model

    def part(self, name: str) -> nn.Module:
        if name not in PARTS:
            raise KeyError(f"unknown model part '{name}'; parts are {PARTS}")
        return getattr(self, name)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part name (what per-part learning rates apply to)."""
        return {p: [q for q in self.part(p).parameters() if q.requires_grad] for p in PARTS}

    def set_mode(self, part: str, mode: str, lora: dict[str, Any] | LoRASettings | None = None) -> None:
        """frozen: no gradients; full: all parameters train; lora: adapters (added once) train, the rest frozen."""
        if mode not in MODES:
            raise ValueError(f"{part}: mode must be one of {MODES}, got '{mode}'")
        module = self.part(part)
        if mode == "lora":
            settings = lora if isinstance(lora, LoRASettings) else LoRASettings.from_dict(
                lora if lora is not None else self._default_lora(part))
            if not has_lora(module):
                add_lora(module, settings, part)
                self.config.lora[part] = settings.to_dict()
            for name, p in module.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            for p in module.parameters():
                p.requires_grad_(mode == "full")
        self.modes[part] = mode

    def train(self, mode: bool = True) -> "VideoLLM":
        """Train mode for trained parts only: frozen parts stay in eval mode (no dropout, no BatchNorm updates)."""
        super().train(mode)
        if mode:
            for part, part_mode in self.modes.items():
                if part_mode == "frozen":
                    self.part(part).eval()
        return self

    def _default_lora(self, part: str) -> dict[str, Any]:
        if part == "tower" and getattr(self.tower, "lora_targets", ()):
            return {"targets": list(self.tower.lora_targets)}
        return {}

    # ---------------------------------------------------------------- visual tokens
    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    def visual_grid(self, num_frames: int) -> tuple[int, int]:
        """(groups, tokens per group) the connector emits for `num_frames` preprocessed frames."""
        size = self.tower.preprocessor.size
        h, w = (size, size) if isinstance(size, int) else size
        return self.connector.output_grid(self.tower.grid_for(num_frames, h, w))

    def num_visual_tokens(self, num_frames: int) -> int:
        groups, per_group = self.visual_grid(num_frames)
        return groups * per_group

    def visual_slot(self, num_frames: int, timestamps: Sequence[float] | None = None) -> list[int]:
        """Token ids that replace the placeholder: VISUAL_TOKEN runs, with "Time: x.xs" stamps if enabled."""
        groups, per_group = self.visual_grid(num_frames)
        if not self.config.time_stamps or timestamps is None or groups < 2:
            return [VISUAL_TOKEN] * (groups * per_group)
        slot: list[int] = []
        for g in range(groups):
            t = float(timestamps[g * num_frames // groups])
            slot += self.tokenizer(f"Time: {t:.1f}s", add_special_tokens=False)["input_ids"]
            slot += [VISUAL_TOKEN] * per_group
        return slot

    def encode_visual(self, pixel_values: list[torch.Tensor], timestamps: list[torch.Tensor],
                      instruction: Instruction | None = None, features: list[torch.Tensor] | None = None,
                      grids: list[tuple[int, int, int]] | None = None) -> VisualTokens:
        """Tower (skipped for cached `features`) + connector per media sample; equal shapes run as one batch."""
        inputs = list(features) if features else list(pixel_values)
        if not inputs:
            raise ValueError("encode_visual needs at least one clip")
        shapes: dict[tuple[Any, ...], list[int]] = {}
        for i, x in enumerate(inputs):
            shapes.setdefault((tuple(x.shape), tuple(grids[i]) if features else None), []).append(i)
        pieces: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        groups = 1
        for (_, grid), idx in shapes.items():
            x = torch.stack([inputs[i] for i in idx]).to(self.device)  # [b, T, 3, H, W] or [b, T', N, D]
            ts = torch.stack([timestamps[i] for i in idx]).to(self.device)  # [b, T]
            if features:
                if self.tower.temporal_patch > 1:
                    ts = ts[:, :: self.tower.temporal_patch][:, : grid[0]]
                feats = VisualFeatures(tokens=x.to(next(self.connector.parameters()).dtype), grid=grid, timestamps=ts)
            else:
                feats = self.tower(x.to(next(self.tower.parameters()).dtype), ts)
            ins = None
            if instruction is not None and getattr(self.connector, "uses_instruction", False):
                ins = Instruction(instruction.embeds[idx], instruction.mask[idx])
            out = self.connector(feats, ins)
            groups = out.groups
            for j, i in enumerate(idx):
                pieces[i] = (out.embeds[j], None if out.mask is None else out.mask[j])
        embeds = [pieces[i][0] for i in range(len(inputs))]
        masks = [pieces[i][1] for i in range(len(inputs))]
        if len({e.shape for e in embeds}) != 1:  # clips of different lengths: concatenated in sample order
            cat_mask = None
            if any(m is not None for m in masks):
                cat_mask = torch.cat([m if m is not None else torch.ones(e.shape[0], dtype=torch.bool, device=e.device)
                                      for m, e in zip(masks, embeds)])[None]
            return VisualTokens(torch.cat(embeds)[None], groups, cat_mask)
        mask = None if all(m is None for m in masks) else torch.stack(
            [m if m is not None else torch.ones(e.shape[0], dtype=torch.bool, device=e.device) for m, e in zip(masks, embeds)])
        return VisualTokens(torch.stack(embeds), groups, mask)

    # ---------------------------------------------------------------- batching
    def make_sample(self, turns: Sequence[Turn], clip: Any = None, media_type: str | None = None,
                    sample_id: str = "sample") -> dict[str, Any]:
        """A `build_batch` sample from conversation turns and a decoded `vlm.video.Clip` (or None for text)."""
        if clip is None:
            return {"id": sample_id, "turns": list(turns), "media_type": None}
        if media_type is None:
            media_type = "image" if clip.frames.shape[0] == 1 and PLACEHOLDERS["image"] in turns[0].text else "video"
        return {"id": sample_id, "turns": list(turns), "media_type": media_type,
                "pixel_values": self.tower.preprocessor(clip.frames),  # [T, 3, H, W]
                "timestamps": torch.as_tensor(clip.timestamps, dtype=torch.float32)}

    def _instruction_text(self, turns: Sequence[Turn], media_type: str | None) -> str:
        text = next((t.text for t in turns if t.role == "user"), "")
        return text.replace(PLACEHOLDERS.get(media_type or "", "\0"), "").strip()

    def encode_sample(self, sample: dict[str, Any], *, generation: bool = False, prefill: str = "") -> dict[str, Any]:
        """Tokenize one sample {"id", "turns", "media_type", "pixel_values" [T,3,H,W] | "features" [T',N,D] + "grid"
        + "num_frames", "timestamps" [T]} into ids/labels around its visual slot. Raises TemplateMismatchError."""
        media_type = sample.get("media_type")
        out: dict[str, Any] = {"id": str(sample.get("id", "sample"))}
        slot: list[int] = []
        if media_type is not None:
            if "features" in sample:
                num_frames = int(sample["num_frames"])
                out["features"], out["grid"] = sample["features"], tuple(sample["grid"])
            else:
                num_frames = sample["pixel_values"].shape[0]
                out["pixel_values"] = sample["pixel_values"]
            ts = sample.get("timestamps")
            ts = torch.zeros(num_frames) if ts is None else torch.as_tensor(ts, dtype=torch.float32)
            out["timestamps"] = ts
            slot = self.visual_slot(num_frames, ts.tolist())
            if getattr(self.connector, "uses_instruction", False):
                text = self._instruction_text(sample["turns"], media_type)
                out["instruction_ids"] = self.tokenizer(text, add_special_tokens=False)["input_ids"] or [self.tokenizer.eos_token_id]
        if generation:
            out["input_ids"] = self.template.encode_prompt(sample["turns"], media_type, slot, prefill, out["id"])
        else:
            enc = self.template.encode(sample["turns"], media_type, slot, self.config.max_length, out["id"])
            out["input_ids"], out["labels"] = enc.input_ids, enc.labels
        return out

    def collate(self, encoded: Sequence[dict[str, Any]], *, generation: bool = False) -> Batch:
        """Pad encoded samples into a Batch (left padding for generation)."""
        pad_id = self.tokenizer.pad_token_id
        ids = [e["input_ids"] for e in encoded]
        media = [e for e in encoded if "timestamps" in e]
        instr = [e["instruction_ids"] for e in media if "instruction_ids" in e]
        batch = Batch(
            input_ids=pad_sequences(ids, pad_id, left=generation),
            attention_mask=pad_sequences([[1] * len(x) for x in ids], 0, left=generation),
            labels=None if generation else pad_sequences([e["labels"] for e in encoded], IGNORE_INDEX),
            pixel_values=[e["pixel_values"] for e in media if "pixel_values" in e],
            timestamps=[e["timestamps"] for e in media],
            features=[e["features"] for e in media if "features" in e],
            grids=[e["grid"] for e in media if "features" in e],
        )
        if instr:
            batch.instruction_ids = pad_sequences(instr, pad_id)
            batch.instruction_mask = pad_sequences([[1] * len(x) for x in instr], 0).bool()
        return batch

    def build_batch(self, samples: Sequence[dict[str, Any]], *, generation: bool = False, prefill: str = "") -> Batch:
        """`encode_sample` + `collate`: for training, labels cover assistant tokens; for generation the prompt ends
        with the assistant header (+ `prefill`) and sequences are left-padded."""
        return self.collate([self.encode_sample(s, generation=generation, prefill=prefill) for s in samples],
                            generation=generation)

    # ---------------------------------------------------------------- forward
    def embed(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(inputs_embeds [B, S, D], attention_mask [B, S], labels [B, S]) with visual tokens spliced in."""
        ids = batch.input_ids.to(self.device)
        attention = batch.attention_mask.to(self.device)
        labels = None if batch.labels is None else batch.labels.to(self.device)
        embed_tokens = self.llm.get_input_embeddings()
        is_visual = ids == VISUAL_TOKEN  # [B, S]
        embeds = embed_tokens(ids.clamp(min=0))  # [B, S, D]
        if not batch.pixel_values and not batch.features:
            if is_visual.any():
                raise ValueError("input_ids have visual positions but the batch has no pixels")
            return embeds, attention, labels
        instruction = None
        if batch.instruction_ids is not None:
            instruction = Instruction(embed_tokens(batch.instruction_ids.to(self.device)), batch.instruction_mask.to(self.device))
        visual = self.encode_visual(batch.pixel_values, batch.timestamps, instruction, batch.features, batch.grids)
        flat = visual.embeds.reshape(-1, visual.embeds.shape[-1]).to(embeds.dtype)  # [sum L, D]
        if flat.shape[0] != int(is_visual.sum()):
            raise ValueError(f"the batch has {int(is_visual.sum())} visual positions but the connector produced "
                             f"{flat.shape[0]} tokens; build batches with VideoLLM.build_batch")
        embeds = embeds.masked_scatter(is_visual.unsqueeze(-1), flat)
        if labels is not None:
            labels = labels.masked_fill(is_visual, IGNORE_INDEX)
        if visual.mask is not None and not bool(visual.mask.all()):
            embeds, attention, labels = self._drop_pruned(embeds, attention, labels, is_visual, visual.mask)
        return embeds, attention, labels

    def _drop_pruned(self, embeds: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor | None,
                     is_visual: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Remove visual positions a token reducer pruned, re-padding on the side the batch was padded on."""
        keep = attention.bool().clone()
        keep[is_visual] = mask.reshape(-1).to(keep.device)
        left = bool(attention[:, 0].eq(0).any())
        rows = [keep[i].nonzero().squeeze(-1) for i in range(embeds.shape[0])]
        width = max(len(r) for r in rows)
        new_e = embeds.new_zeros(embeds.shape[0], width, embeds.shape[-1])
        new_a = attention.new_zeros(embeds.shape[0], width)
        new_l = None if labels is None else labels.new_full((embeds.shape[0], width), IGNORE_INDEX)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if left else slice(0, len(r))
            new_e[i, sl] = embeds[i, r]
            new_a[i, sl] = 1
            if new_l is not None:
                new_l[i, sl] = labels[i, r]  # type: ignore[index]
        return new_e, new_a, new_l

    def forward(self, batch: Batch, return_logits: bool = False, objective: str = "lm") -> Any:
        """Causal-LM output: `.loss` (mean over assistant tokens) when the batch has labels, `.logits` when it has
        none or `return_logits` is set. `objective="words"` returns `word_alignment_loss` instead (no LLM forward).

        For training, the LM head runs only at positions that predict an assistant token: the vocabulary
        projection (49k x D for SmolLM2) at every position is most of the head's cost and memory otherwise.
        """
        if objective == "words":
            return CausalLMOutputWithPast(loss=self.word_alignment_loss(batch))
        if objective != "lm":
            raise ValueError(f"unknown objective '{objective}' (lm | words)")
        embeds, attention, labels = self.embed(batch)
        decoder = getattr(self.llm, getattr(self.llm, "base_model_prefix", "model"), None)
        head = self.llm.get_output_embeddings()
        sparse = (labels is not None and not return_logits and decoder is not None and head is not None
                  and not getattr(self.llm.config, "final_logit_softcapping", None))
        if not sparse:
            return self.llm(inputs_embeds=embeds, attention_mask=attention, labels=labels, use_cache=False)
        hidden = decoder(inputs_embeds=embeds, attention_mask=attention, use_cache=False).last_hidden_state  # [B, S, D]
        targets = labels[:, 1:]  # position i predicts token i + 1
        picked = targets != IGNORE_INDEX  # [B, S-1]
        logits = head(hidden[:, :-1][picked]).float()  # [n, V]
        loss = torch.nn.functional.cross_entropy(logits, targets[picked])
        return CausalLMOutputWithPast(loss=loss)

    def word_alignment_loss(self, batch: Batch, temperature: float = 0.05) -> torch.Tensor:
        """Ground the visual tokens in the LLM's own word embeddings, without running the LLM.

        For each token id v of the batch's assistant text, every clip scores v by its best-matching visual token
        (cosine with the LLM's input embedding of v, / temperature); a softmax over the clips of the batch must
        put the mass on the clips whose text contains v (multi-positive InfoNCE, one term per id). Ids in every
        clip's text or in none (template tokens, "the") carry no information and are left out, so the loss only
        asks what tells clips apart: colours, shapes, directions, counts. A connector trained this way emits
        tokens that point at the words describing its clip, which the LLM can attend to and copy.
        """
        if batch.labels is None:
            raise ValueError("word_alignment_loss needs a batch with labels (the target text)")
        ids = batch.input_ids.to(self.device)
        rows = [i for i in range(ids.shape[0]) if bool((ids[i] == VISUAL_TOKEN).any())]
        visual = self.encode_visual(batch.pixel_values, batch.timestamps, None, batch.features, batch.grids)
        if visual.embeds.shape[0] != len(rows):
            raise ValueError("word_alignment_loss needs clips of equal length in a batch")
        vis = torch.nn.functional.normalize(visual.embeds.float(), dim=-1)  # [B, L, D]
        labels = batch.labels.to(self.device)[rows]  # [B, S]
        words = [set(row[row >= 0].tolist()) for row in labels]
        vocab = sorted(set().union(*words)) if words else []
        present = torch.tensor([[v in w for v in vocab] for w in words], dtype=torch.bool, device=self.device)
        informative = (present.sum(0) > 0) & (present.sum(0) < len(rows)) if vocab else present.new_zeros(0)
        if not bool(informative.any()):
            return vis.sum() * 0.0  # nothing tells these clips apart (e.g. a batch of one)
        vocab_t = torch.tensor(vocab, device=self.device)[informative]
        present = present[:, informative]  # [B, V]
        table = self.llm.get_input_embeddings().weight[vocab_t].detach().float()
        sim = torch.einsum("bld,vd->blv", vis, torch.nn.functional.normalize(table, dim=-1)) / temperature
        if visual.mask is not None:
            sim = sim.masked_fill(~visual.mask[..., None], float("-inf"))
        score = sim.amax(1).log_softmax(0)  # [B, V]: which clip does each word belong to?
        return -torch.logsumexp(score.masked_fill(~present, float("-inf")), dim=0).mean()

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, **kwargs: Any) -> list[str]:
        """Answers for a generation batch (greedy by default; sampling with do_sample=True)."""
        embeds, attention, _ = self.embed(batch)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=attention, max_new_tokens=max_new_tokens,
                                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                                **sampling, **kwargs)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    # ---------------------------------------------------------------- saving / loading
    def _tower_rebuildable(self) -> bool:
        return bool(getattr(self.tower, "loaded_from_checkpoint", False))

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
        """Write config.json, the connector, the trained or non-rebuildable parts, adapters and the tokenizer.

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
                rebuildable = self._tower_rebuildable() if part == "tower" else self.config.llm.get("loader") != "random"
                if self.modes[part] == "full" or not rebuildable:
                    save_tensors(self.part_state(part, state_dict, base=True), tmp / f"{part}.safetensors")
                    saved.append(part)
            meta = {"vlm_version": __version__, "config": self.config.to_dict(), "saved_parts": saved,
                    "modes": self.modes, "num_visual_tokens": self.num_visual_tokens(self.config.num_frames)}
            (tmp / "config.json").write_text(json.dumps(meta, indent=2))
            self.tokenizer.save_pretrained(tmp / "tokenizer")
        log.info("saved %s (%s)", folder, ", ".join(saved))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "VideoLLM":
        """Rebuild from config.json and load the saved parts strictly (mismatches name part and key)."""
        folder = Path(folder)
        meta_path = folder / "config.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{folder}: not a saved VideoLLM (no config.json)")
        meta = json.loads(meta_path.read_text())
        config = VideoLLMConfig.from_dict(meta["config"])
        lora = config.lora
        config.lora = {}
        model = cls.from_config(config)
        saved = set(meta["saved_parts"])
        for part in ("tower", "llm"):
            module = model.part(part)
            if part in saved:
                load_module(_without_lora(module), folder / f"{part}.safetensors", part)
            if f"{part}_lora" in saved:
                settings = load_lora(module, folder / f"{part}_lora", part)
                model.config.lora[part] = settings.to_dict()
            elif part in lora:
                raise CheckpointMismatchError(f"{folder}: config lists LoRA on {part} but {part}_lora/ is missing")
        load_module(model.connector, folder / "connector.safetensors", "connector")
        for part, mode in meta.get("modes", {}).items():
            model.modes[part] = mode
        model.eval()
        return model

    def connector_record(self) -> dict[str, Any]:
        """What a stage-1 connector needs to be re-attached: tower, dims, frames, connector config."""
        n = self.config.num_frames
        size = self.tower.preprocessor.size
        h, w = (size, size) if isinstance(size, int) else size
        return {
            "vlm_version": __version__,
            "tower": self.config.tower, "tower_hidden_size": self.tower.hidden_size,
            "preprocessor": self.tower.preprocessor.to_dict(), "num_frames": n,
            "grid": list(self.tower.grid_for(n, h, w)), "connector": self.config.connector,
            "num_visual_tokens": self.num_visual_tokens(n),
            "llm": self.config.llm, "llm_hidden_size": self.llm.get_input_embeddings().embedding_dim,
            "time_stamps": self.config.time_stamps,
        }

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
        model = cls.from_config(cfg)
        model.load_connector(folder)
        return model


def _without_lora(module: nn.Module) -> nn.Module:
    """A view of the module's base weights for saving/loading: LoRA parameters are stored separately."""
    if not has_lora(module):
        return module
    return _BaseWeights(module)


class _BaseWeights(nn.Module):
    """Exposes `state_dict`/`load_state_dict` of a LoRA-injected module without the adapter tensors, under the
    original (pre-injection) key names."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._m = [module]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {k.replace(".base_layer.", "."): v for k, v in self._m[0].state_dict().items() if "lora_" not in k}

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        target = self._m[0].state_dict()
        renamed = {}
        for k in target:
            if "lora_" in k:
                continue
            renamed[k] = state[k.replace(".base_layer.", ".")]
        return self._m[0].load_state_dict(renamed, strict=False)
