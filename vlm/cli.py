"""The `vlm` command. Command groups of other packages (data, eval) plug in through the `vlm.commands`
entry-point group, so `vlm` itself never imports `data_tools` or `evals`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import entry_points


def _list(args: argparse.Namespace) -> int:
    import vlm.connectors  # noqa: F401  (registers the built-ins)
    import vlm.towers  # noqa: F401
    from vlm.connectors.base import CONNECTORS, REDUCERS
    from vlm.llm.load import LLM_LOADERS
    from vlm.objectives import CONTRASTIVE_OBJECTIVES, STAGE_OBJECTIVES
    from vlm.towers.base import TOWERS
    from vlm.video.backends import BACKENDS
    from vlm.video.sampling import POLICIES

    for title, registry in (("towers", TOWERS), ("connectors", CONNECTORS), ("token reducers", REDUCERS),
                            ("LLM loaders", LLM_LOADERS), ("sampling policies", POLICIES), ("video backends", BACKENDS),
                            ("stage objectives", STAGE_OBJECTIVES), ("contrastive objectives", CONTRASTIVE_OBJECTIVES)):
        print(f"{title}: {', '.join(registry.names())}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from vlm.train.engine import run_recipe
    from vlm.train.recipe import load_recipe

    stage = None if args.stage is None else args.stage - 1
    recipe = load_recipe(args.recipe, args.set or [], stage)
    final = run_recipe(recipe, only_stage=stage, resume=not args.no_resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained model: {final}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from vlm.train.pretrain import load_pretrain_recipe, pretrain

    encoder = pretrain(load_pretrain_recipe(args.recipe, args.set or []), resume=not args.no_resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pretrained encoder: {encoder}  (tower: {{\"name\": \"video_vit\", \"checkpoint\": \"{encoder}\"}})")
    return 0


def _classify(args: argparse.Namespace) -> int:
    from vlm.train.classify import classify, load_classify_recipe

    folder = classify(load_classify_recipe(args.recipe, args.set or []), resume=not args.no_resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained classifier: {folder}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from vlm.chat import VideoChat, repl

    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    chat = VideoChat.from_pretrained(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map, num_frames=args.frames,
                                     require_video=args.video is not None,
                                     **{k: v for k, v in settings.items() if v is not None})
    if args.video is not None:
        chat.load_video(args.video, start=args.start, end=args.end)  # unreadable: one line, exit 2 (main)
    return repl(chat)


def _placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available, else CPU)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bfloat16 on CUDA, else float32)")
    p.add_argument("--device-map", default=None, choices=["auto", "balanced", "sequential"],
                   help="spread a model too big for one GPU over the GPUs and the CPU (accelerate; replaces --device)")


def _export(args: argparse.Namespace) -> int:
    from vlm.export import export

    print(f"exported: {export(args.model, args.to, args.out)}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import tempfile

    try:
        import uvicorn

        from vlm.serve.app import create_app
    except ImportError as e:
        raise SystemExit(f"vlm serve needs the serve extra: pip install 'vlm[serve]' ({e})") from None
    from vlm.model import VideoLLM

    model = VideoLLM.from_pretrained(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                                     merge_lora=True)
    options = {"max_new_tokens": args.max_new_tokens} | ({"num_frames": args.frames} if args.frames else {})
    with tempfile.TemporaryDirectory(prefix="vlm-serve-") as tmp:
        app = create_app(args.model, model=model, upload_dir=args.upload_dir or tmp, media_root=args.media_root,
                         served_name=args.name, max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
                         max_sessions=args.max_sessions, max_session_bytes=int(args.max_session_mb * (1 << 20)),
                         chat_options=options)
        print(f"vlm serve: {app.state.served_name} on http://{args.host}:{args.port}/ (API: /v1/chat/completions)", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm", description="video language models: build, train, evaluate, chat")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list every registry: towers, connectors, reducers, LLM loaders, sampling, backends, objectives")
    p.set_defaults(func=_list)
    p = sub.add_parser("chat", help="chat about a video in the terminal (streamed answers; /reset, /video PATH, /quit)")
    p.add_argument("--model", required=True, help="a saved VideoLLM folder")
    p.add_argument("--video", help="video file, frame folder, GIF or image (or load one later with /video PATH)")
    p.add_argument("--frames", type=int, help="frames to sample (default: the model's num_frames)")
    p.add_argument("--start", type=float, help="only the part of the video after this second")
    p.add_argument("--end", type=float, help="only the part of the video before this second")
    p.add_argument("--max-new-tokens", type=int, help="longest answer in tokens (default 256)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, help="seed for sampling")
    _placement_args(p)
    p.set_defaults(func=_chat)
    p = sub.add_parser("export", help="write a model as a transformers LLaVA-NeXT-Video folder (docs/EXPORT.md)")
    p.add_argument("model", help="a saved VideoLLM folder")
    p.add_argument("--to", required=True, choices=["llava_next_video", "llava_onevision"], help="the target class")
    p.add_argument("--out", required=True, help="the folder to write")
    p.set_defaults(func=_export)
    p = sub.add_parser("serve", help="serve a model: OpenAI-compatible /v1/chat/completions with video, and a web page")
    p.add_argument("model", help="a saved VideoLLM folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--media-root", help="folder whose videos requests may name by path (none: uploads and data: URLs only)")
    p.add_argument("--upload-dir", help="where uploads are kept (default: a temporary folder removed at exit)")
    p.add_argument("--max-upload-mb", type=float, default=64.0, help="largest upload, data: URL or media file")
    p.add_argument("--max-sessions", type=int, default=8, help="conversations kept with their video encoded")
    p.add_argument("--max-session-mb", type=float, default=2048.0, help="memory those sessions may hold (KV caches, frames)")
    p.add_argument("--name", help="the model id clients send (default: the folder's name)")
    p.add_argument("--frames", type=int, help="frames sampled per video (default: the model's num_frames)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default longest answer (requests may ask for less or more)")
    _placement_args(p)
    p.set_defaults(func=_serve)
    p = sub.add_parser("train", help="run a staged training recipe (YAML); launch with torchrun for several processes")
    p.add_argument("recipe", help="recipes/<name>.yaml")
    p.add_argument("--stage", type=int, default=None, help="run only this stage (1-based); its --set overrides apply to it")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe value, e.g. data.frames=8 (every stage), stages.0.batch_size=4 (the first stage: list indices count from 0), model.num_frames=8")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints and finished stages")
    p.set_defaults(func=_train)
    for name, func, recipe, about in (
            ("pretrain", _pretrain, "videomae_pretrain", "VideoMAE pretraining of a video_vit encoder"),
            ("classify", _classify, "video_vit_classify", "train a video classifier (any tower + a linear head)")):
        p = sub.add_parser(name, help=f"{about} (recipes/{recipe}.yaml); launch with torchrun for several processes")
        p.add_argument("recipe", help=f"recipes/{recipe}.yaml")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a recipe value, e.g. train.max_steps=100")
        p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
        p.set_defaults(func=func)
    for ep in sorted(entry_points(group="vlm.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def _input_errors() -> tuple[type[BaseException], ...]:
    """What a user's input raises (a malformed or missing file, recipe or model folder), not a bug."""
    from vlm.data.conversation import DataFormatError, TemplateMismatchError
    from vlm.export import ExportError
    from vlm.train.recipe import RecipeError
    from vlm.video.errors import VideoDecodeError
    from vlm.weights import CheckpointMismatchError

    return (DataFormatError, TemplateMismatchError, RecipeError, ExportError, VideoDecodeError, CheckpointMismatchError,
            FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except _input_errors() as e:  # a bad file, recipe or model folder: one line naming it (the traceback with -v)
        if args.verbose:
            raise
        print("vlm: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
