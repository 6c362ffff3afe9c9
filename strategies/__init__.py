"""Server-side strategies, one algorithm per file, the math in pure functions.

Registry: ``strategy.name`` -> the class that implements it. Two families: LoRA on a
single-exit model (``LoRAStrategy``) and depth-heterogeneous early exits
(``EarlyExitStrategy``). To add a method:

1. write ``strategies/<name>.py``: its math as pure functions over numpy arrays, and a
   class that overrides the smallest hooks of :class:`LoRAStrategy` (``downlink``,
   ``aggregate_lora``) or, for a global adapter on frozen weights, of
   :class:`AdapterStrategy` (``initial_factors``, ``combine``, ``delta``); an early-exit
   method sets ``exit_kind`` and ``client_method`` of :class:`EarlyExitStrategy` or
   overrides ``trains``. A strategy whose nodes do something new names a device-side
   method of its own (``client_method``; the checklist in client_app/methods/__init__.py);
2. options of its own: a config section in ``stamen/config.py`` and ``from_config``;
3. add it to ``STRATEGIES`` here and to ``stamen.config.LORA_STRATEGIES`` or
   ``stamen.config.EARLY_EXIT_STRATEGIES`` (the ServerApp picks its path by that);
4. unit tests of the math on tiny arrays, and a line in the study (``conf/``).
"""

from .adapter import AdapterStrategy
from .base import LoRAStrategy
from .depthfl import DepthFL
from .early_exit import EarlyExitStrategy, layerwise_average
from .exclusivefl import ExclusiveFL
from .fedit import FedIT
from .fedspine import FedSpine
from .flexlora import FlexLoRA
from .flora import FLoRA, merge_stacked, stack_lora
from .hetlora import HetLoRA
from .inclusivefl import InclusiveFL
from .reefl import ReeFL

STRATEGIES = {
    "flora": FLoRA,
    "fedit": FedIT,
    "hetlora": HetLoRA,
    "flexlora": FlexLoRA,
    "fedspine": FedSpine,
    "reefl": ReeFL,
    "depthfl": DepthFL,
    "inclusivefl": InclusiveFL,
    "exclusivefl": ExclusiveFL,
}

__all__ = [
    "STRATEGIES",
    "AdapterStrategy",
    "DepthFL",
    "EarlyExitStrategy",
    "ExclusiveFL",
    "FLoRA",
    "FedIT",
    "FedSpine",
    "FlexLoRA",
    "HetLoRA",
    "InclusiveFL",
    "LoRAStrategy",
    "ReeFL",
    "layerwise_average",
    "merge_stacked",
    "stack_lora",
]
