"""Text-video retrieval: metrics with a stated tie rule, and a small dual encoder trained on frozen features.

Metrics (`retrieval_metrics`), from a similarity matrix S [N_text, N_video] and each text's video:
  text -> video   the query is a caption; it is correct when its own video is retrieved.
                  rank = 1 + number of *other* videos v with S[t, v] >= S[t, own video].
  video -> text   the query is a video with one or more captions; its rank is the best rank among its captions:
                  rank = 1 + number of captions of *other* videos with S[c, v] >= max over its own captions.
                  (Its own other captions never count against it.) A video without captions is not a query.
  R@K = percentage of queries with rank <= K; MdR = median rank (numpy median: the mean of the two middle
  ranks for an even count); MnR = mean rank.
Tie rule: pessimistic. A wrong item that scores exactly as high as the correct one is ranked above it. Ties
are then never a free win: a collapsed model that scores everything the same gets the worst rank instead of
R@1 = 100%, results do not depend on item order or a random tie-break, and the numbers are a lower bound.

The dual encoder (`DualEncoder`) keeps the vision tower frozen: tower tokens are space-pooled and cached once
(`evals.features`), then a temporal mean + linear projection (video side) and a linear projection over a
frozen text encoder's sentence embedding (text side: the packaged MiniLM, or mean-pooled LLM hidden states)
are trained with InfoNCE or SigLIP's sigmoid loss (`vlm.objectives`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from evals.features import describe_tower, extract_features
from evals.results import EvalResult
from vlm.data.conversation import DataFormatError
from vlm.objectives import build_objective
from vlm.towers.base import VisionTower
from vlm.train.loop import CONSTANT_LR, ScheduleSpec

log = logging.getLogger(__name__)
TextEncoder = Callable[[Sequence[str]], torch.Tensor]  # texts -> [N, D]


# ---------------------------------------------------------------------- metrics
def text_to_video_ranks(sim: torch.Tensor, text_video: torch.Tensor) -> torch.Tensor:
    """1-based pessimistic ranks [N_text] of each caption's own video among all videos."""
    own = sim.gather(1, text_video.view(-1, 1))  # [Nt, 1]
    return (sim >= own).sum(1)  # the own video counts itself once: 1 + others >= own


def video_to_text_ranks(sim: torch.Tensor, text_video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ranks [N_q], video ids [N_q]) for videos that have captions: best own caption vs other videos' captions."""
    n_video = sim.shape[1]
    own = text_video.view(-1, 1) == torch.arange(n_video, device=sim.device).view(1, -1)  # [Nt, Nv]
    has = own.any(0)  # [Nv]
    best = torch.where(own, sim, torch.full_like(sim, -math.inf)).max(0).values  # [Nv]
    beats = (sim >= best.view(1, -1)) & ~own  # [Nt, Nv] other videos' captions at or above the best own one
    ranks = 1 + beats.sum(0)
    ids = torch.nonzero(has).view(-1)
    return ranks[ids], ids


def _summary(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    r = ranks.double().cpu().numpy()
    out = {f"{prefix}_R@{k}": float(100.0 * (r <= k).mean()) for k in (1, 5, 10)}
    out[f"{prefix}_MdR"] = float(np.median(r))
    out[f"{prefix}_MnR"] = float(r.mean())
    return out


def retrieval_metrics(sim: torch.Tensor, text_video: Sequence[int] | torch.Tensor) -> dict[str, float]:
    """t2v_* and v2t_* R@1/5/10 (percent), MdR and MnR, plus query counts; see the module docstring."""
    sim = sim.float()
    tv = torch.as_tensor(text_video, dtype=torch.long, device=sim.device)
    if sim.dim() != 2 or tv.shape != (sim.shape[0],):
        raise ValueError(f"sim must be [N_text, N_video] and text_video [N_text]; got {tuple(sim.shape)}, {tuple(tv.shape)}")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"retrieval needs at least one caption and one video; the similarity matrix is {tuple(sim.shape)}")
    if tv.min() < 0 or tv.max() >= sim.shape[1]:
        raise ValueError(f"text_video holds video ids {int(tv.min())}..{int(tv.max())}, outside 0..{sim.shape[1] - 1}")
    if torch.isnan(sim).any():
        raise ValueError("similarity matrix has NaNs")
    t2v = text_to_video_ranks(sim, tv)
    v2t, _ = video_to_text_ranks(sim, tv)
    out = _summary(t2v, "t2v") | _summary(v2t, "v2t")
    out["text_queries"], out["video_queries"] = int(t2v.numel()), int(v2t.numel())
    return out


