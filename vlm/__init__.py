"""vlm: video language models as vision tower + connector + causal LLM."""

import torch

__version__ = "0.1.0"

# Denormal floats (below 1.2e-38) are flushed to zero on the CPU. Attention probabilities and optimizer moments of a
# model trained for a while fall into that range, and CPU arithmetic on them is 30x slower (a 512 x 512 matmul of
# denormals: 7.0 s vs 0.23 s here); one quickstart training step took over 10 minutes instead of 10 seconds. The
# values lost are below anything float32 training resolves; GPUs flush them in their fast paths too.
torch.set_flush_denormal(True)
