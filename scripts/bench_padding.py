"""How much of a stage's LLM work is padding, batch order by batch order, and what grouping by length and
padding-free batches save.

    python scripts/bench_padding.py --recipe recipes/synth_long.yaml --stage 2 --init runs/synth_long/1-slots/final \
        [--set KEY=VALUE ...] [--window 50] [--epochs 3] [--time 3] [--no-docs]

The stage is built as `vlm train` builds it (`setup_stage`: the mixture, the feature cache filled, and, for a frozen
connector, the visual tokens it writes for each clip). Each sample's true length is what the LLM reads: its
tokenized conversation plus the visual tokens its clip is given (a word connector tells each clip in as many tokens
as it has to tell). Batches are padded to their longest sample, as `Collate` does, so an order's cost is the sum
over its batches of batch size x longest sample. Four orders of the same epochs, all in this process:

- random: the epoch shuffled (`group_by_length: false`, how the shipped recipes train);
- LLaVA: LLaVA's modality-length grouping (one global batch sorted, `group_window: 1`), by the stage's estimate
  of each length (4 characters a token + the visual budget);
- window: `--window` global batches sorted together (`group_window`), by the same estimate;
- window, written: the same, by the written visual lengths (what `vlm train` uses for a frozen connector);
- random, padding-free: the random batches, their real positions packed into one row (`padding_free: true`).

Reports each order's padding share and LLM tokens per epoch against random order. `--time K` also runs K batches
of the random and the written-window order forward and backward (no optimizer step), one warm-up first, the random
ones padded and padding-free in turn, and reports seconds per step and per thousand LLM tokens, the epoch time each
order's tokens predict, and the padding-free speed-up with the largest difference of the two ways' losses.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_docs import update_section  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.data.dataset import BatchPlan  # noqa: E402
from vlm.llm.template import VISUAL_TOKEN  # noqa: E402
from vlm.objectives import reads_text  # noqa: E402
from vlm.train.engine import setup_stage, written_lengths  # noqa: E402
from vlm.train.recipe import load_recipe  # noqa: E402


def true_lengths(data, written: list[int]) -> list[int]:
    """Each sample's LLM length: its encoded ids, the visual slot replaced by the tokens its clip is given."""
    out = []
    for i in range(len(data.dataset)):
        ids = data.dataset[i]["input_ids"]
        slot = sum(1 for t in ids if t == VISUAL_TOKEN)
        out.append(len(ids) - slot + (written[i] if slot else 0))
    return out


def epoch_cost(plan: BatchPlan, lengths: list[int], epochs: int) -> tuple[int, int]:
    """(real tokens, padded tokens) over `epochs` epochs of `plan`'s batches."""
    real = padded = 0
    for e in range(epochs):
        for b in plan.epoch(e):
            real += sum(lengths[i] for i in b)
            padded += len(b) * max(lengths[i] for i in b)
    return real, padded


