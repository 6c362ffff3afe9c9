"""Central differential privacy for the LoRA strategies whose aggregate is an average of
per-node updates (``dp.mode = "central"``): a wrapper by composition, after Flower's
``DifferentialPrivacyServerSideFixedClipping`` (McMahan et al., 2018), with the clipping
done where the wrapped strategy averages.

Flower's wrapper clips ``reply arrays - sent arrays`` position by position. A Stamen
node does not send back what it received (it receives dense weights and replies with
LoRA factors), so that difference is not defined here. Instead, a node's update is:

* ``product`` space (FLoRA, whose aggregate is the mean of the nodes' ``s_k B_k A_k``):
  the products ``s_k B_k A_k`` of every adapted matrix and the head's change. Clipped by
  scaling ``B_k`` and the head's change by ``min(1, C / norm)``, which scales the product
  exactly.
* ``factors`` space (FedIT, whose aggregate is the mean of the factors): ``A_k - A``,
  ``B_k - B`` (the adapter the node was sent) and the head's change, clipped as one vector.
* ``product-change`` space (FlexLoRA, whose aggregate is the mean of the nodes' products
  before an SVD, and whose nodes start from a truncation ``s_k B0_k A0_k`` of the previous
  delta): ``s_k B_k A_k - s_k B0_k A0_k`` per adapted matrix and the head's change. The
  clipped change is not a rank-r_k product, so the wrapper clips the head and hands the
  clip factors to the strategy (``clip_updates``), which applies them to the dense sum.

Then every node weighs the same (``num-examples`` is set to 1: with example-weighted
means one node's influence is not bounded by ``C / m``), and the mean has a fixed
denominator: the round's cohort size m, the number of nodes it asked, set before any
reply. A cohort node whose reply is missing, late, invalid or unclippable counts as
sending no change (``LoRAStrategy.zero_update``: what it was sent), so the release is

    base + (1/m) sum_{k replied} clip(u_k)       (base: what the round starts from)

The neighbouring relation is add/remove of one node's update within the cohort (a node
that sends anything, or nothing, moves the release by at most C / m), which is the one
McMahan et al. use with their fixed-denominator estimator. Dividing by the number of
replies instead would give C / n only under replace-one; under add/remove it is about
2C / (n + 1). The strategy adds Gaussian noise of standard deviation ``z C / m``
(Flower's ``compute_stdv``) to what the round releases (:meth:`LoRAStrategy.noise_release`),
also in a round where no reply came. The guarantee is per node (all of its data), for
the released global models, with m public; the accountant is Opacus's RDP with no
amplification by sampling (rate 1), composed over rounds.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord
from flwr.app.message import make_message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log
from flwr.supercore.differential_privacy import compute_stdv

from stamen import keys

from .bounds import lora_change, norm_of
from .lora_records import from_record, init_factors, split_global, to_record


def clip_factor(norm: float, clipping_norm: float) -> float:
    """The scale that brings an update of ``norm`` within ``clipping_norm``."""
    return 1.0 if norm <= clipping_norm else clipping_norm / norm


def _factors(arrays: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    modules = (k.removesuffix(keys.LORA_A) for k in arrays if k.endswith(keys.LORA_A))
    return {m: (arrays[m + keys.LORA_A], arrays[m + keys.LORA_B]) for m in modules}


def product_update(arrays: dict[str, np.ndarray], scaling: float, head_now: dict[str, np.ndarray]) -> list[np.ndarray]:
    """A product-space update: ``s B A`` per adapted matrix, and the head's change."""
    return lora_change(_factors(arrays), scaling, {}, arrays, head_now)


def factor_update(arrays: dict[str, np.ndarray], sent: dict[str, np.ndarray], head_now: dict[str, np.ndarray]) -> list[np.ndarray]:
    """A factor-space update: each factor minus the one the node was sent, and the head's change."""
    out = [arrays[k.removeprefix(keys.INIT_PREFIX)] - v for k, v in sorted(sent.items())]
    return out + [arrays[k] - head_now[k] for k in sorted(head_now)]


