"""Per-filter ternary records, ``tf`` (version 2; TWN ``threshold="filter"``, STTN).

Every slice ``f`` along one axis holds ``{-n_f, 0, p_f}``
(:func:`leaf_parts.filter_ternary_parts`). Stream: u8 the axis (the last one,
a Flax kernel's output filters, is tried first), u8 ``S`` scales per filter
(1: ``n_f = p_f``, stored ``p_f``; 2: all ``-n_f`` then all ``p_f``), u8 ``1``
if the zero is ``-0.0``, ``S x F`` values (itemsize each, ``+0`` for a sign
the filter does not use), then the assignment coded by
:data:`symbol_coding.CONTEXT`. The scales are checked against the stream's
length before they are read.
"""

from __future__ import annotations

import numpy as np

from ec2t_jax._src.export import symbol_coding
from ec2t_jax._src.export.errors import ExportFormatError
from ec2t_jax._src.export.leaf_bytes import (from_le_bytes, sign_flipped, to_le_bytes,
                                             uint_view)
from ec2t_jax._src.export.leaf_parts import FilterTernaryParts
from ec2t_jax._src.export.record_codecs.protocol import Leaf, LeafRecord, RecordCodec

HEAD = 3  # axis, scales per filter, zero sign


def tf_stream(parts: FilterTernaryParts) -> bytes:
  """The ``tf`` stream of a per-filter ternary leaf."""
  if parts.symmetric:
    has_positive = uint_view(parts.positive) != 0
    scales = [np.where(has_positive, parts.positive, sign_flipped(parts.negative))]
  else:
    scales = [parts.negative, parts.positive]
  head = bytes([parts.axis, len(scales), parts.zero_is_negative])
  return (head + b"".join(to_le_bytes(v) for v in scales)
          + symbol_coding.CONTEXT.encode(parts.assignment + 1, 3))


def _encode(leaf: Leaf):
  if not leaf.entropy or leaf.ternary is not None:
    return None
  parts = leaf.filter_ternary
  return None if parts is None else tf_stream(parts)


def _scales(record: LeafRecord, stream: bytes) -> tuple[int, np.ndarray, np.ndarray, int]:
  """Parses the head: ``(axis, negative, positive, start of the assignment)``."""
  shape = record.shape
  if len(stream) < HEAD:
    raise ExportFormatError("truncated per-filter ternary stream")
  axis, per_filter, zero_sign = stream[:HEAD]
  if axis >= len(shape) or per_filter not in (1, 2) or zero_sign > 1:
    raise ExportFormatError(f"corrupt head (axis {axis}, {per_filter} scales per "
                            f"filter, zero sign {zero_sign}) for shape {shape}")
  filters = shape[axis]
  head = HEAD + per_filter * filters * record.itemsize
  if head >= len(stream):
    raise ExportFormatError(f"a {len(stream):,}-byte stream cannot hold "
                            f"{per_filter * filters:,} scales and an assignment")
  scales = from_le_bytes(stream[HEAD:head], record.dtype_, per_filter * filters)
  if per_filter == 1:
    negative, positive = sign_flipped(scales), scales
  else:
    negative, positive = scales[:filters], scales[filters:]
  with np.errstate(invalid="ignore"):
    for values, sign in ((negative, -1), (positive, 1)):
      v = values.astype(np.float64)
      if not ((uint_view(values) == 0) | (np.isfinite(v) & (sign * v > 0))).all():
        raise ExportFormatError(f"invalid scales {v[:8].tolist()}")
  return axis, negative, positive, head


def _decode(record: LeafRecord, stream: bytes) -> np.ndarray:
  axis, negative, positive, head = _scales(record, stream)
  shape, zero_sign = record.shape, stream[2]
  symbols = symbol_coding.CONTEXT.decode(stream[head:], shape, 3)
  along = [1] * len(shape)
  along[axis] = shape[axis]
  out = np.full(shape, -0.0 if zero_sign else 0.0, record.dtype_)
  for symbol, values in ((0, negative), (2, positive)):
    where = symbols == symbol
    if (where & (uint_view(values) == 0).reshape(along)).any():
      raise ExportFormatError("per-filter ternary stream uses a scale it does not store")
    np.copyto(out, values.reshape(along), where=where)
  return out.reshape(-1)


def _fits(r: LeafRecord) -> bool:  # at least one scale before the assignment
  head = HEAD + r.itemsize
  return r.nbytes > head and 0 < r.numel <= symbol_coding.CONTEXT.capacity(r.nbytes - head, 3)


TF = RecordCodec("tf", versions=(2, 3), encode=_encode, fits=_fits, decode=_decode,
                 float_only=True, own_dtype=True, range_coded=True)