def time_batches(run, data, objective: str, batches: list[list[int]], lengths: list[int],
                 padding_free: tuple[bool, ...] = (False,)) -> dict[bool, tuple[float, int, list[float]]]:
    """Per way (padded, padding-free), over `batches` (after one warm-up batch), each batch run each way in turn:
    mean seconds per forward + backward, the LLM tokens read (padded, or the real ones alone) and the losses."""
    model = run.model
    model.train()
    out: dict[bool, tuple[list[float], int, list[float]]] = {pf: ([], 0, []) for pf in padding_free}
    for k, b in enumerate([batches[0]] + batches):
        batch, _ = run.collate([data.dataset[i] for i in b])
        for pf in padding_free:
            t0 = time.perf_counter()
            loss = model(batch.to(run.accelerator.device), objective=objective, padding_free=pf).loss
            run.accelerator.backward(loss)
            run.optimizer.zero_grad(set_to_none=True)
            if k:
                times, tokens, losses = out[pf]
                times.append(time.perf_counter() - t0)
                losses.append(loss.item())
                read = sum(lengths[i] for i in b) if pf else len(b) * max(lengths[i] for i in b)
                out[pf] = (times, tokens + read, losses)
    return {pf: (statistics.mean(times), tokens, losses) for pf, (times, tokens, losses) in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", required=True)
    p.add_argument("--stage", type=int, required=True, help="1-based")
    p.add_argument("--init", default=None, help="the model the stage starts from (the previous stage's final)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--time", type=int, default=0, help="batches to time per order (0: count tokens only)")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    recipe = load_recipe(args.recipe, args.set)
    index = args.stage - 1
    stage = recipe.stages[index]
    if not reads_text(stage.objective):
        raise SystemExit(f"stage {args.stage} (objective {stage.objective!r}) does not run the LLM: no padding to count")
    stage.group_by_length, stage.group_window = True, args.window
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run, data = setup_stage(recipe, index, Path(args.init) if args.init else None, Path(tmp), resume=False)
        setup_s = time.perf_counter() - t0
        model = run.accelerator.unwrap_model(run.model)
        written = data.dataset.visual_tokens
        if isinstance(written, int):  # a connector the stage trains: its lengths now, as a frozen one would write
            written = written_lengths(model, data)
        data.dataset.visual_tokens = model.num_visual_tokens(stage.data.frames)  # the stage's estimate: the budget
        estimate = [data.dataset.length(i) for i in range(len(data.dataset))]
        data.dataset.visual_tokens = written
        by_written = [data.dataset.length(i) for i in range(len(data.dataset))]
        lengths = true_lengths(data, written)
        bs, seed = stage.batch_size, recipe.seed
        plans = {"random": BatchPlan(estimate, bs, seed=seed, group_by_length=False),
                 "LLaVA (window 1)": BatchPlan(estimate, bs, seed=seed),
                 f"window {args.window}, estimated lengths": BatchPlan(estimate, bs, seed=seed, window=args.window),
                 f"window {args.window}, written lengths": BatchPlan(by_written, bs, seed=seed, window=args.window)}
        costs = {name: epoch_cost(plan, lengths, args.epochs) for name, plan in plans.items()}
        costs["random, padding-free"] = (costs["random"][0], costs["random"][0])  # any order: only real tokens
        timed = {}
        if args.time:
            rng = np.random.default_rng(0)
            for name in ("random", f"window {args.window}, written lengths"):
                batches = plans[name].epoch(0)
                pick = [batches[i] for i in sorted(rng.choice(len(batches), min(args.time, len(batches)), replace=False))]
                ways = (False, True) if name == "random" else (False,)
                for pf, result in time_batches(run, data, stage.objective, pick, lengths, ways).items():
                    timed[f"{name}, padding-free" if pf else name] = result
    random_padded = costs["random"][1]
    lines = [f"`python scripts/bench_padding.py --recipe {args.recipe} --stage {args.stage}"
             + (f" --init {args.init}" if args.init else "") + "".join(f" --set {s}" for s in args.set)
             + f" --window {args.window}"
             + (f" --time {args.time}" if args.time else "") + "`",
             "", f"{len(lengths)} samples, batches of {bs}, {args.epochs} epochs; a sample's LLM length: mean "
             f"{statistics.mean(lengths):.0f} tokens (min {min(lengths)}, max {max(lengths)}), of them visual: mean "
             f"{statistics.mean(written):.0f}; setup (feature cache, written lengths) {setup_s:.0f} s; "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}.", "",
             "| batch order | padding share | LLM tokens per epoch | vs random |", "|---|---|---|---|"]
    for name, (real, padded) in costs.items():
        lines.append(f"| {name} | {100 * (1 - real / padded):.1f}% | {padded // args.epochs:,} | "
                     f"{padded / random_padded:.2f}x |")
    if timed:
        lines += ["", "| timed order | batches | s per step | s per 1,000 LLM tokens | epoch predicted |", "|---|---|---|---|---|"]
        for name, (sec, tokens, _) in timed.items():
            per_k = sec * args.time / tokens * 1000
            epoch_min = per_k * costs[name][1] / args.epochs / 1000 / 60
            lines.append(f"| {name} | {args.time} | {sec:.1f} | {per_k:.3f} | {epoch_min:.1f} min |")
        padded, packed = timed["random"], timed["random, padding-free"]
        worst = max(abs(a - b) / abs(a) for a, b in zip(padded[2], packed[2]))
        lines += ["", f"The same random batches, padded and padding-free in turn: {padded[0] / packed[0]:.2f}x "
                  f"faster padding-free; largest relative difference of their losses {worst:.1e}."]
    body = "\n".join(lines)
    print(body)
    if not args.no_docs:
        update_section("bench-padding", "## Padding in a stage's batches: random order vs grouping by length (bench_padding)",
                       body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
