"""Our VideoLLM as an lmms-eval model, so the field's harness can score it on its own tasks:

    pip install lmms-eval            # beside vlm; its task data comes from the HF hub
    lmms-eval --model vlm --model_args pretrained=runs/my_model/final,num_frames=16 --tasks mvbench --batch_size 8

The `vlm` model id reaches lmms-eval through the `lmms_eval.models` entry-point group (pyproject.toml), the way
lmms-eval loads external models. The adapter answers the two request kinds video tasks use:

- `generate_until`: each request's context is asked as the first user turn after the video (`<video>\\n` +
  context), greedy, cut at the task's `until` strings; `max_new_tokens` from the task (default 256).
- `loglikelihood`: the summed log-probability of the target continuation after the same prompt, and whether
  greedy decoding writes that text (compared as text, not token ids).

A visual is a video path (decoded once per call and shared by its requests), a frame folder, an image path or a
PIL image. Requests run in batches of `batch_size` through `generate_answers` / `score_options` (one prefix
forward per batch). Sampling settings (temperature > 0) are not used: answers are greedy, as lmms-eval's video
tasks ask by default. Multi-round generation (`generate_until_multi_round`) is not supported and says so.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from evals.interface import GenerationRequest, ScoringRequest
from vlm.data.conversation import PLACEHOLDERS, Turn
from vlm.video import Clip, read_clip

log = logging.getLogger(__name__)

try:  # lmms-eval's base class when it is installed; the same contract without it (tests, vlm-only installs)
    from lmms_eval.api.model import lmms as _Base
except ImportError:  # pragma: no cover - depends on the environment
    class _Base:  # type: ignore[no-redef]
        def __init__(self) -> None:
            self._rank, self._world_size = 0, 1

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> Any:
            args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
            return cls(**args, **{k: v for k, v in (additional_config or {}).items() if v is not None})

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size


def manifest() -> Any:
    """The `lmms_eval.models` entry point: lmms-eval's registration record for `--model vlm`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlm", simple_class_path="evals.lmms.VLM")


class VLM(_Base):
    """pretrained: a saved VideoLLM folder; num_frames (default: the model's), sampling policy, device, dtype,
    batch_size, max_new_tokens (when a task gives none)."""

    def __init__(self, pretrained: str, num_frames: int | str | None = None, sampling: str | None = None,
                 device: str | None = None, dtype: str | None = None, batch_size: int | str = 1,
                 max_new_tokens: int | str = 256, model: Any = None, **unused: Any) -> None:
        super().__init__()
        if unused:
            log.warning("vlm adapter: ignoring model_args %s", sorted(unused))
        if model is None:
            from vlm.model import VideoLLM

            model = VideoLLM.from_pretrained(pretrained, device=device, dtype=dtype, merge_lora=True)
        self.model = model.eval()
        self.num_frames = int(num_frames or model.config.num_frames)
        self.sampling = sampling or model.config.sampling
        self.batch_size = max(1, int(batch_size))
        self.max_new_tokens = int(max_new_tokens)
        self.task_dict: dict[str, Any] = {}  # set by lmms-eval's evaluator: task -> split -> docs

    # ---------------------------------------------------------------- visuals
    def _clip(self, visual: Any, cache: dict[Any, Clip]) -> tuple[Clip, str]:
        if isinstance(visual, (str, bytes)) or hasattr(visual, "__fspath__"):
            key = str(visual)
            if key not in cache:
                cache[key] = read_clip(key, self.num_frames, self.sampling)
            clip = cache[key]
            return clip, "image" if len(clip) == 1 and clip.num_frames_total == 1 else "video"
        if hasattr(visual, "convert"):  # a PIL image
            frame = np.asarray(visual.convert("RGB"))[None]  # [1, H, W, 3]
            return Clip(frame, np.zeros(1), np.zeros(1, dtype=np.int64), "<image>", 1.0, 1), "image"
        raise TypeError(f"vlm adapter: unsupported visual of type {type(visual).__name__} (a path or a PIL image)")

    def _prompt(self, context: str, doc_to_visual: Any, doc_id: Any, task: str, split: str,
                cache: dict[Any, Clip]) -> dict[str, Any]:
        visuals = [] if doc_to_visual is None else list(doc_to_visual(self.task_dict[task][split][doc_id]) or [])
        if len(visuals) > 1:
            raise ValueError(f"vlm adapter: {task}/{split}/{doc_id} has {len(visuals)} visuals; a model here takes one")
        uid = f"{task}/{split}/{doc_id}"
        if not visuals:
            return {"uid": uid, "clip": None, "turns": [Turn("user", context)], "media_type": "video"}
        clip, media = self._clip(visuals[0], cache)
        return {"uid": uid, "clip": clip, "turns": [Turn("user", f"{PLACEHOLDERS[media]}\n{context}")], "media_type": media}

    # ---------------------------------------------------------------- the two request kinds
    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        cache: dict[Any, Clip] = {}
        built = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if float(gen_kwargs.get("temperature", 0) or 0) > 0 or gen_kwargs.get("do_sample"):
                log.warning("vlm adapter: %s asks for sampling; answering greedily", task)
            built.append(GenerationRequest(**self._prompt(context, doc_to_visual, doc_id, task, split, cache),
                                           max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
                                           stop=tuple(until)))
        answers = self.model.generate_answers(built, batch_size=self.batch_size)
        out = []
        for request, text in zip(built, answers):
            for stop in request.stop:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
        return out

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        cache: dict[Any, Clip] = {}
        scoring, greedy = [], []
        tokenizer = self.model.processor.tokenizer
        for req in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            target = doc_to_target(self.task_dict[task][split][doc_id]) if callable(doc_to_target) else doc_to_target
            prompt = self._prompt(context, doc_to_visual, doc_id, task, split, cache)
            scoring.append(ScoringRequest(**prompt, continuations=[str(target)]))
            length = len(tokenizer(str(target), add_special_tokens=False)["input_ids"])
            greedy.append(GenerationRequest(**prompt, max_new_tokens=length + 2))  # room for another tokenization
        scores = self.model.score_options(scoring, batch_size=self.batch_size)
        texts = self.model.generate_answers(greedy, batch_size=self.batch_size)
        # greedy: the greedy answer's text starts with the target's (a text-level check: a target tokenized
        # differently from how the model would write it still counts when the text is the same)
        return [(float(s[0]), t.strip().startswith(str(r.continuations[0]).strip()))
                for s, t, r in zip(scores, texts, scoring)]

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("the vlm lmms-eval adapter answers single-turn tasks (generate_until, loglikelihood); "
                                  "multi-round tasks are not supported")
