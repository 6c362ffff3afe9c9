"""What one node's reply can do to the aggregate: bounded updates and bounded weights.

A node can send anything. Two things it sends move the aggregate without limit unless
the server bounds them: the size of its update and the weight it claims (its
``num-examples``). Both rules below are pure functions; :class:`Bounds` holds the
configuration (``robust.*``, :class:`stamen.config.RobustConfig`) and ``SampledStrategy.collect`` applies it to every round's
parsed replies, for both strategy families (strategies/base.py).

**Update norm.** Each strategy measures a node's update where it aggregates
(``update_parts``): for LoRA the product ``s_k B_k A_k`` of every adapted matrix minus
the product of the adapter the node was sent (none: a fresh LoRA), for dense parameters
(early exits) the change from what it was sent, and for the head its change. The bound
of a round is

    bound = min(norm-multiple x median(norms of the round's valid replies), norm-cap)

norm bounding as in Sun et al., "Can You Really Backdoor Federated Learning?" (2019),
with the norm taken relative to the round's median (so no absolute scale has to be
tuned per model) and an optional absolute cap. The median needs an honest majority of
the round's replies, and at least :data:`MIN_FOR_MEDIAN` of them: with two replies it
is their mean, which one attacker controls, so only the cap applies then. An update over
the bound is clipped to it (``robust.over-bound = "clip"``, the default: an honest node
that is unusually far out keeps the direction of its update) or dropped (``"drop"``).

**Weight.** A node's aggregation weight is its claimed ``num-examples``, capped by what
it said in its device profile at the query (``num-examples`` there: its partition size,
measured when the run started), and then by ``robust.max-weight-share`` of the round's
total (water-filling: the capped nodes share exactly that much each, the others keep
their claims). Like the median, the share needs :data:`MIN_FOR_MEDIAN` replies: of two
nodes with unequal data one always holds more than half, honest or not.
``robust.weights = "equal"`` gives every node the same weight instead. With n replies a
share below 1/n cannot be met: every node then weighs the same.

Under central DP (strategies/central_dp.py) the DP clipping already bounds every update
to C. The median rule is then off: it would let one node's presence change how another
node's update is treated, and the sensitivity C / m would no longer hold. The cap still
applies (it does not depend on the other nodes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from stamen.config import RobustConfig

MIN_FOR_MEDIAN = 3  # fewer valid replies: the median is not robust; only the cap applies

Bounds = RobustConfig  # robust.* of the run config (stamen/config.py)
OFF = RobustConfig(norm_multiple=0.0, norm_cap=0.0, over_bound="clip", max_weight_share=1.0, weights="examples")  # as sent


def lora_change(
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    scaling: float,
    sent: Mapping[str, tuple[np.ndarray, np.ndarray]],
    head: Mapping[str, np.ndarray],
    head_now: Mapping[str, np.ndarray],
) -> list[np.ndarray]:
    """A LoRA reply's change, in float64: ``s B A - s B0 A0`` per adapted matrix (by
    module name; ``B0 A0`` the adapter the node was sent, a module without one: 0), then
    ``head - head_now`` per head tensor (by name). The bound measures it, and central DP
    clips it (strategies/central_dp.py)."""
    parts = []
    for module, (a, b) in sorted(factors.items()):
        product = scaling * (b.astype(np.float64) @ a.astype(np.float64))
        if module in sent:
            a0, b0 = sent[module]
            product = product - scaling * (b0.astype(np.float64) @ a0.astype(np.float64))
        parts.append(product)
    return parts + [head[k].astype(np.float64) - head_now[k] for k in sorted(head_now)]


def norm_of(parts: Sequence[np.ndarray]) -> float:
    """The Euclidean norm of all the parts as one vector (float64)."""
    return math.sqrt(sum(float(np.sum(np.square(p, dtype=np.float64))) for p in parts))


def norm_bound(norms: Sequence[float], *, multiple: float, cap: float, relative: bool = True) -> tuple[float, str]:
    """This round's bound on an update's norm, and how it was set (for the log)."""
    bound, how = math.inf, "none"
    if relative and multiple > 0 and len(norms) >= MIN_FOR_MEDIAN:
        median = float(np.median(norms))
        bound, how = multiple * median, f"{multiple:g} x the round's median {median:.4g}"
    if cap > 0 and cap < bound:
        bound, how = cap, f"the cap {cap:g}"
    return bound, how


def scale_to_bound(norm_at: Callable[[float], float], bound: float, *, iterations: int = 40) -> float:
    """The largest t in [0, 1] found by bisection with ``norm_at(t) <= bound``, where
    ``norm_at(t)`` is the norm of the update scaled by t (``norm_at(0) = 0``). For an update
    that scales linearly this is ``bound / norm``; for an adapter that can only be moved
    along its factors (``A0 + t dA``, ``B0 + t dB``) it is where the product's change meets
    the bound."""
    if norm_at(1.0) <= bound:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(iterations):
        mid = (low + high) / 2
        if norm_at(mid) <= bound:
            low = mid
        else:
            high = mid
    return low


def capped_shares(weights: Mapping[int, float], share: float) -> dict[int, float]:
    """Cap every weight at ``share`` of the total after capping (water-filling): the k
    largest weights become c = share x (rest + k c), i.e. c = share x rest / (1 - share k),
    with k the smallest number for which the largest weight left is within c; the others
    keep theirs. When ``share`` x n <= 1 no weight can be above the share: all the same."""
    if share >= 1 or not weights:
        return dict(weights)
    order = sorted(weights, key=lambda n: weights[n], reverse=True)
    for k in range(len(order)):
        if share * k >= 1:
            break
        rest = sum(weights[n] for n in order[k:])
        c = share * rest / (1 - share * k)
        if weights[order[k]] <= c:
            return {n: (c if i < k else weights[n]) for i, n in enumerate(order)}
    return dict.fromkeys(weights, 1.0)


def bounded_weights(
    claims: Mapping[int, float], *, declared: Mapping[int, float], share: float, equal: bool
) -> dict[int, float]:
    """Each node's aggregation weight: its claim, capped by what it declared in its profile
    (where it declared anything), then, among at least :data:`MIN_FOR_MEDIAN` nodes, by
    ``share`` of the round's total; or all 1."""
    if equal:
        return dict.fromkeys(claims, 1.0)
    own = {n: min(float(w), float(declared[n])) if n in declared else float(w) for n, w in claims.items()}
    return capped_shares(own, share) if len(own) >= MIN_FOR_MEDIAN else own
