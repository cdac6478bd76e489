"""Format version 3's per-channel codebook records (``fc``): ParetoQ per channel, per-column ternary."""

import chex
import ml_dtypes
import numpy as np
import pytest

from ec2t_jax._src.export import codebook_coding
from ec2t_jax._src.export import container
from ec2t_jax._src.export.errors import ExportFormatError
from ec2t_jax._src.export.record_codecs import channel_codebook

from tests.export.test_export_hostile import _assert_error, one_leaf

FLOATS = [np.float32, np.float16, ml_dtypes.bfloat16]
CODES = {2: np.array([-3, -1, 1, 3]), 3: np.arange(-4, 4), 4: np.arange(-8, 8)}  # integer grids


def _assert_bitwise(out, x):
  assert (out.dtype, out.shape, out.tobytes()) == (x.dtype, x.shape, x.tobytes())


def _per_channel(rng, shape, bits, dtype=np.float32):
  """Random codes of a ``bits``-bit grid times one positive scale per output channel (last axis)."""
  codes = rng.choice(CODES[bits], size=shape)
  scale = rng.uniform(0.01, 0.2, shape[-1])
  return (codes * scale).astype(dtype)


def _per_column_ternary(rng, shape, dtype=np.float32):
  """Asymmetric per-column ternary: column c holds {-w_n[c], 0, w_p[c]}."""
  a = rng.choice([-1, 0, 1], size=shape, p=(0.3, 0.4, 0.3))
  w_n, w_p = rng.uniform(0.01, 0.5, shape[-1]), rng.uniform(0.01, 0.5, shape[-1])
  return np.where(a > 0, w_p, np.where(a < 0, -w_n, 0.0)).astype(dtype)


def _record(x, **kw):
  data = container.pack({"x": x}, **kw)
  _assert_bitwise(container.unpack(data)["x"], x)
  info = container.read_info(data)
  return info.version, info.records[0]


def _h0_bits(symbols):
  _, counts = np.unique(symbols, return_counts=True)
  return -(counts * np.log2(counts / counts.sum())).sum()


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_per_channel_quantized_leaves_round_trip_bitwise_as_fc_in_version_3(bits, dtype):
  x = _per_channel(np.random.default_rng(bits), (64, 48), bits, dtype)
  version, record = _record(x)
  chex.assert_equal((version, record.codec, record.storage), (3, "fc", np.dtype(dtype).name))


@pytest.mark.parametrize("dtype", FLOATS)
def test_asymmetric_per_column_ternary_leaves_round_trip_bitwise_through_fc(dtype):
  x = _per_column_ternary(np.random.default_rng(1), (3, 3, 16, 32), dtype)
  _, record = _record(x, codecs={"raw", "fc"})
  chex.assert_equal(record.codec, "fc")
  _, chosen = _record(x)  # tf codes the same leaf with contexts: the writer keeps the smaller
  fc = container.read_info(container.pack({"x": x}, codecs={"raw", "fc"})).records[0].nbytes
  assert chosen.nbytes <= fc


def test_negative_zeros_and_nans_in_a_channel_keep_their_bit_patterns():
  x = np.tile(np.array([[0.0, -0.0, 1.5], [np.nan, -0.0, 1.5], [-1.5, 2.0, 0.0]], np.float32),
              (40, 1))
  _, record = _record(x, codecs={"raw", "fc"})
  chex.assert_equal(record.codec, "fc")


def test_fc_is_four_times_smaller_than_the_dense_fallback_and_near_the_codes_entropy():
  rng = np.random.default_rng(0)
  x = _per_channel(rng, (128, 512), 2)
  _, record = _record(x)
  dense = container.read_info(container.pack({"x": x}, codecs={"raw", "zs"})).records[0]
  assert 4 * record.nbytes < dense.nbytes, (record.nbytes, dense.nbytes)
  codebooks = 2 + 512 + 4 * 4 * 512
  assert record.nbytes - codebooks <= 1.02 * _h0_bits(x.view(np.uint32)) / 8 + 64


def test_the_writer_keeps_version_2_for_files_without_fc():
  x = _per_column_ternary(np.random.default_rng(2), (8, 8))
  data = container.pack({"x": x}, codecs={"raw", "zs", "tf"})
  chex.assert_equal(container.read_info(data).version, 2)
  chex.assert_equal((container.file_version(["tc", "cb"]), container.file_version(["fc"])), (2, 3))


def test_channel_codebook_parts_refuses_what_fc_cannot_hold():
  rng = np.random.default_rng(3)
  too_many = _per_channel(rng, (600, 4), 4)
  too_many[:300, 1] = np.arange(300, dtype=np.float32)  # 257+ values in channel 1
  assert channel_codebook.channel_codebook_parts(too_many) is None
  assert channel_codebook.channel_codebook_parts(np.tile([0.5, 1.5], 64)) is None  # one axis
  assert channel_codebook.channel_codebook_parts(np.ones((64, 8), np.float32)) is None  # k_c = 1
  with pytest.raises(ValueError, match="none of the codecs"):
    container.pack({"x": too_many}, codecs={"fc"})


