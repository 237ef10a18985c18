"""Benchmark the `video_vit` attention modes and VideoMAE pretraining; update docs/BENCHMARKS.md.

    python scripts/bench_video_transformers.py            # ~16 min on the shared 2-core CPU machine (955 s measured)
    python scripts/bench_video_transformers.py --quick    # a smoke run (minutes), docs untouched

1. Scaling: forward time and peak memory of each attention mode for t = 4, 8, 16 temporal tokens of 14 x 14
   (224 px frames, patch 16, tubelet 1, so t frames), depth 4, width 384, 6 heads, batch 1, inference mode.
   Each (mode, t) runs in a fresh subprocess (glibc's mmap threshold fixed, so freed tensors leave RSS): after
   a warm-up forward the kernel's peak-RSS counter is reset (/proc/self/clear_refs) before each measured
   forward, and peak memory = VmHWM after it - VmRSS before it. Memory is
   measured twice: with SDPA's default CPU kernel (flash attention: no L x L matrix is ever stored) and with the
   math kernel (the attention matrix is materialised, as in the papers' analyses). Ratios are to `joint` at the
   same t, measured in the same run.
2. Accuracy at an equal budget: each mode is trained from scratch on the synthetic classification clips with the
   same steps, batch, schedule and seed; top-1 on the test clips with one centre view (the training view) and
   multi-view (evals.classify: 2 temporal clips x 3 crops, view-averaged softmax).
3. VideoMAE: the `joint` encoder pretrained with 90% tube masking on the training clips (labels unused), then
   fine-tuned with the budget of (2); compared with the same encoder from scratch (the `joint` row of (2)); and
   linear probes on the frozen features of the pretrained and of the randomly initialised encoder.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_docs import update_section  # noqa: E402

sys.path.insert(0, str(ROOT))

MODES = ("joint", "factorized_encoder", "divided", "factorized_dot_product", "window", "pooling")
SCALE_T = (4, 8, 16)
SCALE_ARCH = dict(depth=4, width=384, heads=6, patch_size=16, tubelet=1, image_size=224, num_frames=16,
                  window=(4, 7, 7), kv_stride=(1, 2, 2), temporal_depth=1)
CLS_ARCH = dict(depth=4, width=64, heads=4, patch_size=8, tubelet=2, image_size=32, num_frames=8,
                window=(2, 2, 2), kv_stride=(1, 2, 2), temporal_depth=1, layer=-1)


# ---------------------------------------------------------------------------------------------- 1. scaling
def _proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(mode: str, t: int, reps: int, threads: int) -> list[dict]:
    """One (mode, t) cell in this (fresh) process: SDPA's default kernel (time after a warm-up, and peak memory),
    then the math kernel (peak memory; its time is not reported)."""
    import resource

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vlm.towers.video_vit import VideoViT, VideoViTConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = {k: v for k, v in SCALE_ARCH.items() if k != "temporal_depth" or mode == "factorized_encoder"}
    model = VideoViT(VideoViTConfig(**cfg, attention=mode)).eval()
    x = torch.randn(1, t, 3, 224, 224)
    rows = []
    for backend, kernels in (("default", [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]), ("math", [SDPBackend.MATH])):
        with torch.inference_mode(), sdpa_kernel(kernels):
            if backend == "default":
                model.hidden(x)  # warm-up: thread pools, kernel selection, first-call allocations
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                base, how = _proc_kb("VmRSS"), "VmHWM"
            except OSError:  # no clear_refs: the process-wide high-water mark (over-states later cells)
                base, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
            times = []
            for _ in range(reps if backend == "default" else 1):
                t0 = time.perf_counter()
                out = model.hidden(x)
                times.append(time.perf_counter() - t0)
            peak = _proc_kb("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            del out
        rows.append({"mode": mode, "t": t, "backend": backend, "tokens": t * 196, "time_s": min(times),
                     "peak_mib": max(0.0, (peak - base) / 1024), "memory_counter": how})
    return rows


def run_scaling(reps: int, threads: int, ts: tuple[int, ...]) -> list[dict]:
    rows = []
    for t in ts:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--measure", mode, str(t), "--reps", str(reps), "--threads", str(threads)]
            # a fixed mmap threshold: freed tensors go back to the OS, so RSS follows live memory (glibc's
            # dynamic threshold would keep the warm-up's buffers and hide the timed forward's allocations)
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_="65536")
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if res.returncode != 0:
                raise RuntimeError(f"measurement {mode} t={t} failed:\n{res.stderr[-2000:]}")
            cell = json.loads(res.stdout.strip().splitlines()[-1])
            rows += cell
            d, m = cell
            print(f"  t={t:2d} {mode:23s} {d['time_s']:7.3f} s  {d['peak_mib']:7.1f} MiB (default)  "
                  f"{m['peak_mib']:7.1f} MiB (math)", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- 2. + 3. accuracy
def synth_data(folder: Path, num: int) -> Path:
    from data_tools.synth import generate

    summary = folder / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("num") == num:
        return folder
    generate(folder, num=num, seed=0, frames=16, size=112, eval_fraction=0.1, workers=2)
    return folder


def build_classifier(mode: str, encoder_dir: Path | None = None):
    import torch

    from vlm.towers import build_tower
    from vlm.classifier import VideoClassifier

    torch.manual_seed(0)
    if encoder_dir is not None:
        tower = build_tower("video_vit", checkpoint=str(encoder_dir), layer=-1)
    else:
        arch = {k: v for k, v in CLS_ARCH.items() if k != "temporal_depth" or mode == "factorized_encoder"}
        tower = build_tower("video_vit", **arch, attention=mode)
    return VideoClassifier(tower, 12)


def evaluate(model, name: str, test, items, classes, out: Path, views: tuple[int, int]) -> dict:
    from evals.classify import evaluate_classification  # the shared multi-view evaluator
    from vlm.classifier import accuracy

    single = accuracy(model, test.pixels, test.labels)
    shutil.rmtree(out / name, ignore_errors=True)
    res = evaluate_classification(model.classify_clip, items, classes, out / name, num_frames=CLS_ARCH["num_frames"],
                                  num_clips=views[0], num_crops=views[1], model_name=name, progress=False)
    return {"top1_1view": single, "top1_multiview": res.metrics["top1"], "top5_multiview": res.metrics["top5"]}


def probe_accuracy(tower, train, test) -> float:
    """Top-1 (%) of a linear probe (evals.classify.fit_linear_probe) on the frozen tower's mean-pooled tokens."""
    import torch

    from evals.classify import fit_linear_probe

    @torch.no_grad()
    def feats(pixels: torch.Tensor) -> torch.Tensor:
        tower.eval()
        return torch.cat([tower(pixels[i : i + 64]).tokens.mean(dim=(1, 2)) for i in range(0, len(pixels), 64)])

    probe = fit_linear_probe(feats(train.pixels), train.labels, 12, steps=300)
    with torch.no_grad():
        return 100.0 * float((probe(feats(test.pixels)).argmax(1) == test.labels).float().mean())


