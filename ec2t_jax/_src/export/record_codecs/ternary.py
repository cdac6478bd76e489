"""Ternary records: ``tb`` (the paper's two bitmasks), ``te`` (version 1) and ``tc`` (context-coded).

A ternary leaf is its assignment (``n, 0, p`` as symbols ``0, 1, 2``) and its
three values ``[-w_n, zero, w_p]`` (``zero`` is ``+0`` or ``-0``, kept for a
bitwise round trip), in the leaf's own float dtype.

``tb``  the three values (``3 x itemsize`` raw bytes), the non-zero mask
        (``numel`` bits) and the sign mask of the non-zeros (``nnz`` bits,
        1 = positive), each ``np.packbits(bitorder="little")``, zero padding.
``te``  (version 1) the three values, then the assignment range-coded by
        :data:`symbol_coding.SEMI_STATIC`.
``tc``  (version 2) ``-w_n`` and ``w_p`` (``2 x itemsize`` bytes), one byte
        ``1`` if the zero is ``-0.0`` else ``0``, then the assignment coded by
        :data:`symbol_coding.CONTEXT`.
"""

from __future__ import annotations

import numpy as np

from ec2t_jax._src.export import symbol_coding
from ec2t_jax._src.export.errors import ExportFormatError
from ec2t_jax._src.export.leaf_bytes import (contiguous, from_le_bytes, mask_bytes, pack_bits,
                                             to_le_bytes, uint_view, unpack_bits)
from ec2t_jax._src.export.record_codecs.protocol import Leaf, LeafRecord, RecordCodec


def three_values_bytes(itemsize: int) -> int:
  """Head of ``tb`` / ``te``: ``[-w_n, zero, w_p]``."""
  return 3 * itemsize


def two_values_bytes(itemsize: int) -> int:
  """Head of ``tc``: ``-w_n``, ``w_p`` and the zero's sign byte."""
  return 2 * itemsize + 1


def _check_values(values: np.ndarray) -> np.ndarray:
  v = values.astype(np.float64)
  if not (v[0] < 0 and v[1] == 0 and v[2] > 0 and np.isfinite(v).all()):
    raise ExportFormatError(f"invalid ternary values {v.tolist()}")
  return values


def _three_values(record: LeafRecord, stream: bytes) -> np.ndarray:
  head = three_values_bytes(record.itemsize)
  return _check_values(from_le_bytes(stream[:head], record.dtype_, 3))


def _two_values(record: LeafRecord, stream: bytes) -> np.ndarray:
  head = two_values_bytes(record.itemsize)
  if len(stream) < head or stream[head - 1] > 1:
    raise ExportFormatError("corrupt ternary value header")
  ends = from_le_bytes(stream[:head - 1], record.dtype_, 2)
  zero = np.array([-0.0 if stream[head - 1] else 0.0], record.dtype_)
  return _check_values(np.concatenate([ends[:1], zero, ends[1:]]))


def _tb_encode(leaf: Leaf):
  parts = leaf.ternary
  if parts is None:
    return None
  a = parts.assignment
  nonzero = a != 0
  return to_le_bytes(parts.values) + pack_bits(nonzero) + pack_bits(a[nonzero] > 0)


def _tb_decode(record: LeafRecord, stream: bytes) -> np.ndarray:
  values = _three_values(record, stream)
  head, mask = three_values_bytes(record.itemsize), mask_bytes(record.numel)
  nonzero = unpack_bits(stream[head:head + mask], record.numel)
  positive = unpack_bits(stream[head + mask:], int(nonzero.sum()))
  symbols = np.ones(record.numel, np.int8)
  symbols[nonzero] = np.where(positive, 2, 0)
  return values[symbols]


def _tb_fits(r: LeafRecord) -> bool:
  head, mask = three_values_bytes(r.itemsize), mask_bytes(r.numel)
  return head + mask <= r.nbytes <= head + 2 * mask


def _te_encode(leaf: Leaf):
  parts = leaf.ternary
  if parts is None or not leaf.entropy:
    return None
  return to_le_bytes(parts.values) + symbol_coding.SEMI_STATIC.encode(parts.assignment + 1, 3)


def _te_decode(record: LeafRecord, stream: bytes) -> np.ndarray:
  values = _three_values(record, stream)
  head = three_values_bytes(record.itemsize)
  return values[symbol_coding.SEMI_STATIC.decode(stream[head:], record.shape, 3).reshape(-1)]


def _te_fits(r: LeafRecord) -> bool:
  head = three_values_bytes(r.itemsize)
  return r.nbytes >= head and r.numel <= symbol_coding.SEMI_STATIC.capacity(r.nbytes - head, 3)


def _tc_encode(leaf: Leaf):
  parts = leaf.ternary
  if parts is None or not leaf.entropy:
    return None
  zero_is_negative = bool(uint_view(contiguous(parts.values[1:2]))[0])
  head = to_le_bytes(parts.values[[0, 2]]) + bytes([zero_is_negative])
  return head + symbol_coding.CONTEXT.encode(parts.assignment + 1, 3)


def _tc_decode(record: LeafRecord, stream: bytes) -> np.ndarray:
  values = _two_values(record, stream)
  head = two_values_bytes(record.itemsize)
  return values[symbol_coding.CONTEXT.decode(stream[head:], record.shape, 3).reshape(-1)]


def _tc_fits(r: LeafRecord) -> bool:
  head = two_values_bytes(r.itemsize)
  return r.nbytes > head and 0 < r.numel <= symbol_coding.CONTEXT.capacity(r.nbytes - head, 3)


_TERNARY = dict(float_only=True, own_dtype=True, ternary=True)
TB = RecordCodec("tb", versions=(1, 2, 3), encode=_tb_encode, fits=_tb_fits, decode=_tb_decode,
                 **_TERNARY)
TE = RecordCodec("te", versions=(1,), encode=_te_encode, fits=_te_fits, decode=_te_decode,
                 range_coded=True, **_TERNARY)
TC = RecordCodec("tc", versions=(2, 3), encode=_tc_encode, fits=_tc_fits, decode=_tc_decode,
                 range_coded=True, **_TERNARY)
