"""VideoLLM's evaluation interface on a tiny random model: option scores equal an independent, hand-summed
reference, greedy answers are batched by prefill without changing them, and the multiple-choice harness
reports exactly what the model's own scores and answers say."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evals.interface import AnswerGenerator, GenerationRequest, OptionScorer, ScoringRequest
from evals.mcq import decode_item_clip, evaluate_mcq
from evals.profiles import get_profile, loglik_continuations, mvbench_turns, parse_mvbench
from tests.conftest import TINY_LLM, TINY_TOWERS
from tests.eval_helpers import make_bench, moving_square
from vlm.data.conversation import Turn
from vlm.data.mvbench import LETTERS, MCQItem, load_mvbench
from vlm.model import VideoLLM
from vlm.scoring import FirstLineStop, ScoringMixin
from vlm.video import Clip
from tests.eval_helpers import single_thread  # noqa: F401  (fixture)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    yield


@pytest.fixture(scope="module")
def model() -> VideoLLM:
    torch.manual_seed(0)
    m = VideoLLM.from_config({"tower": copy.deepcopy(TINY_TOWERS["clip"]), "connector": {"name": "mlp"},
                              "llm": copy.deepcopy(TINY_LLM), "num_frames": 4})
    assert isinstance(m, ScoringMixin)
    return m.eval()


def clip(seed: int | None = None) -> Clip:
    """The moving square, or (with a seed) random frames."""
    frames = moving_square((200, 30, 30), frames=4)
    if seed is not None:
        frames = np.random.default_rng(seed).integers(0, 255, frames.shape, dtype=np.uint8)
    return Clip(frames, np.arange(4) * 0.5, np.arange(4), "synthetic", 2.0, 4)


ITEM = MCQItem("t", 0, Path("v.mp4"), "Which way does it move?", ["left", "right", "up", "down"],
               "right", 1)



def prompt_embeds(model, req) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """(continuation ids, prompt embeddings [1, S, D], attention [1, S]) of a request, as score_options builds them."""
    conts = [model.processor.tokenizer(c, add_special_tokens=False)["input_ids"] for c in req.continuations]
    sample = model.processor.make_sample(req.turns, req.clip, "video")
    batch = model.processor.build_batch([sample], generation=True, prefill=req.prefill)
    with torch.no_grad():
        embeds, attention, _ = model.embed(batch)
    return conts, embeds, attention

def reference_scores(model: VideoLLM, req: ScoringRequest, media: str = "video") -> list[float]:
    """log p(option | prompt + prefill) without vlm.scoring: per option, one plain forward over the prompt embeddings
    followed by the option's token embeddings, and the option tokens' log-probs summed by hand."""
    media = media if req.clip is not None else None
    processor = model.processor
    batch = processor.build_batch([processor.make_sample(req.turns, req.clip, media)], generation=True, prefill=req.prefill)
    table = model.llm.get_input_embeddings()
    out = []
    with torch.no_grad():
        prompt, attention, _ = model.embed(batch)  # [1, S, D]
        assert bool(attention.all()), "one prompt, no padding"
        s = prompt.shape[1]
        for text in req.continuations:
            ids = model.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
            full = torch.cat([prompt[0], table(torch.tensor(ids, dtype=torch.long))], dim=0)[None]  # [1, S + n, D]
            keep = len(ids) + 1  # logits of positions s - 1 ... s + n - 1 only (the lm head is most of the cost)
            logits = model.llm(inputs_embeds=full, logits_to_keep=keep).logits[0]  # [keep, V]
            assert logits.shape[0] == keep
            total = 0.0
            for j, token in enumerate(ids):
                position = s - 1 + j  # predicts the option's token j
                row = logits[position - (s + len(ids) - keep)]
                total += float(torch.log_softmax(row.double(), dim=-1)[token])
            out.append(total)
    return out


def test_videollm_implements_the_interface(model):
    assert isinstance(model, AnswerGenerator) and isinstance(model, OptionScorer)


OPTION_SETS = {
    # different lengths (3, 12, 1, 3 tokens) and an empty option, which scores 0.0
    "mixed": ["A) left", "B) right turn, then a long way up the hill", "C", "D) down", ""],
    "one_token": ["A", "B", ""],  # the prefix-only path (no continuation forward)
    "two_tokens": ["A)", "B", "C) up"],  # 2 and 1 tokens next to a longer one
    "at_most_two": ["A)", "B"],
}


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("options", list(OPTION_SETS))
def test_option_scores_equal_an_independent_reference(model, share_prefix, options):
    conts = OPTION_SETS[options]
    lengths = [len(model.processor.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in conts]
    assert lengths[0] == {"mixed": 3, "one_token": 1, "two_tokens": 2, "at_most_two": 2}[options]
    req = ScoringRequest(uid="q", clip=clip(), turns=mvbench_turns(ITEM), prefill="Best option:(", continuations=conts)
    scores = model.score_options([req], share_prefix=share_prefix)[0]
    ref = reference_scores(model, req)
    assert len(scores) == len(conts)
    assert np.allclose(scores, ref, atol=1e-4, rtol=0), (scores, ref)
    for c, s in zip(conts, scores):
        assert (s == 0.0) if c == "" else (s < 0)
    assert len({round(s, 3) for s in ref}) == len(conts)  # distinct options score differently: a mix-up shows


@pytest.mark.parametrize("share_prefix", [True, False])
def test_several_requests_each_get_their_own_prompt_prefill_and_order(model, share_prefix):
    other = MCQItem("t", 1, Path("v.mp4"), "What colour is the square?", ["red", "blue"], "red", 0)
    reqs = [
        ScoringRequest(uid="a", clip=clip(), turns=mvbench_turns(ITEM), prefill="Best option:(",
                       continuations=["A) left", "B) right", "C) up"]),
        ScoringRequest(uid="b", clip=None, turns=[Turn("user", "Which way does it move?")], prefill="",
                       continuations=["left", "to the right"]),
        ScoringRequest(uid="c", clip=clip(seed=3), turns=mvbench_turns(other), prefill="The answer is",
                       continuations=[" red", " blue", " a red square"]),
    ]
    scores = model.score_options(reqs, share_prefix=share_prefix)
    assert len(scores) == 3
    for req, got in zip(reqs, scores):
        assert np.allclose(got, reference_scores(model, req), atol=1e-4, rtol=0), req.uid


@pytest.mark.parametrize("way", ["tree", "cache", "recompute"])
def test_a_batch_of_questions_scores_like_one_question_at_a_time(model, way, monkeypatch):
    """Questions of different prompt lengths, clips and option counts (one without a clip), scored together: within
    1e-4 of scoring each alone; the tree in one forward per prompt (they share no start), the KV cache in two
    forwards per prefill (one prefix forward, one over every option), and a batch_size splits them."""
    share_prefix = way != "recompute"
    if way == "cache":  # what an LLM without custom attention masks (flash attention) gets
        monkeypatch.setattr(model, "_score_tree", model._score_with_cache)
    long_item = MCQItem("t", 2, Path("v.mp4"), "Which way does the square move, and how far does it get before "
                        "the clip ends? Think about it.", ["left", "right", "up"], "up", 2)
    reqs = [ScoringRequest(uid=f"q{n}", clip=c, turns=mvbench_turns(it), prefill="Best option:(", continuations=o)
            for n, (c, it, o) in enumerate([
                (clip(), ITEM, ["A) left", "B) right turn, then up", "C", "D) down"]),
                (clip(seed=1), long_item, ["A", "B) right", "C) up"]),
                (None, ITEM, ["A) left", "B", ""]),
                (clip(seed=2), ITEM, ["A) left", "B) right"])])]
    alone = [model.score_options([r], share_prefix=share_prefix)[0] for r in reqs]
    forwards = []
    real = model.llm.forward
    monkeypatch.setattr(model.llm, "forward", lambda *a, **k: forwards.append(k["inputs_embeds"].shape) or real(*a, **k))
    together = model.score_options(reqs, share_prefix=share_prefix)
    assert [f[0] for f in forwards] == {"tree": [1] * 4, "cache": [4, 12], "recompute": [12]}[way]  # 4 + 3 + 3 + 2 options
    for got, ref in zip(together, alone):
        assert np.allclose(got, ref, atol=1e-4, rtol=0), (got, ref)
    forwards.clear()
    split = model.score_options(reqs, share_prefix=share_prefix, batch_size=3)
    assert [f[0] for f in forwards] == {"tree": [1] * 4, "cache": [3, 10, 1, 2], "recompute": [10, 2]}[way]
    assert all(np.allclose(a, b, atol=1e-4, rtol=0) for a, b in zip(split, alone))


@pytest.mark.parametrize("way", ["tree", "cache", "recompute"])
def test_a_question_asked_twice_about_one_clip_scores_as_alone(model, way, monkeypatch):
    """Two requests whose prompts are the same (the same question about the same clip, with other options: a
    cloze prompt holds no options): the start they share is each one's whole prompt, and every option still
    follows its own prompt's last position."""
    if way == "cache":
        monkeypatch.setattr(model, "_score_tree", model._score_with_cache)
    reqs = [ScoringRequest(uid=f"q{n}", clip=clip(), turns=mvbench_turns(ITEM), prefill="Best option:(",
                           continuations=o) for n, o in enumerate([["A) left", "B) right turn, then up", "C"],
                                                                    ["D) down", "B"], ["A) left"]])]
    alone = [model.score_options([r], share_prefix=way != "recompute")[0] for r in reqs]
    together = model.score_options(reqs, share_prefix=way != "recompute")
    for got, ref in zip(together, alone):
        assert np.allclose(got, ref, atol=1e-4, rtol=0), (got, ref)


