"""Dense records: ``raw`` (the values' bytes) and ``zs`` (byte-shuffled, zlib-compressed).

``raw``: the array's bytes (C order, little-endian) in the storage dtype.
``zs``: the same bytes byte-shuffled (all first bytes, all second bytes, ...)
and zlib-compressed: lossless, helps a little on float data. A ``zs`` stream
of ``B`` bytes holds at most ``1032 B`` bytes (deflate's largest expansion),
and it is inflated with that output limit.
"""

from __future__ import annotations

import zlib

import numpy as np

from ec2t_jax._src.export.errors import ExportFormatError
from ec2t_jax._src.export.leaf_bytes import contiguous, from_le_bytes, inflate
from ec2t_jax._src.export.record_codecs.protocol import Leaf, LeafRecord, RecordCodec

ZLIB_MAX_RATIO = 1032  # deflate never expands one input byte to more output bytes


def _shuffle_compress(raw: bytes, itemsize: int) -> bytes:
  planes = np.frombuffer(raw, np.uint8).reshape(-1, itemsize).T
  return zlib.compress(contiguous(planes).tobytes(), 6)


def _shuffle_decompress(data: bytes, itemsize: int, count: int) -> bytes:
  planes = inflate(data, itemsize * count, "zs stream")
  if len(planes) != itemsize * count:
    raise ExportFormatError("decompressed zs stream has the wrong length")
  return np.frombuffer(planes, np.uint8).reshape(itemsize, count).T.tobytes()


def _zs_encode(leaf: Leaf):
  if leaf.array.size < 16 or leaf.ternary is not None:  # ternary codecs beat zlib there
    return None
  return _shuffle_compress(leaf.raw, leaf.storage.itemsize)


def _zs_decode(record: LeafRecord, stream: bytes) -> np.ndarray:
  raw = _shuffle_decompress(stream, record.itemsize, record.numel)
  return from_le_bytes(raw, record.storage_dtype, record.numel)


RAW = RecordCodec(
    "raw", versions=(1, 2, 3), encode=lambda leaf: leaf.raw,
    fits=lambda r: r.nbytes == r.numel * r.itemsize,
    decode=lambda r, stream: from_le_bytes(stream, r.storage_dtype, r.numel))

ZS = RecordCodec(
    "zs", versions=(1, 2, 3), encode=_zs_encode,
    fits=lambda r: 0 < r.nbytes and r.numel * r.itemsize <= ZLIB_MAX_RATIO * r.nbytes,
    decode=_zs_decode)
