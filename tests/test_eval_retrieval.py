"""Retrieval metrics (tie rule, several captions per video), contrastive objectives, dual-encoder training."""

from __future__ import annotations

import json
import math
from collections import Counter

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


def _naive_ranks(sim: torch.Tensor, text_video: list[int]) -> tuple[list[int], dict[int, int]]:
    """The module docstring's definitions, written as plain loops: (t2v ranks, {video: v2t rank})."""
    s = sim.tolist()
    t2v = [1 + sum(1 for v in range(len(s[t])) if v != own and s[t][v] >= s[t][own]) for t, own in enumerate(text_video)]
    v2t = {}
    for v in sorted(set(text_video)):
        best = max(s[t][v] for t, own in enumerate(text_video) if own == v)
        v2t[v] = 1 + sum(1 for t, own in enumerate(text_video) if own != v and s[t][v] >= best)
    return t2v, v2t


def _naive_metrics(sim: torch.Tensor, text_video: list[int]) -> dict[str, float]:
    import statistics

    t2v, v2t = _naive_ranks(sim, text_video)
    out = {}
    for prefix, ranks in (("t2v", t2v), ("v2t", list(v2t.values()))):
        for k in (1, 5, 10):
            out[f"{prefix}_R@{k}"] = 100.0 * sum(r <= k for r in ranks) / len(ranks)
        out[f"{prefix}_MdR"] = float(statistics.median(ranks))
        out[f"{prefix}_MnR"] = sum(ranks) / len(ranks)
    out["text_queries"], out["video_queries"] = len(t2v), len(v2t)
    return out


# 9 captions x 7 videos; video 0 has captions 0-2 (its best, caption 1, in the middle), video 3 has captions 5 and 6
# (its best second), video 6 has none. Scores are negative in places and tie in places (marked "tie").
SEVERAL_TEXT_VIDEO = [0, 0, 0, 1, 2, 3, 3, 4, 5]
SEVERAL_SIM = [
    # v0    v1    v2    v3    v4    v5    v6
    [-0.6, -0.2, 0.1, 0.75, 0.0, 0.3, -0.7],   # c0 (v0): all 5 other captioned videos and not v6 above -> rank 6
    [0.5, -0.5, 0.2, 0.1, 0.45, 0.35, 0.5],    # c1 (v0): v6 ties -> rank 2
    [-0.4, -0.8, 0.3, 0.35, 0.1, 0.25, -0.9],  # c2 (v0): v2..v5 above -> rank 5
    [0.2, -0.3, 0.0, 0.8, 0.3, 0.22, -0.35],   # c3 (v1): v0, v2..v5 above -> rank 6
    [0.6, -0.1, 0.9, 0.2, 0.5, 0.21, 0.0],     # c4 (v2): rank 1
    [-0.5, -0.7, 0.4, 0.3, 0.42, 0.6, 0.1],    # c5 (v3): v2, v4, v5 above -> rank 4
    [0.1, -0.9, -0.1, 0.7, 0.2, 0.5, 0.8],     # c6 (v3): v6 above -> rank 2
    [0.0, -0.3, 0.5, 0.6, 0.4, 0.9, 0.3],      # c7 (v4): v2, v3, v5 above -> rank 4
    [-0.9, -0.6, 0.2, 0.0, 0.1, 0.2, 0.25],    # c8 (v5): v2 ties, v6 above -> rank 3
]


def test_several_captions_per_video():
    """Hand-computed ranks. v2t (column by column, the video's best own caption against other videos' captions):
    v0: best own is c1 (0.5), only c4 (0.6) is higher -> 2 (its first caption c0 would give 6, its last c2 5);
    v1: own c3 is negative (-0.3): c0 and c4 are higher and c7 ties -> 4 (a 0 instead of -inf for "not own" gives 1);
    v2: 1; v3: best own c6 (0.7, its second caption), c0 and c3 higher -> 3 (by its first caption: 5; counting its own
    other caption: 4); v4: c1, c4, c5 higher -> 4; v5: every other caption at or above 0.2 -> 9; v6: no caption, no query.
    6 video queries: an even count, median = (3 + 4) / 2."""
    text_video = torch.tensor(SEVERAL_TEXT_VIDEO)
    sim = torch.tensor(SEVERAL_SIM)
    assert text_to_video_ranks(sim, text_video).tolist() == [6, 2, 5, 6, 1, 4, 2, 4, 3]
    ranks, ids = video_to_text_ranks(sim, text_video)
    assert ids.tolist() == [0, 1, 2, 3, 4, 5] and ranks.tolist() == [2, 4, 1, 3, 4, 9]
    m = retrieval_metrics(sim, SEVERAL_TEXT_VIDEO)
    assert m["text_queries"] == 9 and m["video_queries"] == 6
    # t2v ranks 6 2 5 6 1 4 2 4 3: 1 at R@1, 7 at R@5 (a rank of exactly 5 counts), 9 at R@10; median 4 (odd count)
    assert m["t2v_R@1"] == pytest.approx(100 / 9) and m["t2v_R@5"] == pytest.approx(700 / 9) and m["t2v_R@10"] == 100.0
    assert m["t2v_MdR"] == 4.0 and m["t2v_MnR"] == pytest.approx(33 / 9)
    # v2t ranks 2 4 1 3 4 9
    assert m["v2t_R@1"] == pytest.approx(100 / 6) and m["v2t_R@5"] == pytest.approx(500 / 6) and m["v2t_R@10"] == 100.0
    assert m["v2t_MdR"] == 3.5 and m["v2t_MnR"] == pytest.approx(23 / 6)
    assert m == pytest.approx(_naive_metrics(sim, SEVERAL_TEXT_VIDEO))
    # a video without captions is not a query
    m = retrieval_metrics(torch.rand(2, 3), [0, 2])
    assert m["video_queries"] == 2 and m["text_queries"] == 2