def product_change(
    arrays: dict[str, np.ndarray], sent: dict[str, np.ndarray], scaling: float, head_now: dict[str, np.ndarray]
) -> list[np.ndarray]:
    """A product-change update: ``s B A - s B0 A0`` per adapted matrix (``B0, A0`` the
    adapter the node was sent; none: a fresh LoRA, product 0), and the head's change."""
    return lora_change(_factors(arrays), scaling, init_factors(sent), arrays, head_now)


def clip_reply(
    arrays: dict[str, np.ndarray],
    *,
    space: str,
    scaling: float,
    head_now: dict[str, np.ndarray],
    sent: dict[str, np.ndarray],
    clipping_norm: float,
) -> tuple[dict[str, np.ndarray], float]:
    """The reply's arrays with its update clipped to ``clipping_norm`` in ``space``; and
    the update's norm before clipping. In ``product-change`` space only the head is
    clipped here: the strategy scales the factors' change (``clip_updates``)."""
    if space == "product":
        norm = norm_of(product_update(arrays, scaling, head_now))
    elif space == "factors":
        norm = norm_of(factor_update(arrays, sent, head_now))
    elif space == "product-change":
        norm = norm_of(product_change(arrays, sent, scaling, head_now))
    else:
        raise ValueError(f"unknown central-DP space {space!r}")
    c = clip_factor(norm, clipping_norm)
    out = dict(arrays)
    for k in head_now:
        out[k] = (head_now[k] + c * (arrays[k] - head_now[k])).astype(arrays[k].dtype)
    if space == "product":
        for k in arrays:
            if k.endswith(keys.LORA_B):
                out[k] = (c * arrays[k]).astype(arrays[k].dtype)
    elif space == "factors":
        for k, start in sent.items():
            name = k.removeprefix(keys.INIT_PREFIX)
            out[name] = (start + c * (arrays[name] - start)).astype(arrays[name].dtype)
    return out, norm


