"""Can a word-slot connector follow a covered object through a shuffle? Perfect detections against its heads.

    python scripts/shuffle_tracking.py --recipe recipes/synth_long.yaml --data demo_data/synth_long --frames 8 16
    python scripts/shuffle_tracking.py --model runs/synth_long/1-slots/final --data demo_data/synth_long --frames 8 16

For every shuffle clip of DATA (a ball covered by one of four identical boxes that then swap places in pairs,
`vlm data synth`), the detections of each sampled frame are linked into tracks as the story layout links them
(`vlm.connectors.tracks.link`). The ball's cover is the box track within one cell of the ball's last detection, in
that frame or the next (the nearest; ties: fewer rows and columns apart); the answer the tracks give is that box's
place among the boxes of the last frame, left to right. The script reports how often that is the clip's true end
position, for the annotations' detections (`vlm.connectors.truth`, what perfect heads would name: `--recipe`, no
training needed) or the heads' (`--model`), at each frame count, each with the connector's one-name-per-object
rule on and off (`merge_duplicates`: a detection within one cell of one with the same words is dropped), and how
many boxes are named in the frames where all four rest. With `--covered under`, it also writes each clip's story
with the connector's `covered` events (the story layout follows a hidden object) and counts the clips whose last
sentence names the right box (" At the end, the blue ball is under the second red box from the left."): what stage 2
would read. `--set link_motion=1` links every track (the script's own and the connector's) with that motion cost.
With `--swaps`, it counts the clips where the connector's swap count (`counts` rule `{swaps: true}`,
`vlm.connectors.tracks.swap_counts`) is the true number of swaps, those where every swap's places are told in order
(`swap_events`, what the story's `swaps` sentences say), and the split's other clips where it says a swap happened
(none did). The numbers are in docs/GROUNDING.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlm.connectors.story import ORDINALS  # noqa: E402
from vlm.connectors.tracks import Detection, Track, link, linking, merge_duplicates, swap_counts, swap_events  # noqa: E402
from vlm.connectors.truth import true_detected  # noqa: E402
from vlm.data.regions import nearest_frames  # noqa: E402
from vlm.model import VideoLLM  # noqa: E402
from vlm.towers.base import VisualFeatures  # noqa: E402
from vlm.train.recipe import load_recipe  # noqa: E402
from vlm.video import read_clip  # noqa: E402


def cover(tracks: list[Track], ball: Detection, frame: int) -> Track | None:
    """The box track within one cell of the ball's last detection (at `frame`), in that frame or the next."""
    near = []
    for i, tr in enumerate(tracks):
        for k in (frame, frame + 1):
            if k in tr.frames:
                c = tr.detections[tr.frames.index(k)].cell
                dy, dx = abs(c[0] - ball.cell[0]), abs(c[1] - ball.cell[1])
                near.append((max(dy, dx), dy + dx, i))
    close = sorted(n for n in near if n[0] <= 1)
    return tracks[close[0][2]] if close else None


def end_position(frames: list[list[Detection]], box: str, merge: bool) -> int | None:
    """The place, left to right among the boxes of the last frame, of the ball's cover (None: not followed)."""
    boxes = [[d for d in f if d.identity[-1] == box] for f in frames]
    balls = [(k, d) for k, f in enumerate(frames) for d in f if d.identity[-1] != box]
    if not balls:
        return None
    tracks = link([merge_duplicates(f) if merge else f for f in boxes])
    found = cover(tracks, balls[-1][1], balls[-1][0])
    last = sorted((tr for tr in tracks if tr.frames[-1] == len(frames) - 1), key=lambda tr: tr.detections[-1].cell[1])
    return next((i + 1 for i, tr in enumerate(last) if tr is found), None)


def told_position(story: str, preposition: str) -> int | None:
    """The place the story's last sentence gives the hidden object, 1 = first from the left (None: not told)."""
    said = re.search(rf"At the end, the .+? is {re.escape(preposition)} the (\w+) .+? from the left\.", story)
    return ORDINALS.index(said[1]) + 1 if said and said[1] in ORDINALS else None