@pytest.mark.parametrize("seed", range(6))
def test_ranks_match_the_definition_written_as_loops(seed):
    """Random small-integer scores (many ties, many negatives), 1-3 captions per video, some videos uncaptioned."""
    g = torch.Generator().manual_seed(seed)
    n_video = 5 + seed
    text_video = [v for v in range(n_video) if v % 4 != 3 for _ in range(1 + (v * 7 + seed) % 3)]
    sim = torch.randint(-3, 3, (len(text_video), n_video), generator=g).float()
    t2v, v2t = _naive_ranks(sim, text_video)
    assert text_to_video_ranks(sim, torch.tensor(text_video)).tolist() == t2v
    ranks, ids = video_to_text_ranks(sim, torch.tensor(text_video))
    assert dict(zip(ids.tolist(), ranks.tolist())) == v2t
    assert retrieval_metrics(sim, text_video) == pytest.approx(_naive_metrics(sim, text_video))


@pytest.mark.parametrize("sim, text_video, match", [
    (torch.zeros(0, 0), [], "at least one caption and one video"),
    (torch.zeros(0, 3), [], "at least one caption and one video"),
    (torch.zeros(2, 0), [0, 0], "at least one caption and one video"),
    (torch.zeros(2, 3), [0, 3], "outside 0..2"),
    (torch.zeros(2, 3), [-1, 0], "outside 0..2"),
    (torch.zeros(2, 3), [0, 1, 2], "must be"),
    (torch.zeros(3), [0, 1, 2], "must be"),
    (torch.tensor([[0.1, float("nan")]]), [0], "^similarity matrix has NaNs$"),
])
def test_bad_inputs_are_clear_value_errors(sim, text_video, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(sim, text_video)


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
    """Train: 6 decodable videos with 1-3 captions each, an undecodable one (3 captions) in the middle and a missing
    file. Test: the 6 in reverse order, half with an extra caption naming two colours, the undecodable one third.
    Skipped videos are counted and named per split and their captions dropped; the metrics equal ones recomputed
    here from the saved dual encoder, fresh tower features of each decodable test video and those videos' captions
    in order; a caption naming only its own colour retrieves its video first (R@5 of 6 videos is not free)."""
    import copy

    from safetensors.torch import load_file

    from evals.features import clip_features
    from evals.results import EvalResult
    from evals.retrieval import DualEncoder, RetrievalItem, evaluate_retrieval, load_retrieval
    from tests.conftest import TINY_TOWERS
    from tests.eval_helpers import moving_square
    from vlm.towers import build_tower
    from vlm.video import read_clip, write_video

    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "white": (240, 240, 240),
               "yellow": (230, 220, 30), "cyan": (30, 210, 220)}
    names = list(colours)
    rows = []
    (tmp_path / "videos").mkdir()
    for i, (name, rgb) in enumerate(colours.items()):
        if i == 3:  # an undecodable video with three captions between blue and white
            (tmp_path / "videos" / "broken.mp4").write_text("not a video")
            rows.append({"video": "videos/broken.mp4", "captions": ["broken a", "broken b", "broken c"]})
        write_video(tmp_path / "videos" / f"{name}.mp4", moving_square(rgb, 8, direction=1 if i % 2 else -1), 4.0)
        caps = [f"{name} {k}" for k in range(1 + i % 3)]
        rows.append({"video": f"videos/{name}.mp4", "captions": caps} if len(caps) > 1 else
                    {"video": f"videos/{name}.mp4", "caption": caps[0]})
    (tmp_path / "retrieval.json").write_text(json.dumps(rows))
    items = load_retrieval(tmp_path / "retrieval.json")
    assert [len(it.captions) for it in items] == [1, 2, 3, 3, 1, 2, 3]
    train = items + [RetrievalItem(tmp_path / "videos" / "missing.mp4", ["red 9"])]
    good = [it for it in items if it.video.name != "broken.mp4"][::-1]
    test_good = [RetrievalItem(it.video, it.captions + ([f"{it.video.stem} {good[k - 1].video.stem}"] if k % 2 else []))
                 for k, it in enumerate(good)]
    test = test_good[:2] + [items[3]] + test_good[2:]

    def words(texts):  # a stand-in text encoder: which colour words the caption names (plus a constant)
        return torch.tensor([[float(n in t.split()) for n in names] + [1.0] for t in texts])

    torch.manual_seed(0)
    tower = build_tower(**copy.deepcopy(TINY_TOWERS["clip"]))
    res = evaluate_retrieval(tower, train, test, tmp_path / "out", text_encoder=words, num_frames=4, steps=100,
                             batch_size=4, embed_dim=16, lr=1e-2, progress=False)
    captions = [c for it in test_good for c in it.captions]
    owner = [v for v, it in enumerate(test_good) for _ in it.captions]
    assert res.counts["text_queries"] == len(captions) == 15 and res.counts["video_queries"] == 6
    assert res.counts["skipped_train"] == 2 and res.counts["skipped_test"] == 1 and res.counts["test_videos"] == 7
    assert [r.split(": ")[:2] for r in res.counts["skipped_reasons"]] == [
        ["train", str(items[3].video)], ["train", str(train[-1].video)], ["test", str(items[3].video)]]

    fresh = torch.cat([clip_features(tower, [read_clip(it.video, 4)]) for it in test_good])  # [6, T', D]
    cached = load_file(str(tmp_path / "out" / "features_test.safetensors"))
    assert cached["index"].tolist() == [0, 1, 3, 4, 5, 6]
    assert torch.allclose(cached["features"], fresh, atol=1e-5)
    model = DualEncoder(fresh.shape[-1], len(names) + 1, 16)
    model.load_state_dict(load_file(str(tmp_path / "out" / "dual_encoder.safetensors")))
    sim = model.similarity(fresh, words(captions))
    assert sim.shape == (15, 6)
    expected = _naive_metrics(sim, owner)
    assert {k: v for k, v in expected.items() if not k.endswith("queries")} == pytest.approx(res.metrics)
    for d in ("t2v", "v2t"):
        assert res.per_task[d] == pytest.approx({k.split("_", 1)[1]: v for k, v in expected.items() if k.startswith(d)})
    assert res.per_task["t2v"] != res.per_task["v2t"], res.per_task  # else the check above could not tell them apart
    t2v, _ = _naive_ranks(sim, owner)
    assert [r for r, c in zip(t2v, captions) if len(c.split()) == 2 and c.split()[1].isdigit()] == [1] * 12
    assert res.settings["final_loss"] < res.settings["first_loss"]
    assert EvalResult.load(tmp_path / "out" / "results.json").task_type == "retrieval"


