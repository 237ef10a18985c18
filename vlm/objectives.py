"""Training objectives, one registry per kind.

Stage objectives (`STAGE_OBJECTIVES`, a recipe stage's `objective:`) are what `VideoLLM.forward` computes for a
batch: "lm", the causal-LM loss on assistant tokens; "words", the word-alignment loss that trains the connector
without running the LLM; "slots", the detector-style loss of a `word_slots` connector's heads against per-frame
annotations (no LLM either). Each is a function (model, batch, return_logits) -> CausalLMOutputWithPast.

Contrastive objectives (`CONTRASTIVE_OBJECTIVES`) train video-text dual encoders: symmetric InfoNCE and SigLIP's
pairwise sigmoid loss. Both take L2-normalised embeddings video [B, E] and text [B, E] where row i of each is a
matching pair, or an explicit `positives` mask [B_video, B_text] (True where the pair matches: several captions of
one video in a batch).

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
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlm.llm.packing import enable_packing, pack
from vlm.llm.template import IGNORE_INDEX, VISUAL_TOKEN
from vlm.registry import Registry
from vlm.towers.base import VisualFeatures

if TYPE_CHECKING:
    from vlm.model import VideoLLM
    from vlm.processor import Batch


# ---------------------------------------------------------------------------------------------- stage objectives
class StageObjective(Protocol):
    """A stage objective: the model and a batch in, a causal-LM output whose `.loss` the stage minimises."""

    def __call__(self, model: VideoLLM, batch: Batch, return_logits: bool = False,
                 padding_free: bool = False) -> CausalLMOutputWithPast: ...


STAGE_OBJECTIVES: Registry[StageObjective] = Registry("stage objective")
register_stage_objective = STAGE_OBJECTIVES.register


@register_stage_objective("lm")
def causal_lm(model: VideoLLM, batch: Batch, return_logits: bool = False,
              padding_free: bool = False) -> CausalLMOutputWithPast:
    """Causal-LM output: `.loss` (mean over assistant tokens) when the batch has labels, `.logits` when it has
    none or `return_logits` is set.

    For training, the LM head runs only at positions that predict an assistant token: the vocabulary
    projection (49k x D for SmolLM2) at every position is most of the head's cost and memory otherwise.
    `padding_free`: the batch's real positions run as one packed row, without its padding (`vlm.llm.packing`).
    """
    embeds, attention, labels = model.embed(batch)
    llm = model.llm
    decoder = getattr(llm, getattr(llm, "base_model_prefix", "model"), None)
    head = llm.get_output_embeddings()
    sparse = (labels is not None and not return_logits and decoder is not None and head is not None
              and not getattr(llm.config, "final_logit_softcapping", None))
    if not sparse:
        return llm(inputs_embeds=embeds, attention_mask=attention, labels=labels, use_cache=False)
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, S]: position i predicts token i + 1
    if padding_free and embeds.shape[0] > 1 and not bool(attention.all()):
        enable_packing(llm)
        embeds, positions, targets, cu, longest = pack(embeds, attention, targets)
        hidden = decoder(inputs_embeds=embeds, position_ids=positions, use_cache=False, cu_seq_lens_q=cu,
                         cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest).last_hidden_state
    else:
        hidden = decoder(inputs_embeds=embeds, attention_mask=attention, use_cache=False).last_hidden_state
    picked = targets != IGNORE_INDEX  # [B, S] (one row of the batch's real positions when packed)
    logits = head(hidden[picked]).float()  # [n, V]
    loss = F.cross_entropy(logits, targets[picked])
    return CausalLMOutputWithPast(loss=loss)


def word_alignment_loss(model: VideoLLM, batch: Batch, temperature: float = 0.05) -> torch.Tensor:
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
    ids = batch.input_ids.to(model.device)
    rows = [i for i in range(ids.shape[0]) if bool((ids[i] == VISUAL_TOKEN).any())]
    visual = model.encode_visual(batch.pixel_values, batch.timestamps, None, batch.features, batch.grids)
    if visual.embeds.shape[0] != len(rows):
        raise ValueError("word_alignment_loss needs clips of equal length in a batch")
    vis = torch.nn.functional.normalize(visual.embeds.float(), dim=-1)  # [B, L, D]
    labels = batch.labels.to(model.device)[rows]  # [B, S]
    words = [set(row[row >= 0].tolist()) for row in labels]
    vocab = sorted(set().union(*words)) if words else []
    present = torch.tensor([[v in w for v in vocab] for w in words], dtype=torch.bool, device=model.device)
    informative = (present.sum(0) > 0) & (present.sum(0) < len(rows)) if vocab else present.new_zeros(0)
    if not bool(informative.any()):
        return vis.sum() * 0.0  # nothing tells these clips apart (e.g. a batch of one)
    vocab_t = torch.tensor(vocab, device=model.device)[informative]
    present = present[:, informative]  # [B, V]
    table = model.llm.get_input_embeddings().weight[vocab_t].detach().float()
    sim = torch.einsum("bld,vd->blv", vis, torch.nn.functional.normalize(table, dim=-1)) / temperature
    if visual.mask is not None:
        sim = sim.masked_fill(~visual.mask[..., None], float("-inf"))
    score = sim.amax(1).log_softmax(0)  # [B, V]: which clip does each word belong to?
    return -torch.logsumexp(score.masked_fill(~present, float("-inf")), dim=0).mean()


@register_stage_objective("words")
def word_alignment(model: VideoLLM, batch: Batch, return_logits: bool = False,
                   padding_free: bool = False) -> CausalLMOutputWithPast:
    """`word_alignment_loss` as the output's `.loss`: trains the connector without running the LLM."""
    return CausalLMOutputWithPast(loss=word_alignment_loss(model, batch))


