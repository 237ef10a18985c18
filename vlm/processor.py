"""VideoLLMProcessor: everything between raw inputs and a model's tensors, saved beside the model.

    clip (uint8 frames [T, H, W, 3]) -> preprocess_clip -> pixel_values [T, 3, H, W] + timestamps [T]
    turns + clip -> make_sample -> encode_sample (chat template, visual slot, labels) -> collate -> Batch

The processor holds the tokenizer, the chat template (with the system prompt), `max_length`, the tower's
`VideoPreprocessor` and the "Time: 1.5s" stamp setting. How many visual tokens T frames take is a property of the
tower and connector, so sizing a visual slot needs `visual_grid` (num_frames -> (groups, tokens per group)):
`VideoLLM` sets it on its own processor; a processor loaded on its own gets it as an argument.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from vlm import __version__
from vlm.data.conversation import PLACEHOLDERS, Turn
from vlm.llm.template import IGNORE_INDEX, VISUAL_TOKEN, ChatTemplate
from vlm.video.clip import Clip
from vlm.video.transforms import VideoPreprocessor

CONFIG_NAME = "processor_config.json"
TOKENIZER_DIR = "tokenizer"
VisualGrid = Callable[[int], tuple[int, int]]  # num_frames -> (groups, tokens per group)


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
    visual: list[torch.Tensor] = field(default_factory=list)  # ready visual tokens [L, D] (a long video's memory)
    regions: list[Any] = field(default_factory=list)  # per media sample, its per-frame annotations or None
    left_padded: bool = False  # generation and scoring batches pad on the left (rows end where the answer begins)

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.labels),
                     [p.to(device) for p in self.pixel_values], [t.to(device) for t in self.timestamps],
                     [f.to(device) for f in self.features], list(self.grids),
                     move(self.instruction_ids), move(self.instruction_mask), [v.to(device) for v in self.visual],
                     self.regions, self.left_padded)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pad_sequences(seqs: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """Id lists -> [len(seqs), longest] long tensor, padded with `value` on the right (or the left)."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if left:
                out[i, width - len(s):] = torch.as_tensor(s)
            else:
                out[i, : len(s)] = torch.as_tensor(s)
    return out