def test_load_retrieval_paths_single_caption_and_errors(tmp_path):
    from evals.retrieval import load_retrieval
    from vlm.data.conversation import DataFormatError

    (tmp_path / "r.json").write_text(json.dumps([{"video": "a.mp4", "caption": "one"},
                                                 {"video": "sub/b.mp4", "captions": ["x", "y"]}]))
    items = load_retrieval(tmp_path / "r.json")
    assert [(it.video, it.captions) for it in items] == [(tmp_path / "a.mp4", ["one"]), (tmp_path / "sub/b.mp4", ["x", "y"])]
    assert load_retrieval(tmp_path / "r.json", root=tmp_path / "media")[1].video == tmp_path / "media" / "sub/b.mp4"
    for bad in ([{"video": "a.mp4", "captions": []}], [{"captions": ["x"]}], [{"video": "a.mp4", "captions": [1]}],
                {"video": "a.mp4"}, ["a.mp4"]):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(DataFormatError):
            load_retrieval(tmp_path / "bad.json")
    with pytest.raises(DataFormatError):
        load_retrieval(tmp_path / "missing.json")


def test_dual_encoder_similarity_is_text_by_video_cosine():
    from evals.retrieval import DualEncoder

    torch.manual_seed(0)
    model = DualEncoder(6, 5, 4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # non-trivial LayerNorm affine too
    video, text = torch.randn(3, 2, 6), torch.randn(4, 5)

    def ln(x, norm):
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps) * norm.weight + norm.bias

    v = ln(video.mean(1), model.video_norm) @ model.video_proj.weight.t() + model.video_proj.bias  # temporal mean first
    t = ln(text, model.text_norm) @ model.text_proj.weight.t() + model.text_proj.bias
    expected = (t / t.norm(dim=-1, keepdim=True)) @ (v / v.norm(dim=-1, keepdim=True)).t()
    sim = model.similarity(video, text)
    assert sim.shape == (4, 3) and torch.allclose(sim, expected, atol=1e-5)
    assert torch.allclose(model.similarity(video.mean(1), text), expected, atol=1e-5)  # pooled [N, D] input too