@pytest.mark.parametrize("way", ["tree", "cache"])
def test_questions_about_one_clip_compute_its_video_once(model, way, monkeypatch):
    """Three questions about one clip and one about another, scored together: the start the three share (system
    prompt and video) runs once; the tree puts it, the three rests and their options in one row, and the other
    question in a row of its own; the KV cache runs the starts, then the rest of all four prompts, then every
    option. Each score within 1e-4 of the question scored alone."""
    other = MCQItem("t", 1, Path("v.mp4"), "What colour is the square in the first frame of the video?",
                    ["red", "blue"], "red", 0)
    third = MCQItem("t", 2, Path("v.mp4"), "Does it stop?", ["yes", "no"], "no", 1)
    same = clip()
    reqs = [ScoringRequest(uid=f"q{n}", clip=c, turns=mvbench_turns(it), prefill="Best option:(", continuations=o)
            for n, (c, it, o) in enumerate([(same, ITEM, ["A) left", "B) right", "C) up"]),
                                            (same, other, ["A) red", "B) blue"]),
                                            (clip(seed=4), ITEM, ["A) left", "B) right"]),
                                            (same, third, ["A) yes", "B) no"])])]
    alone = [model.score_options([r])[0] for r in reqs]
    embeds = [prompt_embeds(model, r)[1][0] for r in reqs]
    shared = next(i for i in range(embeds[0].shape[0]) if not torch.equal(embeds[0][i], embeds[1][i]))
    assert shared > embeds[0].shape[0] // 2  # the video is most of the prompt
    forwards = []
    real = model.llm.forward
    monkeypatch.setattr(model.llm, "forward", lambda *a, **k: forwards.append(tuple(k["inputs_embeds"].shape[:2]))
                        or real(*a, **k))
    if way == "cache":
        monkeypatch.setattr(model, "_score_tree", model._score_with_cache)
    together = model.score_options(reqs)
    if way == "tree":
        tokens = [sum(len(c) for c in prompt_embeds(model, r)[0]) for r in reqs]  # option tokens per question
        one_clip = shared + sum(embeds[i].shape[0] - shared + tokens[i] for i in (0, 1, 3))
        assert forwards == [(1, one_clip), (1, embeds[2].shape[0] + tokens[2])]
    else:
        assert [f[0] for f in forwards] == [2, 4, 9]  # two groups, four prompts, 3 + 2 + 2 + 2 options
        assert forwards[0][1] == max(shared, embeds[2].shape[0])  # the clip's shared start, the other prompt whole
        assert forwards[1][1] == max(e.shape[0] for e in (embeds[0], embeds[1], embeds[3])) - shared  # the rests
    for got, ref in zip(together, alone):
        assert np.allclose(got, ref, atol=1e-4, rtol=0), (got, ref)


