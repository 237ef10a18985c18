"""`vlm data ...`: synthesize, validate."""

from __future__ import annotations

import argparse
import json


def _synth(args: argparse.Namespace) -> int:
    if args.long:
        if args.extra_questions:
            raise SystemExit("vlm data synth: --extra-questions asks the short world's tasks, not --long's")
        from data_tools.synth.long_world import generate_long

        durations = tuple(float(d) for d in args.durations.split(","))
        print(json.dumps(generate_long(args.out, args.num, args.seed, durations=durations, fps=args.fps or 1.0,
                                       size=args.size, train=args.train), indent=2))
        return 0
    from data_tools.synth import generate

    extra = {}
    for item in args.extra_questions or []:
        key, _, n = item.partition("=")
        if not n.isdigit():
            raise SystemExit(f"--extra-questions takes TASK=N (e.g. action_window=2), got {item!r}")
        extra[key] = int(n)
    try:
        summary = generate(args.out, args.num, args.seed, frames=args.frames, size=args.size, fps=args.fps or 8.0,
                           eval_fraction=args.eval_fraction, workers=args.workers, data_format=args.format,
                           extra_questions=extra)
    except ValueError as e:  # a setting out of range (a clip that fails raises RuntimeError naming it)
        raise SystemExit(f"vlm data synth: {e}") from None
    if args.oracle:
        from data_tools.synth.oracle import write_oracle

        summary["oracle"] = write_oracle(args.out, args.oracle)
    print(json.dumps(summary, indent=2))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from data_tools.validate import validate_file

    any_bad = False
    for path in args.files:
        report = validate_file(path, args.media_root, decode=not args.no_decode)
        for problem in report.problems:
            print(problem)
        print(report.summary())
        any_bad |= not report.ok
    return 1 if any_bad else 0


def _convert(args: argparse.Namespace) -> int:
    from data_tools.convert import mvbench_to_llava, videoqa_to_llava

    if args.source == "mvbench":
        n = mvbench_to_llava(args.input, args.out, args.tasks)
    else:
        n = videoqa_to_llava(args.input, args.out, args.video_template)
    print(f"wrote {n} samples to {args.out}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register the `data` command group on the `vlm` command line."""
    data = subparsers.add_parser("data", help="synthesize and validate datasets")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("synth", help="generate the synthetic temporal-video world (videos + all data files)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=int, default=200, help="number of clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--fps", type=float, default=None, help="frame rate (default 8; 1 with --long)")
    p.add_argument("--eval-fraction", type=float, default=0.2, help="share of clips held out for the benchmark")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--format", choices=["json", "hf"], default="json",
                   help="hf: also write the training and QA files as Hugging Face saved datasets (<name>.hf/ beside "
                        "each <name>.json; a recipe's mixture reads either)")
    p.add_argument("--extra-questions", nargs="+", metavar="TASK=N",
                   help="ask each training clip up to N more questions of a task (its key, e.g. action_window), each "
                        "with another answer, in qa_train.json only; the benchmark is unchanged")
    p.add_argument("--long", action="store_true",
                   help="the long-video world instead: minutes of a still scene with a few needle events, and its "
                        "MVBench-layout benchmark (needle object and time, event count, order, last event)")
    p.add_argument("--durations", default="30,60,120,300,600", help="with --long: clip lengths in seconds, cycled")
    p.add_argument("--train", type=int, default=0, help="with --long: this many more clips for training (videos/ and "
                   "qa_train.json, cloze form); --num clips make the benchmark")
    p.add_argument("--oracle", nargs="?", const="events", choices=["events", "frames"],
                   help="also write the text oracle: each clip's ground truth described in text, in place of the video, in "
                        "every training file, and descriptions.json for `vlm eval mcq --descriptions`; events (the "
                        "default): OUT/oracle/, what happens and when; frames: OUT/oracle_frames/, the objects seen in "
                        "each of 8 sampled frames")
    p.set_defaults(func=_synth)

    p = sub.add_parser("validate", help="report every bad sample of LLaVA-style JSON/JSONL files")
    p.add_argument("files", nargs="+")
    p.add_argument("--media-root", default=None, help="folder media paths are relative to (default: the file's)")
    p.add_argument("--no-decode", action="store_true", help="only check that media files exist")
    p.set_defaults(func=_validate)

    p = sub.add_parser("convert", help="convert MVBench-layout or VideoQA JSON into LLaVA-format training data")
    p.add_argument("source", choices=["mvbench", "videoqa"])
    p.add_argument("input", help="MVBench root folder, or a VideoQA JSON file")
    p.add_argument("--out", required=True, help="LLaVA-format JSON to write")
    p.add_argument("--tasks", nargs="*", default=None, help="mvbench: task names or keys (default: all)")
    p.add_argument("--video-template", default="{video}.mp4", help="videoqa: video id -> path under the media root")
    p.set_defaults(func=_convert)
