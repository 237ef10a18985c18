"""VideoLLM's evaluation interface on a tiny random model: cached option scoring is exact, agrees with greedy
decoding, and drives the multiple-choice harness end to end."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from evals.interface import AnswerGenerator, GenerationRequest, OptionScorer, ScoringRequest
from evals.mcq import evaluate_mcq
from evals.profiles import get_profile, mvbench_turns
from tests.conftest import TINY_LLM, TINY_TOWERS
from tests.eval_helpers import make_bench, moving_square
from vlm.data.mvbench import MCQItem
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


def clip() -> Clip:
    frames = moving_square((200, 30, 30), frames=4)
    return Clip(frames, torch.arange(4).numpy() * 0.5, torch.arange(4).numpy(), "synthetic", 2.0, 4)


ITEM = MCQItem("t", 0, Path("v.mp4"), "Which way does it move?", ["left", "right", "up", "down"],
               "right", 1)


def test_videollm_implements_the_interface(model):
    assert isinstance(model, AnswerGenerator) and isinstance(model, OptionScorer)


def test_cached_prefix_scores_equal_a_full_recompute(model):
    conts = ["A) left", "B) right turn, then a long way up the hill", "C", "D) down"]
    req = ScoringRequest(uid="q", clip=clip(), turns=mvbench_turns(ITEM), prefill="Best option:(", continuations=conts)
    cached = model.score_options([req])[0]
    full = model.score_options([req], share_prefix=False)[0]
    assert torch.allclose(torch.tensor(cached), torch.tensor(full), atol=1e-4, rtol=1e-5), (cached, full)
    assert len(set(cached)) == 4 and all(s < 0 for s in cached)


def test_single_letter_loglik_agrees_with_greedy_first_token(model):
    letters = ["A", "B", "C", "D"]
    ids = [model.tokenizer(x, add_special_tokens=False)["input_ids"] for x in letters]
    assert all(len(i) == 1 for i in ids)
    for seed in range(3):
        c = clip()
        c.frames = torch.randint(0, 255, c.frames.shape, generator=torch.Generator().manual_seed(seed)).numpy().astype("uint8")
        req = ScoringRequest(uid="q", clip=c, turns=mvbench_turns(ITEM), prefill="Best option:(", continuations=letters)
        scores = model.score_options([req])[0]
        batch = model.build_batch([model.make_sample(req.turns, c, "video")], generation=True, prefill=req.prefill)
        embeds, attention, _ = model.embed(batch)
        with torch.no_grad():
            out = model.llm.generate(inputs_embeds=embeds, attention_mask=attention, max_new_tokens=1, do_sample=False,
                                     output_scores=True, return_dict_in_generate=True,
                                     pad_token_id=model.tokenizer.pad_token_id)
        first = F.log_softmax(out.scores[0][0].float(), dim=-1)  # greedy's first-step distribution
        letter_logp = [float(first[i[0]]) for i in ids]
        assert torch.allclose(torch.tensor(scores), torch.tensor(letter_logp), atol=1e-4)
        assert max(range(4), key=lambda k: scores[k]) == max(range(4), key=lambda k: letter_logp[k])


def test_generate_answers_and_first_line_stop(model):
    stop = FirstLineStop(model.tokenizer, ["\n"])
    ids = model.tokenizer(["\n\nA) yes\nmore", "B) no"], add_special_tokens=False, padding=True)["input_ids"]
    assert stop(torch.tensor([ids[0], ids[1]]), None).tolist() == [True, False]
    reqs = [GenerationRequest(uid=f"q{i}", clip=clip(), turns=mvbench_turns(ITEM), prefill="Best option:(",
                              max_new_tokens=3, stop=("\n",)) for i in range(2)]
    answers = model.generate_answers(reqs)
    assert len(answers) == 2 and answers[0] == answers[1]  # same question, same clip, greedy


def test_tiny_model_through_the_harness(model, tmp_path):
    bench = make_bench(tmp_path / "bench", missing_video=False)
    ll = evaluate_mcq(model, bench, tmp_path / "ll", profile="loglik", num_frames=4, progress=False)
    assert ll.counts["scored"] == ll.counts["questions"] == 12 and ll.metrics["unparsable"] == 0
    short = dataclasses.replace(get_profile("mvbench"), max_new_tokens=2)
    gen = evaluate_mcq(model, bench, tmp_path / "gen", profile=short, num_frames=4, batch_size=4, progress=False)
    assert gen.counts["scored"] == 12 and gen.counts["skipped"] == 0
    assert 0.0 <= gen.metrics["accuracy_over_questions"] <= 100.0