def test_dual_encoder_batches_pair_distinct_videos_with_their_own_captions(monkeypatch):
    """Every training batch holds min(batch_size, videos) distinct videos (fewer only where an epoch boundary
    repeated one), each row paired with one of that video's own captions; every video and caption gets used."""
    import evals.retrieval as retrieval

    seen = []

    class Recording(retrieval.DualEncoder):
        def encode_video(self, feats):
            seen.append(("v", feats[:, 0, 0].tolist()))
            return super().encode_video(feats)

        def encode_text(self, feats):
            seen.append(("t", feats[:, 0].tolist()))
            seen.append(("id", feats[:, 1].tolist()))
            return super().encode_text(feats)

    monkeypatch.setattr(retrieval, "DualEncoder", Recording)
    n_video = 5
    text_video = [0, 0, 0, 1, 2, 2, 3, 4]  # video ids 0..4, captions per video 3, 1, 2, 1, 1
    video = torch.arange(n_video, dtype=torch.float).view(-1, 1, 1).expand(n_video, 2, 3).contiguous()
    text = torch.tensor([[float(v), float(t)] for t, v in enumerate(text_video)])  # column 0: owner, column 1: id
    with pytest.raises(ValueError, match="two videos"):
        train_dual_encoder(video, text, [0] * len(text_video), steps=1)
    torch.manual_seed(7)
    out = train_dual_encoder(video, text, text_video, embed_dim=4, steps=40, batch_size=3)
    assert len(out.losses) == 40
    vids = [x for kind, x in seen if kind == "v"]
    caps = [x for kind, x in seen if kind == "t"]
    assert len(vids) == len(caps) == 40
    for v, c in zip(vids, caps):
        assert len(set(v)) == len(v) and v == c  # distinct videos, each with a caption of its own
    assert sum(len(v) == 3 for v in vids) >= 30 and all(2 <= len(v) <= 3 for v in vids)
    assert set(sum(vids, [])) == set(range(n_video))
    # epochs: 40 batches of 3 draw 24 shuffled passes over the 5 videos, so no video is drawn more than 24 times
    # (an epoch's leftover videos lead the next batch; they are not dropped for a fresh shuffle)
    counts = Counter(sum(vids, []))
    assert max(counts.values()) <= 40 * 3 // n_video and len(counts) == n_video
    assert {int(t) for kind, x in seen if kind == "id" for t in x} == set(range(len(text_video)))  # every caption
    torch.manual_seed(123)  # another global RNG state: the seed alone fixes batches and initialisation
    again = train_dual_encoder(video, text, text_video, embed_dim=4, steps=40, batch_size=3)
    assert again.losses == out.losses
    assert train_dual_encoder(video, text, text_video, embed_dim=4, steps=40, batch_size=3, seed=1).losses != out.losses


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


def test_llm_text_encoder_mean_pools_only_real_tokens():
    """Batched (right-padded, several batches) embeddings equal each caption's mean last hidden state taken alone."""
    from evals.retrieval import LLMTextEncoder
    from tests.conftest import TINY_LLM
    from vlm.llm.load import load_llm

    torch.manual_seed(0)
    llm, tok = load_llm(**TINY_LLM)
    llm.eval()
    texts = ["a red square", "the green box moves to the left, then back to the right", "x", "two words"]
    enc = LLMTextEncoder(llm, tok, batch_size=3)
    out = enc(texts)
    assert out.shape == (4, llm.config.hidden_size) and enc.model_id.startswith("llm-mean-pool:")
    with torch.no_grad():
        for t, row in zip(texts, out):
            ids = tok([t], return_tensors="pt")
            alone = llm(**ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
            assert torch.allclose(row, alone, atol=1e-5)
    assert not torch.allclose(out[0], out[2], atol=1e-3)


# ---------------------------------------------------------------------- the results record of evaluate_retrieval
# extract_features is replaced by a recording stand-in (the real one is exercised end to end above), so the record
# can be checked field by field: the exact key sets, every setting, the counts, the plumbing of each argument.
_FEATS = {name: torch.randn(2, 6, generator=torch.Generator().manual_seed(k))
          for k, name in enumerate(["red", "green", "blue", "white"])}
_WORDS = ["red", "green", "blue", "white"]


def _words(texts):
    """A stand-in text encoder: which colour words the caption names, its digit, and a constant."""
    return torch.tensor([[float(n in t.split()) for n in _WORDS] + [float(t.split()[-1]), 1.0] for t in texts])


class FakeTower:  # all evaluate_retrieval itself reads of a tower once extract_features is replaced
    hidden_size = 6


@pytest.fixture
def fake_pipeline(monkeypatch):
    """Records every extract_features and train_dual_encoder call; a clock that reads 100.0 then 102.34567."""
    import types

    import evals.retrieval as retrieval

    calls = {"extract": [], "train": []}

    def extract(tower, videos, **kw):
        calls["extract"].append((tower, list(videos), kw))
        index = [i for i, v in enumerate(videos) if "broken" not in v.name]
        errors = {i: f"cannot decode {v.name}" for i, v in enumerate(videos) if "broken" in v.name}
        return torch.stack([_FEATS[videos[i].stem] for i in index]), index, errors

    real_train = retrieval.train_dual_encoder

    def train(*args, **kw):
        out = real_train(*args, **kw)
        calls["train"].append((args, kw, out))
        return out

    ticks = iter([100.0])
    monkeypatch.setattr(retrieval, "extract_features", extract)
    monkeypatch.setattr(retrieval, "train_dual_encoder", train)
    monkeypatch.setattr(retrieval, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks, 102.34567)))
    return calls