def test_options_get_no_special_tokens_even_from_a_tokenizer_that_adds_bos(model, monkeypatch):
    """Llama-style tokenizers put BOS before every text they tokenize; an option must be scored without it."""
    monkeypatch.setattr(model.processor.tokenizer, "add_bos_token", True)
    assert model.processor.tokenizer("A) left")["input_ids"][0] == model.processor.tokenizer.bos_token_id
    req = ScoringRequest(uid="q", clip=clip(), turns=mvbench_turns(ITEM), prefill="Best option:(",
                         continuations=["A) left", "B) right turn", ""])
    ref = reference_scores(model, req)
    for share_prefix in (True, False):
        assert np.allclose(model.score_options([req], share_prefix=share_prefix)[0], ref, atol=1e-4, rtol=0)


def test_shared_prefix_runs_the_prompt_once_and_only_the_options_after_it(model, monkeypatch):
    """share_prefix=True: the tree, one forward of the prompt and its options keeping the logits that score a token;
    with a KV cache, one prompt forward keeping only the last logits, then one forward over the K option tokens
    after the cached prompt; share_prefix=False: one forward over K full sequences."""
    calls: list[dict] = []
    real = model.llm.forward

    def spy(*args, **kw):
        calls.append({k: (tuple(v.shape) if torch.is_tensor(v) else v) for k, v in kw.items()
                      if k in ("inputs_embeds", "input_ids", "logits_to_keep", "use_cache")}
                     | {"past": 0 if kw.get("past_key_values") is None else kw["past_key_values"].get_seq_length()})
        return real(*args, **kw)

    monkeypatch.setattr(model.llm, "forward", spy)
    conts = ["A) left", "B) right turn, then a long way up the hill", "C"]  # 3, 12 and 1 tokens
    req = ScoringRequest(uid="q", clip=clip(), turns=mvbench_turns(ITEM), prefill="Best option:(", continuations=conts)
    model.score_options([req])  # the tree: the prompt and its options in one row, logits where a token is scored
    s = prompt_embeds(model, req)[1].shape[1]
    (tree,) = calls
    d = tree["inputs_embeds"][2]
    assert tree == {"inputs_embeds": (1, s + 16, d), "logits_to_keep": (1 + 2 + 11,), "use_cache": False, "past": 0}
    calls.clear()
    monkeypatch.setattr(model, "_score_tree", model._score_with_cache)  # an LLM without custom masks
    model.score_options([req])
    (prefix, rest) = calls
    assert prefix == {"inputs_embeds": (1, s, d), "logits_to_keep": 1, "use_cache": True, "past": 0}
    assert rest == {"inputs_embeds": (3, 12, d), "logits_to_keep": 0, "use_cache": True, "past": s}
    calls.clear()
    model.score_options([req], share_prefix=False)
    assert calls == [{"inputs_embeds": (3, s + 12, d), "logits_to_keep": 13, "use_cache": False, "past": 0}]
    calls.clear()
    model.score_options([dataclasses.replace(req, continuations=["A", "B", ""])])
    assert calls == [prefix]  # single-token options: the prompt forward is all it takes


@pytest.mark.parametrize("share_prefix", [True, False])
def test_a_single_option_and_an_image_request_with_a_system_turn(model, share_prefix):
    """One continuation (a batch of one row) scores like the reference; an image request keeps its media type even
    when its first turn is the system prompt (inferring it from the first turn would take it for a video)."""
    one = ScoringRequest(uid="q", clip=clip(), turns=mvbench_turns(ITEM), prefill="Best option:(",
                         continuations=["B) right turn"])
    frame = clip(seed=5)
    image = Clip(frame.frames[:1], frame.timestamps[:1], frame.indices[:1], "synthetic", 2.0, 1)
    pic = ScoringRequest(uid="i", clip=image, media_type="image", prefill="",
                         turns=[Turn("system", "Be brief."), Turn("user", "<image>\nWhat colour is it?")],
                         continuations=["red", "a blue square"])
    for req, media in ((one, "video"), (pic, "image")):
        got = model.score_options([req], share_prefix=share_prefix)[0]
        assert np.allclose(got, reference_scores(model, req, media), atol=1e-4, rtol=0), req.uid