def draw(clip, frames: list[list[Detection]], grid: tuple[int, int, int], truth: int, answer: int | None,
         title: str, out: Path) -> None:
    """The clip's frames with each named object's cell outlined (boxes red, the ball blue), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = grid[1], grid[2]
    rows = (len(frames) + 7) // 8
    fig, axes = plt.subplots(rows, 8, figsize=(14.4, 2.1 * rows + 0.3), squeeze=False)
    for ax in axes.flat[len(frames):]:
        ax.axis("off")
    for ax, image, t, dets in zip(axes.flat, clip.frames, clip.timestamps, frames):
        ax.imshow(image)
        ch, cw = image.shape[0] / h, image.shape[1] / w
        for d in dets:
            box = d.identity[-1] == "box"
            ax.add_patch(plt.Rectangle((d.cell[1] * cw, d.cell[0] * ch), cw, ch, fill=False, lw=1.5,
                                       color="red" if box else "deepskyblue"))
        ax.set_title(f"t={float(t):.2f}s: {sum(d.identity[-1] == 'box' for d in dets)} boxes", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}: the ball ends under box {answer or '?'} from the left (truth: {truth})", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--recipe", help="a recipe with a word_slots connector: the annotations' detections")
    which.add_argument("--model", help="a saved VideoLLM with a word_slots connector: its heads' detections")
    p.add_argument("--data", required=True, help="a `vlm data synth` folder")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--frames", type=int, nargs="+", default=[8])
    p.add_argument("--slots", type=int, default=5, help="objects named per frame (the four boxes and the ball: 5)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a connector setting for the heads, e.g. peaks=false")
    p.add_argument("--covered", metavar="PREPOSITION", help="also score the story's end sentence, e.g. under")
    p.add_argument("--swaps", action="store_true", help="also score the swap count, and read the split's other clips "
                   "for swaps said where none happened")
    p.add_argument("--strip", type=Path, help="a PNG of the first clip at the first frame count, what is named where")
    args = p.parse_args(argv)
    data = Path(args.data)
    model = VideoLLM.from_pretrained(args.model, device="cpu") if args.model else \
        VideoLLM.from_config(load_recipe(args.recipe, [], check_files=False).model_config())
    settings = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    if args.covered:
        events = {**(model.config.connector.get("events") or {}), "covered": args.covered}
        settings = {"layout": "story", "events": events, **settings}
    model.apply_settings({"connector": {"slots": args.slots, **settings}})
    meta = {m["id"]: m for m in map(json.loads, (data / "meta.jsonl").read_text().splitlines())}
    split = json.loads((data / f"regions_{args.split}.json").read_text())
    records = [r for r in split if "shuffle" in meta.get(Path(r["video"]).stem, {})]
    others = [r for r in split if "shuffle" not in meta.get(Path(r["video"]).stem, {})] if args.swaps else []
    if not records:
        raise SystemExit(f"{data}: no shuffle clips in regions_{args.split}.json")
    def read(r: dict, frames: int):  # the clip, what the heads (or perfect ones) saw, and the features' grid
        clip = read_clip(data / r["video"], frames, "uniform")
        if args.model:
            pixels, stamps = model.processor.preprocess_clip(clip)
            with torch.no_grad():
                feats = model.connector.reduced(model.tower_features(pixels[None], stamps[None]))
            return clip, model.connector.detections(feats)[0], feats.grid
        grid = model.tower.grid_for(frames, *model.tower.preprocessor.hw)
        stamps = torch.tensor(clip.timestamps, dtype=torch.float)[None]
        feats = VisualFeatures(torch.zeros(1, frames, grid[1] * grid[2], 1), grid, timestamps=stamps)
        return clip, model.connector.detections(feats, true_detected(model.connector, [r["regions"]], stamps, grid))[0], grid

    with linking(model.connector.link_motion):  # its own links cost as the connector's (`--set link_motion=1`)
        for frames in args.frames:
            right, told, swaps = {True: 0, False: 0}, 0, {"right": 0, "places_right": 0, "said_in_other_clips": 0}
            rest = {"frames": 0, "all_four_named": 0}
            for r in records:
                shuffle = meta[Path(r["video"]).stem]["shuffle"]
                clip, seen, grid = read(r, frames)
                swaps["right"] += sum(swap_counts(seen[1]).values()) == len(shuffle["swaps"])
                swaps["places_right"] += [list(p) for _, _, p in swap_events(seen[1])] == shuffle["swaps"]
                for merge in right:
                    right[merge] += end_position(seen[1], "box", merge) == shuffle["end_position"]
                if args.covered:
                    told += told_position(model.connector.text(seen, grid), args.covered) == shuffle["end_position"]
                if args.strip and r is records[0] and frames == args.frames[0]:
                    draw(clip, seen[1], grid, shuffle["end_position"], end_position(seen[1], "box", False),
                         args.model or f"{args.recipe} (perfect detections)", args.strip)
                for f, a in zip(seen[1], nearest_frames(r["regions"], clip.timestamps)):
                    if all(o["action"] == "still" for o in a["objects"] if o["shape"] == "box") and \
                            sum(o["shape"] == "box" for o in a["objects"]) == 4:
                        rest["frames"] += 1
                        rest["all_four_named"] += sum(d.identity[-1] == "box" for d in f) == 4
            for r in others:
                swaps["said_in_other_clips"] += any(swap_counts(read(r, frames)[1][1]).values())
            swapped = {f"swaps_{k}": v for k, v in swaps.items()} | {"other_clips": len(others)} if args.swaps else {}
            print(json.dumps({"frames": frames, "clips": len(records), "end_right": right[True],
                              "end_right_without_merge": right[False], **({"story_right": told} if args.covered else {}),
                              **{f"rest_{k}": v for k, v in rest.items()}, **swapped}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
