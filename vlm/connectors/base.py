"""The connector interface: visual features in, LLM-width tokens out, with the count known up front."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from vlm.registry import Registry
from vlm.towers.base import VisualFeatures


@dataclass
class Instruction:
    """The instruction text as LLM input embeddings, for instruction-aware connectors (InstructBLIP)."""

    embeds: torch.Tensor  # [B, S, D_llm]
    mask: torch.Tensor  # [B, S] bool, True = real token


@dataclass
class VisualTokens:
    """Connector output, in chronological order: `groups` equal consecutive chunks, one per output time step."""

    embeds: torch.Tensor  # [B, L, D_llm]
    groups: int  # L % groups == 0; 1 when the connector summarises the whole clip
    mask: torch.Tensor | None = None  # [B, L] bool, True = keep (pruned tokens are False); None = all kept
    timestamps: torch.Tensor | None = None  # [B, groups] seconds at which each group starts; None = unknown


class TokenReducer(nn.Module):
    """Reduces visual tokens before a connector (pooling, merging, pruning). Usable on its own."""

    def output_grid(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        raise NotImplementedError

    def forward(self, feats: VisualFeatures) -> VisualFeatures:
        raise NotImplementedError


class Connector(nn.Module):
    """Maps VisualFeatures [B, T', N, D_vis] to VisualTokens [B, L, D_llm], after optional token reducers.

    Subclasses implement `project` and `project_grid`; `num_tokens(grid)` is exact for every connector whose
    output does not depend on the data, and an upper bound when a reducer prunes (the mask says what is kept).
    """

    uses_instruction: bool = False
    settings: tuple[str, ...] = ()  # constructor arguments that change no weights: a saved model may change them

    def __init__(self, in_dim: int, out_dim: int, reducers: Sequence[TokenReducer] = ()):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.reducers = nn.ModuleList(reducers)

    def apply_settings(self, values: dict[str, Any]) -> None:
        """Change constructor arguments listed in `settings` on a built connector (they change no weights)."""
        unknown = set(values) - set(self.settings)
        if unknown:
            raise ValueError(f"{type(self).__name__}: {sorted(unknown)} change the weights; only {list(self.settings)} "
                             "can be changed on a built connector")
        if values:
            self.configure(**values)

    def configure(self, **values: Any) -> None:
        """Set the `settings` arguments (subclasses that have any validate them here)."""
        raise NotImplementedError(f"{type(self).__name__} has no settings")

    def attach_llm(self, embeddings: nn.Embedding, tokenizer: Any) -> None:
        """Called by VideoLLM at assembly with the LLM's input embeddings and tokenizer: an `OutputNorm` takes the
        text embeddings' per-channel RMS as its scale; connectors that emit words look their tokens up."""
        norm = getattr(self, "output_norm", None)
        if norm is not None:
            with torch.no_grad():
                norm.scale.fill_(float(embeddings.weight.float().pow(2).mean().sqrt()))

    def project_grid(self, grid: tuple[int, int, int]) -> tuple[int, int]:
        """(groups, tokens per group) that `project` emits for features on `grid`."""
        raise NotImplementedError

    def project(self, feats: VisualFeatures, instruction: Instruction | None = None) -> VisualTokens:
        raise NotImplementedError

    def reduced_grid(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        for reducer in self.reducers:
            grid = reducer.output_grid(grid)
        return grid

    def output_grid(self, grid: tuple[int, int, int]) -> tuple[int, int]:
        return self.project_grid(self.reduced_grid(grid))

    def num_tokens(self, grid: tuple[int, int, int]) -> int:
        groups, per_group = self.output_grid(grid)
        return groups * per_group

    def forward(self, feats: VisualFeatures, instruction: Instruction | None = None) -> VisualTokens:
        for reducer in self.reducers:
            feats = reducer(feats)
        out = self.project(feats, instruction)
        norm, clock = getattr(self, "output_norm", None), getattr(self, "time_encoding", None)
        embeds = out.embeds if norm is None else norm(out.embeds)
        if clock is not None:
            embeds = clock(embeds, out.groups, out.timestamps)
        return VisualTokens(embeds, out.groups, out.mask, out.timestamps)


class TimeEncoding(nn.Module):
    """Each visual token gets its group's absolute time in seconds: sinusoids of periods from 1 s to about an hour,
    through a learnable projection to the LLM width that starts at zero (adding it to a trained connector changes
    nothing until it is trained). A frame keeps its time whatever the number of frames sampled or merged around
    it, unlike positions counted in tokens; the alternative to "Time: x.xs" text stamps (`time_stamps`)."""

    def __init__(self, dim: int, bands: int = 16):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi / torch.logspace(0, math.log10(4096), bands), persistent=False)
        self.proj = nn.Linear(2 * bands, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, embeds: torch.Tensor, groups: int, timestamps: torch.Tensor | None) -> torch.Tensor:
        if timestamps is None:
            raise ValueError("time_encoding needs the clips' timestamps (VisualFeatures.timestamps)")
        if timestamps.shape[1] != groups:  # e.g. one stamp per frame, two frames per group
            timestamps = timestamps[:, torch.arange(groups) * timestamps.shape[1] // groups]
        angles = timestamps.to(self.freqs.device, torch.float32)[..., None] * self.freqs  # [B, G, bands]
        clock = self.proj(torch.cat([angles.sin(), angles.cos()], -1))  # [B, G, D]
        return embeds + clock.repeat_interleave(embeds.shape[1] // groups, dim=1).to(embeds.dtype)


class OutputNorm(nn.Module):
    """Standardises visual tokens over the data and scales them to the LLM's text embeddings.

    Per channel, the running mean over clips and positions is subtracted and the result divided by the running
    standard deviation (BatchNorm statistics: batch statistics in train mode, running ones in eval mode), then
    multiplied by a learnable per-channel gain and by `scale`, the RMS of one channel of the LLM's input
    embeddings (set by `Connector.attach_llm` at assembly, saved with the connector). Without it, a connector
    trained through a frozen LLM drifts into a large constant soft prompt: tokens ~20x the text-embedding norm of
    which ~0.2% of the energy differs between videos, so after the LLM's first RMSNorm every video looks the same
    (docs/GROUNDING.md).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.stats = nn.BatchNorm1d(dim, affine=False)
        self.gain = nn.Parameter(torch.ones(dim))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        b, l, d = embeds.shape
        x = self.stats(embeds.reshape(b * l, d).float()).reshape(b, l, d)
        return (x * self.gain * self.scale).to(embeds.dtype)


CONNECTORS: Registry[type[Connector]] = Registry("connector", Connector)
REDUCERS: Registry[type[TokenReducer]] = Registry("token reducer", TokenReducer)
register_connector = CONNECTORS.register
register_reducer = REDUCERS.register


def build_connector(
    name: str, in_dim: int, out_dim: int, reduce: Sequence[dict[str, Any]] = (), **kwargs: Any
) -> Connector:
    """Build a connector by key; `reduce` is a list of {"name": reducer_key, **kwargs} applied in order first;
    `output_norm="standardize"` adds an `OutputNorm` after any connector ("none", the default, adds nothing);
    `time_encoding="sinusoid"` adds a `TimeEncoding` after it."""
    output_norm = kwargs.pop("output_norm", "none")
    time_encoding = kwargs.pop("time_encoding", "none")
    if time_encoding not in ("none", "sinusoid"):
        raise ValueError(f"connector '{name}': time_encoding must be 'none' or 'sinusoid', got '{time_encoding}'")
    if output_norm not in ("none", "standardize"):
        raise ValueError(f"connector '{name}': output_norm must be 'none' or 'standardize', got '{output_norm}'")
    reducers = []
    for spec in reduce:
        spec = dict(spec)
        reducers.append(REDUCERS.build(spec.pop("name"), **spec))
    connector = CONNECTORS.get(name)(in_dim=in_dim, out_dim=out_dim, reducers=reducers, **kwargs)
    if output_norm == "standardize":
        connector.output_norm = OutputNorm(out_dim)
    if time_encoding == "sinusoid":
        connector.time_encoding = TimeEncoding(out_dim)
    return connector