# ---------------------------------------------------------------------- data
@dataclass
class RetrievalItem:
    video: Path
    captions: list[str]


def load_retrieval(path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[RetrievalItem]:
    """[{"video": relative path, "captions": [...]}] (or "caption": str); paths relative to `root` (default: the file's folder)."""
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataFormatError(f"{path}: cannot read retrieval data: {e}") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a list of {{video, captions}}")
    items = []
    for i, rec in enumerate(data):
        caps = rec.get("captions", [rec["caption"]] if "caption" in rec else None) if isinstance(rec, dict) else None
        if not isinstance(rec, dict) or "video" not in rec or not caps or not all(isinstance(c, str) for c in caps):
            raise DataFormatError(f"{path}[{i}]: needs 'video' and a non-empty 'captions' list of strings")
        items.append(RetrievalItem(base / rec["video"], list(caps)))
    return items


# ---------------------------------------------------------------------- text encoders
class LLMTextEncoder:
    """Mean-pooled last hidden states of a causal LM over the caption's tokens (e.g. `VideoLLM.llm`)."""

    def __init__(self, llm: nn.Module, tokenizer: Any, batch_size: int = 16):
        self.llm, self.tokenizer, self.batch_size = llm, tokenizer, batch_size
        self.model_id = f"llm-mean-pool:{getattr(getattr(llm, 'config', None), 'name_or_path', type(llm).__name__)}"

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        device = next(self.llm.parameters()).device
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i : i + self.batch_size]), padding=True, return_tensors="pt").to(device)
            hidden = self.llm(**enc, output_hidden_states=True).hidden_states[-1].float()  # [b, S, D]
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)).cpu())
        return torch.cat(out)


