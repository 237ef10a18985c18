"""Contrastive objectives for video-text dual encoders: symmetric InfoNCE and SigLIP's pairwise sigmoid loss.

Both take L2-normalised embeddings video [B, E] and text [B, E] where row i of each is a matching pair, or an
explicit `positives` mask [B_video, B_text] (True where the pair matches: several captions of one video in a
batch). They live in `vlm` (not `evals`) because training code may use them and `vlm` never imports `evals`.

InfoNCE (CLIP; Radford et al. 2021, and the video-text form of e.g. CLIP4Clip): logits = s * V T^T with a
learnable scale s = exp(log_scale), initialised to 1/0.07 and clamped to <= 100; loss = mean of the
video->text and text->video cross-entropies. With `positives`, the target of a row is uniform over its
positives (a multi-positive soft target).

SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"): logits = t * V T^T + b with
learnable t = exp(t'), t' initialised to log 10, and b initialised to -10; every pair is an independent
binary problem, z = +1 for a positive and -1 otherwise, loss = -sum(log sigmoid(z * logits)) / B_video.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _check(video: torch.Tensor, text: torch.Tensor, positives: torch.Tensor | None) -> torch.Tensor:
    if video.dim() != 2 or text.dim() != 2 or video.shape[1] != text.shape[1]:
        raise ValueError(f"expected video [B, E] and text [B', E], got {tuple(video.shape)} and {tuple(text.shape)}")
    if positives is None:
        if video.shape[0] != text.shape[0]:
            raise ValueError("without a positives mask, video and text must be paired row by row")
        return torch.eye(video.shape[0], dtype=torch.bool, device=video.device)
    if positives.shape != (video.shape[0], text.shape[0]):
        raise ValueError(f"positives must be [{video.shape[0]}, {text.shape[0]}], got {tuple(positives.shape)}")
    if not bool(positives.any(1).all()) or not bool(positives.any(0).all()):
        raise ValueError("every video and every text needs at least one positive")
    return positives.bool()


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE with a learnable temperature (scale = 1 / temperature)."""

    def __init__(self, init_temperature: float = 0.07, learnable: bool = True, max_scale: float = 100.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learnable)
        self.max_scale = float(max_scale)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.scale.detach())

    def logits(self, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.scale * video @ text.t()  # [Bv, Bt]

    def forward(self, video: torch.Tensor, text: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
        pos = _check(video, text, positives)
        logits = self.logits(video, text)  # [Bv, Bt]
        if positives is None:
            target = torch.arange(video.shape[0], device=video.device)
            return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        v2t = pos.float() / pos.sum(1, keepdim=True)  # [Bv, Bt] soft targets
        t2v = pos.t().float() / pos.t().sum(1, keepdim=True)  # [Bt, Bv]
        loss_v = -(v2t * F.log_softmax(logits, dim=1)).sum(1).mean()
        loss_t = -(t2v * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
        return 0.5 * (loss_v + loss_t)


class SigmoidLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss with learnable temperature t and bias b."""

    def __init__(self, init_t: float = math.log(10.0), init_b: float = -10.0, learnable: bool = True):
        super().__init__()
        self.t_prime = nn.Parameter(torch.tensor(float(init_t)), requires_grad=learnable)
        self.bias = nn.Parameter(torch.tensor(float(init_b)), requires_grad=learnable)

    @property
    def temperature(self) -> float:
        """1 / t, for logging alongside InfoNCE's temperature."""
        return float(1.0 / self.t_prime.detach().exp())

    def logits(self, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.t_prime.exp() * video @ text.t() + self.bias  # [Bv, Bt]

    def forward(self, video: torch.Tensor, text: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
        pos = _check(video, text, positives)
        z = pos.float() * 2.0 - 1.0  # +1 positives, -1 negatives
        return -F.logsigmoid(z * self.logits(video, text)).sum() / video.shape[0]


OBJECTIVES = {"infonce": InfoNCELoss, "siglip": SigmoidLoss}


def build_objective(name: str, **kwargs: float) -> nn.Module:
    """"infonce" | "siglip"."""
    if name not in OBJECTIVES:
        raise KeyError(f"unknown contrastive objective '{name}'; objectives: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)
