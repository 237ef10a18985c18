"""The words oracle: a word-slot model's own text written from the ground truth, in place of the clips.

    python scripts/words_oracle.py --model runs/synth_long/final --data demo_data/synth_long
    python scripts/words_oracle.py --recipe recipes/synth_long.yaml --data demo_data/synth_long --out demo_data/synth_long/oracle_story
    python scripts/words_oracle.py --heads FOLD0=regions_fold1.json --heads FOLD1=regions_fold0.json \
        --heads FULL=regions_test.json --data demo_data/synth_long --out demo_data/synth_long/heads_out_of_fold
    vlm train recipes/oracle_text.yaml --set vars.data=demo_data/synth_long \\
        --set 'stages.0.data.mixture=[{path: demo_data/synth_long/oracle_words/qa_train.json}]' ...
    vlm eval mcq --model runs/oracle_text/final --bench demo_data/synth_long/mvbench --profile cloze \\
        --descriptions demo_data/synth_long/oracle_words/descriptions.json --out runs/oracle_text/eval_cloze

For every clip of `DIR/regions_{train,test}.json` it writes what the model's `word_slots` connector, in its layout
(frames, tracks or story), would give the LLM if its heads were perfect (for frames: each sampled frame after its
"Time: x.xs" stamp, with the scene's and each object's words, then the count and event sentences), all from the
per-frame annotations the heads are trained on (`vlm.connectors.truth`). `OUT` (default `DIR/oracle_words/`) gets
`descriptions.json` and a text-only twin of the training and benchmark files, as `vlm data synth --oracle` writes
them, so the text oracle's recipe trains on it. Trained at the model's budget, it separates what perception costs
(the heads' model against this) from what the words' format costs (this against the event oracle). Only the
connector's words and settings are read, not its weights, so `--recipe` (with `--set` overrides) serves before any
training: the model is built from the recipe's `model` section. Records whose annotations do not fit the connector's
words, or whose video cannot be read, are skipped, named and counted.

`--heads MODEL=REGIONS` writes instead what trained heads write from the video, for the clips of one regions file
of DATA per model. Heads read their own training clips better than new ones, so an LLM trained on the text of the
clips its heads learned from meets noisier text at test time; heads trained on one half of the training clips
writing the text of the other half (out of fold), and heads trained on all of them writing the test clips', give
it text as noisy in training as in the test (docs/GROUNDING.md row 53). Where the models cover only some clips (the
test clips' regions alone, to score a trained oracle on the heads' text), the twin of a file with other clips is
not written, and the summary says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_tools.synth.oracle import write_described  # noqa: E402
from vlm.connectors.truth import true_text, written_text  # noqa: E402
from vlm.data.conversation import read_records  # noqa: E402
from vlm.model import VideoLLM  # noqa: E402
from vlm.train.recipe import load_recipe  # noqa: E402
from vlm.video import read_clip  # noqa: E402


def load(args: argparse.Namespace, where: str | None = None) -> VideoLLM:
    """The model whose connector writes the text: from --recipe (none trained), --model, or a --heads MODEL."""
    if where is None and args.recipe:
        model = VideoLLM.from_config(load_recipe(args.recipe, args.set, check_files=False).model_config())
    else:
        model = VideoLLM.from_pretrained(where or args.model, device="cpu")
    if not hasattr(model.connector, "slot_targets"):
        raise SystemExit(f"{where or args.model or args.recipe}: its connector ({type(model.connector).__name__}) "
                         "has no word slots")
    return model


def texts_of(model: VideoLLM, batch: list[tuple[dict, Any]], frames: int, heads: bool) -> list[str]:
    """The connector's text of each (record, clip or its frame times) of `batch`: from the heads on the clip's
    frames, or from the record's annotations."""
    grid = model.tower.grid_for(frames, *model.tower.preprocessor.hw)
    if not heads:
        return true_text(model.connector, [r["regions"] for r, _ in batch], torch.stack([s for _, s in batch]), grid)
    pixels, stamps = zip(*(model.processor.preprocess_clip(clip) for _, clip in batch))
    with torch.no_grad():
        feats = model.connector.reduced(model.tower_features(torch.stack(pixels), torch.stack(stamps)))
        return written_text(model.connector, feats)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a saved VideoLLM folder with a word_slots connector")
    which.add_argument("--recipe", help="a training recipe whose model has a word_slots connector (none trained)")
    which.add_argument("--heads", action="append", metavar="MODEL=REGIONS",
                       help="the text of the clips of REGIONS (a regions file of DATA) as MODEL's heads write it from "
                            "the video, not from the annotations; repeat until every clip is covered")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides, as `vlm train`'s")
    p.add_argument("--data", required=True, help="a `vlm data synth` folder (regions_train.json, regions_test.json)")
    p.add_argument("--out", default=None, help="default: DATA/oracle_words")
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default: the model's)")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    data = Path(args.data)
    if args.set and not args.recipe:
        raise SystemExit("--set overrides a --recipe")
    if args.heads:
        jobs = []
        for spec in args.heads:
            where, _, regions = spec.partition("=")
            if not (where and regions and (data / regions).is_file()):
                raise SystemExit(f"--heads {spec}: write MODEL=REGIONS, REGIONS a file of {data}")
            jobs.append((load(args, where), [regions], True))
    else:
        names = [n for n in ("regions_train.json", "regions_test.json") if (data / n).is_file()]
        if not names:
            raise SystemExit(f"{data}: no regions_train.json or regions_test.json (`vlm data synth` writes both)")
        jobs = [(load(args), names, False)]
    by_video, skipped = {}, []
    for model, names, heads in jobs:
        frames = args.frames or model.config.num_frames
        for name in names:
            batch = []
            for location, record in [*read_records(data / name), (None, None)]:
                if record is not None:
                    problems = [] if isinstance(record, Exception) else model.connector.region_problems(record.get("regions"))
                    if isinstance(record, Exception) or problems:
                        skipped.append(f"{location}: {record if isinstance(record, Exception) else problems[0]}")
                        continue
                    try:
                        clip = read_clip(data / record["video"], frames, model.config.sampling if heads else "uniform")
                    except Exception as e:  # noqa: BLE001 - any unreadable video is skipped and named
                        skipped.append(f"{location}: {record['video']}: {e}")
                        continue
                    batch.append((record, clip if heads else torch.tensor(clip.timestamps, dtype=torch.float)))
                if batch and (record is None or len(batch) == args.batch):
                    by_video.update({r["video"]: t for (r, _), t in zip(batch, texts_of(model, batch, frames, heads))})
                    batch = []
    out = Path(args.out) if args.out else data / "oracle_words"
    described = {Path(v).stem: t for v, t in by_video.items()}
    counts = write_described(data, out, described, by_video, partial=bool(args.heads))
    (out / "skipped.txt").write_text("".join(s + "\n" for s in skipped), encoding="utf-8")
    print(json.dumps({"written": counts, "skipped": len(skipped), "out": str(out),
                      "example": next(iter(by_video.values()), "")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