@pytest.mark.parametrize("way", ["_score_tree", "_score_with_cache", "_score_recompute"])
def test_masked_prompt_positions_are_not_attended(model, way):
    """A left-padded prompt (as a generation batch pads it) scores like the prompt alone: neither the prompt forward
    nor the options may attend to the masked positions. RoPE positions are relative, so the shift does not matter."""
    req = ScoringRequest(uid="q", clip=clip(), turns=mvbench_turns(ITEM), prefill="Best option:(",
                         continuations=["A) left", "B) right turn", "C"])
    ref = reference_scores(model, req)
    conts, embeds, attention = prompt_embeds(model, req)
    junk = torch.Generator().manual_seed(0)
    padded = torch.cat([20 * torch.randn(1, 3, embeds.shape[2], generator=junk), embeds], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=attention.dtype), attention], dim=1)
    score = getattr(model, way)
    with torch.no_grad():
        assert np.allclose(score(padded, mask, [conts])[0], ref, atol=1e-4, rtol=0)
        seen = score(padded, torch.ones_like(mask), [conts])[0]  # the junk, attended, changes every score
    assert all(abs(a - b) > 1e-3 for a, b in zip(seen, ref)), (seen, ref)


def test_recompute_casts_option_embeddings_to_the_prompts_dtype(model, monkeypatch):
    """An embedding table kept in another precision than the prompt embeddings (float32 embeddings beside bfloat16
    layers, say): the options' embeddings are cast to the prompt's dtype, which the layers expect."""
    req = ScoringRequest(uid="q", clip=clip(), turns=mvbench_turns(ITEM), prefill="Best option:(",
                         continuations=["A) left", "B) right turn"])
    ref = reference_scores(model, req)
    conts, embeds, attention = prompt_embeds(model, req)
    table = torch.nn.Embedding.from_pretrained(model.llm.get_input_embeddings().weight.detach().double())
    monkeypatch.setattr(model.llm, "get_input_embeddings", lambda: table)
    with torch.no_grad():
        assert np.allclose(model._score_recompute(embeds, attention, [conts])[0], ref, atol=1e-4, rtol=0)


def test_scoring_is_silent(model):
    """No warning per scored question (an implicit softmax dimension, say), whichever path runs."""
    options = (["A) left", "B) right turn"], ["A", "B"])  # the continuation forward; the prompt forward alone
    reqs = [ScoringRequest(uid="q", clip=clip(), turns=mvbench_turns(ITEM), prefill="Best option:(", continuations=c)
            for c in options]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for share_prefix in (True, False):
            model.score_options(reqs, share_prefix=share_prefix)


def test_single_letter_loglik_agrees_with_greedy_first_token(model):
    letters = ["A", "B", "C", "D"]
    ids = [model.processor.tokenizer(x, add_special_tokens=False)["input_ids"] for x in letters]
    assert all(len(i) == 1 for i in ids)
    for seed in range(3):
        c = clip(seed)
        req = ScoringRequest(uid="q", clip=c, turns=mvbench_turns(ITEM), prefill="Best option:(", continuations=letters)
        scores = model.score_options([req])[0]
        sample = model.processor.make_sample(req.turns, c, "video")
        batch = model.processor.build_batch([sample], generation=True, prefill=req.prefill)
        embeds, attention, _ = model.embed(batch)
        with torch.no_grad():
            out = model.llm.generate(inputs_embeds=embeds, attention_mask=attention, max_new_tokens=1, do_sample=False,
                                     output_scores=True, return_dict_in_generate=True,
                                     pad_token_id=model.processor.tokenizer.pad_token_id)
        first = F.log_softmax(out.scores[0][0].float(), dim=-1)  # greedy's first-step distribution
        letter_logp = [float(first[i[0]]) for i in ids]
        assert torch.allclose(torch.tensor(scores), torch.tensor(letter_logp), atol=1e-4)
        assert max(range(4), key=lambda k: scores[k]) == max(range(4), key=lambda k: letter_logp[k])


# ---------------------------------------------------------------------- the pieces, by hand
def test_gather_sums_the_right_positions_in_float64():
    torch.manual_seed(1)
    first = torch.log_softmax(torch.randn(6), dim=-1)  # [V]
    rest = torch.log_softmax(torch.randn(3, 3, 6), dim=-1)  # [K, L, V]: position j predicts token j + 1
    got, = ScoringMixin._gather(first.expand(3, -1), rest, [[[1, 2, 3], [4], []]])
    want = [float(first[1]) + float(rest[0, 0, 2]) + float(rest[0, 1, 3]), float(first[4]), 0.0]
    assert got == pytest.approx(want, abs=1e-6)
    # token log-probs -1 and -1e-8 sum to -1 in float32: summing there would tie "[0, 1]" with "[0]"
    first = torch.tensor([-1.0, -30.0])
    rest = torch.tensor([[[-30.0, -1e-8]], [[-30.0, -30.0]]])
    assert (torch.tensor(-1.0) + torch.tensor(-1e-8)).item() == -1.0  # the float32 tie this avoids
    (longer,), (shorter,) = ScoringMixin._gather(first.expand(2, -1), rest, [[[0, 1]], [[0]]])  # two prompts
    assert shorter == -1.0 and longer == pytest.approx(-1.0 - 1e-8, abs=1e-12) and longer < shorter


def test_gather_goes_on_after_an_empty_option():
    first = torch.log_softmax(torch.tensor([0.5, -1.0, 2.0, 0.0]), dim=-1)
    rest = torch.log_softmax(torch.tensor([[[0.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]],
                                           [[0.0, 0.0, 0.0, 0.0]], [[1.0, 0.0, 3.0, 0.0]]]), dim=-1)
    z = math.log(math.exp(0.5) + math.exp(-1.0) + math.exp(2.0) + 1.0)
    want = [0.0, -1.0 - z, 0.0, 2.0 - z + 3.0 - math.log(math.exp(1.0) + 2.0 + math.exp(3.0))]
    assert ScoringMixin._gather(first.expand(4, -1), rest, [[[], [1], [], [2, 2]]])[0] == pytest.approx(want, abs=1e-6)


class _Stop(Exception):
    pass


