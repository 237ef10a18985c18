"""The lmms-eval adapter (evals.lmms.VLM), driven the way lmms-eval's evaluator drives a model: Instance-shaped
requests whose args are (context, gen_kwargs | doc_to_target, doc_to_visual, doc_id, task, split), docs in
`task_dict`. lmms-eval itself does not install here (it requires torchvision), so the requests are objects of
the same shape."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points

import pytest

from evals.interface import GenerationRequest, ScoringRequest
from evals.lmms import VLM
from tests.eval_helpers import write_clip
from vlm.data.conversation import Turn


@dataclass
class Instance:  # lmms_eval.api.instance.Instance's fields that a model reads
    request_type: str
    arguments: tuple
    idx: int = 0

    @property
    def args(self) -> tuple:
        return self.arguments


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    for color in ("red", "green"):
        write_clip(root / f"{color}.mp4", color)
    model = VLM.create_from_arg_string(f"pretrained={tiny_model_dir},batch_size=2,max_new_tokens=5")
    docs = [{"video": str(root / f"{c}.mp4"), "question": q, "answer": a}
            for c in ("red", "green") for q, a in (("Which way does it move?", "left"), ("What colour is it?", c))]
    model.task_dict = {"synth": {"test": docs}}
    return model, docs


def _visual(doc):
    return [doc["video"]]


def _target(doc):
    return doc["answer"]


def test_generate_until_equals_our_greedy_answers(adapter):
    model, docs = adapter
    reqs = [Instance("generate_until", (d["question"], {"until": ["\n\n"], "max_new_tokens": 5}, _visual, i, "synth", "test"), i)
            for i, d in enumerate(docs)]
    answers = model.generate_until(reqs)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    from vlm.video import read_clip

    direct = model.model.generate_answers([
        GenerationRequest(uid=str(i), clip=read_clip(d["video"], model.num_frames, model.sampling),
                          turns=[Turn("user", f"<video>\n{d['question']}")], max_new_tokens=5) for i, d in enumerate(docs)])
    assert answers == [a.split("\n\n")[0] for a in direct]


def test_until_cuts_the_answer(adapter):
    model, docs = adapter
    full = model.generate_until([Instance("generate_until", (docs[0]["question"], {"max_new_tokens": 5}, _visual, 0, "synth", "test"))])[0]
    if len(full.split()) < 2:
        pytest.skip("the tiny model's answer has no second word to cut at")
    stop = full.split()[1]
    cut = model.generate_until([Instance("generate_until", (docs[0]["question"], {"until": [stop], "max_new_tokens": 5},
                                                            _visual, 0, "synth", "test"))])[0]
    assert cut == full.split(stop)[0] and stop not in cut


def test_loglikelihood_scores_and_greedy_flag(adapter):
    model, docs = adapter
    reqs = [Instance("loglikelihood", (d["question"], _target, _visual, i, "synth", "test")) for i, d in enumerate(docs)]
    out = model.loglikelihood(reqs)
    from vlm.video import read_clip

    direct = model.model.score_options([
        ScoringRequest(uid=str(i), clip=read_clip(d["video"], model.num_frames, model.sampling),
                       turns=[Turn("user", f"<video>\n{d['question']}")], continuations=[d["answer"]])
        for i, d in enumerate(docs)])
    assert [s for s, _ in out] == pytest.approx([d[0] for d in direct], abs=1e-5)
    assert all(s < 0 for s, _ in out)
    assert not out[0][1]  # "left" is not what a random tiny model writes
    # the greedy answer itself is flagged greedy
    greedy = model.generate_until([Instance("generate_until", (docs[0]["question"], {"max_new_tokens": 3}, _visual, 0, "synth", "test"))])[0]
    docs_g = [{**docs[0], "answer": greedy}]
    model.task_dict["greedy"] = {"test": docs_g}
    assert model.loglikelihood([Instance("loglikelihood", (docs[0]["question"], _target, _visual, 0, "greedy", "test"))])[0][1]


def test_text_only_docs_and_refusals(adapter):
    model, _ = adapter
    model.task_dict["text"] = {"test": [{"q": "hi"}]}
    out = model.generate_until([Instance("generate_until", ("Say hi.", {"max_new_tokens": 3}, lambda d: [], 0, "text", "test"))])
    assert isinstance(out[0], str)
    with pytest.raises(NotImplementedError, match="multi-round"):
        model.generate_until_multi_round([])


def test_registered_for_lmms_eval():
    """`lmms-eval --model vlm` finds the adapter through the lmms_eval.models entry-point group."""
    eps = {ep.name: ep.value for ep in entry_points(group="lmms_eval.models")}
    assert eps.get("vlm") == "evals.lmms:manifest"