def _retrieval_items(tmp_path):
    from evals.retrieval import RetrievalItem

    def item(name, *caps):
        return RetrievalItem(tmp_path / f"{name}.mp4", list(caps))

    train = [item("red", "red 1", "red 2"), item("broken_a", "red 3", "blue 4"), item("green", "green 5"),
             item("blue", "blue 6", "blue 7", "blue 8"), item("white", "white 9")]
    test = [item("white", "white 1", "white 2"), item("broken_b", "green 3"), item("blue", "blue 4"),
            item("red", "red 5", "red 6")]
    return train, test


def _check_record(res, out, calls, *, tower_id, dataset_name, objective, num_frames, steps, batch_size, embed_dim,
                  lr, seed, progress, text_encoder_name, workers=2):
    """Everything evaluate_retrieval reports and saves for the items of `_retrieval_items`, recomputed here."""
    from safetensors.torch import load_file

    from evals.retrieval import DualEncoder

    # frozen features: one call per split, each with the split's own cache file, the tower id and the progress flag
    assert [(tower is not None, [v.stem for v in videos], kw) for tower, videos, kw in calls["extract"]] == [
        (True, ["red", "broken_a", "green", "blue", "white"],
         {"num_frames": num_frames, "cache": out / "features_train.safetensors", "tower_id": tower_id,
          "progress": progress, "workers": workers}),
        (True, ["white", "broken_b", "blue", "red"],
         {"num_frames": num_frames, "cache": out / "features_test.safetensors", "tower_id": tower_id,
          "progress": progress, "workers": workers})]
    # training: the decodable train videos, their captions in order, caption -> index among the kept videos
    (args, kw, trained), = calls["train"]
    assert kw == {"objective": objective, "embed_dim": embed_dim, "steps": steps, "batch_size": batch_size,
                  "lr": lr, "seed": seed, "progress": progress}
    assert torch.equal(args[0], torch.stack([_FEATS[n] for n in ["red", "green", "blue", "white"]]))
    assert torch.equal(args[1], _words(["red 1", "red 2", "green 5", "blue 6", "blue 7", "blue 8", "white 9"]))
    assert list(args[2]) == [0, 0, 1, 2, 2, 2, 3]
    assert len(trained.losses) == steps and len(set(trained.losses[:2])) == 2 and len(set(trained.losses[-2:])) == 2

    # metrics recomputed from the saved heads, the decodable test videos and their captions
    saved = load_file(str(out / "dual_encoder.safetensors"))
    assert saved.keys() == trained.model.state_dict().keys()
    model = DualEncoder(6, 6, embed_dim)
    model.load_state_dict(saved)
    assert model.video_proj.out_features == embed_dim
    captions = ["white 1", "white 2", "blue 4", "red 5", "red 6"]
    owner = [0, 0, 1, 2, 2]
    expected = _naive_metrics(model.similarity(torch.stack([_FEATS[n] for n in ["white", "blue", "red"]]),
                                               _words(captions)), owner)
    assert res.task_type == "retrieval" and res.model == tower_id
    assert res.dataset == {"name": dataset_name, "train_videos": 5, "test_videos": 4}
    assert res.metrics.keys() == {f"{d}_{m}" for d in ("t2v", "v2t") for m in ("R@1", "R@5", "R@10", "MdR", "MnR")}
    assert res.metrics == pytest.approx({k: v for k, v in expected.items() if not k.endswith("queries")})
    assert res.per_task.keys() == {"t2v", "v2t"}
    for d in ("t2v", "v2t"):
        assert res.per_task[d] == pytest.approx({k[4:]: v for k, v in expected.items() if k.startswith(d + "_")})
    assert res.counts == {"test_videos": 4, "text_queries": 5, "video_queries": 3, "skipped_train": 1,
                          "skipped_test": 1, "elapsed_seconds": 2.346,
                          "skipped_reasons": [f"train: {out.parent / 'broken_a.mp4'}: cannot decode broken_a.mp4",
                                              f"test: {out.parent / 'broken_b.mp4'}: cannot decode broken_b.mp4"]}
    assert type(res.counts["elapsed_seconds"]) is float
    assert res.settings == {
        "objective": objective, "final_temperature": pytest.approx(trained.objective.temperature, rel=1e-6),
        "final_loss": trained.losses[-1], "first_loss": trained.losses[0], "steps": steps, "batch_size": batch_size,
        "embed_dim": embed_dim, "lr": lr, "seed": seed, "num_frames": num_frames, "text_encoder": text_encoder_name,
        "tie_rule": "pessimistic (a tie with a wrong item counts against the query)",
        "video_query_rank": "best rank among the video's own captions"}
    assert res.profile is None and res.judge is None
    # saved: the record, the heads, the report and its chart
    assert json.loads((out / "results.json").read_text(encoding="utf-8")) == res.to_dict()
    assert sorted(p.name for p in out.iterdir()) == ["dual_encoder.safetensors", "per_task.png", "report.md",
                                                     "results.json"]
    return trained