def run_accuracy(out: Path, num: int, steps: int, pretrain_steps: int, threads: int, views: tuple[int, int],
                 modes: tuple[str, ...]) -> dict:
    import torch

    from vlm.data.classification import load_classification, load_labelled
    from vlm.train.classify import ClassifyTrainConfig, train_classifier
    from vlm.train.pretrain import load_pretrain_recipe, pretrain

    torch.set_num_threads(threads)
    data = synth_data(out / "synth", num)
    probe = build_classifier("joint")
    pre = probe.tower.preprocessor
    t0 = time.perf_counter()
    train = load_labelled(data / "classification_train.jsonl", CLS_ARCH["num_frames"], pre, progress=False)
    test = load_labelled(data / "classification_test.jsonl", CLS_ARCH["num_frames"], pre, progress=False)
    items, classes = load_classification(data / "classification_test.jsonl")
    print(f"  decoded {len(train.labels)} training and {len(test.labels)} test clips in {time.perf_counter() - t0:.0f} s")
    batch = 16
    epochs = steps * batch / len(train.labels)
    cfg = ClassifyTrainConfig(epochs=epochs, batch_size=batch, lr=1e-3, weight_decay=0.05, warmup_ratio=0.1, seed=0)
    results: dict = {"modes": {}, "budget": {"steps": steps, "batch": batch, "epochs": round(epochs, 2),
                                             "train_clips": len(train.labels), "test_clips": len(test.labels)}}
    for mode in modes:
        model = build_classifier(mode)
        t0 = time.perf_counter()
        hist = train_classifier(model, train.pixels, train.labels, cfg, progress=False)
        secs = time.perf_counter() - t0
        row = evaluate(model, mode, test, items, classes, out / "eval", views)
        row |= {"train_s": secs, "final_loss": sum(r["loss"] for r in hist[-20:]) / min(20, len(hist)),
                "params": sum(p.numel() for p in model.parameters())}
        results["modes"][mode] = row
        print(f"  {mode:23s} top-1 {row['top1_1view']:5.1f} (1 view) {row['top1_multiview']:5.1f} (multi-view)  "
              f"train {secs:5.0f} s", flush=True)

    # 3. VideoMAE: pretrain the joint encoder on the training clips (no labels), fine-tune with the same budget
    recipe = load_pretrain_recipe(ROOT / "recipes" / "videomae_pretrain.yaml", [
        f"vars.data={data}", f"vars.output={out / 'videomae'}", "data.frames=8", "data.num_workers=0", "data.cache=true",
        "train.precision=fp32", f"train.max_steps={pretrain_steps}", "train.batch_size=16", "train.lr=1.5e-3",
        "train.save_every=0", "train.warmup_ratio=0.05",
        *[f"encoder.{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in CLS_ARCH.items()
          if k not in ("layer", "window", "kv_stride", "temporal_depth")], "encoder.attention=joint"])
    shutil.rmtree(out / "videomae", ignore_errors=True)
    t0 = time.perf_counter()
    encoder_dir = pretrain(recipe, resume=False, progress=False)
    pre_s = time.perf_counter() - t0
    losses = [json.loads(x)["loss"] for x in (out / "videomae" / "metrics.jsonl").read_text().splitlines()]
    model = build_classifier("joint", encoder_dir)
    t0 = time.perf_counter()
    hist = train_classifier(model, train.pixels, train.labels, cfg, progress=False)
    secs = time.perf_counter() - t0
    row = evaluate(model, "videomae_joint", test, items, classes, out / "eval", views)
    row |= {"train_s": secs, "final_loss": sum(r["loss"] for r in hist[-20:]) / min(20, len(hist)),
            "pretrain_s": pre_s, "pretrain_steps": pretrain_steps, "norm_pix": recipe.objective.norm_pix,
            "pretrain_loss_first": sum(losses[:10]) / len(losses[:10]), "pretrain_loss_last": sum(losses[-10:]) / len(losses[-10:])}
    # linear probes on frozen features: what the pretraining put into the representation, without fine-tuning
    row["probe_videomae"] = probe_accuracy(build_classifier("joint", encoder_dir).tower, train, test)
    row["probe_random"] = probe_accuracy(build_classifier("joint").tower, train, test)
    results["videomae"] = row
    print(f"  videomae-pretrained joint top-1 {row['top1_1view']:5.1f} (1 view) {row['top1_multiview']:5.1f} (multi-view); "
          f"pretraining {pre_s:.0f} s, loss {row['pretrain_loss_first']:.3f} -> {row['pretrain_loss_last']:.3f}; "
          f"linear probe on frozen features: VideoMAE {row['probe_videomae']:.1f}, random init {row['probe_random']:.1f}",
          flush=True)
    return results


