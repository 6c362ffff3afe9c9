"""Packed records (stamen/pack.py): exact round trips through Flower's object encoding,
objects that do not grow with the number of arrays, and every malformed pack refused."""

import json
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from stamen import pack as P


def over_the_wire(record: ArrayRecord) -> ArrayRecord:
    """What the receiving side holds: every object deflated to bytes and inflated back,
    as Flower moves them (one PushObject / PullObject each)."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}
    return inflate_object_from_contents(record.object_id, contents)


def objects(record: ArrayRecord) -> int:
    return len(get_all_nested_objects(record))


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == np.asarray(want[k]).dtype, k
        assert got[k].shape == np.asarray(want[k]).shape, k
        np.testing.assert_array_equal(got[k], want[k])


def test_round_trip_is_exact_for_mixed_dtypes_scalars_and_empty_arrays():
    rng = np.random.default_rng(0)
    arrays = {
        "q.lora_A": rng.normal(size=(2, 3)).astype(np.float32),
        "scalar": np.array(7.25, dtype=np.float64),  # 0-dim
        "empty": np.zeros((0,), dtype=np.float32),
        "empty.2d": np.zeros((3, 0), dtype=np.int64),
        "kept.rows": np.array([0, 2, 5], dtype=np.int64),
        "half": np.array([1.5, -2.0, np.inf], dtype=np.float16),
        "mask": np.array([True, False, True]),
        "bytes": np.arange(5, dtype=np.uint8),
        "q.lora_B": rng.normal(size=(4, 2)).astype(np.float32),
        "transposed": np.arange(6, dtype=np.int32).reshape(2, 3).T,  # not C-contiguous
    }
    assert_same(P.unpack(over_the_wire(P.pack(arrays))), arrays)


def test_very_many_small_arrays_round_trip_in_a_fixed_number_of_objects():
    rng = np.random.default_rng(1)
    many = {f"layer.{i}.lora_A": rng.normal(size=(2, 3)).astype(np.float32) for i in range(2000)}
    few = {"one": rng.normal(size=(2000 * 6,)).astype(np.float32)}  # the same bytes in one array
    assert_same(P.unpack(over_the_wire(P.pack(many))), many)
    # ArrayRecord + index Array + its chunk + float32 buffer Array + its chunk
    assert objects(P.pack(many)) == objects(P.pack(few)) == 5
    assert objects(ArrayRecord({k: Array(v) for k, v in many.items()})) == 1 + 2 * 2000  # Flower's own: 2 per array


def test_objects_grow_with_bytes_by_flowers_chunks_not_with_arrays():
    n = 3 * FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE // 4 + 1  # 3 chunks of float32 and 4 bytes
    big = np.random.default_rng(2).normal(size=n).astype(np.float32)  # distinct chunks (Flower dedupes equal ones)
    packed = P.pack({"big": big, "idx": np.arange(4, dtype=np.int64)})
    # record, index (+1 chunk), float32 buffer (+4 chunks), int64 buffer (+1 chunk)
    assert objects(packed) == 1 + 2 + 5 + 2


def test_unpacking_makes_read_only_views_of_the_received_buffer():
    record = over_the_wire(P.pack({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}))
    out = P.unpack(record)
    buffer = np.frombuffer(record[P.BUFFER_PREFIX + "float32"].data, dtype=np.uint8)
    assert all(np.shares_memory(v, buffer) for v in out.values())  # no copy
    assert not out["a"].flags.writeable  # a received update cannot be changed in place


def test_the_format_is_documented_json():
    index = json.loads(P.pack({"w": np.zeros((2, 2), np.float32), "i": np.arange(3)})[P.INDEX_KEY].data)
    assert index == {
        "format": "stamen-pack",
        "version": 1,
        "count": 2,
        "buffers": {"float32": 16, "int64": 24},
        "arrays": [["w", "float32", [2, 2], 0], ["i", "int64", [3], 0]],
    }


def test_arrays_that_cannot_be_packed_are_refused_at_the_sender():
    with pytest.raises(TypeError, match="complex"):
        P.pack({"z": np.ones(2, dtype=np.complex64)})
    with pytest.raises(TypeError, match="cannot be packed"):
        P.pack({"o": np.array([object()])})


def test_the_empty_record_is_the_empty_mapping():
    assert P.unpack(ArrayRecord()) == {}
    assert P.unpack(over_the_wire(P.pack({}))) == {}


# --- malformed packs: a node can send anything ------------------------------------------


def forged(entries, buffers: dict[str, bytes], *, count=None, version=1, sizes=None, extra=None) -> ArrayRecord:
    """A pack built by hand, as an attacker would."""
    sizes = {d: len(b) for d, b in buffers.items()} if sizes is None else sizes
    index = {"format": "stamen-pack", "version": version, "count": len(entries) if count is None else count, "buffers": sizes, "arrays": entries}
    body = json.dumps(index).encode()
    record = ArrayRecord()
    record[P.INDEX_KEY] = Array(dtype="uint8", shape=(len(body),), stype=P.INDEX_STYPE, data=body)
    for dtype, data in buffers.items():
        record[P.BUFFER_PREFIX + dtype] = Array(dtype=dtype, shape=(len(data) // P.DTYPES[dtype].itemsize,), stype=P.BUFFER_STYPE, data=data)
    for key, array in (extra or {}).items():
        record[key] = array
    return record


F32 = np.arange(4, dtype=np.float32).tobytes()  # 16 bytes: four float32

MALFORMED = {
    "offset out of range": (lambda: forged([["a", "float32", [4], 4]], {"float32": F32}), "out of range"),
    "overlapping spans": (lambda: forged([["a", "float32", [2], 0], ["b", "float32", [3], 4]], {"float32": F32}), "overlaps"),
    "unaligned span": (lambda: forged([["a", "float32", [1], 2]], {"float32": F32}), "not aligned"),
    "bytes no array owns": (lambda: forged([["a", "float32", [3], 0]], {"float32": F32}), "belong to no array"),
    "a gap between spans": (lambda: forged([["a", "float32", [1], 0], ["b", "float32", [2], 8]], {"float32": F32}), "bytes 4..8 .* belong to no array"),
    "wrong dtype": (lambda: forged([["a", "complex64", [2], 0]], {"float32": F32}), "has no buffer"),
    "buffer of a dtype not allowed": (lambda: forged([], {}, sizes={"object": 8}), "not one of"),
    "buffer array of another dtype": (
        lambda: forged([["a", "float32", [4], 0]], {"float32": F32},
                       extra={P.BUFFER_PREFIX + "float32": Array(dtype="int32", shape=(4,), stype=P.BUFFER_STYPE, data=F32)}),
        "expected 'stamen.pack' 'float32'",
    ),
    "index names the wrong count": (lambda: forged([["a", "float32", [4], 0]], {"float32": F32}, count=3), "count 3"),
    "truncated buffer": (lambda: forged([["a", "float32", [4], 0]], {"float32": F32[:12]}, sizes={"float32": 16}), "truncated"),
    "a name twice": (lambda: forged([["a", "float32", [2], 0], ["a", "float32", [2], 8]], {"float32": F32}), "twice"),
    "negative size in a shape": (lambda: forged([["a", "float32", [-4], 0]], {"float32": F32}), "shape"),
    "a key the index does not name": (
        lambda: forged([["a", "float32", [4], 0]], {"float32": F32}, extra={"sneaky": Array(np.ones(2))}),
        "does not name",
    ),
    "buffer missing": (lambda: forged([["a", "float32", [4], 0]], {}, sizes={"float32": 16}), "has none"),
    "index not JSON": (lambda: _with_index(b"\xff{not json"), "not JSON"),
    "unpacked arrays": (lambda: ArrayRecord({"a": Array(np.ones(2))}), "not a packed record"),
}


def _with_index(body: bytes) -> ArrayRecord:
    record = ArrayRecord()
    record[P.INDEX_KEY] = Array(dtype="uint8", shape=(len(body),), stype=P.INDEX_STYPE, data=body)
    return record


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_pack_is_refused_naming_the_problem(case):
    build, reason = MALFORMED[case]
    with pytest.raises(P.MalformedRecord, match=reason):
        P.unpack(over_the_wire(build()))


def test_the_hand_built_pack_is_well_formed_when_nothing_is_forged():
    """The helper above is honest: an unforged pack built with it unpacks."""
    out = P.unpack(over_the_wire(forged([["a", "float32", [2], 0], ["b", "float32", [2], 8]], {"float32": F32})))
    np.testing.assert_array_equal(out["b"], [2.0, 3.0])


def test_another_version_names_both_versions():
    with pytest.raises(P.MalformedRecord, match=r"version 2, this Stamen reads version 1"):
        P.unpack(forged([["a", "float32", [4], 0]], {"float32": F32}, version=2))


# --- a malformed pack in a reply: dropped, the node named, the round goes on -------------


def _reply(instruction, record: ArrayRecord, rank: int = 2):
    from flwr.app import Message, MetricRecord, RecordDict

    from stamen import keys

    metrics = MetricRecord({keys.NUM_EXAMPLES: 10, keys.TRAIN_LOSS: 1.0, keys.LORA_ALPHA: 4.0, keys.LORA_RANK: rank})
    return Message(RecordDict({keys.ARRAYS: record, keys.METRICS: metrics}), reply_to=instruction)


def _lora_global():
    return {"m.weight": np.zeros((3, 4), np.float32), "head.bias": np.zeros(2, np.float32)}


def _good_lora(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"m.lora_A": rng.normal(size=(2, 4)).astype(np.float32), "m.lora_B": rng.normal(size=(3, 2)).astype(np.float32), "head.bias": np.ones(2, np.float32)}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_flora_drops_a_malformed_pack_naming_the_node(case, flower_identity, fake_grid, caplog):
    import logging

    from strategies.flora import FLoRA

    s = FLoRA(node_ranks={7: 2, 8: 2}, default_rank=2, lora_alpha=4.0, min_nodes=1)
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, P.pack(_lora_global()), ConfigRecord(), fake_grid([7, 8]))}
    build, reason = MALFORMED[case]
    with caplog.at_level(logging.WARNING):
        new, metrics = s.aggregate_train(1, [_reply(msgs[7], over_the_wire(build())), _reply(msgs[8], P.pack(_good_lora(1)))])
    assert metrics["num-clients"] == 1 and s.rounds[-1].dropped.keys() == {7}
    assert "dropping node 7 from round 1: invalid update: malformed pack" in caplog.text
    assert re.search(reason, s.rounds[-1].dropped[7])
    assert P.unpack(new)["m.weight"].any()  # node 8's update was aggregated


def test_central_dp_drops_a_malformed_pack_naming_the_node(flower_identity, fake_grid, caplog):
    import logging

    from flwr.app import ConfigRecord

    from strategies.central_dp import CentralDP
    from strategies.flora import FLoRA

    inner = FLoRA(node_ranks={7: 2, 8: 2}, default_rank=2, lora_alpha=4.0, min_nodes=1)
    dp = CentralDP(inner, noise_multiplier=1e-12, clipping_norm=1.0, delta=1e-5)
    msgs = {m.metadata.dst_node_id: m for m in dp.configure_train(1, P.pack(_lora_global()), ConfigRecord(), fake_grid([7, 8]))}
    build, _ = MALFORMED["overlapping spans"]
    with caplog.at_level(logging.WARNING):
        _, metrics = dp.aggregate_train(1, [_reply(msgs[7], build()), _reply(msgs[8], P.pack(_good_lora(1)))])
    assert metrics["num-clients"] == 1 and "overlaps" in inner.rounds[-1].dropped[7]
    assert "node 7" in caplog.text


def test_an_early_exit_strategy_drops_a_malformed_pack_naming_the_node(flower_identity, fake_grid, caplog):
    import logging

    from flwr.app import ConfigRecord

    from strategies import ReeFL

    s = ReeFL(node_exits={7: 1, 8: 1}, num_exits=1, required_exits={"emb": 1}, distill_weight=1.0, distill_rampup_rounds=1)
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, P.pack({"emb": np.zeros(2, np.float32)}), ConfigRecord(), fake_grid([7, 8]))}
    build, _ = MALFORMED["truncated buffer"]
    with caplog.at_level(logging.WARNING):
        new, metrics = s.aggregate_train(1, [_reply(msgs[7], build()), _reply(msgs[8], P.pack({"emb": np.ones(2, np.float32)}))])
    assert metrics["num-clients"] == 1 and "truncated" in s.rounds[-1].dropped[7]
    assert "node 7" in caplog.text
    np.testing.assert_array_equal(P.unpack(new)["emb"], [1.0, 1.0])


def test_a_received_view_loads_into_torch_without_a_copy_or_a_warning():
    import warnings

    from ml.tensors import source_tensor

    view = P.unpack(over_the_wire(P.pack({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})))["w"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns about read-only arrays; these are only read
        tensor = source_tensor(view)
    assert tensor.data_ptr() == view.ctypes.data and tensor.shape == (2, 3)
