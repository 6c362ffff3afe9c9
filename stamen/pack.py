"""Packed records: a message's arrays in a handful of Flower objects, not one per array.

Flower 1.39 moves every ``Array`` of an ``ArrayRecord`` as its own object, and every
object as its own PushObject / PullObject RPC, two at a time. A SmolLM2 LoRA update has
about 240 arrays, so a transfer cost about 120 sequential round trips before its bytes
mattered (docs/transfers.md). A packed record holds the same arrays as:

``stamen.pack``
    the index: an ``Array`` of stype ``stamen.pack-index``, its data UTF-8 JSON::

        {"format": "stamen-pack", "version": 1, "count": N,
         "buffers": {"float32": <bytes>, "int64": <bytes>, ...},
         "arrays": [[name, dtype, shape, offset], ...]}

    ``offset`` is in bytes from the start of that dtype's buffer.
``stamen.pack.<dtype>``
    one contiguous buffer per dtype (``Array`` of stype ``stamen.pack``, dtype ``<dtype>``,
    shape ``(elements,)``): the arrays of that dtype, C order, little-endian, one after
    another in index order. Flower cuts each buffer into ``ArrayChunk`` objects of
    ``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`` (5 MiB) itself.

So a record costs ``3 + sum over dtypes (1 + ceil(bytes / 5 MiB))`` objects, whatever the
number of arrays. Packing copies each array once (into its buffer); unpacking makes no
copy: every array is a read-only ``numpy.frombuffer`` view of the buffer Flower received.

Unpacking trusts nothing: a malformed pack (unknown version or dtype, a span out of
range, overlapping, unaligned or leaving bytes unaccounted for, a count that disagrees,
a truncated buffer, names twice) raises :class:`MalformedRecord` naming what is wrong.
Shapes, finiteness and bounds of each array are the caller's checks, on the unpacked
arrays (strategies/lora_records.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

FORMAT = "stamen-pack"
VERSION = 1
INDEX_KEY = "stamen.pack"
BUFFER_PREFIX = "stamen.pack."
INDEX_STYPE = "stamen.pack-index"
BUFFER_STYPE = "stamen.pack"
# The dtypes a pack may carry, each stored little-endian. Nothing else: no objects, no
# strings, no structured or datetime dtypes (np.frombuffer of those is not plain data).
DTYPES = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64")
}
MAX_NDIM = 32
MAX_INDEX_BYTES = 64 * 2**20  # 64 MiB of JSON: about a million arrays


class MalformedRecord(ValueError):
    """A record that cannot be unpacked; the message says why."""


def pack(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``{name: array}`` -> a packed ``ArrayRecord`` (see the module docstring)."""
    groups: dict[str, list[np.ndarray]] = {}
    entries, sizes = [], {}
    for name, value in arrays.items():
        value = np.asarray(value)
        dtype = _dtype_name(value.dtype, name)
        value = np.asarray(value, dtype=DTYPES[dtype], order="C")  # ascontiguousarray would make a 0-dim array 1-dim
        offset = sizes.get(dtype, 0)
        entries.append([str(name), dtype, list(value.shape), offset])
        sizes[dtype] = offset + value.nbytes
        groups.setdefault(dtype, []).append(value.reshape(-1).view(np.uint8))
    index = {"format": FORMAT, "version": VERSION, "count": len(entries), "buffers": sizes, "arrays": entries}
    body = json.dumps(index, separators=(",", ":")).encode("utf-8")
    record = ArrayRecord()
    record[INDEX_KEY] = Array(dtype="uint8", shape=(len(body),), stype=INDEX_STYPE, data=body)
    for dtype, parts in groups.items():
        data = b"".join(parts)  # the one copy: each array into its dtype's buffer
        record[BUFFER_PREFIX + dtype] = Array(
            dtype=dtype, shape=(len(data) // DTYPES[dtype].itemsize,), stype=BUFFER_STYPE, data=data
        )
    return record


def unpack(record: ArrayRecord) -> dict[str, np.ndarray]:
    """A packed ``ArrayRecord`` -> ``{name: read-only array view}``; raises
    :class:`MalformedRecord` for anything but a well-formed pack of this version.
    An empty record (no index, no arrays) is an empty mapping."""
    if len(record) == 0:
        return {}
    if INDEX_KEY not in record:
        raise MalformedRecord(
            f"not a packed record (no '{INDEX_KEY}' index; keys {_some(list(record.keys()))}): the peer sends "
            f"unpacked arrays, this Stamen reads pack format version {VERSION}"
        )
    index = _read_index(record[INDEX_KEY])
    buffers = {dtype: _read_buffer(record, dtype, size) for dtype, size in index["buffers"].items()}
    extra = sorted(set(record.keys()) - {INDEX_KEY} - {BUFFER_PREFIX + d for d in buffers})
    if extra:
        raise MalformedRecord(f"keys the index does not name: {_some(extra)}")

    out: dict[str, np.ndarray] = {}
    spans: dict[str, list[tuple[int, int, str]]] = {d: [] for d in buffers}
    for entry in index["arrays"]:
        name, dtype, shape, offset = _read_entry(entry, buffers)
        if name in out:
            raise MalformedRecord(f"{name!r} is in the index twice")
        itemsize = DTYPES[dtype].itemsize
        count = math.prod(shape)
        end = offset + count * itemsize
        if offset % itemsize:
            raise MalformedRecord(f"{name!r}: offset {offset} is not aligned to {dtype} ({itemsize} bytes)")
        if end > len(buffers[dtype]):
            raise MalformedRecord(
                f"{name!r}: bytes {offset}..{end} are out of range of the {dtype} buffer ({len(buffers[dtype])} bytes)"
            )
        spans[dtype].append((offset, end, name))
        out[name] = np.frombuffer(buffers[dtype], dtype=DTYPES[dtype], count=count, offset=offset).reshape(shape)
    for dtype, taken in spans.items():
        _check_tiling(dtype, sorted(taken), len(buffers[dtype]))
    return out


def _read_index(array: Array) -> dict:
    if array.stype != INDEX_STYPE:
        raise MalformedRecord(f"the index has stype {array.stype!r}, expected {INDEX_STYPE!r}")
    if len(array.data) > MAX_INDEX_BYTES:
        raise MalformedRecord(f"the index is {len(array.data)} bytes, more than {MAX_INDEX_BYTES}")
    try:
        index = json.loads(bytes(array.data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise MalformedRecord(f"the index is not JSON: {err}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise MalformedRecord(f"the index is not a {FORMAT} index")
    version = index.get("version")
    if version != VERSION:
        raise MalformedRecord(f"the peer sends pack format version {version!r}, this Stamen reads version {VERSION}")
    if set(index) != {"format", "version", "count", "buffers", "arrays"}:
        raise MalformedRecord(f"index fields {sorted(index)}, expected count, buffers and arrays")
    buffers, entries, count = index["buffers"], index["arrays"], index["count"]
    if not isinstance(buffers, dict) or not isinstance(entries, list):
        raise MalformedRecord("index 'buffers' must be an object and 'arrays' a list")
    if not _is_int(count) or count != len(entries):
        raise MalformedRecord(f"the index names count {count!r} but lists {len(entries)} arrays")
    for dtype, size in buffers.items():
        if dtype not in DTYPES:
            raise MalformedRecord(f"buffer dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if not _is_int(size) or size < 0 or size % DTYPES[dtype].itemsize:
            raise MalformedRecord(f"buffer {dtype}: size {size!r} is not a whole number of {dtype} elements")
    return index


def _read_buffer(record: ArrayRecord, dtype: str, size: int) -> bytes:
    key = BUFFER_PREFIX + dtype
    if key not in record:
        raise MalformedRecord(f"the index names a {dtype} buffer of {size} bytes; the record has none")
    array = record[key]
    if array.stype != BUFFER_STYPE or array.dtype != dtype:
        raise MalformedRecord(f"{key}: stype {array.stype!r} dtype {array.dtype!r}, expected {BUFFER_STYPE!r} {dtype!r}")
    if len(array.data) != size:
        what = "truncated" if len(array.data) < size else "longer than its index"
        raise MalformedRecord(f"{key} is {what}: {len(array.data)} bytes, the index says {size}")
    if tuple(array.shape) != (size // DTYPES[dtype].itemsize,):
        raise MalformedRecord(f"{key}: shape {tuple(array.shape)} disagrees with its {size} bytes")
    return array.data


def _read_entry(entry, buffers: Mapping[str, bytes]) -> tuple[str, str, tuple[int, ...], int]:
    if not (isinstance(entry, list) and len(entry) == 4):
        raise MalformedRecord(f"index entry {_short(entry)}: expected [name, dtype, shape, offset]")
    name, dtype, shape, offset = entry
    if not isinstance(name, str) or not name:
        raise MalformedRecord(f"index entry {_short(entry)}: the name must be a non-empty string")
    if dtype not in buffers:
        raise MalformedRecord(f"{name!r}: dtype {dtype!r} has no buffer (buffers: {', '.join(buffers) or 'none'})")
    if not (isinstance(shape, list) and len(shape) <= MAX_NDIM and all(_is_int(d) and d >= 0 for d in shape)):
        raise MalformedRecord(f"{name!r}: shape {_short(shape)} is not a list of at most {MAX_NDIM} sizes >= 0")
    if not _is_int(offset) or offset < 0:
        raise MalformedRecord(f"{name!r}: offset {offset!r} is not a byte offset >= 0")
    return name, dtype, tuple(shape), offset


def _check_tiling(dtype: str, spans: list[tuple[int, int, str]], size: int) -> None:
    """The spans of one buffer, in offset order, must cover it exactly once."""
    position, previous = 0, None
    for start, end, name in spans:
        if start < position:
            raise MalformedRecord(f"{name!r} overlaps {previous!r} in the {dtype} buffer (bytes {start}..{end}, {previous!r} ends at {position})")
        if start > position:
            raise MalformedRecord(f"bytes {position}..{start} of the {dtype} buffer belong to no array")
        position, previous = end, name
    if position != size:
        raise MalformedRecord(f"bytes {position}..{size} of the {dtype} buffer belong to no array")


def _dtype_name(dtype: np.dtype, name: str) -> str:
    for key, allowed in DTYPES.items():
        if dtype.kind == allowed.kind and dtype.itemsize == allowed.itemsize:
            return key
    raise TypeError(f"{name!r}: dtype {dtype} cannot be packed (packs carry {', '.join(DTYPES)})")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _some(names: list[str]) -> str:
    return ", ".join(map(repr, names[:3])) + (" ..." if len(names) > 3 else "")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