# ----------------------------------------------------------------- hostile records


def _fc(sizes, values, indices, shape, alphabet=None):
  alphabet = max(sizes) if alphabet is None else alphabet
  stream = (alphabet.to_bytes(2, "little") + bytes(k - 1 for k in sizes)
            + np.asarray(values, np.float32).tobytes()
            + codebook_coding.encode(np.asarray(indices).reshape(-1), min(max(2, alphabet), 256)))
  return one_leaf({"c": "fc", "d": "float32", "s": list(shape)}, stream)


ZEROS = np.zeros((4, 2), int)


@pytest.mark.parametrize("sizes, values, alphabet, match", [
    ([2, 2], [0.5, 1.5, 0.5, 1.5], 1, "K = 1"),
    ([2, 2], [0.5, 1.5, 0.5, 1.5], 300, "K = 300"),
    ([2, 1], [0.5, 1.5, 0.5], 3, "largest channel codebook 2"),
    ([2, 2], [1.5, 0.5, 0.5, 1.5], None, "not distinct and sorted"),
    ([2, 2], [0.5, 0.5, 0.5, 1.5], None, "not distinct and sorted"),
])
def test_hostile_fc_heads_are_rejected(sizes, values, alphabet, match):
  _assert_error(_fc(sizes, values, ZEROS, (4, 2), alphabet), match)


def test_fc_values_beyond_the_stream_and_indices_beyond_a_codebook_are_rejected():
  truncated = one_leaf({"c": "fc", "d": "float32", "s": [4, 2]},
                       b"\x02\x00\x01\x01" + bytes(14))  # 16 bytes of values needed
  _assert_error(truncated, "cannot hold 4 codebook values")
  indices = np.array([[0, 1]] * 4)  # channel 1 has one value, index 1 is beyond it
  _assert_error(_fc([2, 1], [0.5, 1.5, 0.5], indices, (4, 2)), "beyond its channel's codebook")


def test_fc_counts_beyond_what_a_stream_holds_are_rejected_before_decoding():
  count = 10**6
  data = one_leaf({"c": "fc", "d": "float32", "s": [count, 1]}, bytes(2 + 1 + 8 + 8))
  _assert_error(data, f"cannot hold {count:,} elements", max_bytes=2**50)
  _assert_error(one_leaf({"c": "fc", "d": "float32", "s": [8]}, bytes(64)), "cannot hold")
  _assert_error(one_leaf({"c": "fc", "d": "float32", "s": [2, 10**8]}, bytes(64)),
                "cannot hold", max_bytes=2**50)  # the C sizes alone would not fit


def test_version_2_files_cannot_use_fc():
  x = _per_channel(np.random.default_rng(4), (16, 8), 2)
  stream = channel_codebook.fc_stream(channel_codebook.channel_codebook_parts(x))
  _assert_error(one_leaf({"c": "fc", "d": "float32", "s": [16, 8]}, stream, version=2),
                "corrupt record")


def test_truncated_and_bit_flipped_fc_streams_raise_or_decode_to_the_original():
  x = _per_channel(np.random.default_rng(5), (32, 6), 2)
  stream = channel_codebook.fc_stream(channel_codebook.channel_codebook_parts(x))
  crc = container.read_info(container.pack({"w": x})).records[0].crc
  file = lambda s: one_leaf({"c": "fc", "d": "float32", "s": list(x.shape), "k": crc}, s)
  _assert_bitwise(container.unpack(file(stream))["w"], x)
  for cut in range(1, len(stream)):
    with pytest.raises(ExportFormatError):
      container.unpack(file(stream[:cut]))
  rng = np.random.default_rng(6)
  same = 0
  for at in range(len(stream)):
    flipped = bytearray(stream)
    flipped[at] ^= 1 << int(rng.integers(8))
    try:
      out = container.unpack(file(bytes(flipped)))["w"]
    except ExportFormatError:
      continue
    _assert_bitwise(out, x)
    same += 1
  assert same < len(stream) // 10, same


def test_the_report_gives_an_fc_leaf_the_entropy_of_its_per_channel_codes():
  from ec2t_jax.report import build_report  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7)
  codes = rng.choice(4, size=(128, 64), p=(0.1, 0.4, 0.4, 0.1))
  scale = rng.uniform(0.01, 0.2, 64)
  x = ((2 * codes - 3) * scale).astype(np.float32)  # index order: +1, +3, -1, -3 (bit patterns)
  layer = build_report({"fc": {"kernel": x}}, geometry="none")["layers"][0]
  chex.assert_equal((layer["codec"], layer["ternary"]), ("fc", False))
  np.testing.assert_allclose(layer["entropy_bits"], _h0_bits(codes) / codes.size, rtol=1e-12)
  assert layer["entropy_bits"] < layer["bits_per_weight"] < 2 + 32 * 4 * 64 / codes.size
