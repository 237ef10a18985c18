"""What a step of a "slots" stage (the word heads trained on per-frame annotations, no LLM) costs, and what reading
its samples without their text and writing its targets at once save.

    python scripts/bench_slots_stage.py [--recipe recipes/quickstart.yaml] [--stage 1] [--set KEY=VALUE ...] \
        [--steps 30] [--no-docs]

The stage is built as `vlm train` builds it (`setup_stage`: the mixture, the feature cache filled). Three ways to
run the same batches, interleaved batch by batch so that each sees the machine in the same state:

- before: each sample encoded with its conversation (the chat template, the clip's visual slot, padding to the
  longest), as any stage that reads text encodes it, and the targets written into their tensors one element at a
  time (`elementwise_targets` below: how `slot_targets` wrote them before);
- text left out: the samples as the stage reads them now (`reads_text` is False for "slots"), the old targets;
- shipped: both.

Each step is timed in two parts: loading (the dataset's samples and the collated batch, from the feature cache)
and the step (forward and backward; no optimizer update, so every way sees the same weights). The three give the
same loss on every batch (checked). The ratio is a step's time each way over the shipped one; the stage's time is
predicted from the recipe's steps (the optimizer's update, the same each way, left out).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_docs import update_section  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vlm.connectors.words as words  # noqa: E402
from vlm.connectors.slot_heads import centre_targets, slot_targets  # noqa: E402
from vlm.data.dataset import ConversationDataset  # noqa: E402
from vlm.data.regions import cell_of, nearest_frames  # noqa: E402
from vlm.train.engine import setup_stage  # noqa: E402
from vlm.train.recipe import load_recipe  # noqa: E402


def elementwise_targets(regions: Sequence[Sequence[dict[str, Any]]], timestamps: Sequence[Sequence[float]],
                        grid: tuple[int, int, int], scene_vocab: Mapping[str, Sequence[str]],
                        attributes: Mapping[str, Sequence[str]], offsets: bool = False) -> dict[str, torch.Tensor]:
    """`slot_targets` as it was: each word written into its tensor on its own (the peer)."""
    b, t, h, w = len(regions), len(timestamps[0]), grid[1], grid[2]
    found = torch.zeros(b, t, h * w)
    objects = torch.full((len(attributes), b, t, h * w), -100, dtype=torch.long)
    scene = torch.zeros(len(scene_vocab), b, t, dtype=torch.long)
    offset, near = torch.zeros(b, t, h * w, 2), torch.zeros(b, t, h * w, dtype=torch.bool)
    for i, clip in enumerate(regions):
        for j, frame in enumerate(nearest_frames(clip, timestamps[i])):
            if offsets:
                for c, d in centre_targets([o["center"] for o in frame.get("objects", [])], h, w).items():
                    offset[i, j, c], near[i, j, c] = torch.tensor(d), True
            for a, (attr, vocab) in enumerate(scene_vocab.items()):
                scene[a, i, j] = vocab.index(frame["scene"][attr])
            for obj in frame.get("objects", []):
                c = cell_of(obj["center"], h, w)
                found[i, j, c] = 1
                for a, (attr, vocab) in enumerate(attributes.items()):
                    objects[a, i, j, c] = vocab.index(obj[attr])
    return {"found": found, "objects": objects, "scene": scene} | ({"offset": offset, "near": near} if offsets else {})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="recipes/quickstart.yaml")
    p.add_argument("--stage", type=int, default=1, help="1-based; a stage with objective 'slots'")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=30, help="batches timed (after one warm-up)")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    recipe = load_recipe(args.recipe, args.set)
    index = args.stage - 1
    stage = recipe.stages[index]
    if stage.objective != "slots":
        raise SystemExit(f"stage {args.stage} of {args.recipe} has objective {stage.objective!r}, not 'slots'")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run, data = setup_stage(recipe, index, None, Path(tmp), resume=False)
        setup_s = time.perf_counter() - t0
        model = run.accelerator.unwrap_model(run.model)
        with_text = ConversationDataset(data.items, data.visual, model.processor.encode_sample,
                                        data.dataset.visual_tokens)
        ways = {"before: text encoded, targets one by one": (with_text, elementwise_targets),
                "text left out, targets one by one": (data.dataset, elementwise_targets),
                "shipped: text left out, targets at once": (data.dataset, slot_targets)}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
        batches = [b for e in range(args.steps + 1) for b in run.plan.epoch(e)][: args.steps + 1]
        model.train()
        for k, indices in enumerate(batches):
            losses = []
            for name, (dataset, targets) in ways.items():
                words.slot_targets = targets
                t0 = time.perf_counter()
                batch, _ = run.collate([dataset[i] for i in indices])
                t1 = time.perf_counter()
                loss = model(batch.to(run.accelerator.device), objective="slots").loss
                run.accelerator.backward(loss)
                run.optimizer.zero_grad(set_to_none=True)  # no update: every way sees the same weights
                t2 = time.perf_counter()
                losses.append(float(loss.detach()))
                if k:
                    times[name].append((t1 - t0, t2 - t1))
            if len(set(losses)) != 1:
                raise SystemExit(f"batch {k}: the ways disagree on the loss: {losses}")
        words.slot_targets = slot_targets
    clips = len(data.items)
    shipped = statistics.mean(sum(t) for t in times[list(ways)[-1]])
    lines = [f"`python scripts/bench_slots_stage.py --recipe {args.recipe} --stage {args.stage}"
             + "".join(f" --set {s}" for s in args.set) + f" --steps {args.steps}`", "",
             f"{clips} clips of {stage.data.frames} frames, batches of {stage.batch_size}, {run.total_steps} steps in "
             f"the recipe; {args.steps} batches timed after one warm-up, the same loss each way on every batch; "
             f"forward and backward (no optimizer step); setup (feature cache) {setup_s:.0f} s; "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads.",
             "", "| way | loading, s per step | step, s per step | total | the recipe's steps | vs shipped |",
             "|---|---|---|---|---|---|"]
    for name, ts in times.items():
        load, step = statistics.mean(t[0] for t in ts), statistics.mean(t[1] for t in ts)
        lines.append(f"| {name} | {load:.3f} | {step:.3f} | {load + step:.3f} | "
                     f"{(load + step) * run.total_steps / 60:.1f} min | {(load + step) / shipped:.2f}x |")
    body = "\n".join(lines)
    print(body)
    if not args.no_docs:
        update_section(f"bench-slots-stage-{Path(args.recipe).stem}", "## A slots stage's step: text left out, "
                       f"targets written at once (bench_slots_stage, {Path(args.recipe).name})", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