class _IdsOn:
    """Token ids as a generation step hands them over, on another device than the CPU ("meta" stands in for an
    accelerator: it keeps shapes and devices but no values, so the rows come from here)."""

    def __init__(self, rows: list[list[int]], device: str):
        self.rows, self.shape, self.device = rows, (len(rows), len(rows[0])), torch.device(device)

    def tolist(self) -> list[list[int]]:
        return self.rows


class _MetaLLM:
    """An LLM on another device than the CPU ("meta"): it records where each tensor it gets lives, answers the
    prompt forward (the one that keeps the last position's logits) and stops at the next one (where values would
    be read)."""

    def __init__(self, config):
        self.config = config
        self.seen: list[dict[str, str]] = []

    def get_input_embeddings(self):
        def table(ids: torch.Tensor) -> torch.Tensor:
            self.seen.append({"table": ids.device.type})
            return torch.zeros(*ids.shape, 4, device=ids.device)
        return table

    def __call__(self, **kw):
        self.seen.append({k: v.device.type for k, v in kw.items() if torch.is_tensor(v)})
        if kw.get("logits_to_keep") == 1:
            return SimpleNamespace(logits=torch.zeros(1, 1, 10, device="meta"))
        raise _Stop


class _MetaScorer(ScoringMixin):
    """ScoringMixin with VideoLLM's own KV-cache path over a `_MetaLLM`."""

    prefill, extend = VideoLLM.prefill, VideoLLM.extend

    def __init__(self, processor, llm):
        self.processor, self.llm = processor, llm


def test_every_tensor_scoring_makes_lives_on_the_inputs_device(model):
    meta = torch.device("meta")
    owner = SimpleNamespace(processor=SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=3)))
    ids, mask = ScoringMixin._continuation_ids(owner, [[5, 6], [8]], meta)
    assert (ids.device, mask.device, tuple(ids.shape), tuple(mask.shape)) == (meta, meta, (2, 2), (2, 2))

    scorer = _MetaScorer(owner.processor, _MetaLLM(model.llm.config))
    # two prompts of 5 positions sharing their first 3 (the plan reads values: it is given here)
    scorer._prefix_plan = lambda embeds, attention: ([5, 5], [0, 0], [3])
    embeds, attention = torch.zeros(2, 5, 4, device=meta), torch.ones(2, 5, dtype=torch.long, device=meta)
    with pytest.raises(_Stop):
        scorer._score_with_cache(embeds, attention, [[[1, 2], [3]], [[4]]])
    on_meta = {"inputs_embeds": "meta", "attention_mask": "meta", "position_ids": "meta"}
    assert scorer.llm.seen == [on_meta, on_meta, {"table": "meta"}, on_meta]  # shared start, rests, options
    scorer.llm = _MetaLLM(model.llm.config)
    with pytest.raises(_Stop):
        scorer._score_recompute(embeds[:1], attention[:1], [[[1, 2], [3]]])
    assert scorer.llm.seen == [{"table": "meta"}, {"inputs_embeds": "meta", "attention_mask": "meta"}]

    # the stopping criterion answers on the ids' device, where generate combines it with its own flags
    rows = [model.processor.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("A\nB", "A B")]
    width = max(map(len, rows))
    rows = [r + [model.processor.tokenizer.pad_token_id] * (width - len(r)) for r in rows]
    for stops in (["\n"], []):
        done = FirstLineStop(model.processor.tokenizer, stops)(_IdsOn(rows, "meta"), None)
        assert (done.device, done.dtype, tuple(done.shape)) == (meta, torch.bool, (2,))
    assert FirstLineStop(model.processor.tokenizer, ["\n"])(_IdsOn(rows, "cpu"), None).tolist() == [True, False]


@pytest.mark.parametrize("pad,fill", [(7, 7), (None, 0)])
def test_continuation_ids_are_right_padded_with_a_mask(pad, fill):
    owner = SimpleNamespace(processor=SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=pad)))
    ids, mask = ScoringMixin._continuation_ids(owner, [[5, 6, 4], [8], []], torch.device("cpu"))
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 4], [8, fill, fill], [fill, fill, fill]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, mask = ScoringMixin._continuation_ids(owner, [[], []], torch.device("cpu"))  # still one column
    assert ids.tolist() == [[fill], [fill]] and mask.tolist() == [[0], [0]]


def test_first_line_stop(model):
    tok = model.processor.tokenizer
    pad = tok.pad_token_id

    def rows(*texts: str, left: dict[int, int] | None = None) -> torch.Tensor:
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        ids = [[pad] * (left or {}).get(i, 0) + r for i, r in enumerate(ids)]
        width = max(map(len, ids))
        return torch.tensor([r + [pad] * (width - len(r)) for r in ids])  # pads are special tokens: not text

    newline = FirstLineStop(tok, ["\n"])
    batch = rows("\n\nA", "\n\nA) yes\nmore", "A) yes", "B\n", "\n", "\n", left={5: 1})
    # blank lines before the answer do not stop it; a newline after text does; a pad token is not text
    assert newline(batch, None).tolist() == [False, True, False, True, False, False]
    assert newline(batch, None).dtype == torch.bool
    either = FirstLineStop(tok, ["\n", "."])  # any of the stops
    assert either(rows("A. x", "A x\n", "A x"), None).tolist() == [True, True, False]
    assert FirstLineStop(tok, ["es"])(rows("yes", "no"), None).tolist() == [True, False]  # inside a word too
    for never in (FirstLineStop(tok, []), FirstLineStop(tok, [""])):  # no stops (empty strings dropped)
        assert never.stops == () and never(rows("A\nB", "\n"), None).tolist() == [False, False]
    assert FirstLineStop(tok, ["", "\n"]).stops == ("\n",)


