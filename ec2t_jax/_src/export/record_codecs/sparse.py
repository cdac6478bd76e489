"""Sparse records (ECP and other leaves with zeros): ``sb``, ``se`` (version 1), ``sc``.

An element is zero iff all its stored bytes are zero. The non-zero values are
stored raw, in the storage dtype, after the non-zero mask:

``sb``  the mask as ``numel`` bits (``np.packbits(bitorder="little")``).
``se``  (version 1) u32 mask-stream length, the mask (alphabet 2, flat) coded
        by :data:`symbol_coding.SEMI_STATIC`.
``sc``  (version 2) u32 mask-stream length, the mask (alphabet 2, the leaf's
        shape) coded by :data:`symbol_coding.CONTEXT`.

A stored value with all bytes zero is refused (it would be a second encoding
of a zero).
"""

from __future__ import annotations

import struct
from typing import Optional

import numpy as np

from ec2t_jax._src.export import symbol_coding
from ec2t_jax._src.export.errors import ExportFormatError
from ec2t_jax._src.export.leaf_bytes import (from_le_bytes, mask_bytes, pack_bits, to_le_bytes,
                                             uint_view, unpack_bits)
from ec2t_jax._src.export.record_codecs.protocol import Leaf, LeafRecord, RecordCodec

_LENGTH = struct.Struct("<I")  # the coded mask's length (se, sc)


def _dense_values(leaf: Leaf) -> Optional[bytes]:
  """The non-zero stored values, when a sparse record pays off, else ``None``."""
  if leaf.ternary is not None or leaf.array.size < 16 or leaf.nonzero.all():
    return None
  values = to_le_bytes(leaf.stored.reshape(-1)[leaf.nonzero.reshape(-1)])
  return values if mask_bytes(leaf.array.size) + len(values) < len(leaf.raw) else None


def _scatter(record: LeafRecord, nonzero: np.ndarray, rest: bytes) -> np.ndarray:
  values = from_le_bytes(rest, record.storage_dtype, int(nonzero.sum()))
  if (uint_view(values) == 0).any():
    raise ExportFormatError("sparse record stores a zero as a non-zero")
  flat = np.zeros(record.numel, record.storage_dtype)
  flat[nonzero] = values
  return flat


def _coded_mask(record: LeafRecord, stream: bytes, coder, shape) -> tuple[np.ndarray, bytes]:
  """The mask of ``se`` / ``sc`` and the bytes after it."""
  if len(stream) < _LENGTH.size:
    raise ExportFormatError("truncated sparse stream")
  (length,) = _LENGTH.unpack_from(stream)
  end = _LENGTH.size + length
  if end > len(stream):
    raise ExportFormatError("truncated mask stream")
  mask = coder.decode(stream[_LENGTH.size:end], shape, 2)
  return mask.reshape(-1).astype(bool), stream[end:]


def _sb_encode(leaf: Leaf):
  values = _dense_values(leaf)
  return None if values is None else pack_bits(leaf.nonzero) + values


def _sb_decode(record: LeafRecord, stream: bytes) -> np.ndarray:
  mask = mask_bytes(record.numel)
  return _scatter(record, unpack_bits(stream[:mask], record.numel), stream[mask:])


def _coded_encode(coder, flat: bool):
  def encode(leaf: Leaf):
    values = _dense_values(leaf)
    if values is None or not leaf.entropy or not leaf.nonzero.any():
      return None
    mask = leaf.nonzero.astype(np.int8)
    coded = coder.encode(mask.reshape(-1) if flat else mask, 2)
    return _LENGTH.pack(len(coded)) + coded + values
  return encode


def _se_decode(record: LeafRecord, stream: bytes) -> np.ndarray:
  nonzero, rest = _coded_mask(record, stream, symbol_coding.SEMI_STATIC, (record.numel,))
  return _scatter(record, nonzero, rest)


def _sc_decode(record: LeafRecord, stream: bytes) -> np.ndarray:
  nonzero, rest = _coded_mask(record, stream, symbol_coding.CONTEXT, record.shape)
  return _scatter(record, nonzero, rest)


SB = RecordCodec(
    "sb", versions=(1, 2, 3), encode=_sb_encode, decode=_sb_decode,
    fits=lambda r: mask_bytes(r.numel) <= r.nbytes <= mask_bytes(r.numel) + r.numel * r.itemsize)
SE = RecordCodec(
    "se", versions=(1,), encode=_coded_encode(symbol_coding.SEMI_STATIC, flat=True),
    decode=_se_decode, range_coded=True,
    fits=lambda r: (r.nbytes >= _LENGTH.size
                    and r.numel <= symbol_coding.SEMI_STATIC.capacity(r.nbytes - _LENGTH.size, 2)))
SC = RecordCodec(
    "sc", versions=(2, 3), encode=_coded_encode(symbol_coding.CONTEXT, flat=False),
    decode=_sc_decode, range_coded=True,
    fits=lambda r: (r.nbytes > _LENGTH.size
                    and 0 < r.numel <= symbol_coding.CONTEXT.capacity(r.nbytes - _LENGTH.size, 2)))
