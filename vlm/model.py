"""VideoLLM: vision tower + connector + causal LLM, assembled from a config of registry keys.

The module holds tensors; its `processor` (`VideoLLMProcessor`, saved and loaded with it) prepares text and pixels.
The video-to-LLM path of training, generation, scoring and chat lives here once: `encode_visual` (clips -> visual
tokens), `splice` (input embeddings, visual tokens at the placeholder), `prefill` + `extend` (KV cache).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import Cache, DynamicCache

import vlm.connectors  # noqa: F401  (registers built-in connectors)
import vlm.towers  # noqa: F401  (registers built-in towers)
from vlm.budget import TokenBudget
from vlm.connectors.base import Instruction, VisualTokens, build_connector
from vlm.llm.load import load_llm
from vlm.llm.lora import LoRASettings, add_lora, has_lora
from vlm.llm.template import IGNORE_INDEX, VISUAL_TOKEN
from vlm.objectives import STAGE_OBJECTIVES
from vlm.model_config import MODES, PARTS, SETTINGS, VideoLLMConfig, saved_config  # noqa: F401  (re-exported)
from vlm.processor import Batch, VideoLLMProcessor, drop_pruned
from vlm.saving import SavingMixin
from vlm.scoring import ScoringMixin
from vlm.towers.base import VisionTower, VisualFeatures, build_tower


class VideoLLM(ScoringMixin, SavingMixin, nn.Module):
    """The model. Parameter groups are its three children, `tower`, `connector` and `llm`; `processor` turns
    conversations and clips into its `Batch` (its visual slots sized by this model's `visual_grid`)."""

    def __init__(self, config: VideoLLMConfig, tower: VisionTower, connector: nn.Module, llm: nn.Module,
                 processor: VideoLLMProcessor):
        super().__init__()
        self.config = config
        self.tower = tower
        self.connector = connector
        self.llm = llm
        self.processor = processor
        self.budget = TokenBudget.from_dict(config.token_budget)
        processor.visual_grid = self.visual_grid
        self.modes: dict[str, str] = {"tower": "frozen", "connector": "full", "llm": "frozen"}

    # ---------------------------------------------------------------- building
    @classmethod
    def from_config(cls, config: VideoLLMConfig | dict[str, Any], processor: VideoLLMProcessor | None = None) -> "VideoLLM":
        """Build the parts from their registry keys; the processor from the config unless one is given."""
        if isinstance(config, dict):
            config = VideoLLMConfig.from_dict(config)
        tower_cfg = dict(config.tower)
        tower = build_tower(tower_cfg.pop("name"), **tower_cfg)
        llm, tokenizer = load_llm(**config.llm)
        conn_cfg = dict(config.connector)
        connector = build_connector(conn_cfg.pop("name"), in_dim=tower.hidden_size,
                                    out_dim=llm.get_input_embeddings().embedding_dim, **conn_cfg)
        connector.attach_llm(llm.get_input_embeddings(), tokenizer)
        if processor is None:
            processor = VideoLLMProcessor(tokenizer, tower.preprocessor, system_prompt=config.system_prompt,
                                          max_length=config.max_length, time_stamps=config.time_stamps,
                                          uses_instruction=bool(getattr(connector, "uses_instruction", False)),
                                          distinct_frames=config.distinct_frames)
        model = cls(config, tower, connector, llm, processor)
        for part, mode in model.modes.items():  # defaults: tower and LLM frozen, connector trained
            model.set_mode(part, mode)
        for part, settings in list(config.lora.items()):
            model.set_mode(part, "lora", settings)
        return model

    def apply_settings(self, settings: dict[str, Any]) -> None:
        """Change config fields that change no weights (`SETTINGS`: the token budget, prompt length, system prompt,
        time stamps, the connector's `settings`) on a built model, its processor included."""
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise ValueError(f"{sorted(unknown)} change the weights; only {list(SETTINGS)} can be changed on a built model")
        for key, value in settings.items():
            if key == "connector":
                self.connector.apply_settings(value)
                self.config.connector.update(copy.deepcopy(value))
                continue
            setattr(self.config, key, copy.deepcopy(value))
            if key == "token_budget":
                self.budget = TokenBudget.from_dict(value)
            else:
                setattr(self.processor, key, value)

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
        """LoRA settings when none are given: a tower's own `lora_targets` where it names them, else the library's."""
        targets = getattr(self.tower, "lora_targets", ()) if part == "tower" else ()
        return {"targets": list(targets)} if targets else {}

    # ---------------------------------------------------------------- video -> LLM
    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    def visual_grid(self, num_frames: int) -> tuple[int, int]:
        """(groups, tokens per group) the connector emits for `num_frames` preprocessed frames."""
        grid = self.tower.grid_for(num_frames, *self.tower.preprocessor.hw)
        return self.connector.output_grid(self.budget.grid(grid, self.connector))

    def num_visual_tokens(self, num_frames: int) -> int:
        groups, per_group = self.visual_grid(num_frames)
        return groups * per_group

    def tower_features(self, pixel_values: torch.Tensor, timestamps: torch.Tensor) -> VisualFeatures:
        """The tower on pixels [B, T, 3, H, W] (in the tower's dtype) with timestamps [B, T]: tokens [B, T', N, D]."""
        return self.tower(pixel_values.to(self.device, next(self.tower.parameters()).dtype), timestamps.to(self.device))

    def encode_visual(self, pixel_values: list[torch.Tensor], timestamps: list[torch.Tensor],
                      instruction: Instruction | None = None, features: list[torch.Tensor] | None = None,
                      grids: list[tuple[int, int, int]] | None = None) -> VisualTokens:
        """Tower (skipped for cached `features`) + connector per media sample; equal shapes run as one batch. Without
        gradients, a clip given several times (one clip's questions, scored together) is encoded once, unless the
        connector reads each sample's instruction."""
        inputs = list(features) if features else list(pixel_values)
        if not inputs:
            raise ValueError("encode_visual needs at least one clip")
        shapes: dict[tuple[Any, ...], list[int]] = {}
        for i, x in enumerate(inputs):
            shapes.setdefault((tuple(x.shape), tuple(grids[i]) if features else None), []).append(i)
        pieces: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        groups = 1
        reads_instruction = instruction is not None and getattr(self.connector, "uses_instruction", False)
        for (_, grid), same_shape in shapes.items():
            first = {i: i for i in same_shape}  # each sample -> the first sample with the same clip and times
            if not torch.is_grad_enabled() and not reads_instruction:
                for n, i in enumerate(same_shape):
                    first[i] = next((k for k in same_shape[:n] if first[k] == k and torch.equal(inputs[k], inputs[i])
                                     and torch.equal(timestamps[k], timestamps[i])), i)
            idx = [i for i in same_shape if first[i] == i]
            x = torch.stack([inputs[i] for i in idx]).to(self.device)  # [b, T, 3, H, W] or [b, T', N, D]
            ts = torch.stack([timestamps[i] for i in idx]).to(self.device)  # [b, T]
            if features:
                if self.tower.temporal_patch > 1:
                    ts = ts[:, :: self.tower.temporal_patch][:, : grid[0]]
                feats = VisualFeatures(tokens=x.to(next(self.connector.parameters()).dtype), grid=grid, timestamps=ts)
            else:
                feats = self.tower_features(x, ts)
            ins = None
            if instruction is not None and getattr(self.connector, "uses_instruction", False):
                ins = Instruction(instruction.embeds[idx], instruction.mask[idx])
            out = self.connector(self.budget.apply(feats, self.connector), ins)
            groups = out.groups
            for j, i in enumerate(idx):
                pieces[i] = (out.embeds[j], None if out.mask is None else out.mask[j])
            for i in same_shape:
                pieces[i] = pieces[first[i]]
        embeds = [pieces[i][0] for i in range(len(inputs))]  # each [L_i, D]
        masks = None if all(pieces[i][1] is None for i in pieces) else [
            m if m is not None else torch.ones(e.shape[0], dtype=torch.bool, device=e.device)
            for e, m in (pieces[i] for i in range(len(inputs)))]
        if len({e.shape for e in embeds}) != 1:  # clips of different lengths: concatenated in sample order
            return VisualTokens(torch.cat(embeds)[None], groups, None if masks is None else torch.cat(masks)[None])
        return VisualTokens(torch.stack(embeds), groups, None if masks is None else torch.stack(masks))

    def embed_instruction(self, ids: torch.Tensor, mask: torch.Tensor) -> Instruction:
        """What an instruction-aware connector attends to: the LLM's embeddings of ids [B, S] with mask [B, S]."""
        return Instruction(self.llm.get_input_embeddings()(ids.to(self.device)), mask.to(self.device))

    def splice(self, ids: torch.Tensor, visual: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings [B, S, D] of ids [B, S]: the LLM's token embeddings, with the rows of `visual` [n, D]
        filling the n VISUAL_TOKEN positions in order."""
        ids = ids.to(self.device)
        embeds = self.llm.get_input_embeddings()(ids.clamp(min=0))  # [B, S, D]
        is_visual = ids == VISUAL_TOKEN  # [B, S]
        count = 0 if visual is None else visual.shape[0]
        if count != int(is_visual.sum()):
            raise ValueError(f"the ids have {int(is_visual.sum())} visual positions but {count} visual tokens were "
                             "given; build batches with VideoLLM.processor.build_batch")
        return embeds if visual is None else embeds.masked_scatter(is_visual.unsqueeze(-1),
                                                                   visual.to(embeds.device, embeds.dtype))

    def embed(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(inputs_embeds [B, S, D], attention_mask [B, S], labels [B, S]) with visual tokens spliced in and the
        positions a token reducer pruned removed."""
        ids, attention = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        labels = None if batch.labels is None else batch.labels.to(self.device)
        visual = None
        if batch.visual:  # ready tokens (a long video's memory): no tower, no connector
            if batch.pixel_values or batch.features:
                raise ValueError("a batch mixes ready visual tokens with clips; build them in separate batches")
            visual = torch.cat(batch.visual).to(self.device)
        elif batch.pixel_values or batch.features:
            instruction = None if batch.instruction_ids is None else self.embed_instruction(batch.instruction_ids,
                                                                                            batch.instruction_mask)
            tokens = self.encode_visual(batch.pixel_values, batch.timestamps, instruction, batch.features, batch.grids)
            visual = tokens.embeds.reshape(-1, tokens.embeds.shape[-1])  # [sum L, D]
            if tokens.mask is not None and not bool(tokens.mask.all()):
                ids, attention, labels = drop_pruned(ids, attention, labels, tokens.mask, batch.left_padded)
                visual = visual[tokens.mask.reshape(-1)]
        if labels is not None:
            labels = labels.masked_fill(ids == VISUAL_TOKEN, IGNORE_INDEX)
        return self.splice(ids, visual), attention, labels

    def prefill(self, embeds: torch.Tensor, attention: torch.Tensor | None = None, logits_to_keep: int = 1,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, Cache]:
        """Run a prompt's embeddings [B, S, D] through the LLM into a new KV cache: (logits [B, keep, V] of the last
        `logits_to_keep` positions (0: all), the cache)."""
        cache = DynamicCache(config=self.llm.config)
        return self.extend(cache, embeds, attention, logits_to_keep, position_ids), cache

    def extend(self, cache: Cache, embeds: torch.Tensor, attention: torch.Tensor | None = None,
               logits_to_keep: int = 1, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Append positions (embeddings [B, S, D]) to `cache` in place; `attention` [B, past + S] covers the cached
        positions too, `position_ids` [B, S] are the new positions' (default: counted on from the cache's length,
        padding included). Returns the logits [B, keep, V] of the last `logits_to_keep` positions (0: all)."""
        return self.llm(inputs_embeds=embeds, attention_mask=attention, past_key_values=cache, use_cache=True,
                        logits_to_keep=logits_to_keep, position_ids=position_ids).logits

    # ---------------------------------------------------------------- forward
    def forward(self, batch: Batch, return_logits: bool = False, objective: str = "lm", padding_free: bool = False) -> Any:
        """The stage objective `objective` (registered in `vlm.objectives`) on a batch: "lm", the causal-LM output
        (`.loss` on assistant tokens when the batch has labels, `.logits` without them or with `return_logits`;
        `padding_free`: the loss from the batch's real positions packed into one row, `vlm.llm.packing`);
        "words" and "slots", connector losses as `.loss` (no LLM forward; `vlm.objectives`)."""
        return STAGE_OBJECTIVES.get(objective)(self, batch, return_logits, padding_free)

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, **kwargs: Any) -> list[str]:
        """Answers for a generation batch (greedy by default; sampling with do_sample=True)."""
        embeds, attention, _ = self.embed(batch)
        tokenizer = self.processor.tokenizer
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=attention, max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                **sampling, **kwargs)
        return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
