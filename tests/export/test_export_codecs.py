"""Format version 2's per-filter ternary (``tf``) and codebook (``cb``) records."""

import math

import chex
import ml_dtypes
import numpy as np
import pytest

from ec2t_jax._src.export import codebook_coding
from ec2t_jax._src.export import context_coding
from ec2t_jax._src.export import container
from ec2t_jax._src.export import leaf_parts
from ec2t_jax._src.export.record_codecs import filter_ternary

from tests.export.test_export_hostile import FUZZ_MAX_BYTES, _assert_error, _bounded, one_leaf


def _assert_bitwise(out, x):
  assert (out.dtype, out.shape, out.tobytes()) == (x.dtype, x.shape, x.tobytes())


def _per_filter(rng, shape, axis=-1, dtype=np.float32, symmetric=True, dead=0, zero=0.0):
  """Random per-filter ternary grid: filter f along ``axis`` holds {-n_f, zero, p_f}."""
  a = rng.choice([-1, 0, 1], size=shape, p=(0.3, 0.4, 0.3))
  filters = shape[axis]
  p = rng.uniform(0.01, 0.5, filters)
  n = p if symmetric else rng.uniform(0.01, 0.5, filters)
  along = [1] * len(shape)
  along[axis] = filters
  if dead:
    a = np.moveaxis(a, axis, -1).copy()
    a[..., :dead] = 0
    a = np.moveaxis(a, -1, axis)
  p, n = p.astype(dtype).reshape(along), n.astype(dtype).reshape(along)
  return np.where(a > 0, p, np.where(a < 0, -n, np.asarray(zero, dtype))).astype(dtype)


def _codec_and_round_trip(x, **kw):
  data = container.pack({"x": x}, **kw)
  out = container.unpack(data)["x"]
  _assert_bitwise(out, x)
  return container.read_info(data).records[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, ml_dtypes.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_random_per_filter_ternary_leaves_round_trip_bitwise_as_tf(dtype, symmetric):
  rng = np.random.default_rng(0)
  x = _per_filter(rng, (5, 5, 6, 16), dtype=dtype, symmetric=symmetric, dead=2)
  record = _codec_and_round_trip(x)
  chex.assert_equal((record.codec, record.storage), ("tf", np.dtype(dtype).name))


def test_per_filter_scales_along_a_first_axis_and_negative_zeros_round_trip_bitwise():
  x = _per_filter(np.random.default_rng(1), (32, 8, 3, 3), axis=0, zero=-0.0)
  parts = leaf_parts.filter_ternary_parts(x)
  chex.assert_equal((parts.axis, parts.zero_is_negative, parts.symmetric), (0, True, True))
  chex.assert_equal(_codec_and_round_trip(x).codec, "tf")


def test_filter_ternary_parts_rejects_leaves_with_a_third_magnitude_in_a_filter():
  x = _per_filter(np.random.default_rng(2), (3, 3, 4, 8))
  x[0, 0, 0, 0] = 0.77
  x[1, 0, 0, 0] = 0.0
  assert leaf_parts.filter_ternary_parts(x) is None


def test_filter_ternary_parts_rejects_leaves_with_both_zero_signs():
  x = _per_filter(np.random.default_rng(2), (3, 3, 4, 8))
  x.flat[np.flatnonzero(x == 0)[0]] = -0.0
  assert leaf_parts.filter_ternary_parts(x) is None


def test_tf_is_chosen_over_sparse_floats_and_is_several_times_smaller():
  x = _per_filter(np.random.default_rng(3), (5, 5, 20, 50))
  tf = len(container.pack({"x": x}))
  old = len(container.pack({"x": x}, codecs=set(container.CODECS) - {"tf", "cb", "fc"}))
  assert 3 * tf < old, (tf, old)


def _entropy_bits(values):
  _, counts = np.unique(values, return_counts=True)
  q = counts / counts.sum()
  return -(counts * np.log2(q)).sum()


def test_inq_like_leaf_round_trips_bitwise_as_cb_close_to_its_entropy():
  """Powers of two and zero (INQ, 5 bits): indices within 2% + 64 bytes of n H_0."""
  rng = np.random.default_rng(4)
  shape = (3, 3, 64, 64)
  x = (rng.choice([-1, 1], size=shape) * 2.0 ** rng.integers(-9, -2, size=shape)
       * (rng.random(shape) < 0.6)).astype(np.float32)
  record = _codec_and_round_trip(x)
  chex.assert_equal(record.codec, "cb")
  values = np.unique(x.view(np.uint32)).size
  index_bytes = record.nbytes - 2 - 4 * values
  assert index_bytes <= 1.02 * _entropy_bits(x.view(np.uint32)) / 8 + 64


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32, ml_dtypes.bfloat16])
def test_mcq_like_leaf_of_hit_counts_times_a_scale_round_trips_bitwise_as_cb(dtype):
  rng = np.random.default_rng(5)
  counts = rng.poisson(1.0, size=(3, 3, 32, 64))
  x = (counts * 3 if dtype == np.int32 else counts * 0.0123).astype(dtype)
  record = _codec_and_round_trip(x)
  chex.assert_equal(record.codec, "cb")
  assert record.nbytes * 8 < 1.05 * _entropy_bits(counts) + 8 * 64


