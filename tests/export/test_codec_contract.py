"""The contract every registered record codec passes, driven by the codec registry.

For each codec of ``record_codecs`` (a new codec is tested here by its
registration alone, once one of :data:`SAMPLES` is a leaf it applies to):
``encode`` then ``decode`` is bitwise, in the codec alone and in a file of each
version that may hold it; ``fits`` refuses a record declaring more elements
than its stream can hold, and the reader refuses it before allocating; a
truncated stream, a bit-flipped file and a record in a file of a version that
may not hold the codec are :class:`ExportFormatError`\\ s; a bit flip in a
resealed file (checksum recomputed) gives that error or, where nothing else
can tell, an array of the declared dtype and shape, and for range-coded
streams (their CRC) never anything but the original.
"""

import numpy as np
import pytest

from ec2t_jax._src.export import container
from ec2t_jax._src.export import errors
from ec2t_jax._src.export import record_codecs
from ec2t_jax._src.export.leaf_bytes import crc32_le
from ec2t_jax._src.export.record_codecs import Leaf, LeafRecord

from tests.export.test_export_hostile import PEAK_BUDGET, _bounded, one_leaf

CODECS = record_codecs.all_names()


def _samples():
  rng = np.random.default_rng(0)
  ternary = rng.choice(np.array([-0.5, 0.0, 0.25], np.float32), size=(12, 16), p=(.3, .4, .3))
  sparse = np.where(rng.random((12, 16)) < 0.7, 0.0, rng.normal(size=(12, 16))).astype(np.float32)
  signs = rng.choice([-1.0, 0.0, 1.0], size=(3, 3, 4, 8), p=(.3, .4, .3))
  per_filter = (signs * rng.uniform(0.1, 0.5, 8)).astype(np.float32)  # one scale per filter
  codebook = rng.choice(np.array([-0.75, -0.125, 0.0, 0.375, 1.5], np.float32), size=(10, 10))
  return {"dense": rng.normal(size=(6, 7)).astype(np.float32),
          "ternary": ternary, "sparse": sparse, "per_filter": per_filter,
          "codebook": codebook, "ternary_float16": ternary.astype(np.float16),
          "int32": rng.integers(-9, 9, size=(5, 4)).astype(np.int32),
          "bool": rng.random(17) < 0.5}


SAMPLES = _samples()


def _stream(codec, array):
  """The codec's stream of ``array`` (its own dtype), or None where it does not apply."""
  return codec.encode(Leaf(array, array.dtype, entropy=True))


def _applicable(name):
  codec = record_codecs.get(name)
  return [(k, a) for k, a in SAMPLES.items() if _stream(codec, a) is not None]


def _first(name):
  samples = _applicable(name)
  assert samples, f"codec {name!r} applies to none of SAMPLES: add a leaf it stores"
  return samples[0][1]


def _record(name, array, stream) -> dict:
  """The header record the container writes for this stream."""
  record = {"c": name, "d": array.dtype.name, "s": list(array.shape), "n": len(stream)}
  if record_codecs.get(name).range_coded:
    record["k"] = crc32_le(array)
  return record


def _file(name, array, stream=None, version=None, **changes) -> bytes:
  codec = record_codecs.get(name)
  stream = _stream(codec, array) if stream is None else stream
  record = {**_record(name, array, stream), **changes}
  return one_leaf(record, stream, version=version or max(codec.versions))


def _assert_bitwise(out, x):
  assert (out.dtype, out.shape, out.tobytes()) == (x.dtype, x.shape, x.tobytes())


def _unpacked_or_error(data):
  try:
    return container.unpack(data)["w"]
  except errors.ExportFormatError as e:
    assert "\n" not in str(e)
    return e


@pytest.mark.parametrize("name", CODECS)
def test_encode_then_decode_is_bitwise(name):
  codec = record_codecs.get(name)
  _first(name)  # at least one sample
  for _, array in _applicable(name):
    stream = _stream(codec, array)
    record = LeafRecord("w", name, array.dtype.name, array.shape, len(stream), array.dtype.name)
    assert codec.fits(record)
    _assert_bitwise(codec.decode(record, stream).reshape(array.shape), array)


@pytest.mark.parametrize("name", CODECS)
def test_a_file_of_every_version_that_may_hold_it_round_trips_bitwise(name):
  array = _first(name)
  for version in record_codecs.get(name).versions:
    _assert_bitwise(container.unpack(_file(name, array, version=version))["w"], array)


@pytest.mark.parametrize("name", CODECS)
def test_a_file_of_a_version_that_may_not_hold_it_is_refused(name):
  array = _first(name)
  others = [v for v in container.SUPPORTED_VERSIONS if v not in record_codecs.get(name).versions]
  for version in others:
    with pytest.raises(errors.ExportFormatError, match=f"'c': '{name}'"):
      container.unpack(_file(name, array, version=version))


@pytest.mark.parametrize("name", CODECS)
def test_fits_refuses_more_elements_than_the_stream_holds_before_any_allocation(name):
  codec = record_codecs.get(name)
  array = _first(name)
  stream = _stream(codec, array)
  huge = LeafRecord("w", name, array.dtype.name, (2**40,), len(stream), array.dtype.name)
  assert not codec.fits(huge)
  out, peak = _bounded(container.unpack, _file(name, array, s=[2**40]), max_bytes=2**62)
  assert isinstance(out, errors.ExportFormatError)
  assert peak < PEAK_BUDGET


@pytest.mark.parametrize("name", CODECS)
def test_a_truncated_stream_is_an_export_format_error(name):
  array = _first(name)
  stream = _stream(record_codecs.get(name), array)
  for cut in (1, len(stream) // 2, len(stream)):
    with pytest.raises(errors.ExportFormatError):
      container.unpack(_file(name, array, stream[:len(stream) - cut]))


def _flipped(data: bytes, position: int, bit: int) -> bytes:
  return data[:position] + bytes([data[position] ^ (1 << bit)]) + data[position + 1:]


@pytest.mark.parametrize("name", CODECS)
def test_a_bit_flipped_file_fails_its_checksum(name):
  data = _file(name, _first(name))
  with pytest.raises(errors.ExportFormatError, match="checksum"):
    container.unpack(_flipped(data, len(data) - 40, 3))


@pytest.mark.parametrize("name", CODECS)
def test_a_bit_flipped_stream_resealed_is_an_error_or_what_only_the_checksum_guards(name):
  codec = record_codecs.get(name)
  array = _first(name)
  stream = _stream(codec, array)
  for position in sorted({0, len(stream) // 3, len(stream) // 2, len(stream) - 1}):
    for bit in (0, 4, 7):
      out = _unpacked_or_error(_file(name, array, _flipped(stream, position, bit)))
      if isinstance(out, errors.ExportFormatError):
        continue
      assert (out.dtype, out.shape) == (array.dtype, array.shape)
      if codec.range_coded:  # the CRC of the decoded leaf
        _assert_bitwise(out, array)


def test_pack_writes_only_the_codecs_of_the_current_version():
  writable = set(record_codecs.names(container.FORMAT_VERSION))
  for array in SAMPLES.values():
    for entropy in (True, False):
      info = container.read_info(container.pack({"w": array}, entropy_coding=entropy))
      assert info.records[0].codec in writable