# ---------------------------------------------------------------------- dual encoder
class DualEncoder(nn.Module):
    """Trainable heads over frozen features: video [B, T', Dv] -> [B, E]; text [B, Dt] -> [B, E]; both L2-normalised."""

    def __init__(self, video_dim: int, text_dim: int, embed_dim: int = 256):
        super().__init__()
        self.video_norm = nn.LayerNorm(video_dim)
        self.video_proj = nn.Linear(video_dim, embed_dim)
        self.text_norm = nn.LayerNorm(text_dim)
        self.text_proj = nn.Linear(text_dim, embed_dim)

    def encode_video(self, feats: torch.Tensor) -> torch.Tensor:
        pooled = feats.mean(dim=1) if feats.dim() == 3 else feats  # temporal mean: [B, Dv]
        return F.normalize(self.video_proj(self.video_norm(pooled)), dim=-1)

    def encode_text(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_norm(feats)), dim=-1)

    @torch.no_grad()
    def similarity(self, video_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """Cosine similarities [N_text, N_video]."""
        return self.encode_text(text_feats) @ self.encode_video(video_feats).t()


@dataclass
class TrainedDualEncoder:
    model: DualEncoder
    objective: nn.Module
    losses: list[float]


def train_dual_encoder(video_feats: torch.Tensor, text_feats: torch.Tensor, text_video: Sequence[int] | torch.Tensor, *,
                       objective: str = "infonce", embed_dim: int = 256, steps: int = 300, batch_size: int = 64,
                       lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0, progress: bool = False,
                       schedule: ScheduleSpec = CONSTANT_LR) -> TrainedDualEncoder:
    """Train the heads (and the objective's temperature / bias) on (video, caption) pairs, the rate following the
    training loop's warmup + cosine `schedule` (default: constant).

    Each step draws up to `batch_size` distinct videos and one random caption of each, so every batch row has
    exactly one positive. video_feats [Nv, T', Dv], text_feats [Nt, Dt], text_video [Nt] (caption -> video).
    """
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    tv = torch.as_tensor(text_video, dtype=torch.long)
    captions_of: dict[int, list[int]] = {}
    for t, v in enumerate(tv.tolist()):
        captions_of.setdefault(v, []).append(t)
    videos = sorted(captions_of)
    if len(videos) < 2:
        raise ValueError("contrastive training needs at least two videos with captions")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DualEncoder(video_feats.shape[-1], text_feats.shape[-1], embed_dim)
        loss_fn = build_objective(objective)
    params = list(model.parameters()) + [p for p in loss_fn.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = schedule.scheduler(opt, steps)
    losses: list[float] = []
    b = min(batch_size, len(videos))
    order: list[int] = []
    for step in range(steps):
        if len(order) < b:
            order += [videos[i] for i in torch.randperm(len(videos), generator=gen).tolist()]
        batch_v, order = order[:b], order[b:]
        if len(set(batch_v)) < len(batch_v):  # an epoch boundary repeated a video: keep the first of each
            batch_v = list(dict.fromkeys(batch_v))
        batch_t = [rng.choice(captions_of[v]) for v in batch_v]
        v_emb = model.encode_video(video_feats[batch_v])
        t_emb = model.encode_text(text_feats[batch_t])
        loss = loss_fn(v_emb, t_emb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if progress and (step % 50 == 0 or step == steps - 1):
            log.info("dual encoder step %d/%d: loss %.4f, temperature %.4f", step + 1, steps, losses[-1], loss_fn.temperature)
    model.eval()
    return TrainedDualEncoder(model, loss_fn, losses)


def _text_features(items: Sequence[RetrievalItem], encoder: TextEncoder) -> tuple[torch.Tensor, list[int]]:
    texts, owner = [], []
    for i, it in enumerate(items):
        texts += it.captions
        owner += [i] * len(it.captions)
    return encoder(texts).float(), owner


def evaluate_retrieval(
    tower: VisionTower,
    train_items: Sequence[RetrievalItem],
    test_items: Sequence[RetrievalItem],
    out_dir: str | os.PathLike,
    *,
    text_encoder: TextEncoder | None = None,
    objective: str = "infonce",
    num_frames: int = 8,
    steps: int = 300,
    batch_size: int = 64,
    embed_dim: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    tower_spec: Any = None,
    dataset: str = "",
    progress: bool = True,
    workers: int = 2,
) -> EvalResult:
    """Cache frozen-tower features, train the dual encoder on `train_items`, report retrieval on `test_items`;
    `workers` processes decode videos ahead of the tower (0: in this process)."""
    if text_encoder is None:
        from evals.text_embed import shared_minilm

        text_encoder = shared_minilm()
    out = Path(out_dir)
    tid = describe_tower(tower, tower_spec)
    t0 = time.perf_counter()
    splits = {}
    for name, items in (("train", train_items), ("test", test_items)):
        feats, index, errors = extract_features(tower, [it.video for it in items], num_frames=num_frames,
                                                cache=out / f"features_{name}.safetensors", tower_id=tid,
                                                progress=progress, workers=workers)
        kept = [items[i] for i in index]
        text_feats, owner = _text_features(kept, text_encoder)
        splits[name] = (feats, text_feats, owner, errors)
    trained = train_dual_encoder(splits["train"][0], splits["train"][1], splits["train"][2], objective=objective,
                                 embed_dim=embed_dim, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                 progress=progress)
    feats, text_feats, owner, errors = splits["test"]
    metrics = retrieval_metrics(trained.model.similarity(feats, text_feats), owner)
    skipped = [f"{name}: {its[i].video}: {e}" for name, its in (("train", train_items), ("test", test_items))
               for i, e in sorted(splits[name][3].items())]  # undecodable videos, named; their captions were dropped
    per_direction = {d: {k.split("_", 1)[1]: v for k, v in metrics.items() if k.startswith(d + "_")} for d in ("t2v", "v2t")}
    result = EvalResult(
        task_type="retrieval", model=tid, dataset={"name": dataset or "retrieval", "train_videos": len(train_items),
                                                   "test_videos": len(test_items)},
        metrics={k: v for k, v in metrics.items() if not k.endswith("queries")}, per_task=per_direction,
        counts={"test_videos": len(test_items), "text_queries": metrics["text_queries"],
                "video_queries": metrics["video_queries"], "skipped_train": len(splits["train"][3]),
                "skipped_test": len(errors), "skipped_reasons": skipped,
                "elapsed_seconds": round(time.perf_counter() - t0, 3)},
        settings={"objective": objective, "final_temperature": trained.objective.temperature,
                  "final_loss": trained.losses[-1], "first_loss": trained.losses[0], "steps": steps,
                  "batch_size": batch_size, "embed_dim": embed_dim, "lr": lr, "seed": seed, "num_frames": num_frames,
                  "text_encoder": getattr(text_encoder, "model_id", type(text_encoder).__name__),
                  "tie_rule": "pessimistic (a tie with a wrong item counts against the query)",
                  "video_query_rank": "best rank among the video's own captions"},
    )
    result.save(out / "results.json")
    save_file({k: v.contiguous() for k, v in trained.model.state_dict().items()}, str(out / "dual_encoder.safetensors"))
    from evals.report import write_report

    write_report([result], out)
    return result