def test_cb_keeps_negative_zero_and_nan_patterns_apart():
  x = np.tile(np.array([0.0, -0.0, np.nan, 1.5, -1.5], np.float32), 40)
  _codec_and_round_trip(x)
  assert leaf_parts.codebook_parts(x)[0].size == 5


def test_new_codecs_are_chosen_only_when_smaller():
  rng = np.random.default_rng(6)
  leaves = {
      "tiny_per_filter": np.array([[0.5, -2.0], [0.0, 2.0]], np.float32),
      "few_values_small": np.array([0.1, 0.2, 0.3, 0.1, 0.4], np.float32),
      "dense": rng.normal(size=(3, 3, 8, 8)).astype(np.float32),
      "global_ternary": rng.choice([-0.5, 0.0, 0.25], size=(3, 3, 16, 16)).astype(np.float32),
      "per_filter": _per_filter(rng, (3, 3, 16, 32)),
      "codebook": rng.choice([0.0, 0.5, 1.0, 3.0], size=(64, 64)).astype(np.float32),
  }
  info = container.read_info(container.pack(leaves))
  for record in info.records:
    sizes = {}
    for codec in container.CODECS:
      try:
        data = container.pack({"x": leaves[record.path]}, codecs={codec})
      except ValueError:
        continue
      sizes[codec] = container.read_info(data).records[0].nbytes
    chex.assert_equal(record.nbytes, min(sizes.values()))
    assert sizes[record.codec] == record.nbytes, (record.path, sizes)
  chosen = {r.path: r.codec for r in info.records}
  assert chosen["tiny_per_filter"] == "raw" and chosen["few_values_small"] == "raw", chosen
  assert chosen["global_ternary"] == "tc" and chosen["dense"] not in ("tf", "cb"), chosen
  assert chosen["per_filter"] == "tf" and chosen["codebook"] == "cb", chosen


def test_float16_option_keeps_tf_and_cb_leaves_exact():
  rng = np.random.default_rng(7)
  tree = {"tf": _per_filter(rng, (3, 3, 8, 16)),
          "cb": rng.choice([0.1, 0.2, 0.3], size=(32, 32)).astype(np.float32)}
  data = container.pack(tree, float16=True)
  out = container.unpack(data)
  for k in tree:
    _assert_bitwise(out[k], tree[k])
  chex.assert_equal([r.codec for r in container.read_info(data).records], ["tf", "cb"])


def test_without_entropy_coding_neither_new_codec_is_written():
  x = _per_filter(np.random.default_rng(8), (3, 3, 8, 16))
  record = container.read_info(container.pack({"x": x}, entropy_coding=False)).records[0]
  assert record.codec not in ("tf", "cb")