def test_evaluate_retrieval_record_with_the_defaults(tmp_path, fake_pipeline, monkeypatch):
    """Defaults: the packaged MiniLM text encoder, 8 frames, 300 InfoNCE steps of up to 64 videos, 256-d heads,
    lr 1e-3, seed 0, progress shown, dataset named "retrieval", the tower named by its class and width."""
    import evals.text_embed
    from evals.retrieval import evaluate_retrieval

    class PackagedEncoder:
        model_id = "fake/minilm"

        def __call__(self, texts):
            return _words(texts)

    monkeypatch.setattr(evals.text_embed, "shared_minilm", PackagedEncoder)
    train, test = _retrieval_items(tmp_path)
    res = evaluate_retrieval(FakeTower(), train, test, tmp_path / "out")
    trained = _check_record(res, tmp_path / "out", fake_pipeline, tower_id="FakeTower(hidden=6)",
                            dataset_name="retrieval", objective="infonce", num_frames=8, steps=300, batch_size=64,
                            embed_dim=256, lr=1e-3, seed=0, progress=True, text_encoder_name="fake/minilm")
    assert 1.0 / trained.objective.scale.item() == pytest.approx(res.settings["final_temperature"], rel=1e-6)


def test_evaluate_retrieval_record_with_every_setting_given(tmp_path, fake_pipeline):
    """Each argument reaches the record and the calls; a tower spec names the tower (sorted JSON); a plain
    function as text encoder is named by its type."""
    from evals.retrieval import evaluate_retrieval

    def encoder(texts):
        return _words(texts)

    train, test = _retrieval_items(tmp_path)
    res = evaluate_retrieval(FakeTower(), train, test, tmp_path / "out", text_encoder=encoder, objective="siglip",
                             num_frames=3, steps=7, batch_size=2, embed_dim=8, lr=0.02, seed=5,
                             tower_spec={"name": "tiny", "frames": 3}, dataset="msrvtt-mini", progress=False,
                             workers=0)
    trained = _check_record(res, tmp_path / "out", fake_pipeline, tower_id='{"frames": 3, "name": "tiny"}',
                            dataset_name="msrvtt-mini", objective="siglip", num_frames=3, steps=7, batch_size=2,
                            embed_dim=8, lr=0.02, seed=5, progress=False, text_encoder_name="function", workers=0)
    assert 1.0 / trained.objective.t_prime.exp().item() == pytest.approx(res.settings["final_temperature"], rel=1e-6)


# ---------------------------------------------------------------------- train_dual_encoder: defaults, optimiser, logging
def test_train_dual_encoder_defaults(monkeypatch, caplog):
    """Defaults: InfoNCE, 256-d heads, 300 steps of 64 distinct videos, no progress logging."""
    import logging

    import evals.retrieval as retrieval

    sizes = []

    class Recording(retrieval.DualEncoder):
        def encode_video(self, feats):
            sizes.append(len(set(feats[:, 0, 0].tolist())))
            return super().encode_video(feats)

    monkeypatch.setattr(retrieval, "DualEncoder", Recording)
    caplog.set_level(logging.INFO, logger="evals.retrieval")
    n = 70
    video = torch.arange(n, dtype=torch.float).view(-1, 1, 1).expand(n, 2, 3).contiguous()
    text = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    out = train_dual_encoder(video, text, list(range(n)))
    assert len(out.losses) == 300 and len(sizes) == 300
    assert sizes[0] == 64 and max(sizes) == 64  # 64 distinct videos per batch (of 70)
    assert out.model.video_proj.out_features == 256 and out.model.text_proj.out_features == 256
    assert isinstance(out.objective, InfoNCELoss)
    assert not [r for r in caplog.records if r.name == "evals.retrieval"]


