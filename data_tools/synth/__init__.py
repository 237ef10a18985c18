"""A deterministic synthetic temporal-video world with exact ground truth (`vlm data synth`).

    from data_tools.synth import generate
    summary = generate("data/synth", num=1000, seed=0)

See docs/SYNTHETIC.md for the world, the files and the benchmark tasks.
"""

from data_tools.synth.generate import generate
from data_tools.synth.world import CLASSES

__all__ = ["CLASSES", "generate"]