# ---------------------------------------------------------------------- generation batching
def _gen(uid: str, prefill: str, max_new: int = 4, stop: tuple[str, ...] = (), **kw) -> GenerationRequest:
    return GenerationRequest(uid=uid, clip=kw.get("clip"), turns=kw.get("turns", [Turn("user", "Say " + uid)]),
                             prefill=prefill, max_new_tokens=max_new, stop=stop)


def test_generate_answers_groups_by_prefill_in_chunks_with_the_chunks_limits(model, monkeypatch):
    """Requests with the same prefill run together, `batch_size` at a time, each chunk with the largest
    max_new_tokens and the union of its stops; every answer goes back to its own request."""
    built: list[tuple[list[str], str, bool]] = []
    calls: list[tuple[int, int, tuple[str, ...] | None]] = []
    real_build = model.processor.build_batch

    def build(samples, *, generation=False, prefill=""):
        built.append(([s["id"] for s in samples], prefill, generation))
        return real_build(samples, generation=generation, prefill=prefill)

    def generate(batch, max_new_tokens=64, **kw):
        crit = kw.pop("stopping_criteria", None)
        assert not kw
        if crit is not None:
            assert len(crit) == 1 and isinstance(crit[0], FirstLineStop)
        calls.append((batch.input_ids.shape[0], max_new_tokens, None if crit is None else crit[0].stops))
        return [f"call{len(calls) - 1}-row{j}" for j in range(batch.input_ids.shape[0])]

    monkeypatch.setattr(model.processor, "build_batch", build)
    monkeypatch.setattr(model, "generate", generate)
    reqs = [_gen("r0", "P:", 3, ("\n",)), _gen("r1", "", 5), _gen("r2", "P:", 7, (".",)), _gen("r3", "", 2),
            _gen("r4", "P:", 1, ("\n",))]
    answers = model.generate_answers(reqs, batch_size=2)
    assert built == [(["r0", "r2"], "P:", True), (["r4"], "P:", True), (["r1", "r3"], "", True)]
    assert calls == [(2, 7, ("\n", ".")), (1, 1, ("\n",)), (2, 5, None)]
    assert answers == ["call0-row0", "call2-row0", "call0-row1", "call2-row1", "call1-row0"]
    built.clear(), calls.clear()
    answers = model.generate_answers(reqs)  # no batch size: one chunk per prefill
    assert built == [(["r0", "r2", "r4"], "P:", True), (["r1", "r3"], "", True)]
    assert calls == [(3, 7, ("\n", ".")), (2, 5, None)]
    assert answers == ["call0-row0", "call1-row0", "call0-row1", "call1-row1", "call0-row2"]


def test_batched_greedy_answers_equal_answers_alone(model):
    q1, q2 = mvbench_turns(ITEM), mvbench_turns(MCQItem("t", 1, Path("v.mp4"), "Which way does it turn?",
                                                        ["left", "right", "up", "down"], "right", 1))
    reqs = [_gen("a", "Best option:(", turns=q1, clip=clip()), _gen("b", "", turns=q2, clip=clip()),
            _gen("c", "Best option:(", turns=q2, clip=clip(1)), _gen("d", "", turns=q1, clip=clip(1))]
    alone = [model.generate_answers([r])[0] for r in reqs]
    assert all(alone) and len(set(alone)) >= 3  # different prompts and prefills answer differently
    for batch_size in (None, 2):
        assert model.generate_answers(reqs, batch_size=batch_size) == alone


# ---------------------------------------------------------------------- through the harness
def test_tiny_model_through_the_harness(model, tmp_path):
    """Predictions and accuracies are exactly what the model's own scores (and greedy answers) say, computed here
    without the harness: per question, the argmax of the reference option scores, on the clip sampled with the
    model's own policy (as the harness asks a VideoLLM)."""
    bench = make_bench(tmp_path / "bench", missing_video=False)
    data = load_mvbench(bench)
    expected: dict[str, str] = {}
    ref_scores: dict[str, list[float]] = {}
    for items in data.values():
        for item in items:
            req = ScoringRequest(uid=item.uid, clip=decode_item_clip(item, 4, model.config.sampling),
                                 turns=mvbench_turns(item), prefill="Best option:(",
                                 continuations=loglik_continuations(item))
            s = reference_scores(model, req)
            top = sorted(s, reverse=True)
            assert top[0] - top[1] > 1e-3  # no near-tie: the expected answer is well defined
            ref_scores[item.uid], expected[item.uid] = s, LETTERS[int(np.argmax(s))]
    correct = {t: sum(expected[i.uid] == i.answer_letter for i in items) for t, items in data.items()}
    assert 0 < sum(correct.values()) < 12 and len(set(expected.values())) > 1  # a result a mix-up would change

    ll = evaluate_mcq(model, bench, tmp_path / "ll", profile="loglik", num_frames=4, progress=False)
    rows = {r["uid"]: r for r in map(json.loads, (tmp_path / "ll" / "predictions.jsonl").read_text().splitlines())}
    assert set(rows) == set(expected)
    for uid, row in rows.items():
        assert row["pred"] == expected[uid] and row["correct"] == (expected[uid] == row["answer"]), uid
        assert np.allclose(row["scores"], ref_scores[uid], atol=1e-4, rtol=0), uid
    assert ll.counts["scored"] == ll.counts["questions"] == 12 and ll.metrics["unparsable"] == 0
    for task, items in data.items():
        assert ll.per_task[task]["correct"] == correct[task] and ll.per_task[task]["total"] == len(items)
        assert ll.per_task[task]["accuracy"] == pytest.approx(100.0 * correct[task] / len(items))
    assert ll.metrics["accuracy_over_questions"] == pytest.approx(100.0 * sum(correct.values()) / 12)
    assert ll.metrics["accuracy_mean_over_tasks"] == pytest.approx(
        np.mean([100.0 * correct[t] / len(items) for t, items in data.items()]))

    # generation: each question's greedy answer, generated alone here by the LLM, parsed by the notebook's rule
    short = dataclasses.replace(get_profile("mvbench"), max_new_tokens=3)
    gen = evaluate_mcq(model, bench, tmp_path / "gen", profile=short, num_frames=4, batch_size=4, progress=False)
    rows = {r["uid"]: r for r in map(json.loads, (tmp_path / "gen" / "predictions.jsonl").read_text().splitlines())}
    right = 0
    for items in data.values():
        for item in items:
            sample = model.processor.make_sample(mvbench_turns(item), decode_item_clip(item, 4, model.config.sampling), "video")
            with torch.no_grad():
                embeds, attention, _ = model.embed(model.processor.build_batch([sample], generation=True, prefill=short.prefill))
                ids = model.llm.generate(inputs_embeds=embeds, attention_mask=attention, max_new_tokens=3,
                                         do_sample=False, pad_token_id=model.processor.tokenizer.pad_token_id)
            parsed = parse_mvbench(model.processor.tokenizer.decode(ids[0], skip_special_tokens=True), len(item.candidates))
            assert (rows[item.uid]["pred"], rows[item.uid]["parsed_answer"]) == (parsed.letter, parsed.answer)
            right += parsed.letter == item.answer_letter
    assert gen.counts["scored"] == 12 and gen.counts["skipped"] == 0
    assert gen.metrics["accuracy_over_questions"] == pytest.approx(100.0 * right / 12)


