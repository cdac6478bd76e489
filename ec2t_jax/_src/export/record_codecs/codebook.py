"""Codebook records, ``cb`` (version 2; INQ, MCQ, SLQ, any dtype).

Stream: u16 ``K`` (2 to :data:`leaf_parts.MAX_CODEBOOK` = 256) distinct
values, the ``K`` values sorted by bit pattern (itemsize each), then each
element's index coded by :data:`symbol_coding.CODEBOOK` (adaptive order 0, no
table). The capacity check uses ``K = 2`` (the largest capacity) before ``K``
is read; ``K`` values are checked against the stream's length before they
are read.
"""

from __future__ import annotations

import struct

import numpy as np

from ec2t_jax._src.export import symbol_coding
from ec2t_jax._src.export.errors import ExportFormatError
from ec2t_jax._src.export.leaf_bytes import from_le_bytes, to_le_bytes, uint_view
from ec2t_jax._src.export.leaf_parts import MAX_CODEBOOK
from ec2t_jax._src.export.record_codecs.protocol import Leaf, LeafRecord, RecordCodec

_SIZE = struct.Struct("<H")


def cb_stream(values: np.ndarray, indices: np.ndarray) -> bytes:
  """``cb``: u16 K, the K values (by increasing bit pattern), the coded indices."""
  return (_SIZE.pack(values.size) + to_le_bytes(values)
          + symbol_coding.CODEBOOK.encode(indices, values.size))


def _encode(leaf: Leaf):
  if not leaf.entropy or leaf.ternary is not None:
    return None
  book = leaf.codebook
  return None if book is None else cb_stream(*book)


def _decode(record: LeafRecord, stream: bytes) -> np.ndarray:
  if len(stream) < _SIZE.size:
    raise ExportFormatError("truncated codebook stream")
  (size,) = _SIZE.unpack_from(stream)
  head = _SIZE.size + size * record.itemsize
  if not 2 <= size <= MAX_CODEBOOK or head > len(stream):
    raise ExportFormatError(f"a {len(stream):,}-byte stream cannot hold a codebook "
                            f"of {size} values (2 to {MAX_CODEBOOK} allowed)")
  values = from_le_bytes(stream[_SIZE.size:head], record.dtype_, size)
  bits = uint_view(values)  # compared as unsigned: a signed difference wraps for 64-bit values
  if not (bits[1:] > bits[:-1]).all():
    raise ExportFormatError("codebook values are not distinct and sorted by bit pattern")
  return values[symbol_coding.CODEBOOK.decode(stream[head:], (record.numel,), size)]


def _fits(r: LeafRecord) -> bool:  # at least two values; K = 2 has the largest capacity
  head = _SIZE.size + 2 * r.itemsize
  return (r.nbytes >= head
          and 2 <= r.numel <= symbol_coding.CODEBOOK.capacity(r.nbytes - head, 2))


CB = RecordCodec("cb", versions=(2, 3), encode=_encode, fits=_fits, decode=_decode,
                 own_dtype=True, range_coded=True)
