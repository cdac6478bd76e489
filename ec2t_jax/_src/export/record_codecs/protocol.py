"""The record-codec protocol: what one codec of the ``.ec2t`` format provides.

A *record* is one leaf of a packed file: a header entry (:class:`LeafRecord`)
and a stream of bytes in the payload. A record codec (:class:`RecordCodec`)
turns a leaf into a stream (``encode``), says whether a stream of the
record's length can hold the record's elements before anything is allocated
(``fits``, the "Bounded decoding" rule of :mod:`container`), and turns a stream
back into the flat array (``decode``). Its flags say which leaves it may carry,
and the container enforces them for every codec alike:

* ``versions``: the format versions whose files may hold it (the writer writes
  the codecs of :data:`container.FORMAT_VERSION`);
* ``float_only``: the leaf's dtype must be floating point;
* ``own_dtype``: stored in the leaf's own dtype (never the lossy ``float16``
  storage option);
* ``ternary``: stores a globally ternary leaf (:func:`leaf_parts.ternary_parts`);
* ``range_coded``: its stream is range-coded, so the record carries the
  CRC-32 of the decoded leaf (``"k"``).

``decode`` raises :class:`ExportFormatError` for anything wrong; the container
adds the leaf's name to the message.

Example (a codec that stores the leaf as it is)::

    RAW = RecordCodec("raw", versions=(1, 2, 3), encode=lambda leaf: leaf.raw,
                      fits=lambda r: r.nbytes == r.numel * r.itemsize,
                      decode=lambda r, s: from_le_bytes(s, r.storage_dtype, r.numel))
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Optional

import numpy as np

from ec2t_jax._src.export import leaf_parts
from ec2t_jax._src.export.leaf_bytes import DTYPES, contiguous, to_le_bytes, uint_view


class LeafRecord(NamedTuple):
  """One leaf of a packed file, as its header describes it.

  Attributes:
    path: ``/``-joined path (the ``.npz`` key for flat state dicts).
    codec: one of :data:`CODECS`.
    dtype: the leaf's dtype name.
    shape: the leaf's shape.
    nbytes: length of its stream in the payload.
    storage: dtype name of stored float values (differs from ``dtype`` only
      for the lossy float16 option).
    crc: CRC-32 of the decoded leaf (entropy-coded leaves) or ``None``.
  """
  path: str
  codec: str
  dtype: str
  shape: tuple[int, ...]
  nbytes: int
  storage: str
  crc: Optional[int] = None

  @property
  def numel(self) -> int:
    return math.prod(self.shape)

  @property
  def bits_per_weight(self) -> float:
    return 8.0 * self.nbytes / max(self.numel, 1)

  @property
  def dtype_(self) -> np.dtype:
    """The leaf's numpy dtype."""
    return DTYPES[self.dtype]

  @property
  def storage_dtype(self) -> np.dtype:
    """The numpy dtype of its stored values."""
    return DTYPES[self.storage]

  @property
  def itemsize(self) -> int:
    """Bytes per stored value."""
    return DTYPES[self.storage].itemsize


class Leaf:
  """One leaf to encode, with the analyses the codecs share computed at most once.

  Attributes:
    array: the leaf (C-contiguous).
    storage: the dtype its non-exact codecs store (the leaf's own, or float16).
    entropy: whether the range-coded codecs may be used.
  """

  def __init__(self, array: np.ndarray, storage: np.dtype, entropy: bool):
    self.array = contiguous(array)
    self.storage = np.dtype(storage)
    self.entropy = entropy

  @functools.cached_property
  def ternary(self) -> Optional[leaf_parts.TernaryParts]:
    return leaf_parts.ternary_parts(self.array)

  @functools.cached_property
  def stored(self) -> np.ndarray:
    """The values in the storage dtype."""
    a = self.array
    return a if self.storage == a.dtype else contiguous(a.astype(self.storage))

  @functools.cached_property
  def raw(self) -> bytes:
    """The stored values' little-endian bytes."""
    return to_le_bytes(self.stored)

  @functools.cached_property
  def nonzero(self) -> np.ndarray:
    """Mask of the non-zero *stored* values (float16 may underflow to zero)."""
    return uint_view(self.stored) != 0

  @functools.cached_property
  def filter_ternary(self) -> Optional[leaf_parts.FilterTernaryParts]:
    return leaf_parts.filter_ternary_parts(self.array)

  @functools.cached_property
  def codebook(self):
    return leaf_parts.codebook_parts(self.array)


@dataclasses.dataclass(frozen=True)
class RecordCodec:
  """One record codec of the format (see the module docstring).

  Attributes:
    name: the record's ``"c"``.
    versions: format versions whose files may hold it.
    encode: ``Leaf -> bytes | None`` (``None``: the codec does not apply).
    fits: ``LeafRecord -> bool``, whether ``nbytes`` can hold ``numel``
      elements (checked before decoding).
    decode: ``(LeafRecord, stream) -> flat array`` in the storage dtype.
    float_only, own_dtype, ternary, range_coded: see the module docstring.
  """
  name: str
  versions: tuple[int, ...]
  encode: Callable[[Leaf], Optional[bytes]]
  fits: Callable[[LeafRecord], bool]
  decode: Callable[[LeafRecord, bytes], np.ndarray]
  float_only: bool = False
  own_dtype: bool = False
  ternary: bool = False
  range_coded: bool = False