@register_stage_objective("slots")
def slot_supervision(model: VideoLLM, batch: Batch, return_logits: bool = False,
                     padding_free: bool = False) -> CausalLMOutputWithPast:
    """The connector's `slot_loss` (a `word_slots` connector) on the batch's clips against the per-frame
    annotations their records carry (`vlm.data.regions`), as the output's `.loss`; the LLM is not run."""
    loss_of = getattr(model.connector, "slot_loss", None)
    if loss_of is None:
        raise ValueError(f"objective 'slots' trains a connector with slot heads (word_slots), not {type(model.connector).__name__}")
    if not batch.regions or any(r is None for r in batch.regions):
        raise ValueError("objective 'slots' needs every clip's record to carry 'regions' (vlm.data.regions)")
    if batch.features:
        if len({tuple(f.shape) for f in batch.features}) != 1:
            raise ValueError("objective 'slots' needs clips of equal length in a batch")
        dtype = next(model.connector.parameters()).dtype
        feats = VisualFeatures(tokens=torch.stack(batch.features).to(model.device, dtype), grid=tuple(batch.grids[0]),
                               timestamps=torch.stack(batch.timestamps).to(model.device))
    else:
        feats = model.tower_features(torch.stack(batch.pixel_values), torch.stack(batch.timestamps))
    return CausalLMOutputWithPast(loss=loss_of(feats, batch.regions))


slot_supervision.reads_text = False  # type: ignore[attr-defined]  # its samples are encoded without the chat template


def reads_text(objective: str) -> bool:
    """Whether a stage objective reads the conversation's tokens (the default); one that does not (`reads_text =
    False` on the function) gets samples without them: no tokenizing and padding a clip's text on every step."""
    return getattr(STAGE_OBJECTIVES.get(objective), "reads_text", True)


# ---------------------------------------------------------------------------------------------- contrastive
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


class ContrastiveObjective(nn.Module):
    """A contrastive loss: `forward(video [Bv, E], text [Bt, E], positives=None)` -> scalar loss, `logits(video,
    text)` -> [Bv, Bt], and the `temperature` it has learnt (for logging)."""

    def logits(self, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def temperature(self) -> float:
        raise NotImplementedError


CONTRASTIVE_OBJECTIVES: Registry[type[ContrastiveObjective]] = Registry("contrastive objective", ContrastiveObjective)
register_contrastive_objective = CONTRASTIVE_OBJECTIVES.register


@register_contrastive_objective("infonce")
class InfoNCELoss(ContrastiveObjective):
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


@register_contrastive_objective("siglip")
class SigmoidLoss(ContrastiveObjective):
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


def build_objective(name: str, **kwargs: float) -> ContrastiveObjective:
    """A registered contrastive objective by name ("infonce" | "siglip") with its keyword arguments."""
    return CONTRASTIVE_OBJECTIVES.build(name, **kwargs)
