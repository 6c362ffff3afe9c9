"""Device-side methods, one file each, registered under the name the server's strategy
sends in its train instruction (``keys.METHOD``; a strategy's ``client_method``).

Two families, each a template with a few hooks:

- LoRA on a single-exit model (:class:`~.lora.LoRAMethod`): ``lora`` (FLoRA, FedIT,
  FlexLoRA), ``hetlora`` (a tail regulariser, self-pruning), ``fedspine`` (prunes heads
  and channels while it trains). Hooks: ``regularizer``, ``train``, ``reply``.
- early exits (:class:`~.early_exit.EarlyExitMethod`): ``reefl``, ``depthfl``,
  ``inclusivefl``, ``exclusivefl``. The hook is the objective, ``loss``.

The train handler (client_app/app.py) looks the method up and runs it; it has no branch
per method. To add one:

1. write ``client_app/methods/<name>.py``: a subclass of ``LoRAMethod`` or
   ``EarlyExitMethod`` that overrides the hooks it needs, decorated with
   ``@register("<name>")``; math that the server also runs goes to ``stamen/`` (as
   HetLoRA's tail rule is in stamen/lora_math.py), model math to ``ml/``;
2. import it below;
3. on the server, set the strategy's ``client_method = "<name>"`` (strategies/);
4. a row in tests/test_client_methods.py (what the hook changes, on a tiny model).
"""

from . import depthfl, exclusivefl, fedspine, hetlora, inclusivefl, lora, reefl  # noqa: F401  (each registers itself)
from .registry import METHODS, method_for, register

__all__ = ["METHODS", "method_for", "register"]