class CentralDP(Strategy):
    """Wraps a LoRA strategy with ``central_dp_space`` set (FLoRA, FedIT, FlexLoRA): clips
    each node's update, weighs nodes equally, and has the strategy noise what it releases."""

    def __init__(self, strategy, *, noise_multiplier: float, clipping_norm: float, delta: float) -> None:
        super().__init__()
        space = getattr(strategy, "central_dp_space", None)
        if space is None:
            raise ValueError(f"{type(strategy).__name__} does not support central DP (its aggregate is not an average of node updates)")
        if noise_multiplier <= 0 or clipping_norm <= 0:
            raise ValueError("central DP needs a positive noise multiplier and clipping norm")
        self.strategy, self.space = strategy, space
        strategy.absent_as_zero = True  # the mean's denominator is the cohort's size (module docstring)
        strategy.relative_bound = False  # the median rule would couple the nodes' treatment (strategies/bounds.py)
        self.noise_multiplier, self.clipping_norm, self.delta = noise_multiplier, clipping_norm, delta
        # The noise comes from the OS's entropy, never from a configured seed: every node
        # holds the run config, and with z, C and n public, a seeded generator would let
        # any of them regenerate the noise and subtract it.
        self.rng = np.random.default_rng(secrets.randbits(128))
        self._head_now: dict[str, np.ndarray] = {}
        self._sent: dict[int, dict[str, np.ndarray]] = {}
        self.releases = 0

    def __getattr__(self, name):  # rounds, privacy_log, attach_run, finish, ...: the wrapped strategy's
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def state_dict(self) -> dict:
        """The wrapped strategy's state and the accountant's: the releases so far. Not the
        noise generator's: a resumed run draws its noise from the OS's entropy again."""
        return {"strategy": self.strategy.state_dict(), "releases": self.releases}

    def load_state_dict(self, state, node) -> None:
        self.strategy.load_state_dict(state["strategy"], node)
        self.releases = int(state["releases"])  # epsilon continues from what was released

    def summary(self) -> None:
        log(INFO, "\t├──> central DP (%s space): noise multiplier %s, clipping norm %s", self.space, self.noise_multiplier, self.clipping_norm)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        _, self._head_now = split_global(from_record(arrays))
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._sent = {
            m.metadata.dst_node_id: {
                k: v for k, v in from_record(m.content.array_records[keys.ARRAYS]).items() if k.startswith(keys.INIT_PREFIX)
            }
            for m in messages
        }
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        # a cohort node without a clipped reply counts as sending no change (absent_as_zero)
        norms, scales = [], dict.fromkeys(self._sent, 1.0)
        for i, msg in enumerate(replies):
            if msg.has_error() or keys.ARRAYS not in msg.content.array_records or keys.METRICS not in msg.content.metric_records:
                continue  # the wrapped strategy drops it with its reason
            metrics = msg.content.metric_records[keys.METRICS]
            sent = self._sent.get(msg.metadata.src_node_id, {})
            try:
                # the scaling the strategy aggregates with: from the assigned rank and the
                # factors' shapes, never from what the reply says about itself alone
                update, _ = self.strategy.parse(msg.metadata.src_node_id, msg.content)  # InvalidUpdate: ValueError
                arrays = from_record(msg.content.array_records[keys.ARRAYS])
                scaling = update.scaling
                clipped, norm = clip_reply(
                    arrays, space=self.space, scaling=scaling, head_now=self._head_now, sent=sent, clipping_norm=self.clipping_norm
                )
            except (KeyError, ValueError) as err:  # an update that is not clipped must not be aggregated
                log(WARNING, "central DP: cannot clip node %d's reply (%s); it is dropped", msg.metadata.src_node_id, err)
                replies[i] = self._unclippable(msg, err)
                continue
            norms.append(norm)
            scales[msg.metadata.src_node_id] = clip_factor(norm, self.clipping_norm)
            msg.content[keys.ARRAYS] = to_record(clipped)
            metrics[keys.NUM_EXAMPLES] = 1  # every node weighs the same
        if self.space == "product-change":
            self.strategy.clip_updates(scales)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        n, m = int(metrics["num-clients"]), len(self._sent)
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, m)  # sensitivity C / m: the denominator is m
        noised = self.strategy.noise_release(from_record(arrays), lambda a: a + self.rng.normal(0.0, std, a.shape).astype(a.dtype))
        self.releases += 1
        epsilon = self.epsilon()
        log(
            INFO,
            "central DP round %d: %d of %d updates clipped to %.3g (norms %s), mean over %d, noise std %.3g, epsilon %.3f (delta %g)",
            server_round, n, m, self.clipping_norm, " ".join(f"{x:.3g}" for x in norms), m, std, epsilon, self.delta,
        )
        self.strategy.privacy_log.append(
            {"round": server_round, "node_id": "all", "epsilon": epsilon, "delta": self.delta,
             "noise_multiplier": self.noise_multiplier, "sample_rate": 1.0, "steps": self.releases, "status": "central"}
        )
        metrics[keys.DP_EPSILON] = epsilon
        return to_record(noised), metrics

    @staticmethod
    def _unclippable(msg: Message, err: Exception) -> Message:
        """An error reply in place of ``msg`` (its metadata, no content): the wrapped
        strategy drops the node with this reason."""
        return make_message(msg.metadata, error=Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"central DP cannot clip this update ({err!r})"))

    def epsilon(self) -> float:
        """Epsilon after the releases so far: Gaussian mechanism, no amplification."""
        from ml.privacy import Ledger

        return Ledger([(self.noise_multiplier, 1.0, self.releases)]).epsilon(self.delta)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, replies)