# ---------------------------------------------------------------------------------------------- report
def plot(rows: list[dict], acc: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for mode in MODES:
        d = sorted((r for r in rows if r["mode"] == mode and r["backend"] == "default"), key=lambda r: r["t"])
        m = sorted((r for r in rows if r["mode"] == mode and r["backend"] == "math"), key=lambda r: r["t"])
        style = "-o" if mode == "joint" else "--o" if mode in ("pooling",) else "-s"
        axes[0].plot([r["t"] for r in d], [r["time_s"] for r in d], style, label=mode)
        axes[1].plot([r["t"] for r in m], [r["peak_mib"] for r in m], style, label=mode)
    ts = sorted({r["t"] for r in rows})
    j = {r["t"]: r["time_s"] for r in rows if r["mode"] == "joint" and r["backend"] == "default"}
    if ts and ts[0] in j:
        axes[0].plot(ts, [j[ts[0]] * (t / ts[0]) for t in ts], ":", color="gray", label="linear in t (from joint @ t=4)")
    axes[0].set(title="forward time (SDPA default kernel)", xlabel="t (temporal tokens of 14x14)", ylabel="seconds")
    axes[1].set(title="peak memory, attention matrix materialised (SDPA math)", xlabel="t (temporal tokens of 14x14)",
                ylabel="MiB over the model's baseline")
    for ax in axes[:2]:
        ax.set_xticks(ts)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if acc:
        names = list(acc["modes"]) + ["joint +\nVideoMAE"]
        one = [acc["modes"][m]["top1_1view"] for m in acc["modes"]] + [acc["videomae"]["top1_1view"]]
        multi = [acc["modes"][m]["top1_multiview"] for m in acc["modes"]] + [acc["videomae"]["top1_multiview"]]
        xs = range(len(names))
        axes[2].bar([x - 0.2 for x in xs], one, 0.4, label="1 view")
        axes[2].bar([x + 0.2 for x in xs], multi, 0.4, label="multi-view")
        axes[2].axhline(100 / 12, color="gray", ls=":", label="chance")
        axes[2].set_xticks(list(xs), [n.replace("_", "_\n", 1) if "\n" not in n else n for n in names], fontsize=7)
        axes[2].set(title=f"synthetic 12-class top-1, {acc['budget']['steps']} steps each", ylabel="%")
        axes[2].legend(fontsize=8)
    else:
        axes[2].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict], acc: dict | None, meta: dict) -> str:
    by = {(r["mode"], r["t"], r["backend"]): r for r in rows}
    ts = sorted({r["t"] for r in rows})
    lines = [f"Measured {meta['date']} by `scripts/bench_video_transformers.py` ({meta['threads']} torch thread(s) per "
             f"process; 2 cores shared with other work, load average {meta['load']:.1f} at the start: compare ratios "
             "within one run). Details and discussion: docs/VIDEO_TRANSFORMERS.md.", "",
             f"**Scaling** (depth {SCALE_ARCH['depth']}, width {SCALE_ARCH['width']}, {SCALE_ARCH['heads']} heads, 224 px, "
             "patch 16, tubelet 1: t frames = t x 14 x 14 tokens; batch 1, inference; window (4, 7, 7); "
             "pooling kv stride (1, 2, 2) with depthwise-conv pooling; factorized_encoder 3 spatial + 1 temporal layers). "
             "Time = best of the timed forwards after a warm-up; memory = peak RSS growth during a forward, in a fresh process per cell.", "",
             "| mode | " + " | ".join(f"t={t} time s (x joint)" for t in ts) + " | "
             + " | ".join(f"t={t} peak MiB math (x joint)" for t in ts) + " | "
             + " | ".join(f"t={t} peak MiB default" for t in ts) + " |",
             "|---|" + "---|" * (3 * len(ts))]
    for mode in MODES:
        cells = []
        for t in ts:
            r, j = by[(mode, t, "default")], by[("joint", t, "default")]
            cells.append(f"{r['time_s']:.3f} ({r['time_s'] / j['time_s']:.2f})")
        for t in ts:
            r, j = by[(mode, t, "math")], by[("joint", t, "math")]
            cells.append(f"{r['peak_mib']:.0f} ({r['peak_mib'] / max(j['peak_mib'], 1e-9):.2f})")
        for t in ts:
            cells.append(f"{by[(mode, t, 'default')]['peak_mib']:.0f}")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    k = ts[-1] // ts[0]
    lines += ["", f"Growth from t={ts[0]} to t={ts[-1]} ({k}x the tokens; linear = x{k}, quadratic = x{k * k}): "
              "forward time " + ", ".join(
        f"{m} x{by[(m, ts[-1], 'default')]['time_s'] / by[(m, ts[0], 'default')]['time_s']:.1f}" for m in MODES)
        + "; math-kernel peak memory " + ", ".join(
        f"{m} x{by[(m, ts[-1], 'math')]['peak_mib'] / max(by[(m, ts[0], 'math')]['peak_mib'], 1e-9):.1f}" for m in MODES)
        + "."]
    if acc:
        b = acc["budget"]
        lines += ["", f"**Synthetic classification at an equal budget** ({b['train_clips']} training / {b['test_clips']} "
                  f"test clips of the 12-class synthetic world, 8 frames at 32 px, patch 8, tubelet 2: 4 x 4 x 4 tokens; "
                  f"depth 4, width 64, 4 heads; {b['steps']} AdamW steps of batch {b['batch']} ({b['epochs']} epochs), "
                  "lr 1e-3 warmup + cosine, seed 0, from scratch; window (2, 2, 2); multi-view = evals.classify "
                  f"{meta['views'][0]} clips x {meta['views'][1]} crops, view-averaged softmax). Chance = 8.3 %.", "",
                  "| model | top-1 % (1 view) | top-1 % (multi-view) | top-5 % (multi-view) | final train loss | train s | params |",
                  "|---|---|---|---|---|---|---|"]
        for mode, r in acc["modes"].items():
            lines.append(f"| {mode} (scratch) | {r['top1_1view']:.1f} | {r['top1_multiview']:.1f} | {r['top5_multiview']:.1f} "
                         f"| {r['final_loss']:.3f} | {r['train_s']:.0f} | {r['params']:,} |")
        v = acc["videomae"]
        lines.append(f"| joint + VideoMAE pretraining | {v['top1_1view']:.1f} | {v['top1_multiview']:.1f} | "
                     f"{v['top5_multiview']:.1f} | {v['final_loss']:.3f} | {v['train_s']:.0f} | same as joint |")
        lines += ["", f"VideoMAE pretraining: {v['pretrain_steps']} steps of batch 16 on the training clips (labels "
                  f"unused; recipes/videomae_pretrain.yaml with the encoder above), 90 % tube masking, 4-block decoder of "
                  f"width 32, {'per-patch normalised' if v['norm_pix'] else 'raw (tower-normalised)'} pixel targets, "
                  f"{v['pretrain_s']:.0f} s; reconstruction loss {v['pretrain_loss_first']:.3f} (first 10 steps) -> {v['pretrain_loss_last']:.3f} "
                  "(last 10). Fine-tuning: the budget above, all weights, same hyper-parameters. Its pretraining compute is not "
                  "part of the equal budget: the comparison says what the pretrained initialisation buys at a fixed "
                  f"fine-tuning budget. Linear probe (evals.classify.fit_linear_probe, 300 full-batch steps) on the frozen, "
                  f"mean-pooled last-block tokens: VideoMAE encoder {v['probe_videomae']:.1f} %, the same encoder at random "
                  f"init {v['probe_random']:.1f} %."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", nargs=2, metavar=("MODE", "T"), help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=1, help="timed forwards per scaling cell (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared 2-core machine)")
    ap.add_argument("--num", type=int, default=1500, help="synthetic clips to generate (10 %% are test clips)")
    ap.add_argument("--steps", type=int, default=1200, help="training steps per classifier (the equal budget)")
    ap.add_argument("--pretrain-steps", type=int, default=800, help="VideoMAE pretraining steps")
    ap.add_argument("--out", default="runs/bench_video_transformers", help="working folder (data, runs, eval logs)")
    ap.add_argument("--skip-accuracy", action="store_true", help="only the scaling part")
    ap.add_argument("--quick", action="store_true", help="smoke run: small everything, docs untouched")
    ap.add_argument("--no-docs", action="store_true", help="do not touch docs/")
    ap.add_argument("--report-only", action="store_true", help="rewrite the table, plot and docs from OUT/results.json")
    args = ap.parse_args()
    if args.measure:
        mode, t = args.measure
        print(json.dumps(measure(mode, int(t), args.reps, args.threads)))
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    ts = (2, 4) if args.quick else SCALE_T
    if args.quick:
        args.num, args.steps, args.pretrain_steps, args.reps = 120, 20, 20, 1
    views = (2, 3)
    meta = {"date": _dt.date.today().isoformat(), "threads": args.threads, "load": os.getloadavg()[0], "views": views}
    t0 = time.perf_counter()
    if args.report_only:
        saved = json.loads((out / "results.json").read_text())
        meta, rows, acc = saved["meta"], saved["scaling"], saved["accuracy"]
    else:
        print("1. scaling (a fresh process per cell)")
        rows = run_scaling(args.reps, args.threads, ts)
        acc = None
        if not args.skip_accuracy:
            print("2./3. accuracy at an equal budget, VideoMAE vs scratch")
            acc = run_accuracy(out, args.num, args.steps, args.pretrain_steps, args.threads, views, MODES)
        (out / "results.json").write_text(json.dumps({"meta": meta, "scaling": rows, "accuracy": acc}, indent=2))
    text = table(rows, acc, meta)
    print("\n" + text)
    png = (out / "video_transformers_scaling.png") if (args.quick or args.no_docs) else ROOT / "docs" / "video_transformers_scaling.png"
    plot(rows, acc, png)
    if not (args.quick or args.no_docs):
        update_section("bench_video_transformers", "## Video transformers: attention modes and VideoMAE",
                       text + "\n\n![scaling and accuracy](video_transformers_scaling.png)")
    print(f"\nplot: {png}; total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
