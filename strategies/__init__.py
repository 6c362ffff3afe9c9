"""Server-side strategies, one algorithm per file, the math in pure functions.

Registry: ``strategy.name`` -> the class that implements it. To add a method: write
``strategies/<name>.py`` with its pure aggregation function and a Strategy subclass
that overrides the smallest hook, add it to ``STRATEGIES`` here and to
``stamen.config.STRATEGIES``, and add unit tests on tiny arrays in ``tests/``.
"""

from .flora import FLoRA, merge_stacked, stack_lora

STRATEGIES = {"flora": FLoRA}

__all__ = ["FLoRA", "STRATEGIES", "merge_stacked", "stack_lora"]
