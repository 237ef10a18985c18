"""CPU arithmetic on denormal floats, with and without flushing them to zero (what `import vlm` switches on).

Float32 values under 1.2e-38 are "denormal"; x86 CPUs handle them in slow microcode unless flush-to-zero is set.
They are not exotic in training: a peaked attention softmax puts probabilities of e^-88 .. e^-103 there, and
Adam's second moment of a gradient under 1e-19 is one. Three cases, each timed with flushing off (PyTorch's
default) and on, best of `--repeats`:

  matmul     a 512 x 512 product whose left operand is attention-like probabilities, nine in ten of them denormal
             (a sharp softmax over 512 keys)
  attention  forward + backward of softmax attention (8 x 9 heads x 400 positions x 64) with peaked scores
  adamw      20 AdamW steps on 1M parameters whose gradients are ~1e-20 (second moments become denormal)

Each (case, setting) runs in a process of its own: the setting must be made before torch starts its worker threads,
which keep the floating-point mode they started with (so `import vlm` comes before any torch computation).

    python scripts/bench_denormals.py [--repeats 3] [--write]   (--write: the section of docs/BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_docs import update_section  # noqa: E402


def probabilities(rows: int, cols: int, denormal_share: float, gen: torch.Generator) -> torch.Tensor:
    """A row-stochastic matrix where `denormal_share` of the entries are denormal (e^-90 .. e^-100 relative to the
    row's peak), as a peaked softmax gives."""
    logits = torch.randn(rows, cols, generator=gen)
    far = torch.rand(rows, cols, generator=gen) < denormal_share
    logits = torch.where(far, -90.0 - 10.0 * torch.rand(rows, cols, generator=gen), logits)
    return torch.exp(logits - logits.amax(1, keepdim=True))


def case_matmul(gen: torch.Generator) -> Callable[[], None]:
    a, b = probabilities(512, 512, 0.9, gen), torch.randn(512, 512, generator=gen)

    def run() -> None:
        for _ in range(10):
            a @ b
    return run


def case_attention(gen: torch.Generator) -> Callable[[], None]:
    q = torch.randn(8, 9, 400, 64, generator=gen, requires_grad=True)
    k, v = torch.randn(8, 9, 400, 64, generator=gen), torch.randn(8, 9, 400, 64, generator=gen)
    scale = 5.0  # scores with a spread of ~40: a model that has learned to attend sharply

    def run() -> None:
        probs = (q @ k.transpose(-1, -2) * scale).softmax(-1)
        (probs @ v).sum().backward()
        q.grad = None
    return run


def case_adamw(gen: torch.Generator) -> Callable[[], None]:
    p = torch.nn.Parameter(torch.randn(1_000_000, generator=gen))
    opt = torch.optim.AdamW([p], lr=1e-3, foreach=False)
    grad = torch.randn(1_000_000, generator=gen) * 1e-20

    def run() -> None:
        for _ in range(20):
            p.grad = grad.clone()
            opt.step()
    return run


def timed(make: Callable[[torch.Generator], Callable[[], None]], repeats: int) -> float:
    """Best seconds of the case (after one warm-up run, which for adamw also fills the moments)."""
    run = make(torch.Generator().manual_seed(0))
    run()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best


CASES = {"matmul": case_matmul, "attention": case_attention, "adamw": case_adamw}


def in_process(case: str, flush: bool, repeats: int) -> float:
    """The case's best time in a fresh process whose flush setting is made before any torch computation."""
    out = subprocess.run([sys.executable, __file__, "--case", case, "--flush", str(int(flush)), "--repeats",
                          str(repeats)], check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--write", action="store_true", help="write the results into docs/BENCHMARKS.md")
    p.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # one measurement (a child process)
    p.add_argument("--flush", type=int, choices=[0, 1], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        torch.set_flush_denormal(bool(args.flush))  # before torch starts its threads
        print(timed(CASES[args.case], args.repeats))
        return 0
    rows = []
    for name in CASES:
        slow, fast = in_process(name, False, args.repeats), in_process(name, True, args.repeats)
        rows.append((name, slow, fast))
        print(f"{name:10s} denormals kept {slow:7.3f} s   flushed {fast:7.3f} s   {slow / fast:6.1f}x", flush=True)
    body = "\n".join([
        f"`python scripts/bench_denormals.py --write` ({torch.get_num_threads()} threads, torch {torch.__version__}); "
        f"best of {args.repeats}, each setting in a fresh process; `import vlm` flushes denormal floats to zero "
        "(PyTorch keeps them by default).",
        "",
        "| case | denormals kept (PyTorch default) | flushed to zero (vlm) | speed-up |",
        "|---|---:|---:|---:|",
        *[f"| {n} | {s:.3f} s | {f:.3f} s | **{s / f:.1f}x** |" for n, s, f in rows],
    ])
    if args.write:
        update_section("denormals", "## Denormal floats on the CPU: kept vs flushed to zero", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
