"""FlexLoRA: heterogeneous LoRA by SVD redistribution (Bai et al., NeurIPS 2024).

The server forms each adapted matrix's full weight delta from all clients,

    dW = sum_k p_k s_k B_k A_k          (p_k = n_k / sum_j n_j, s_k = alpha / r_k)

takes its SVD dW = U S V^T once per round, and sends node k the best rank-r_k
approximation, split evenly between the factors (the square root of the singular values
on each side) and divided by the node's own scaling, so that the node's LoRA computes
exactly that truncation:

    B_k = U[:, :r_k] sqrt(S[:r_k]) / sqrt(s_k),   A_k = sqrt(S[:r_k]) V^T[:r_k] / sqrt(s_k)
    s_k B_k A_k = U_r S_r V_r^T

The sqrt split keeps both factors at the same scale (neither starts near zero nor
explodes), which is what the next round of local training needs. Clients train on top
of the frozen W0 starting from the truncation they received, so each client's product
already holds the global state it started from: the new global delta is the weighted
mean of the clients' products, not a sum over rounds. The global model is W0 + dW.

Under central DP (strategies/central_dp.py) a node's product is not its update: it holds
the truncation T_k = s_k B0_k A0_k it was sent. Clipping the product would cap the global
delta itself at the clipping norm. So the wrapper clips the change ``s_k B_k A_k - T_k``
(and the head's) to norm C, and the delta is

    dW = (1/m) sum_{k in cohort} [ T_k + c_k (s_k B_k A_k - T_k) ]     (c_k = min(1, C / norm_k))

over all m nodes the round asked: one that sent nothing valid counts as T_k (no change).
T_k depends only on the previous, already released delta and the node's rank, so it
costs no privacy, and whether a node replies moves dW by at most C / m. The noise goes into the dense dW, before the SVD: every truncation the
nodes receive next is post-processing of the noised sum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .adapter import AdapterStrategy
from .lora_records import ClientLoRA, Factors, split_global


def full_delta(updates: Sequence[ClientLoRA]) -> dict[str, np.ndarray]:
    """sum_k p_k s_k B_k A_k per module."""
    if not updates:
        raise ValueError("full_delta needs at least one client update")
    total = float(sum(u.num_examples for u in updates))
    if total <= 0:
        raise ValueError("full_delta: the clients' num_examples sum to zero")
    out: dict[str, np.ndarray] = {}
    for k, u in enumerate(updates):
        for module, (a, b) in u.factors.items():
            term = (u.num_examples / total) * u.scaling * (b.astype(np.float64) @ a.astype(np.float64))
            if module in out and out[module].shape != term.shape:
                raise ValueError(f"client {k}, {module}: delta {term.shape} differs from {out[module].shape}")
            out[module] = out.get(module, 0.0) + term
    return out


def clipped_delta(
    updates: Sequence[ClientLoRA], starts: Mapping[int, Factors], scales: Mapping[int, float]
) -> dict[str, np.ndarray]:
    """mean_k [T_k + c_k (s_k B_k A_k - T_k)] per module, every node weighing the same:
    ``starts[node]`` are the factors node k was sent (T_k = s_k B0 A0; none: T_k = 0, a
    fresh LoRA) and ``scales[node]`` its clip factor c_k."""
    if not updates:
        raise ValueError("clipped_delta needs at least one client update")
    out: dict[str, np.ndarray] = {}
    for u in updates:
        c = float(scales[u.node_id])
        start = starts.get(u.node_id, {})
        for module, (a, b) in u.factors.items():
            product = u.scaling * (b.astype(np.float64) @ a.astype(np.float64))
            if module in start:
                a0, b0 = start[module]
                sent = u.scaling * (b0.astype(np.float64) @ a0.astype(np.float64))
                term = sent + c * (product - sent)
            else:
                term = c * product
            out[module] = out.get(module, 0.0) + term / len(updates)
    return out


def svd_factors(delta: np.ndarray, rank: int, scaling: float, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A (r, in), B (out, r), singular values) with scaling * B @ A = the best rank-r
    approximation of ``delta``."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if scaling <= 0:
        raise ValueError(f"scaling must be > 0, got {scaling}")
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    a, b = factors_from_svd(u, s, vt, rank, scaling, rng)
    return a, b, s


def redistribute(
    delta: dict[str, np.ndarray], rank: int, scaling: float, dtype=np.float32, rng: np.random.Generator | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every module's rank-``rank`` factors for a node with LoRA scaling ``scaling``."""
    out = {}
    for module, d in delta.items():
        a, b, _ = svd_factors(d, rank, scaling, rng)
        out[module] = (a.astype(dtype), b.astype(dtype))
    return out