def test_codebook_coder_round_trips_every_alphabet_size_and_rejects_bad_ones():
  rng = np.random.default_rng(9)
  for k in (2, 3, 17, 256):
    s = rng.integers(0, k, size=3000)
    chex.assert_trees_all_equal(codebook_coding.decode(codebook_coding.encode(s, k), s.size, k),
                                s.astype(np.uint8))
  with pytest.raises(ValueError, match="alphabet must lie in"):
    codebook_coding.encode(np.zeros(4, int), 257)
  with pytest.raises(ValueError, match="symbols must lie in"):
    codebook_coding.encode(np.array([0, 3]), 3)


def test_codebook_capacity_bounds_the_symbols_of_a_stream():
  """The least probable stream (all one symbol) never exceeds the capacity bound."""
  for k in (2, 256):
    n = 200_000
    data = codebook_coding.encode(np.zeros(n, int), k)
    assert n <= codebook_coding.capacity(len(data), k)
    assert codebook_coding.capacity(len(data), k) < 4 * n  # and the bound is not loose
  assert codebook_coding.capacity(100, 2) < 8 * 100 * 400


# ----------------------------------------------------------------- hostile records


SCALE = np.array([0.5], np.float32).tobytes()


def _tf(head, scales, shape=(2, 3), assignment=None, coded=True):
  a = np.ones(shape, np.int8) if assignment is None else assignment
  coded = context_coding.encode(a, 3) if coded else b""
  return one_leaf({"c": "tf", "d": "float32", "s": list(shape)}, bytes(head) + scales + coded)


@pytest.mark.parametrize("head, scales, match", [
    ([2, 1, 0], SCALE * 3, "corrupt head"),  # axis beyond the shape
    ([1, 3, 0], SCALE * 9, "corrupt head"),  # three scales per filter
    ([1, 1, 2], SCALE * 3, "corrupt head"),  # zero sign byte
    ([1, 1, 0], SCALE * 2 + b"\0", "cannot hold 3 scales"),  # truncated scales
    ([1, 1, 0], np.array([0.5, np.nan, 1], np.float32).tobytes(), "invalid scales"),
    ([1, 1, 0], np.array([0.5, -1, 1], np.float32).tobytes(), "invalid scales"),
    ([1, 2, 0], np.array([-1, -1, -1, 1, 1, -2], np.float32).tobytes(), "invalid scales"),
])
def test_hostile_tf_heads_and_scales_are_rejected(head, scales, match):
  _assert_error(_tf(head, scales, coded="cannot hold" not in match), match)


def test_tf_assignment_using_a_scale_the_file_does_not_store_is_rejected():
  a = np.array([[1, 1, 2], [1, 1, 1]], np.int8)  # filter 2 is dead but has a positive weight
  scales = np.array([0.5, 0.5, 0.0], np.float32).tobytes()
  _assert_error(_tf([1, 1, 0], scales, assignment=a), "uses a scale it does not store")


def _cb(values: bytes, count_field: int, indices: bytes, count: int = 100):
  stream = count_field.to_bytes(2, "little") + values + indices
  return one_leaf({"c": "cb", "d": "float32", "s": [count]}, stream)


@pytest.mark.parametrize("values, size, match", [
    (np.array([1.0], np.float32), 1, "codebook of 1 values"),
    (np.zeros(300, np.float32), 300, "codebook of 300 values"),
    (np.array([2.0, 1.0], np.float32), 2, "not distinct and sorted"),
    (np.array([1.0, 1.0], np.float32), 2, "not distinct and sorted"),
    (np.array([1.0, 2.0], np.float32), 3, "codebook of 3 values"),  # truncated values
])
def test_hostile_codebook_heads_are_rejected(values, size, match):
  indices = b"" if size == 3 else codebook_coding.encode(np.zeros(100, int), 2)
  _assert_error(_cb(values.tobytes(), size, indices), match)


def test_codebook_stream_with_a_ragged_or_leftover_index_stream_is_rejected():
  values = np.array([1.0, 2.0], np.float32).tobytes()
  indices = codebook_coding.encode(np.zeros(100, int), 2)
  _assert_error(_cb(values, 2, indices + b"\0\0"), "whole number of 32-bit words")
  _assert_error(_cb(values, 2, indices + bytes(64)), "data left|CRC|range decoder")