def test_pruned_visual_tokens_in_prompts_of_one_length_score_and_generate_as_alone():
    """Word slots prune a different number of positions per clip; in a batch whose prompts are all one length (no
    padding to see), the rows must still be re-padded on the left, so every row ends where its answer begins."""
    from tests.test_word_slots import tiny_slots_model

    torch.manual_seed(0)
    slots = tiny_slots_model(layout="tracks", text_tokens=128).eval()
    clips = [clip(seed=s) for s in (3, 4, 5)]
    with torch.no_grad():
        kept = [int(slots.encode_visual(*map(list, zip(slots.processor.preprocess_clip(c)))).mask.sum()) for c in clips]
    assert len(set(kept)) > 1  # the clips' texts differ in length
    turns = [Turn("user", "<video>\nWhat happens?")]
    scoring = [ScoringRequest(uid=f"s{k}", clip=c, turns=turns, continuations=["left", "a red circle"])
               for k, c in enumerate(clips)]
    alone = [slots.score_options([r])[0] for r in scoring]
    assert all(np.allclose(a, b, atol=1e-4, rtol=0) for a, b in zip(slots.score_options(scoring), alone))
    asking = [GenerationRequest(uid=f"g{k}", clip=c, turns=turns, max_new_tokens=5) for k, c in enumerate(clips)]
    assert slots.generate_answers(asking) == [slots.generate_answers([r])[0] for r in asking]


def _answer_sample(model, question: str, answers: list[str], frames: Clip | None, video_first: bool = True):
    turns = []
    for k, a in enumerate(answers):
        text = question * (k + 1)
        if k == 0 and frames is not None:
            text = "<video>\n" + text if video_first else text + "\n<video>"
        turns += [Turn("user", text), Turn("assistant", a)]
    return model.processor.make_sample(turns, frames, sample_id=question)


@pytest.mark.parametrize("connector", ["mlp", "diff_prune+mlp"])
def test_answer_losses_equal_each_samples_own_loss(connector):
    """One clip's conversations of different lengths (the start they share runs once), a conversation about
    another clip, a text-only one, and one without answer tokens (nan): each loss is the sample's own
    causal-LM loss, as its forward alone gives it; a pruning connector drops positions first."""
    from tests.test_model import config

    torch.manual_seed(0)
    model = VideoLLM.from_config(config("clip", connector)).eval()
    for layer in model.llm.model.layers:  # sharp attention: a position off by one changes the losses
        layer.self_attn.q_proj.weight.data *= 20
        layer.self_attn.k_proj.weight.data *= 20
    still = Clip(np.repeat(moving_square((30, 200, 30), frames=4)[:1], 4, axis=0), np.arange(4) * 0.5, np.arange(4),
                 "synthetic", 2.0, 4)  # a static clip: the pruning connector keeps its first frame only
    one = [_answer_sample(model, "Which way?", ["right", "Then up, fast."], clip()),
           _answer_sample(model, "What colour?", ["red"], clip()),
           _answer_sample(model, "And now?", ["a red square", "it stops", "gone"], clip())]
    with torch.no_grad():
        alone_one = [float(model(model.processor.build_batch([s])).loss) for s in one]
        assert model.answer_losses(model.processor.build_batch(one)) == pytest.approx(alone_one, rel=1e-5)
        mixed = one[:1] + [_answer_sample(model, "Which way?", ["left"], still),
                           _answer_sample(model, "Say hi.", ["hi"], None),
                           _answer_sample(model, "Where is it?", ["top left", "gone"], clip(), video_first=False)]
        alone = [float(model(model.processor.build_batch([s])).loss) for s in mixed]
        assert model.answer_losses(model.processor.build_batch(mixed)) == pytest.approx(alone, rel=1e-5)
        batch = model.processor.build_batch(one)
        batch.labels[1] = -100  # no answer token in the second sample
        losses = model.answer_losses(batch)
        assert math.isnan(losses[1]) and [losses[0], losses[2]] == pytest.approx([alone_one[0], alone_one[2]], rel=1e-5)


