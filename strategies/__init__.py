"""Server-side strategies, one algorithm per file, the math in pure functions.

Registry: ``strategy.name`` -> the class that implements it. To add a method:

1. write ``strategies/<name>.py``: its math as pure functions over numpy arrays, and a
   class that overrides the smallest hooks of :class:`LoRAStrategy` (``downlink``,
   ``aggregate_lora``) or, for a global adapter on frozen weights, of
   :class:`AdapterStrategy` (``initial_factors``, ``combine``, ``delta``);
2. options of its own: a config section in ``stamen/config.py`` and ``from_config``;
3. add it to ``STRATEGIES`` here and to ``stamen.config.STRATEGIES``;
4. unit tests of the math on tiny arrays, and a line in the study (``conf/``).
"""

from .adapter import AdapterStrategy
from .base import LoRAStrategy
from .fedit import FedIT
from .flexlora import FlexLoRA
from .flora import FLoRA, merge_stacked, stack_lora
from .hetlora import HetLoRA

STRATEGIES = {"flora": FLoRA, "fedit": FedIT, "hetlora": HetLoRA, "flexlora": FlexLoRA}

__all__ = ["STRATEGIES", "AdapterStrategy", "FLoRA", "FedIT", "FlexLoRA", "HetLoRA", "LoRAStrategy", "merge_stacked", "stack_lora"]