@pytest.mark.parametrize("codec, stream_bytes", [("tf", 3 + 4 + 7), ("cb", 2 + 8 + 4)])
def test_tf_and_cb_counts_beyond_what_a_stream_holds_are_rejected_before_decoding(
    codec, stream_bytes):
  count = 10**6
  data = one_leaf({"c": codec, "d": "float32", "s": [count, 1]}, bytes(stream_bytes))
  _assert_error(data, f"cannot hold {count:,} elements", max_bytes=2**50)
  holds = (context_coding.capacity(stream_bytes - 7, 3) if codec == "tf"
           else codebook_coding.capacity(stream_bytes - 10, 2))
  assert holds < math.inf and holds < 100_000


def test_version_1_files_cannot_use_the_new_codecs():
  x = _per_filter(np.random.default_rng(10), (3, 3, 4, 8))
  stream = filter_ternary.tf_stream(leaf_parts.filter_ternary_parts(x))
  data = one_leaf({"c": "tf", "d": "float32", "s": list(x.shape)}, stream, version=1)
  _assert_error(data, "corrupt record")


def test_tiny_valid_cb_and_tf_files_decode_bitwise_within_max_bytes():
  """A 1 Mi-element constant-index leaf is legitimately tiny: max_bytes bounds it, memory stays ~5n."""
  count = 2**20
  values = np.array([0.0, 0.5], np.float32)
  cb = one_leaf({"c": "cb", "d": "float32", "s": [count]},
                b"\x02\x00" + values.tobytes() + codebook_coding.encode(np.zeros(count, int), 2))
  tf = one_leaf({"c": "tf", "d": "float32", "s": [count // 4, 4]},
                bytes([1, 1, 0]) + np.full(4, 0.5, np.float32).tobytes()
                + context_coding.encode(np.ones((count // 4, 4), np.int8), 3))
  for data in (cb, tf):
    assert len(data) < 2000
    _assert_error(data, "more than max_bytes", max_bytes=2**20)
    out, peak = _bounded(container.unpack, data, max_bytes=FUZZ_MAX_BYTES)
    chex.assert_trees_all_equal(out["w"].reshape(-1), np.zeros(count, np.float32))
    assert peak < 2 * 13 * count


# ------------------------------------------------------------ the codec registry


def _constant_codec():
  """A toy record codec (test code only): a leaf holding one value, stored once."""
  from ec2t_jax._src.export.leaf_bytes import from_le_bytes, to_le_bytes, uint_view  # pylint: disable=g-import-not-at-top
  from ec2t_jax._src.export.record_codecs.protocol import RecordCodec  # pylint: disable=g-import-not-at-top

  def encode(leaf):
    flat = uint_view(leaf.stored.reshape(-1))
    return to_le_bytes(leaf.stored.reshape(-1)[:1]) if flat.size and (flat == flat[0]).all() else None

  def decode(record, stream):
    return np.repeat(from_le_bytes(stream, record.storage_dtype, 1), record.numel)

  return RecordCodec("k1", versions=(2, 3), encode=encode, decode=decode,
                     fits=lambda r: r.numel > 0 and r.nbytes == r.itemsize)


def test_a_codec_added_by_one_registration_is_written_checked_and_read(monkeypatch):
  from ec2t_jax._src.export import record_codecs  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(record_codecs, "_REGISTRY", dict(record_codecs._REGISTRY))  # pylint: disable=protected-access
  record_codecs.register(_constant_codec())
  x = np.full((40, 25), 0.375, np.float32)
  record = _codec_and_round_trip(x)
  chex.assert_equal((record.codec, record.nbytes), ("k1", 4))
  data = one_leaf({"c": "k1", "d": "float32", "s": [10]}, bytes(8))
  _assert_error(data, "cannot hold 10 elements")  # its capacity rule, applied by the container
  _assert_error(one_leaf({"c": "k1", "d": "float32", "s": [10]}, bytes(4), version=1),
                "corrupt record")  # not a version-1 codec