def clip_pixels(preprocessor: VideoPreprocessor, clip: Clip | np.ndarray | torch.Tensor,
                distinct: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values [T, 3, H, W], timestamps [T]) of a clip; `distinct`: a decoded `Clip`'s repeated frames (a short
    window's samples) once each. The processor and the training loader (which cannot hold the processor: it goes
    to DataLoader workers) both read clips through this."""
    return preprocessor.clip(clip.distinct() if distinct and isinstance(clip, Clip) else clip)


class VideoLLMProcessor:
    """Tokenizer + chat template + clip preprocessing + sample building + collation into `Batch`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, preprocessor: VideoPreprocessor, *,
                 system_prompt: str | None = None, max_length: int = 2048, time_stamps: bool = False,
                 uses_instruction: bool = False, distinct_frames: bool = False, visual_grid: VisualGrid | None = None):
        self.tokenizer = tokenizer
        self.preprocessor = preprocessor
        self.template = ChatTemplate(tokenizer, system_prompt)
        self.max_length = max_length
        self.time_stamps = time_stamps  # "Time: 1.5s" before each temporal group of visual tokens
        self.uses_instruction = uses_instruction  # samples carry instruction_ids (instruction-aware connectors)
        self.distinct_frames = distinct_frames  # a repeated frame of a clip is read once (`Clip.distinct`)
        self.visual_grid = visual_grid

    @property
    def system_prompt(self) -> str | None:
        return self.template.system_prompt

    @system_prompt.setter
    def system_prompt(self, value: str | None) -> None:
        self.template.system_prompt = value

    # ---------------------------------------------------------------- media
    def preprocess_clip(self, clip: Clip | np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values [T, 3, H, W], timestamps [T]) of a clip, with this processor's `VideoPreprocessor`; with
        `distinct_frames`, a decoded `Clip`'s repeated frames once each."""
        return clip_pixels(self.preprocessor, clip, self.distinct_frames)

    def visual_slot(self, num_frames: int, timestamps: Sequence[float] | None = None) -> list[int]:
        """Token ids that replace the placeholder: VISUAL_TOKEN runs, with "Time: x.xs" stamps if enabled."""
        if self.visual_grid is None:
            raise ValueError("this processor cannot size a visual slot: it was loaded without its model; use "
                             "VideoLLM.from_pretrained(folder).processor or pass visual_grid=model.visual_grid")
        groups, per_group = self.visual_grid(num_frames)
        times = None if timestamps is None else group_starts(timestamps, groups)
        return self.group_slot(groups, per_group, times)

    def group_slot(self, groups: int, per_group: int, times: Sequence[float] | None = None) -> list[int]:
        """The slot of `groups` runs of `per_group` visual tokens, each run after "Time: x.xs" (its start second)
        when time stamps are on and there is more than one group."""
        if not self.time_stamps or times is None or groups < 2:
            return [VISUAL_TOKEN] * (groups * per_group)
        slot: list[int] = []
        for t in times:
            slot += self.tokenizer(f"Time: {t:.1f}s", add_special_tokens=False)["input_ids"]
            slot += [VISUAL_TOKEN] * per_group
        return slot

    def memory_slot(self, memory: Any) -> list[int]:
        """The slot of a `vlm.memory` memory: its groups, each after the second it starts at."""
        return self.group_slot(*memory.layout)

    def instruction_ids(self, turns: Sequence[Turn], media_type: str | None) -> list[int]:
        """What an instruction-aware connector is conditioned on: the first user turn without its placeholder."""
        text = next((t.text for t in turns if t.role == "user"), "")
        text = text.replace(PLACEHOLDERS.get(media_type or "", "\0"), "").strip()
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] or [self.tokenizer.eos_token_id]

    # ---------------------------------------------------------------- samples and batches
    def make_sample(self, turns: Sequence[Turn], clip: Clip | None = None, media_type: str | None = None,
                    sample_id: str = "sample", memory: Any = None) -> dict[str, Any]:
        """A `build_batch` sample from conversation turns and a decoded `vlm.video.Clip` (or None for text), or
        a long video's `vlm.memory.VideoMemory` (its tokens as they are, each group after its time stamp)."""
        if memory is not None:
            return {"id": sample_id, "turns": list(turns), "media_type": "video", "visual": memory.tokens,
                    "slot": self.memory_slot(memory)}
        if clip is None:
            return {"id": sample_id, "turns": list(turns), "media_type": None}
        if media_type is None:
            media_type = "image" if clip.frames.shape[0] == 1 and PLACEHOLDERS["image"] in turns[0].text else "video"
        pixel_values, timestamps = self.preprocess_clip(clip)
        return {"id": sample_id, "turns": list(turns), "media_type": media_type,
                "pixel_values": pixel_values, "timestamps": timestamps}

    def encode_sample(self, sample: dict[str, Any], *, generation: bool = False, prefill: str = "",
                      text: bool = True) -> dict[str, Any]:
        """Tokenize one sample {"id", "turns", "media_type", "pixel_values" [T,3,H,W] | "features" [T',N,D] + "grid"
        + "num_frames", "timestamps" [T]} into ids/labels around its visual slot. Raises TemplateMismatchError.
        text=False keeps only the visual part (and regions): for objectives that never read the conversation."""
        media_type = sample.get("media_type")
        out: dict[str, Any] = {"id": str(sample.get("id", "sample"))}
        slot: list[int] = []
        if "visual" in sample:
            out["visual"], slot = sample["visual"], list(sample["slot"])
        elif media_type is not None:
            if "features" in sample:
                num_frames = int(sample["num_frames"])
                out["features"], out["grid"] = sample["features"], tuple(sample["grid"])
            else:
                num_frames = sample["pixel_values"].shape[0]
                out["pixel_values"] = sample["pixel_values"]
            ts = sample.get("timestamps")
            ts = torch.zeros(num_frames) if ts is None else torch.as_tensor(ts, dtype=torch.float32)
            out["timestamps"] = ts
            if "regions" in sample:  # dense annotations ride along for the "slots" objective (vlm.data.regions)
                out["regions"] = sample["regions"]
            if text:
                slot = self.visual_slot(num_frames, ts.tolist())
                if self.uses_instruction:
                    out["instruction_ids"] = self.instruction_ids(sample["turns"], media_type)
        if not text:
            return out
        if generation:
            out["input_ids"] = self.template.encode_prompt(sample["turns"], media_type, slot, prefill, out["id"])
        else:
            enc = self.template.encode(sample["turns"], media_type, slot, self.max_length, out["id"])
            out["input_ids"], out["labels"] = enc.input_ids, enc.labels
        return out

    def collate(self, encoded: Sequence[dict[str, Any]], *, generation: bool = False) -> Batch:
        """Pad encoded samples into a Batch (left padding for generation)."""
        pad_id = self.tokenizer.pad_token_id
        ids = [e.get("input_ids", []) for e in encoded]  # none where the samples were encoded without text
        media = [e for e in encoded if "timestamps" in e]
        instr = [e["instruction_ids"] for e in media if "instruction_ids" in e]
        batch = Batch(
            input_ids=pad_sequences(ids, pad_id, left=generation),
            attention_mask=pad_sequences([[1] * len(x) for x in ids], 0, left=generation),
            labels=None if generation else pad_sequences([e.get("labels", []) for e in encoded], IGNORE_INDEX),
            pixel_values=[e["pixel_values"] for e in media if "pixel_values" in e],
            timestamps=[e["timestamps"] for e in media],
            features=[e["features"] for e in media if "features" in e],
            grids=[e["grid"] for e in media if "features" in e],
            visual=[e["visual"] for e in encoded if "visual" in e],
            regions=[e.get("regions") for e in media] if any("regions" in e for e in media) else [],
            left_padded=generation,
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

    # ---------------------------------------------------------------- saving / loading
    def to_dict(self) -> dict[str, Any]:
        """The settings saved in processor_config.json (the tokenizer is saved beside it)."""
        return {"processor_class": type(self).__name__, "vlm_version": __version__,
                "preprocessor": self.preprocessor.to_dict(), "system_prompt": self.system_prompt,
                "max_length": self.max_length, "time_stamps": self.time_stamps, "uses_instruction": self.uses_instruction,
                "distinct_frames": self.distinct_frames}

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `processor_config.json` and the tokenizer (`tokenizer/`) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder / TOKENIZER_DIR)
        (folder / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, visual_grid: VisualGrid | None = None) -> "VideoLLMProcessor":
        """A processor saved by `save_pretrained` (alone or by `VideoLLM.save_pretrained`)."""
        folder = Path(folder)
        path = folder / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no {CONFIG_NAME} (a model saved before processors were saved loads "
                                    "with VideoLLM.from_pretrained, which builds its processor from config.json)")
        settings = json.loads(path.read_text())
        for key in ("processor_class", "vlm_version"):  # a record of who wrote the file
            settings.pop(key, None)
        preprocessor = VideoPreprocessor.from_dict(settings.pop("preprocessor"))
        tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR))
        return cls(tokenizer, preprocessor, **settings, visual_grid=visual_grid)  # unknown settings: a TypeError


