"""Retrieval metrics (tie rule, several captions per video), contrastive objectives, dual-encoder training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evals.retrieval import retrieval_metrics, text_to_video_ranks, train_dual_encoder, video_to_text_ranks
from vlm.objectives import InfoNCELoss, SigmoidLoss, build_objective
from tests.eval_helpers import single_thread  # noqa: F401  (fixture)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    yield


def test_ties_count_against_the_query():
    sim = torch.zeros(3, 3)  # a collapsed model: every score equal
    m = retrieval_metrics(sim, [0, 1, 2])
    assert m["t2v_R@1"] == 0.0 and m["t2v_MnR"] == 3.0 and m["v2t_MdR"] == 3.0
    sim = torch.tensor([[0.9, 0.9, 0.1],   # caption 0 ties its video with video 1 -> rank 2
                        [0.2, 0.8, 0.3],   # caption 1: rank 1
                        [0.5, 0.6, 0.4]])  # caption 2: videos 0 and 1 score higher -> rank 3
    assert text_to_video_ranks(sim, torch.tensor([0, 1, 2])).tolist() == [2, 1, 3]
    m = retrieval_metrics(sim, [0, 1, 2])
    assert m["t2v_R@1"] == pytest.approx(100 / 3) and m["t2v_MdR"] == 2.0 and m["t2v_MnR"] == 2.0


def test_several_captions_per_video():
    # captions 0, 1 belong to video 0; caption 2 to video 1; caption 3 to video 2
    text_video = torch.tensor([0, 0, 1, 2])
    sim = torch.tensor([[0.1, 0.5, 0.0],
                        [0.7, 0.2, 0.0],
                        [0.7, 0.9, 0.0],
                        [0.0, 0.0, 0.3]])
    assert text_to_video_ranks(sim, text_video).tolist() == [2, 1, 1, 1]
    ranks, ids = video_to_text_ranks(sim, text_video)
    # video 0: best own caption is 1 (0.7); caption 2 of video 1 ties it -> rank 2 (caption 0 never counts)
    # video 1: its caption 2 (0.9) is the best in the column -> rank 1; video 2: rank 1
    assert ids.tolist() == [0, 1, 2] and ranks.tolist() == [2, 1, 1]
    m = retrieval_metrics(sim, text_video)
    assert m["text_queries"] == 4 and m["video_queries"] == 3
    assert m["v2t_R@1"] == pytest.approx(200 / 3) and m["t2v_R@5"] == 100.0
    # a video without captions is not a query
    m = retrieval_metrics(torch.rand(2, 3), [0, 2])
    assert m["video_queries"] == 2


def test_infonce_matches_cross_entropy_and_learns_temperature():
    torch.manual_seed(0)
    v, t = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    loss_fn = InfoNCELoss()
    assert loss_fn.temperature == pytest.approx(0.07)
    logits = (1 / 0.07) * v @ t.t()
    expected = 0.5 * (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.t(), torch.arange(5)))
    loss = loss_fn(v, t)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert loss_fn.log_scale.grad is not None and loss_fn.log_scale.grad != 0
    # an identity positives mask is the same loss; a two-positive row spreads its target
    assert loss_fn(v, t, torch.eye(5, dtype=torch.bool)).item() == pytest.approx(expected.item(), rel=1e-5)
    pos = torch.eye(5, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True
    assert torch.isfinite(loss_fn(v, t, pos))


def test_siglip_loss_formula_and_init():
    torch.manual_seed(1)
    v, t = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    loss_fn = build_objective("siglip")
    assert isinstance(loss_fn, SigmoidLoss)
    assert loss_fn.t_prime.item() == pytest.approx(math.log(10)) and loss_fn.bias.item() == -10.0
    logits = 10.0 * v @ t.t() - 10.0
    z = 2 * torch.eye(4) - 1
    expected = -F.logsigmoid(z * logits).sum() / 4
    loss = loss_fn(v, t)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert loss_fn.t_prime.grad != 0 and loss_fn.bias.grad != 0


@pytest.mark.parametrize("objective", ["infonce", "siglip"])
def test_dual_encoder_learns_to_retrieve(objective):
    torch.manual_seed(0)
    n_video, dv, dt = 24, 16, 12
    video = torch.randn(n_video, 3, dv)  # [N, T', D] cached tower features
    mix = torch.randn(dv, dt)
    text_video = torch.arange(n_video).repeat_interleave(2)  # two captions per video
    text = video.mean(1)[text_video] @ mix + 0.3 * torch.randn(len(text_video), dt)
    trained = train_dual_encoder(video, text, text_video, objective=objective, embed_dim=32, steps=150,
                                 batch_size=16, lr=3e-3)
    m = retrieval_metrics(trained.model.similarity(video, text), text_video)
    assert trained.losses[-1] < trained.losses[0]
    assert m["t2v_R@1"] > 60 and m["v2t_R@5"] > 90, m


def test_evaluate_retrieval_end_to_end_on_frozen_tiny_tower(tmp_path):
    import copy
    import json

    from evals.results import EvalResult
    from evals.retrieval import evaluate_retrieval, load_retrieval
    from tests.conftest import TINY_TOWERS
    from tests.eval_helpers import write_clip
    from vlm.towers import build_tower

    colours = ["red", "green", "blue", "white"]
    rows = []
    for i, c in enumerate(colours):
        write_clip(tmp_path / "videos" / f"{c}.mp4", c, frames=8, direction=1 if i % 2 else -1)
        rows.append({"video": f"videos/{c}.mp4", "captions": [f"a {c} square", f"the {c} box moves"]})
    (tmp_path / "retrieval.json").write_text(json.dumps(rows))
    items = load_retrieval(tmp_path / "retrieval.json")

    def words(texts):  # a stand-in text encoder: bag of colour words
        return torch.tensor([[float(c in t) for c in colours] + [1.0] for t in texts])

    torch.manual_seed(0)
    tower = build_tower(**copy.deepcopy(TINY_TOWERS["clip"]))
    res = evaluate_retrieval(tower, items, items, tmp_path / "out", text_encoder=words, num_frames=4, steps=100,
                             batch_size=4, embed_dim=16, lr=1e-2, progress=False)
    assert res.counts["text_queries"] == 8 and res.counts["video_queries"] == 4
    assert res.settings["final_loss"] < res.settings["first_loss"]
    assert res.metrics["t2v_R@5"] == 100.0 and set(res.per_task) == {"t2v", "v2t"}
    assert EvalResult.load(tmp_path / "out" / "results.json").task_type == "retrieval"
    assert (tmp_path / "out" / "features_test.safetensors").is_file()


def test_hand_built_ranks_even_median_best_caption_and_ties_are_pessimistic():
    """12 videos, 14 captions; each caption's own video is placed at a chosen rank, so every metric is known.
    Video 0 has two captions: its v2t rank uses the better one (rank 1), not the first (rank 7). An all-zero
    similarity matrix ties everything: every rank is the worst (12), so R@5 and R@10 are 0."""
    n_video = 12
    text_video = [0, 0] + list(range(1, 12)) + [5]  # 14 captions; videos 0 and 5 have two each
    wanted = [7, 1, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 2]  # t2v rank of each caption's own video
    sim = torch.zeros(len(text_video), n_video)
    for i, (v, r) in enumerate(zip(text_video, wanted)):
        others = [u for u in range(n_video) if u != v]
        order = others[: r - 1] + [v] + others[r - 1:]  # best first
        for pos, u in enumerate(order):
            sim[i, u] = 100.0 - pos - 0.01 * i  # distinct scores per caption
    assert text_to_video_ranks(sim, torch.tensor(text_video)).tolist() == wanted
    m = retrieval_metrics(sim, text_video)
    ranks = sorted(wanted)
    assert m["t2v_R@1"] == pytest.approx(100 * 2 / 14) and m["t2v_R@5"] == pytest.approx(100 * 7 / 14)
    assert m["t2v_R@10"] == pytest.approx(100 * 12 / 14)
    assert m["t2v_MdR"] == pytest.approx((ranks[6] + ranks[7]) / 2)  # even count: mean of the two middle ranks
    assert m["t2v_MnR"] == pytest.approx(sum(wanted) / 14)
    v2t, ids = video_to_text_ranks(sim, torch.tensor(text_video))
    assert ids.tolist() == list(range(12)) and int(v2t[0]) == 1
    zero = retrieval_metrics(torch.zeros(len(text_video), n_video), text_video)
    assert zero["t2v_R@5"] == 0.0 and zero["t2v_R@10"] == 0.0 and zero["t2v_MdR"] == 12.0
    assert zero["v2t_R@10"] == 0.0
