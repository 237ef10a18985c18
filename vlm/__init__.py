"""vlm: video language models as vision tower + connector + causal LLM."""

__version__ = "0.1.0"