def test_answer_losses_run_the_shared_start_once(monkeypatch):
    """Conversations about one clip: one prefill of the start the video-first ones share, then each rest after it,
    cut after its last answer token (the cache back at the shared start every time); a question asked before the
    video starts a group of its own."""
    from tests.test_model import config

    torch.manual_seed(0)
    model = VideoLLM.from_config(config("clip", "mlp")).eval()
    samples = [_answer_sample(model, q, ["yes"], clip()) for q in ("Is it red?", "Does it move?", "Is it square?")]
    samples.insert(1, _answer_sample(model, "Is it big?", ["no"], clip(), video_first=False))
    calls = []
    extend = model.extend
    monkeypatch.setattr(model, "extend", lambda cache, x, *a, **k: calls.append((cache.get_seq_length(), x.shape[:2]))
                        or extend(cache, x, *a, **k))
    with torch.no_grad():
        embeds, attention, labels = model.embed(model.processor.build_batch(samples))
        model.answer_losses(model.processor.build_batch(samples))
    first = [int((labels[b] >= 0).nonzero()[0]) for b in range(4)]
    last = [int((labels[b] >= 0).nonzero()[-1]) for b in range(4)]
    shared = int((embeds[0] != embeds[2]).any(-1).nonzero()[0])  # where the video-first questions begin to differ
    assert 0 < shared < first[0]
    assert calls == [(0, (1, shared))] + [(shared, (1, last[b] - shared)) for b in (0, 2, 3)] + [
        (0, (1, first[1])), (first[1], (1, last[1] - first[1]))]


def test_bench_scoring_times_both_ways_and_they_agree(tmp_path, capsys):
    import sys

    torch.manual_seed(0)
    VideoLLM.from_config({"tower": copy.deepcopy(TINY_TOWERS["clip"]), "connector": {"name": "mlp"},
                          "llm": copy.deepcopy(TINY_LLM), "num_frames": 4}).save_pretrained(tmp_path / "model")
    bench = make_bench(tmp_path / "bench", missing_video=False)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_scoring import main

    assert main(["--model", str(tmp_path / "model"), "--bench", str(bench), "--repeats", "1", "--no-docs"]) == 0
    out = capsys.readouterr().out
    assert "| **one row per clip's questions, a prefix-tree mask** |" in out
    n = int(out.split("the same answer to ")[1].split(" of ")[0])
    assert out.split("the same answer to ")[1].startswith(f"{n} of {n} questions") and n > 0


def test_the_tree_is_used_only_where_the_llm_takes_a_custom_mask(model, monkeypatch):
    """sdpa and eager take the prefix-tree mask; flash attention, an active sliding window or soft-capped attention
    get the KV-cache path (a sliding window that is switched off, as Qwen2 configs carry it, does not count)."""
    config = model.llm.config
    assert model._takes_tree_mask()
    monkeypatch.setattr(config, "sliding_window", 4096, raising=False)
    monkeypatch.setattr(config, "use_sliding_window", False, raising=False)
    assert model._takes_tree_mask()
    monkeypatch.setattr(config, "use_sliding_window", True)
    assert not model._takes_tree_mask()
    monkeypatch.setattr(config, "sliding_window", None)
    monkeypatch.setattr(config, "attn_logit_softcapping", 50.0, raising=False)
    assert not model._takes_tree_mask()
    monkeypatch.setattr(config, "attn_logit_softcapping", None)
    monkeypatch.setattr(config, "_attn_implementation", "flash_attention_2")
    assert not model._takes_tree_mask()


DEVICES = [("cpu", torch.float32)] + [
    pytest.param("cuda", dtype, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))
    for dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("device,dtype", DEVICES)
def test_the_scoring_paths_agree_on_each_device(device, dtype, monkeypatch):
    """On the device and in the dtype a user scores with (a GPU's default is bfloat16): the prefix tree, the KV
    cache and the plain recompute give the same option scores and the same choices, and answer_losses gives each
    sample's own loss. Tolerances follow the dtype: bfloat16 keeps 8 bits of mantissa."""
    from tests.test_model import config

    torch.manual_seed(0)
    model = VideoLLM.from_config(config("clip", "mlp")).eval().to(device=device, dtype=dtype)
    assert model._takes_tree_mask()  # sdpa on the CPU and on CUDA alike
    reqs = [ScoringRequest(uid=f"q{n}", clip=c, turns=mvbench_turns(ITEM), prefill="Best option:(", continuations=o)
            for n, (c, o) in enumerate([(clip(), ["A) left", "B) right turn, then up", "C", "D) down"]),
                                        (clip(), ["A", "B) right", "C) up"]),
                                        (clip(seed=1), ["A) left", "B) right"]),
                                        (None, ["A) left", "B", ""])])]
    tol = {torch.float32: 1e-3, torch.bfloat16: 0.25}[dtype]
    with torch.no_grad():
        tree = model.score_options(reqs)
        recompute = model.score_options(reqs, share_prefix=False)
        monkeypatch.setattr(model, "_score_tree", model._score_with_cache)
        cache = model.score_options(reqs)
        for a, b, c in zip(tree, cache, recompute):
            assert np.allclose(a, c, atol=tol, rtol=0) and np.allclose(b, c, atol=tol, rtol=0), (a, b, c)
        samples = [_answer_sample(model, "Which way?", ["right", "Then up."], clip()),
                   _answer_sample(model, "What colour?", ["red"], clip()),
                   _answer_sample(model, "Say hi.", ["hi"], None)]
        alone = [float(model(model.processor.build_batch([s])).loss) for s in samples]
        got = model.answer_losses(model.processor.build_batch(samples))
    assert got == pytest.approx(alone, rel=tol / 10 if dtype == torch.float32 else 0.05)
