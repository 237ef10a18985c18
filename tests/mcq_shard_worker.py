"""Run under torchrun by tests/test_eval_shard.py: `evaluate_mcq` with a scripted model whose answer depends on
the clip's pixels; with a third argument N, rank 1 dies (os._exit) when asked for the (N+1)-th time."""

from __future__ import annotations

import os
import sys

from evals.mcq import evaluate_mcq
from tests.eval_helpers import ScriptedModel


def pixel_scores(request) -> list[float]:
    """A score per option from the clip's mean colour: a different video gives different answers."""
    mean = request.clip.frames.reshape(-1, 3).mean(0)
    return [float((mean[k % 3] * (k + 1)) % 7) + 0.01 * k for k in range(len(request.continuations))]


class DyingModel(ScriptedModel):
    def __init__(self, die_after: int | None):
        super().__init__(scores=pixel_scores)
        self.die_after = die_after

    def score_options(self, requests):
        if self.die_after is not None and os.environ.get("RANK") == "1" and self.calls >= self.die_after:
            os._exit(3)
        return super().score_options(requests)


if __name__ == "__main__":
    out, bench = sys.argv[1], sys.argv[2]
    die_after = int(sys.argv[3]) if len(sys.argv) > 3 else None
    evaluate_mcq(DyingModel(die_after), bench, out, profile="loglik", batch_size=1, progress=False, workers=1)
