"""Tensors over received arrays, to copy from.

Arrays that arrive in a message are read-only views of its buffer (stamen/pack.py:
unpacking makes no copy). ``torch.from_numpy`` of a read-only array warns, because torch
cannot stop writes through the tensor. Where a tensor is only read from, to fill a
parameter (``copy_``, ``load_state_dict``), that warning is noise, and copying the array
first would cost a copy of the whole model per message."""

from __future__ import annotations

import warnings

import numpy as np
import torch


def source_tensor(value: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``value``'s memory; only ever read from it."""
    value = np.asarray(value)
    if value.flags.writeable:
        return torch.from_numpy(value)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(value)
