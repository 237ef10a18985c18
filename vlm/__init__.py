"""vlm: video language models as vision tower + connector + causal LLM."""

import torch

__version__ = "0.1.0"

# Denormal floats (below 1.2e-38) are flushed to zero on the CPU. Attention probabilities and optimizer moments of
# a model trained for a while fall into that range, and CPU arithmetic on them is 3-160x slower (matmul, attention,
# AdamW: docs/BENCHMARKS.md); one quickstart training step took over 10 minutes instead of 20 seconds with them.
# The values lost are below anything float32 training resolves. Torch's worker threads keep the mode they started
# with, so this is set at import: import vlm before running torch computations. It is the CPU's mode for the whole
# process: float64 too, so Python and numpy arithmetic here also read values under 2.2e-308 as zero.
torch.set_flush_denormal(True)