def low_rank_svd(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The thin SVD of B @ A (B: out x R, A: R x in) without forming it when R is small:
    B = Q_b R_b and A^T = Q_a R_a (QR), then the R x R core R_b R_a^T = U_c S V_c^T gives
    B A = (Q_b U_c) S (Q_a V_c)^T exactly. O((out + in) R^2 + R^3) instead of O(out in min(out, in))."""
    qb, rb = np.linalg.qr(b)
    qa, ra = np.linalg.qr(a.T)
    uc, s, vct = np.linalg.svd(rb @ ra.T)
    return qb @ uc, s, vct @ qa.T


def factors_from_svd(
    u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int, scaling: float, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``rank`` factors of a decomposition already taken, with scaling * B @ A = U_r S_r V_r^T.

    The delta may hold fewer than ``rank`` components: a round whose participants' ranks
    sum to less than this node's, or a rank-deficient delta. Split as above, the missing
    components would be zero in both A and B, so their gradients would be zero and they
    would never train. They start as a fresh LoRA does instead, as peft initialises one:
    A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0. The product is unchanged, since B's columns
    are zero."""
    tol = (s.max() if s.size else 0.0) * max(u.shape[0], vt.shape[1]) * np.finfo(np.float64).eps  # numpy's matrix_rank
    r = min(rank, int(np.sum(s > tol)))
    root = np.sqrt(s[:r]) / np.sqrt(scaling)
    a, b = root[:, None] * vt[:r], u[:, :r] * root[None, :]
    if r < rank:
        rng = rng if rng is not None else np.random.default_rng(0)
        bound = 1.0 / np.sqrt(vt.shape[1])
        a = np.concatenate([a, rng.uniform(-bound, bound, size=(rank - r, vt.shape[1]))])
        b = np.pad(b, ((0, 0), (0, rank - r)))
    return a, b


def exact_factors(delta: Mapping[str, np.ndarray], dtype=np.float32) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Factors with ``B @ A = delta`` per module, of one rank for all modules: the largest
    numerical rank among them (a module of lower rank gets zero components). The global
    model as an adapter on W0, for ``stamen export --format adapter``."""
    svds = {m: np.linalg.svd(d.astype(np.float64), full_matrices=False) for m, d in delta.items()}
    eps = np.finfo(np.float64).eps
    rank = max((int(np.sum(s > s.max() * max(u.shape[0], vt.shape[1]) * eps)) for u, s, vt in svds.values() if s.size and s.max() > 0), default=1)
    out = {}
    for m, (u, s, vt) in svds.items():
        root = np.sqrt(s[:rank])
        out[m] = ((root[:, None] * vt[:rank]).astype(dtype), (u[:, :rank] * root[None, :]).astype(dtype))
    return out


class FlexLoRA(AdapterStrategy):
    """Aggregate the full delta; each node starts from its rank's SVD truncation of it."""

    central_dp_space = "product-change"  # the change of s B A from the truncation sent (module docstring)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.global_delta: dict[str, np.ndarray] = {}
        # one SVD per module and round; None: not taken yet (central DP: of the noised delta)
        self._svd: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = {}
        self._clip_scales: dict[int, float] | None = None  # central DP: this round's c_k
        self._combined = 0  # rounds aggregated so far

    def initial_factors(self, node_id: int) -> Factors | None:
        if not self.global_delta:  # round 1: nothing to redistribute; a fresh LoRA (B = 0) trains
            return None
        if self._svd is None:
            self._svd = {m: np.linalg.svd(d, full_matrices=False) for m, d in self.global_delta.items()}
        rank = self.rank_of(node_id)
        scaling = self.lora_alpha / rank
        rng = np.random.default_rng([self.seed, node_id % 2**32, self._combined])  # fresh components, the same all round
        out = {}
        for m, (u, s, vt) in sorted(self._svd.items()):
            a, b = factors_from_svd(u, s, vt, rank, scaling, rng)
            out[m] = (a.astype(np.float32), b.astype(np.float32))
        return out

    def clip_updates(self, scales: Mapping[int, float]) -> None:
        """Central DP: the next :meth:`combine` scales node k's change by ``scales[k]``."""
        self._clip_scales = dict(scales)

    def combine(self, updates: list[ClientLoRA]) -> None:
        from .flora import stack_lora

        if self._clip_scales is not None:  # central DP: a dense mean of clipped changes
            starts = {u.node_id: self.initial_factors(u.node_id) or {} for u in updates}  # what each was sent
            self.global_delta = clipped_delta(updates, starts, self._clip_scales)
            self._svd, self._clip_scales = None, None  # the SVD: when first needed, of the released (noised) delta
            self._combined += 1
            return

        # dW = B_stack A_stack (FLoRA's stack is exactly sum_k p_k s_k B_k A_k); its SVD from
        # the factors when the summed rank is below the matrix size, else from dW itself
        stacked = stack_lora(updates)
        self.global_delta, self._svd = {}, {}
        for m, (a, b) in stacked.items():
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            self.global_delta[m] = b64 @ a64
            if a.shape[0] < min(b.shape[0], a.shape[1]):
                self._svd[m] = low_rank_svd(b64, a64)
            else:
                self._svd[m] = np.linalg.svd(self.global_delta[m], full_matrices=False)
        self._combined += 1

    def delta(self) -> dict[str, np.ndarray]:
        return self.global_delta

    def global_adapter(self):
        return exact_factors(self.global_delta) if self.global_delta else None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "global_delta": self.global_delta, "svd": self._svd, "combined": self._combined}

    def load_state_dict(self, state, node) -> None:
        """The SVD comes back as taken (recomputing it could flip its vectors' signs, and
        with them the factors every node starts from)."""
        super().load_state_dict(state, node)
        self.global_delta, self._svd, self._combined = state["global_delta"], state["svd"], int(state["combined"])

    def noise_release(self, new_global: dict[str, np.ndarray], noise) -> dict[str, np.ndarray]:
        """Noise the dense delta before its SVD (every truncation sent next round is then
        post-processing) and the head; the weights the server keeps are W0 + noised dW."""
        self.global_delta = {m: noise(d) for m, d in self.global_delta.items()}
        self._svd = None
        _, head = split_global(new_global)
        return self.global_arrays({k: noise(v) for k, v in head.items()})