def test_train_dual_encoder_first_step_is_one_adamw_step():
    """One step from the seeded initial heads (`steps=0` returns them untrained): AdamW's decoupled weight decay
    p * (1 - lr * wd), then a first Adam step of size lr * |g| / (|g| + eps) = lr. Default lr 1e-3 and wd 1e-4."""
    g = torch.Generator().manual_seed(0)
    video, text = torch.randn(6, 2, 4, generator=g), torch.randn(6, 3, generator=g)
    tv = [0, 1, 2, 3, 4, 5]
    init = train_dual_encoder(video, text, tv, steps=0, embed_dim=16)
    assert init.losses == []
    p0 = {k: v.clone() for k, v in init.model.state_dict().items()}
    for kwargs, lr, wd in [({}, 1e-3, 1e-4), ({"lr": 0.02, "weight_decay": 0.5}, 0.02, 0.5)]:
        one = train_dual_encoder(video, text, tv, steps=1, embed_dim=16, **kwargs)
        for k, p in one.model.state_dict().items():
            step = (p - p0[k] * (1 - lr * wd)).abs()
            assert torch.allclose(step, torch.full_like(step, lr), rtol=2e-3, atol=0), (k, kwargs)


def test_train_dual_encoder_needs_two_captioned_videos():
    video, text = torch.randn(3, 2, 4), torch.randn(3, 5)
    assert len(train_dual_encoder(video, text, [0, 1, 1], steps=2, embed_dim=4).losses) == 2  # two are enough
    with pytest.raises(ValueError, match="^contrastive training needs at least two videos with captions$"):
        train_dual_encoder(video, text, [1, 1, 1], steps=2, embed_dim=4)


def test_caption_ids_may_be_any_integer_valued_tensor():
    """text_video is converted to integer ids: a float or int32 tensor works like the list."""
    g = torch.Generator().manual_seed(0)
    video, text = torch.randn(4, 2, 4, generator=g), torch.randn(6, 5, generator=g)
    tv = [0, 0, 1, 2, 3, 3]
    ref = train_dual_encoder(video, text, tv, steps=4, embed_dim=4).losses
    for ids in (torch.tensor(tv, dtype=torch.float), torch.tensor(tv, dtype=torch.int32)):
        assert train_dual_encoder(video, text, ids, steps=4, embed_dim=4).losses == ref
    sim = torch.randn(6, 4, generator=g)
    ref_m = retrieval_metrics(sim, tv)
    for ids in (torch.tensor(tv, dtype=torch.float), torch.tensor(tv, dtype=torch.int32)):
        assert retrieval_metrics(sim, ids) == ref_m


def test_train_dual_encoder_logs_progress_every_50_steps_and_the_last(caplog):
    """With progress: steps 1, 51, 101 and the last (102), each with that step's loss and temperature (the
    temperature after a shorter run of the same seed, which trains identically up to there)."""
    import logging

    caplog.set_level(logging.INFO, logger="evals.retrieval")
    g = torch.Generator().manual_seed(0)
    video, text = torch.randn(4, 2, 3, generator=g), torch.randn(5, 2, generator=g)
    tv = [0, 1, 1, 2, 3]
    out = train_dual_encoder(video, text, tv, steps=102, embed_dim=4, lr=0.02, progress=True)
    records = [r for r in caplog.records if r.name == "evals.retrieval"]
    logged = [1, 51, 101, 102]
    assert [r.args[:3] for r in records] == [(s, 102, out.losses[s - 1]) for s in logged]
    temps = [train_dual_encoder(video, text, tv, steps=s, embed_dim=4, lr=0.02).objective.temperature
             for s in logged[:-1]] + [out.objective.temperature]
    assert len(set(temps)) == 4
    assert [r.getMessage() for r in records] == [
        f"dual encoder step {s}/102: loss {out.losses[s - 1]:.4f}, temperature {t:.4f}" for s, t in zip(logged, temps)]
    assert [r.args[3] for r in records] == pytest.approx(temps, rel=1e-6)
    assert all(r.levelno == logging.INFO for r in records)


# ---------------------------------------------------------------------- DualEncoder, LLMTextEncoder, load_retrieval
def test_dual_encoder_default_width_and_single_feature_vectors():
    """256-d embeddings by default; an unbatched feature vector embeds like a batch of one."""
    from evals.retrieval import DualEncoder

    torch.manual_seed(0)
    model = DualEncoder(6, 5)
    assert model.video_proj.out_features == 256 and model.text_proj.out_features == 256
    video, text = torch.randn(3, 2, 6), torch.randn(4, 5)
    v1 = model.encode_video(video.mean(1)[0])  # [Dv] -> [E]
    t1 = model.encode_text(text[0])  # [Dt] -> [E]
    assert v1.shape == t1.shape == (256,)
    assert torch.allclose(v1, model.encode_video(video[:1])[0], atol=1e-6) and v1.norm().item() == pytest.approx(1.0)
    assert torch.allclose(t1, model.encode_text(text[:1])[0], atol=1e-6) and t1.norm().item() == pytest.approx(1.0)


