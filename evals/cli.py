"""`vlm eval ...`: mcq, openqa, retrieval, classify, report (registered through the `vlm.commands` entry point).

    vlm eval mcq --model runs/quickstart --bench data/synth/mvbench --profile mvbench --out runs/eval/mcq
    vlm eval openqa --model DIR --data msrvtt_qa/test_qa.json --videos msrvtt/videos --judge minilm --out OUT
    vlm eval openqa --predictions preds.json --judge openai --judge-base-url http://127.0.0.1:8000/v1 \\
        --judge-model gpt-3.5-turbo-0125 --out OUT
    vlm eval retrieval --tower '{"name": "efficientnet_lite0"}' --train data/synth/retrieval_train.json \\
        --test data/synth/retrieval_test.json --objective siglip --out OUT
    vlm eval classify --tower '{"name": "efficientnet_lite0"}' --train data/synth/classification_train.jsonl \\
        --test data/synth/classification_test.jsonl --clips 2 --crops 3 --out OUT
    vlm eval reliance --model runs/quickstart/final --data data/synth/instruct_test.json --out OUT
    vlm eval probe --data data/synth --source raw:16 --source '{"name": "efficientnet_lite0", "image_size": 128}' \
        --source runs/quickstart/final --out OUT
    vlm eval report OUT1/results.json OUT2/results.json --out report/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _print_result(result: Any, out: str) -> None:
    print(json.dumps({"metrics": result.metrics, "counts": result.counts}, indent=2, default=str))
    print(f"results: {Path(out) / 'results.json'}  report: {Path(out) / 'report.md'}")


def _load_model(path: str, args: argparse.Namespace) -> Any:
    from vlm.model import VideoLLM

    model = VideoLLM.from_pretrained(path, device=args.device, dtype=args.dtype, device_map=args.device_map,
                                     merge_lora=True)
    return with_settings(model, getattr(args, "set", None) or [])


def with_settings(model: Any, assignments: list[str]) -> Any:
    """`--set key.sub=value` (value read as YAML, as `vlm train --set` reads it) on a loaded model: only settings that
    change no weights (`vlm.model.SETTINGS`: the connector's settings, the system prompt, ...), e.g. a sentence the
    connector writes, scored without retraining: --set 'connector.counts.colour changes={color: [red, blue],
    changes: true, says: "the {name} changes color {times}"}'. A mapping is changed key by key."""
    if not assignments:
        return model
    import copy

    from vlm.model import SETTINGS
    from vlm.train.engine import changed_settings
    from vlm.train.recipe import RecipeError, apply_override

    raw = {key: copy.deepcopy(getattr(model.config, key)) for key in SETTINGS}
    for assignment in assignments:
        if assignment.partition("=")[0].strip().split(".")[0] not in SETTINGS:
            raise RecipeError(f"--set {assignment}: only {', '.join(SETTINGS)} (and their keys) change no weights")
        apply_override(raw, assignment)
    try:
        model.apply_settings(changed_settings(model, raw))
    except ValueError as e:
        raise RecipeError(f"--set {' '.join(assignments)}: {e}") from None
    return model


def _model_name(args: argparse.Namespace) -> str:
    """The name results record: --model-name, or the model folder with its --set settings."""
    return getattr(args, "model_name", None) or " ".join([args.model, *args.set])


def _settings_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a setting of the loaded model that changes no weights, e.g. "
                        "connector.switch_cost=4 or system_prompt='Answer briefly.' (repeatable; see docs/EVALUATION.md)")


def _placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available, else CPU)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bfloat16 on CUDA, else float32)")
    p.add_argument("--device-map", default=None, choices=["auto", "balanced", "sequential"],
                   help="spread a model too big for one GPU over the GPUs and the CPU (accelerate; replaces --device)")


def _memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", type=int, default=None, metavar="GROUPS",
                   help="long videos: read every frame at --memory-fps, chunk by chunk, into a memory of GROUPS token "
                        "groups, or a tracks-layout word-slot model's detections (docs/LONG_VIDEO.md), instead of "
                        "--frames sampled frames")
    p.add_argument("--memory-fps", type=float, default=1.0)
    p.add_argument("--chunk-frames", type=int, default=8, help="frames encoded at a time with --memory")


def _workers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=2,
                   help="processes that decode clips ahead of the model (0: decode in this process when needed)")