def drop_pruned(ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor | None,
                keep: torch.Tensor, left: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Remove the visual positions a token reducer pruned from ids, attention and labels [B, S]; `keep` [n] says
    per VISUAL_TOKEN position (in order) whether it stays. Rows are re-padded on the left when `left` (a generation
    or scoring batch: `Batch.left_padded`), else on the right; None: on the side they were padded on (seen from
    the attention mask, which cannot tell a batch of rows of one length)."""
    is_visual = ids == VISUAL_TOKEN
    if keep.numel() != int(is_visual.sum()):
        raise ValueError(f"the ids have {int(is_visual.sum())} visual positions, the keep mask {keep.numel()}")
    kept = attention.bool().clone()
    kept[is_visual] = keep.reshape(-1).to(kept.device)
    left = bool(attention[:, 0].eq(0).any()) if left is None else left
    width = int(kept.sum(1).max())
    new_ids, new_attention = ids.new_zeros(ids.shape[0], width), attention.new_zeros(ids.shape[0], width)  # pad: any id
    new_labels = None if labels is None else labels.new_full((ids.shape[0], width), IGNORE_INDEX)
    for i in range(ids.shape[0]):
        r = kept[i].nonzero().squeeze(-1)
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        new_ids[i, sl], new_attention[i, sl] = ids[i, r], 1
        if new_labels is not None:
            new_labels[i, sl] = labels[i, r]  # type: ignore[index]
    return new_ids, new_attention, new_labels


def group_starts(timestamps: Sequence[float] | torch.Tensor, groups: int) -> list[float]:
    """The second at which each of `groups` equal temporal groups of these frames starts (its first frame's)."""
    return [float(timestamps[g * len(timestamps) // groups]) for g in range(groups)]