class _FakeLM(torch.nn.Module):
    """Last hidden state of a token = its id (one channel); records each forward's batch size."""

    def __init__(self, config=None):
        super().__init__()
        self.one = torch.nn.Parameter(torch.ones(1))
        self.batches = []
        if config is not None:
            self.config = config

    def forward(self, input_ids, attention_mask, output_hidden_states):
        import types

        assert output_hidden_states is True
        self.batches.append(int(input_ids.shape[0]))
        return types.SimpleNamespace(hidden_states=[torch.zeros(1), input_ids.float().unsqueeze(-1) * self.one])


def _fake_tokenizer(texts, padding, return_tensors):
    """Token id = word length; right-padded with 0."""
    from transformers import BatchEncoding

    ids = [[len(w) for w in t.split()] for t in texts]
    width = max(map(len, ids))
    return BatchEncoding({"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
                          "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])})


def test_llm_text_encoder_default_batches_and_model_id():
    """Batches of 16 by default; the id names the LLM's config.name_or_path, else the LLM's class."""
    import types

    from evals.retrieval import LLMTextEncoder

    texts = [" ".join(["ab"] * (1 + k % 3) + ["abcdef"] * (k % 2)) for k in range(17)]
    llm = _FakeLM(types.SimpleNamespace(name_or_path="org/tiny-lm"))
    enc = LLMTextEncoder(llm, _fake_tokenizer)
    assert enc.model_id == "llm-mean-pool:org/tiny-lm"
    out = enc(texts)
    assert llm.batches == [16, 1]
    expected = [sum(len(w) for w in t.split()) / len(t.split()) for t in texts]  # mean over real tokens only
    assert out.shape == (17, 1) and out[:, 0].tolist() == pytest.approx(expected)
    assert LLMTextEncoder(_FakeLM(), _fake_tokenizer).model_id == "llm-mean-pool:_FakeLM"
    assert LLMTextEncoder(_FakeLM(types.SimpleNamespace()), _fake_tokenizer).model_id == "llm-mean-pool:_FakeLM"


def test_load_retrieval_error_messages_name_the_file_and_record(tmp_path):
    import re

    from evals.retrieval import load_retrieval
    from vlm.data.conversation import DataFormatError

    path = tmp_path / "r.json"
    with pytest.raises(DataFormatError, match=re.escape(f"{tmp_path / 'missing.json'}: cannot read retrieval data: ")):
        load_retrieval(tmp_path / "missing.json")
    path.write_text("[{]")
    with pytest.raises(DataFormatError, match=re.escape(f"{path}: cannot read retrieval data: ")):
        load_retrieval(path)
    path.write_text(json.dumps({"video": "a.mp4", "captions": ["x"]}))
    with pytest.raises(DataFormatError, match=re.escape(f"{path}: expected a list of {{video, captions}}")):
        load_retrieval(path)
    path.write_text(json.dumps([{"video": "a.mp4", "caption": "x"}, {"video": "b.mp4", "captions": []}]))
    with pytest.raises(DataFormatError,
                       match=re.escape(f"{path}[1]: needs 'video' and a non-empty 'captions' list of strings")):
        load_retrieval(path)


def test_load_retrieval_reads_utf8_whatever_the_locale(tmp_path):
    """The file is UTF-8 even where the locale's encoding is ASCII (here: LC_CTYPE switched to C for the call)."""
    import codecs
    import locale
    import sys

    from evals.retrieval import load_retrieval

    rows = [{"video": "café.mp4", "captions": ["naïve — crème brûlée", "日本語"]}]
    (tmp_path / "r.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    old = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C")
        if not sys.flags.utf8_mode and codecs.lookup(locale.getpreferredencoding(False)).name == "ascii":
            with pytest.raises(UnicodeDecodeError):  # here a read in the locale's encoding fails
                (tmp_path / "r.json").read_text()
        items = load_retrieval(tmp_path / "r.json")
    finally:
        locale.setlocale(locale.LC_CTYPE, old)
    assert [(it.video, it.captions) for it in items] == [(tmp_path / "café.mp4", ["naïve — crème brûlée", "日本語"])]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_on_a_cuda_similarity_matrix_with_caption_ids_as_a_list():
    sim = torch.tensor(SEVERAL_SIM)
    assert retrieval_metrics(sim.cuda(), SEVERAL_TEXT_VIDEO) == retrieval_metrics(sim, SEVERAL_TEXT_VIDEO)
    ranks, ids = video_to_text_ranks(sim.cuda(), torch.tensor(SEVERAL_TEXT_VIDEO).cuda())
    assert ranks.tolist() == [2, 4, 1, 3, 4, 9] and ids.tolist() == [0, 1, 2, 3, 4, 5]