def _tower(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(tower, spec, model) from --tower JSON or --model DIR."""
    if args.tower:
        from vlm.towers import build_tower

        spec = json.loads(args.tower)
        kwargs = dict(spec)
        return build_tower(kwargs.pop("name"), **kwargs), spec, None
    if args.model:
        model = _load_model(args.model, args)
        return model.tower, {"model": args.model, "tower": model.config.tower}, model
    raise SystemExit("give --tower JSON (a registered tower spec) or --model DIR (a saved VideoLLM)")


def _mcq(args: argparse.Namespace) -> int:
    from evals.mcq import evaluate_mcq

    model = _load_model(args.model, args)
    result = evaluate_mcq(model, args.bench, args.out, profile=args.profile, tasks=args.tasks, num_frames=args.frames,
                          sampling=args.sampling, limit=args.limit, batch_size=args.batch_size,
                          model_name=_model_name(args), descriptions=args.descriptions,
                          workers=args.workers, memory=_memory(args))
    _print_result(result, args.out)
    return 0


def _memory(args: argparse.Namespace) -> dict[str, Any] | None:
    return None if args.memory is None else {"max_groups": args.memory, "fps": args.memory_fps,
                                             "chunk_frames": args.chunk_frames}


def _reliance(args: argparse.Namespace) -> int:
    from evals.reliance import visual_reliance
    from evals.report import write_report

    model = _load_model(args.model, args).eval()
    result = visual_reliance(model, args.data, args.out, media_root=args.media_root, limit=args.limit,
                             num_frames=args.frames, seed=args.seed, model_name=_model_name(args), workers=args.workers,
                             partners=args.partners)
    write_report([result], args.out)
    _print_result(result, args.out)
    return 0


def _slots(args: argparse.Namespace) -> int:
    from evals.report import write_report
    from evals.slots import evaluate_slots

    model = _load_model(args.model, args).eval()
    result = evaluate_slots(model, args.data, args.out, media_root=args.media_root, limit=args.limit,
                            model_name=_model_name(args), workers=args.workers)
    write_report([result], args.out)
    _print_result(result, args.out)
    return 0


def _probe(args: argparse.Namespace) -> int:
    from evals.probe import probe_table, run_probe

    results = run_probe(args.source, args.data, args.out, num_frames=args.frames, pool=args.pool, labels=args.labels)
    print(probe_table(results))
    print(f"results: {Path(args.out) / 'probe.json'}")
    return 0


def _openqa(args: argparse.Namespace) -> int:
    from evals.judges import build_judge
    from evals.openqa import evaluate_openqa, load_openqa, load_predictions

    if args.judge == "openai":
        if not (args.judge_base_url and args.judge_model):
            raise SystemExit("--judge openai needs --judge-base-url and --judge-model (pinned model id)")
        judge = build_judge("openai", base_url=args.judge_base_url, model=args.judge_model,
                            api_key_env=args.judge_api_key_env, cache_dir=args.judge_cache or str(Path(args.out) / "judge_cache"))
    else:
        judge = build_judge(args.judge, threshold=args.threshold)
    if args.predictions:
        items, preds = load_predictions(args.predictions)
        result = evaluate_openqa(None, items, judge, args.out, predictions=preds, dataset=Path(args.predictions).stem,
                                 limit=args.limit, model_name=args.model_name or Path(args.predictions).stem)
    else:
        if not (args.model and args.data):
            raise SystemExit("give --model DIR and --data FILE, or --predictions FILE")
        items = load_openqa(args.data, args.videos, answers=args.answers, video_template=args.video_template)
        result = evaluate_openqa(_load_model(args.model, args), items, judge, args.out, dataset=Path(args.data).stem,
                                 num_frames=args.frames, sampling=args.sampling, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens, limit=args.limit,
                                 model_name=_model_name(args), workers=args.workers, memory=_memory(args))
    _print_result(result, args.out)
    return 0


def _retrieval(args: argparse.Namespace) -> int:
    from evals.retrieval import LLMTextEncoder, evaluate_retrieval, load_retrieval

    tower, spec, model = _tower(args)
    encoder = None
    if args.text_encoder == "llm":
        if model is None:
            raise SystemExit("--text-encoder llm needs --model DIR")
        encoder = LLMTextEncoder(model.llm, model.processor.tokenizer)
    result = evaluate_retrieval(tower, load_retrieval(args.train, args.root), load_retrieval(args.test, args.root),
                                args.out, text_encoder=encoder, objective=args.objective, num_frames=args.frames,
                                steps=args.steps, batch_size=args.batch_size, embed_dim=args.embed_dim, lr=args.lr,
                                seed=args.seed, tower_spec=spec, dataset=Path(args.test).stem, workers=args.workers)
    _print_result(result, args.out)
    return 0


def _classify(args: argparse.Namespace) -> int:
    from evals.classify import evaluate_classification, train_probe
    from vlm.data.classification import load_classification

    tower, spec, _ = _tower(args)
    train, classes = load_classification(args.train, args.root, args.classes)
    test, _ = load_classification(args.test, args.root, args.classes or classes)
    clf = train_probe(tower, train, len(classes), num_frames=args.frames, tower_spec=spec, steps=args.steps,
                      cache=Path(args.out) / "features_train.safetensors", workers=args.workers)
    result = evaluate_classification(clf, test, classes, args.out, num_frames=args.frames, num_clips=args.clips,
                                     num_crops=args.crops, model_name=f"linear-probe:{json.dumps(spec, sort_keys=True)}",
                                     dataset=Path(args.test).stem, workers=args.workers)
    _print_result(result, args.out)
    return 0


def _report(args: argparse.Namespace) -> int:
    from evals.report import write_report
    from evals.results import EvalResult, read_records

    results = [EvalResult.load(p) for p in args.results]
    if args.names:
        if len(args.names) != len(results):
            raise SystemExit(f"--names: {len(args.names)} names for {len(results)} results files")
        for result, name in zip(results, args.names):
            result.model = name
    logs = [Path(p).with_name("predictions.jsonl") for p in args.results]  # multiple choice: compared question by question
    answers = [read_records(f) if r.task_type == "mcq" and f.is_file() else None for r, f in zip(results, logs)]
    path = write_report(results, args.out, answers=answers)
    print(f"report: {path}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register the `eval` command group on the `vlm` command line."""
    ev = subparsers.add_parser("eval", help="evaluate models: multiple choice, open-ended QA, retrieval, classification")
    sub = ev.add_subparsers(dest="eval_command", required=True)

    p = sub.add_parser("mcq", help="multiple-choice QA over an MVBench-layout benchmark")
    p.add_argument("--model", required=True, help="a saved VideoLLM folder")
    p.add_argument("--bench", required=True, help="benchmark root (json/<task>.json, video/, optional tasks.json)")
    p.add_argument("--out", required=True, help="output folder (predictions.jsonl, results.json, report)")
    p.add_argument("--profile", default="mvbench", choices=["mvbench", "lmms_eval", "loglik", "cloze"])
    p.add_argument("--tasks", nargs="*", default=None, help="task names or keys (default: all)")
    p.add_argument("--frames", type=int, default=None, help="frames sampled per clip (default: the count the model "
                   "was trained with, `num_frames` in its config.json; 16 for a model without one)")
    p.add_argument("--sampling", default=None, help="frame sampling policy (default: the one the model was trained "
                   "with, `sampling` in its config.json; segment_middle: MVBench's own rule)")
    p.add_argument("--limit", type=int, default=None, help="first N questions per task")
    p.add_argument("--batch-size", type=int, default=8, help="questions per model call (a clip's questions go together)")
    p.add_argument("--model-name", default=None, help="name recorded in results (default: the model folder)")
    p.add_argument("--descriptions", default=None,
                   help="text oracle: JSON {video name or stem: description} used in place of each clip")
    _memory_args(p)
    _workers_arg(p)
    _placement_args(p)
    _settings_arg(p)
    p.set_defaults(func=_mcq)

    p = sub.add_parser("openqa", help="open-ended video QA scored by a judge")
    p.add_argument("--model", default=None, help="a saved VideoLLM folder")
    p.add_argument("--data", default=None, help="QA file (MSVD-QA / MSRVTT-QA / ActivityNet-QA questions / JSONL)")
    p.add_argument("--answers", default=None, help="ActivityNet-QA answers file, joined on question_id")
    p.add_argument("--videos", default=None, help="video folder (default: the data file's folder)")
    p.add_argument("--video-template", default=None, help='file name pattern, e.g. "video{video}.mp4"')
    p.add_argument("--predictions", default=None, help="judge a file of {id, question, answer, pred} instead")
    p.add_argument("--judge", default="contains", choices=["exact", "contains", "minilm", "iou", "openai"])
    p.add_argument("--threshold", type=float, default=None, help="minilm: cosine threshold (default 0.85); iou: IoU threshold (default 0.5)")
    p.add_argument("--judge-base-url", default=None, help="openai: e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-model", default=None, help="openai: the pinned judge model id")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="openai: env var holding the API key")
    p.add_argument("--judge-cache", default=None, help="openai: verdict cache folder (default OUT/judge_cache)")
    p.add_argument("--out", required=True)
    p.add_argument("--frames", type=int, default=None, help="frames sampled per clip (default: the model's own)")
    p.add_argument("--sampling", default=None, help="frame sampling policy (default: the model's own)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--model-name", default=None)
    _memory_args(p)
    _workers_arg(p)
    _placement_args(p)
    _settings_arg(p)
    p.set_defaults(func=_openqa)

    for name, helptext in (("retrieval", "text-video retrieval with a dual encoder trained on frozen tower features"),
                           ("classify", "action classification: linear probe on a frozen tower, multi-view testing")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--tower", default=None, help='tower spec JSON, e.g. \'{"name": "efficientnet_lite0"}\'')
        p.add_argument("--model", default=None, help="a saved VideoLLM folder (its tower is used)")
        p.add_argument("--train", required=True)
        p.add_argument("--test", required=True)
        p.add_argument("--root", default=None, help="folder video paths are relative to (default: each file's)")
        p.add_argument("--out", required=True)
        p.add_argument("--frames", type=int, default=8)
        p.add_argument("--steps", type=int, default=300)
        _workers_arg(p)
        _placement_args(p)  # where --model's tower runs
        if name == "retrieval":
            p.add_argument("--objective", default="infonce", choices=["infonce", "siglip"])
            p.add_argument("--text-encoder", default="minilm", choices=["minilm", "llm"])
            p.add_argument("--batch-size", type=int, default=64)
            p.add_argument("--embed-dim", type=int, default=256)
            p.add_argument("--lr", type=float, default=1e-3)
            p.add_argument("--seed", type=int, default=0)
            p.set_defaults(func=_retrieval)
        else:
            p.add_argument("--classes", default=None, help="classes.json (default: next to --train)")
            p.add_argument("--clips", type=int, default=1, help="temporal clips per video")
            p.add_argument("--crops", type=int, default=1, choices=[1, 3], help="spatial crops per clip")
            p.set_defaults(func=_classify)

    p = sub.add_parser("reliance", help="does the model look? answer loss with each sample's own video vs another's")
    p.add_argument("--model", required=True, help="a saved VideoLLM folder")
    p.add_argument("--data", required=True, help="held-out conversations (LLaVA JSON/JSONL)")
    p.add_argument("--media-root", default=None, help="folder video paths are relative to (default: the file's)")
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=64, help="samples (a seeded shuffle)")
    p.add_argument("--partners", type=int, default=1,
                   help="other samples' clips each sample is scored with (more: a less noisy own-preferred rate)")
    p.add_argument("--frames", type=int, default=None, help="default: the model's num_frames")
    p.add_argument("--seed", type=int, default=0)
    _workers_arg(p)
    _placement_args(p)
    _settings_arg(p)
    p.set_defaults(func=_reliance)

    p = sub.add_parser("slots", help="word-slot heads vs held-out per-frame annotations: are the words the LLM reads right?")
    p.add_argument("--model", required=True, help="a saved VideoLLM folder with a word_slots connector")
    p.add_argument("--data", required=True, help="records with 'regions' (e.g. DIR/regions_test.json of `vlm data synth`)")
    p.add_argument("--media-root", default=None, help="folder video paths are relative to (default: the file's)")
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=None, help="at most this many clips")
    _workers_arg(p)
    _placement_args(p)
    _settings_arg(p)
    p.set_defaults(func=_slots)

    p = sub.add_parser("probe", help="linear + MLP probes: is what the questions need in a tower's or connector's output?")
    p.add_argument("--data", required=True, help="a synthetic-world folder (meta.jsonl + videos) from `vlm data synth`")
    p.add_argument("--source", action="append", required=True,
                   help="raw:S (frames at S x S), a tower JSON spec, or a saved VideoLLM folder (its connector "
                        "output); repeat to compare")
    p.add_argument("--out", required=True)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--pool", type=int, default=2, help="tower tokens: average-pooled to pool x pool per frame")
    p.add_argument("--labels", nargs="*", default=None, help="default: all (class background color shape cell "
                                                              "direction moving_count)")
    p.set_defaults(func=_probe)

    p = sub.add_parser("report", help="markdown + PNG report from results.json files (several multiple-choice runs "
                                      "are also drawn side by side per task and, from the predictions.jsonl beside "
                                      "each, compared with the first question by question)")
    p.add_argument("results", nargs="+")
    p.add_argument("--names", nargs="+", default=None, help="a name per results file, for the report and its charts")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_report)
