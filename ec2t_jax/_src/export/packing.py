"""The ``.ec2t`` packed format: a parameter tree in as few bytes as it really takes.

Format, version 2
=================

A file is one byte string, all integers little-endian::

    offset  size  field
    0       8     magic  b"\\x89EC2T\\r\\n\\x1a"   (PNG-style: catches text-mode mangling)
    8       2     u16 format version (2; version-1 files are still read)
    10      2     u16 flags (0; anything else is rejected)
    12      4     u32 H: length of the header
    16      8     u64 P: length of the payload
    24      H     header: zlib-compressed UTF-8 JSON (below)
    24+H    P     payload: the leaf streams, one after another, in leaf order
    24+H+P  32    SHA-256 of bytes [0, 24+H+P)

The file size must be exactly ``24 + H + P + 32``. A reader checks, in order:
magic, version, flags, size, checksum, then the header and every stream; any
failure raises :class:`ExportFormatError` naming what is wrong, never a
partly decoded tree.

Header JSON: ``{"tree": structure, "leaves": [record, ...], "meta": {...}}``
where ``structure`` is :mod:`trees`'s (dict key order and key types, lists,
tuples, ``None``) and one record per leaf, in order::

    {"c": codec, "d": dtype name, "s": shape, "n": stream length in bytes,
     "v": storage dtype of float values (only when it differs, e.g. "float16"),
     "k": CRC-32 of the decoded leaf (range-coded leaves)}

Streams start where the previous one ended; their lengths must add up to P.
``meta`` holds the writer, the entropy coder's version and user metadata.

Leaf codecs (the smallest candidate wins, per leaf; version 2 writes ``raw``,
``zs``, ``tb``, ``tc``, ``sb``, ``sc``, ``tf``, ``cb``; version 1 had ``te``
and ``se`` in place of ``tc`` and ``sc`` and neither ``tf`` nor ``cb``, and
its decoders are kept):

``raw``  the array's bytes (C order, little-endian), or its float16 copy when
         ``"v": "float16"`` (lossy option for non-ternary float leaves).
``zs``   the same bytes byte-shuffled (all first bytes, all second bytes, ...)
         and zlib-compressed: lossless, helps a little on float data.
``tb``   **ternary, the paper's two bitmasks**: the three values (negative,
         zero, positive; 3 x itemsize raw bytes, so ``-0.0`` survives), the
         non-zero mask (``numel`` bits) and the sign mask of the non-zeros
         (``nnz`` bits, 1 = positive), each ``np.packbits(bitorder="little")``
         with zero padding.
``te``   (version 1) **ternary, entropy-coded**: the three values, then the assignment
         (``n, 0, p`` as symbols ``0, 1, 2``) range-coded by
         :mod:`entropy_coding` (order 0 or previous-weight context).
``tc``   **ternary, context-coded** (version 2): ``-w_n`` and ``w_p`` (2 x
         itemsize raw bytes), one byte ``1`` if the zero is ``-0.0`` else
         ``0``, then the assignment range-coded under an *adaptive* context
         model by :mod:`context_coding` (neighbours in the kernel and the
         density of the weight's filter and input channel; no model bytes).
``sc``   sparse with a context-coded mask (version 2): u32 mask-stream
         length, the mask stream (alphabet 2, :mod:`context_coding`), the
         non-zero values.
``sb``   **sparse** (ECP and other leaves with zeros): the non-zero mask
         (``numel`` bits; an element is zero iff all its bytes are zero), then
         the non-zero values (raw, in the storage dtype).
``se``   (version 1) sparse with an entropy-coded mask: u32 mask-stream
         length, the mask stream (alphabet 2), the non-zero values.
``tf``   **per-filter ternary** (version 2; TWN ``threshold="filter"``, STTN):
         every slice ``f`` along one axis holds ``{-n_f, 0, p_f}``. u8 the
         axis (the last one, a Flax kernel's output filters, is tried
         first), u8 ``S`` scales per filter (1: ``n_f = p_f``, stored ``p_f``;
         2: all ``-n_f`` then all ``p_f``), u8 ``1`` if the zero is ``-0.0``,
         ``S x F`` values (itemsize each, ``+0`` for a sign the filter does not
         use), then the assignment context-coded as in ``tc``.
``cb``   **codebook** (version 2; INQ, MCQ, SLQ, any dtype): u16 ``K`` (2 to
         :data:`MAX_CODEBOOK` = 256) distinct values, the ``K`` values sorted
         by bit pattern (itemsize each), then each element's index coded by
         :mod:`codebook_coding` (adaptive order 0, no table).

``tf`` and ``cb`` store the leaf's own dtype even under the ``float16``
option (they are written only when smaller than every other candidate).

Bounded decoding
================

A file is untrusted input (its SHA-256 is unkeyed: anyone can recompute it), so
a reader commits no memory that the file's own length and ``max_bytes`` do not
justify. Before anything is allocated it checks:

* the decompressed header against :data:`MAX_HEADER_BYTES` (and ``max_bytes``)
  through ``zlib.decompressobj(...).decompress(data, max_length)``, its JSON
  nesting against :data:`MAX_JSON_DEPTH`, the number of leaves against
  :data:`MAX_LEAVES` and every shape against :data:`MAX_NDIM`;
* the decoded size of the whole tree, ``sum(numel x itemsize)``, against
  ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES`, 4 GiB);
* every record's element count against what its stream can hold: exactly
  ``numel x itemsize`` bytes for ``raw``; at most 1032 bytes per zlib byte
  (deflate's largest expansion) for ``zs``; one mask bit per element for
  ``tb`` / ``sb``; and for the range-coded streams a probability floor: a
  symbol's probability is at most ``1 - (K - 1) f``, so each symbol costs at
  least ``c = -log2(1 - (K - 1) f)`` bits and a stream of ``B`` bytes holds at
  most ``(8 B + 64) / c`` symbols. Version 2's ``tc`` / ``sc`` / ``tf`` use
  ``f = 2^-10`` (:func:`context_coding.capacity`: about 2,800 symbols per
  byte), ``cb`` uses ``f = 2^-8 / K`` (:func:`codebook_coding.capacity`,
  checked with ``K = 2``, its largest, before the stream's ``K`` is read, then
  with its ``K``); ``tf``'s ``S x F`` scales and ``cb``'s ``K`` values are
  checked against the stream's length before they are read; version 1's ``te`` / ``se`` only have constriction's ``2^-24``
  (:func:`entropy_coding.max_symbols`), so for them ``max_bytes`` is the
  real bound.

zlib streams are inflated with a maximum output size and range-coded streams
are decoded in chunks of :data:`entropy_coding.DECODE_CHUNK` symbols into one
preallocated ``int8`` array, so a reader's peak memory is about the decoded
tree (at most ``max_bytes``) plus its ``int8`` assignments, plus the file.

A leaf is *ternary* when it is floating point, finite and holds exactly three
distinct bit patterns: one negative value ``-w_n``, one zero and one positive
value ``w_p``. Storage in the ternary codecs is exact, so the default round trip
is bitwise (arrays come back native-endian with identical bits).

Example:
  >>> tree = {"w": np.array([[0.5, 0.0], [-0.25, 0.5]], np.float32)}
  >>> data = pack(tree)
  >>> assert (unpack(data)["w"] == tree["w"]).all()
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import zlib
from typing import Any, NamedTuple, Optional

import constriction
import ml_dtypes
import numpy as np

from ec2t_jax._src.export import codebook_coding
from ec2t_jax._src.export import context_coding
from ec2t_jax._src.export import entropy_coding
from ec2t_jax._src.core import trees

MAGIC = b"\x89EC2T\r\n\x1a"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
_FIXED = struct.Struct("<8sHHIQ")  # magic, version, flags, H, P
_DIGEST = 32
_MIN_SIZE = _FIXED.size + _DIGEST

_DTYPES = {np.dtype(t).name: np.dtype(t) for t in (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
    np.uint32, np.uint64, np.float16, np.float32, np.float64, ml_dtypes.bfloat16)}
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
CODECS = ("raw", "zs", "tb", "tc", "sb", "sc", "tf", "cb")  # what this version writes
CODECS_BY_VERSION = {1: ("raw", "zs", "tb", "te", "sb", "se"), 2: CODECS}
TERNARY_CODECS = ("tb", "te", "tc")
RANGE_CODED = ("te", "se", "tc", "sc", "tf", "cb")
EXACT_CODECS = ("tf", "cb")  # store the leaf's own dtype even under ``float16``
MAX_CODEBOOK = codebook_coding.MAX_ALPHABET  # most distinct values of a ``cb`` leaf
_TF_HEAD = 3  # axis, scales per filter, zero sign

DEFAULT_MAX_BYTES = 4 * 2**30  # decoded arrays a reader accepts by default
MAX_HEADER_BYTES = 16 * 2**20  # decompressed header JSON
MAX_JSON_DEPTH = 128  # nesting of the header JSON (about 40 levels of tree)
MAX_LEAVES = 2**20
MAX_NDIM = 32
MAX_DIM = 2**40  # largest length of one axis (numpy refuses shapes whose product of
                 # non-zero axes overflows, even for empty arrays)
_ZLIB_MAX_RATIO = 1032  # deflate never expands one input byte to more output bytes


class ExportFormatError(ValueError):
  """A packed file (or stream) is not valid: wrong magic or version, truncated, corrupted."""


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


class PackedInfo(NamedTuple):
  """What a packed file holds, without decoding its leaves.

  Attributes:
    version: format version.
    records: one :class:`LeafRecord` per leaf, in order.
    structure: the tree structure (see :mod:`trees`).
    meta: writer metadata.
    header_bytes: ``H`` (compressed header length).
    payload_bytes: ``P``.
    total_bytes: size of the file.
  """
  version: int
  records: list[LeafRecord]
  structure: Any
  meta: dict
  header_bytes: int
  payload_bytes: int
  total_bytes: int


class TernaryParts(NamedTuple):
  """A ternary leaf split into its assignment and its three stored values.

  Attributes:
    assignment: ``int8`` array in ``{-1, 0, 1}`` (n, 0, p).
    values: the leaf's dtype, ``[-w_n, zero, w_p]`` (``zero`` is ``+0`` or
      ``-0``, kept for bitwise restoration).
  """
  assignment: np.ndarray
  values: np.ndarray

  @property
  def w_n(self) -> float:
    return float(-self.values[0])

  @property
  def w_p(self) -> float:
    return float(self.values[2])


# --------------------------------------------------------------------------- leaves


def _contiguous(array) -> np.ndarray:
  """C-contiguous array, keeping 0-d arrays 0-d (unlike ``np.ascontiguousarray``)."""
  return np.require(np.asarray(array), requirements="C")


def _uint_view(array: np.ndarray) -> np.ndarray:
  return array.view(f"u{array.dtype.itemsize}")


def _to_le_bytes(array: np.ndarray) -> bytes:
  """C-order little-endian bytes (through an unsigned view: works for bfloat16)."""
  array = _contiguous(array)
  return _uint_view(array).astype(f"<u{array.dtype.itemsize}", copy=False).tobytes()


def _from_le_bytes(data: bytes, dtype: np.dtype, count: int) -> np.ndarray:
  if len(data) != count * dtype.itemsize:
    raise ExportFormatError(f"expected {count * dtype.itemsize} value bytes, got {len(data)}")
  words = np.frombuffer(data, f"<u{dtype.itemsize}", count=count)
  return words.astype(f"=u{dtype.itemsize}").view(dtype)


def ternary_parts(array) -> Optional[TernaryParts]:
  """Splits ``array`` into assignment and values if it is ternary, else ``None``.

  Ternary means: floating point, finite, exactly three distinct bit patterns,
  one negative, one zero (``+0`` or ``-0``) and one positive.

  Args:
    array: any array.

  Returns:
    :class:`TernaryParts` or ``None``.

  Example:
    >>> ternary_parts(np.array([0.3, 0.0, -0.2, 0.3], np.float32)).assignment
    array([ 1,  0, -1,  1], dtype=int8)
  """
  array = np.asarray(array)
  if array.dtype.name not in _FLOAT_NAMES or array.size < 3:
    return None
  flat = _contiguous(array).reshape(-1)
  bits = _uint_view(flat)
  if np.unique(bits[:64]).size > 3:  # cheap rejection of dense float leaves
    return None
  patterns, inverse = np.unique(bits, return_inverse=True)
  if patterns.size != 3:
    return None
  values = patterns.view(array.dtype)
  as_float = values.astype(np.float64)
  if not np.isfinite(as_float).all():
    return None
  order = np.argsort(as_float, kind="stable")
  neg, zero, pos = as_float[order]
  if not (neg < 0 and zero == 0 and pos > 0):
    return None
  rank = np.empty(3, np.int8)
  rank[order] = np.array([-1, 0, 1], np.int8)
  return TernaryParts(rank[inverse].reshape(array.shape), values[order])


class FilterTernaryParts(NamedTuple):
  """A per-filter ternary leaf: values ``{-n_f, 0, p_f}`` for each index ``f`` of one axis.

  Attributes:
    axis: the axis the scales vary along (the output filters: last for Flax).
    assignment: ``int8`` array in ``{-1, 0, 1}``.
    negative: ``(F,)`` values ``-n_f`` in the leaf's dtype (``+0`` where
      filter ``f`` has no negative weight).
    positive: ``(F,)`` values ``p_f`` (``+0`` where it has no positive weight).
    zero_is_negative: whether the zeros are ``-0.0``.
  """
  axis: int
  assignment: np.ndarray
  negative: np.ndarray
  positive: np.ndarray
  zero_is_negative: bool

  @property
  def symmetric(self) -> bool:
    """``p_f = n_f`` wherever filter ``f`` has both signs (one scale per filter)."""
    both = (_uint_view(self.negative) != 0) & (_uint_view(self.positive) != 0)
    return bool((-self.negative[both] == self.positive[both]).all())


def filter_ternary_parts(array, axes=None) -> Optional[FilterTernaryParts]:
  """Splits ``array`` into assignment and per-filter values, or returns ``None``.

  Per-filter ternary means: floating point, finite, at least two axes, all
  zeros with one bit pattern, and along some axis (tried last first, as Flax
  kernels keep the output filters last) every slice ``f`` holds at most one
  negative value ``-n_f`` and one positive value ``p_f`` (TWN with
  ``threshold="filter"``, STTN). Globally ternary leaves qualify too.

  Args:
    array: any array.
    axes: the axes to try (default: every axis, last first).

  Returns:
    :class:`FilterTernaryParts` or ``None``.

  Example:
    >>> w = np.array([[0.5, 0.0], [-0.5, 2.0], [0.0, -2.0]], np.float32)
    >>> parts = filter_ternary_parts(w)
    >>> parts.axis, parts.positive.tolist(), parts.symmetric
    (1, [0.5, 2.0], True)
  """
  array = np.asarray(array)
  if array.dtype.name not in _FLOAT_NAMES or array.ndim < 2 or array.size < 3:
    return None
  array = _contiguous(array)
  zero = array == 0
  zero_bits = np.unique(_uint_view(array[zero]))
  if zero_bits.size > 1:
    return None
  with np.errstate(invalid="ignore"):
    if not np.isfinite(array.astype(np.float64)).all():
      return None
  if np.unique(_uint_view(array.reshape(-1)[:4096])).size > 2 * max(array.shape) + 1:
    return None  # cheap rejection of dense float leaves
  negative, positive = array < 0, array > 0
  for axis in (range(array.ndim - 1, -1, -1) if axes is None else axes):
    reduce = tuple(a for a in range(array.ndim) if a != axis)
    ends = []
    for mask in (negative, positive):
      low = np.where(mask, array, np.inf).min(axis=reduce)
      high = np.where(mask, array, -np.inf).max(axis=reduce)
      used = mask.any(axis=reduce)
      if not (low[used] == high[used]).all():
        break
      ends.append(np.where(used, low, 0).astype(array.dtype))
    else:
      assignment = positive.astype(np.int8) - negative.astype(np.int8)
      return FilterTernaryParts(axis, assignment, ends[0], ends[1],
                                bool(zero_bits.size and zero_bits[0]))
  return None


def codebook_parts(array, max_values: int = MAX_CODEBOOK):
  """``(values, indices)`` of a leaf with 2 to ``max_values`` distinct bit patterns, else ``None``.

  ``values`` are the distinct elements sorted by bit pattern (so ``-0.0``
  and ``+0.0`` are distinct and NaNs survive), ``indices`` the ``uint8``
  position of each element's value.

  Example:
    >>> values, indices = codebook_parts(np.array([4, 1, 4, 4], np.int32))
    >>> values.tolist(), indices.tolist()
    ([1, 4], [1, 0, 1, 1])
  """
  array = _contiguous(np.asarray(array))
  if array.size < 2 or array.dtype.name not in _DTYPES:
    return None
  bits = _uint_view(array.reshape(-1))
  if np.unique(bits[:4 * max_values]).size > max_values:  # cheap rejection of dense leaves
    return None
  patterns, inverse = np.unique(bits, return_inverse=True)
  if not 2 <= patterns.size <= max_values:
    return None
  return patterns.view(array.dtype), inverse.astype(np.uint8).reshape(array.shape)


def _pack_bits(mask: np.ndarray) -> bytes:
  return np.packbits(mask.reshape(-1).astype(bool), bitorder="little").tobytes()


def _unpack_bits(data: bytes, count: int) -> np.ndarray:
  if len(data) != (count + 7) // 8:
    raise ExportFormatError(f"bit mask of {count} bits needs {(count + 7) // 8} bytes, got {len(data)}")
  bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
  if bits[count:].any():
    raise ExportFormatError("bit mask has non-zero padding bits")
  return bits[:count].astype(bool)


def _shuffle_compress(raw: bytes, itemsize: int) -> bytes:
  planes = np.frombuffer(raw, np.uint8).reshape(-1, itemsize).T
  return zlib.compress(_contiguous(planes).tobytes(), 6)


def inflate(data: bytes, limit: int, what: str) -> bytes:
  """zlib-decompresses ``data`` into at most ``limit`` bytes.

  Raises:
    ExportFormatError: corrupt or truncated stream, bytes after its end, or an
      output longer than ``limit`` (a zlib bomb is stopped at ``limit + 1``).
  """
  inflater = zlib.decompressobj()
  try:
    out = inflater.decompress(data, limit + 1)
  except zlib.error as e:
    raise ExportFormatError(f"{what}: zlib stream is corrupt: {e}") from None
  if len(out) > limit:
    raise ExportFormatError(f"{what}: zlib stream inflates to more than {limit:,} bytes")
  if not inflater.eof:
    raise ExportFormatError(f"{what}: zlib stream is truncated")
  if inflater.unused_data:
    raise ExportFormatError(f"{what}: {len(inflater.unused_data)} bytes after the zlib stream")
  return out


def _shuffle_decompress(data: bytes, itemsize: int, count: int, what: str) -> bytes:
  planes = inflate(data, itemsize * count, what)
  if len(planes) != itemsize * count:
    raise ExportFormatError(f"{what}: decompressed leaf has the wrong length")
  return np.frombuffer(planes, np.uint8).reshape(itemsize, count).T.tobytes()


def _tc_values(values: np.ndarray) -> bytes:
  """``-w_n``, ``w_p`` and the sign of the zero (``tc``'s head)."""
  zero_is_negative = bool(_uint_view(_contiguous(values[1:2]))[0])
  return _to_le_bytes(values[[0, 2]]) + bytes([zero_is_negative])


def _sign_flipped(values: np.ndarray) -> np.ndarray:
  """``-values`` bit for bit (the sign bit flipped), ``+0`` kept ``+0``."""
  bits = _uint_view(_contiguous(values))
  sign = np.array(1 << (8 * values.dtype.itemsize - 1), bits.dtype)
  return np.where(bits == 0, bits, bits ^ sign).view(values.dtype)


def _tf_stream(parts: FilterTernaryParts) -> bytes:
  """``tf``: axis, scales per filter, zero sign, the scales, the context-coded assignment."""
  if parts.symmetric:
    has_positive = _uint_view(parts.positive) != 0
    scales = [np.where(has_positive, parts.positive, _sign_flipped(parts.negative))]
  else:
    scales = [parts.negative, parts.positive]
  head = bytes([parts.axis, len(scales), parts.zero_is_negative])
  return (head + b"".join(_to_le_bytes(v) for v in scales)
          + context_coding.encode(parts.assignment + 1, 3))


def _decode_filter_ternary(record: LeafRecord, stream: bytes, dtype: np.dtype) -> np.ndarray:
  what = f"per-filter ternary leaf {record.path!r}"
  shape = record.shape
  if len(stream) < _TF_HEAD:
    raise ExportFormatError(f"{what}: truncated stream")
  axis, per_filter, zero_sign = stream[:_TF_HEAD]
  if axis >= len(shape) or per_filter not in (1, 2) or zero_sign > 1:
    raise ExportFormatError(f"{what}: corrupt head (axis {axis}, {per_filter} scales per "
                            f"filter, zero sign {zero_sign}) for shape {shape}")
  filters = shape[axis]
  head = _TF_HEAD + per_filter * filters * dtype.itemsize
  if head >= len(stream):
    raise ExportFormatError(f"{what}: a {len(stream):,}-byte stream cannot hold "
                            f"{per_filter * filters:,} scales and an assignment")
  scales = _from_le_bytes(stream[_TF_HEAD:head], dtype, per_filter * filters)
  if per_filter == 1:
    negative, positive = _sign_flipped(scales), scales
  else:
    negative, positive = scales[:filters], scales[filters:]
  with np.errstate(invalid="ignore"):
    for values, sign in ((negative, -1), (positive, 1)):
      v = values.astype(np.float64)
      if not ((_uint_view(values) == 0) | (np.isfinite(v) & (sign * v > 0))).all():
        raise ExportFormatError(f"{what} has invalid scales {v[:8].tolist()}")
  try:
    symbols = context_coding.decode(stream[head:], shape, 3)
  except context_coding.CodingError as e:
    raise ExportFormatError(f"leaf {record.path!r}: {e}") from None
  along = [1] * len(shape)
  along[axis] = filters
  out = np.full(shape, -0.0 if zero_sign else 0.0, dtype)
  for symbol, values in ((0, negative), (2, positive)):
    where = symbols == symbol
    if (where & (_uint_view(values) == 0).reshape(along)).any():
      raise ExportFormatError(f"{what} uses a scale it does not store")
    np.copyto(out, values.reshape(along), where=where)
  return out.reshape(-1)


def _cb_stream(values: np.ndarray, indices: np.ndarray) -> bytes:
  """``cb``: u16 K, the K values (by increasing bit pattern), the coded indices."""
  return (struct.pack("<H", values.size) + _to_le_bytes(values)
          + codebook_coding.encode(indices, values.size))


def _decode_codebook(record: LeafRecord, stream: bytes, dtype: np.dtype) -> np.ndarray:
  what = f"codebook leaf {record.path!r}"
  if len(stream) < 2:
    raise ExportFormatError(f"{what}: truncated stream")
  (size,) = struct.unpack_from("<H", stream)
  head = 2 + size * dtype.itemsize
  if not 2 <= size <= MAX_CODEBOOK or head > len(stream):
    raise ExportFormatError(f"{what}: a {len(stream):,}-byte stream cannot hold a codebook "
                            f"of {size} values (2 to {MAX_CODEBOOK} allowed)")
  values = _from_le_bytes(stream[2:head], dtype, size)
  if not (np.diff(_uint_view(values).astype(np.int64)) > 0).all():
    raise ExportFormatError(f"{what}: codebook values are not distinct and sorted")
  try:
    return values[codebook_coding.decode(stream[head:], record.numel, size)]
  except codebook_coding.CodingError as e:
    raise ExportFormatError(f"leaf {record.path!r}: {e}") from None


def _decode_values(record: LeafRecord, stream: bytes, dtype: np.dtype) -> tuple[np.ndarray, int]:
  """The three values ``[-w_n, zero, w_p]`` at the start of a ternary stream, and their length."""
  if record.codec == "tc":
    head = 2 * dtype.itemsize + 1
    if len(stream) < head or stream[head - 1] > 1:
      raise ExportFormatError(f"ternary leaf {record.path!r} has a corrupt value header")
    ends = _from_le_bytes(stream[:head - 1], dtype, 2)
    zero = np.array([-0.0 if stream[head - 1] else 0.0], dtype)
    values = np.concatenate([ends[:1], zero, ends[1:]])
  else:
    head = 3 * dtype.itemsize
    values = _from_le_bytes(stream[:head], dtype, 3)
  v = values.astype(np.float64)
  if not (v[0] < 0 and v[1] == 0 and v[2] > 0 and np.isfinite(v).all()):
    raise ExportFormatError(f"ternary leaf {record.path!r} has invalid values {v.tolist()}")
  return values, head


def _candidates(array: np.ndarray, storage: np.dtype, entropy: bool,
                parts: Optional[TernaryParts]) -> dict[str, bytes]:
  """Every applicable codec's stream for one leaf."""
  out = {}
  stored = array if storage == array.dtype else array.astype(storage)
  raw = _to_le_bytes(stored)
  out["raw"] = raw
  if array.size >= 16 and parts is None:  # ternary codecs beat zlib on ternary leaves
    out["zs"] = _shuffle_compress(raw, storage.itemsize)
  if parts is not None:
    values = _to_le_bytes(parts.values)
    a = parts.assignment
    nonzero = a != 0
    out["tb"] = values + _pack_bits(nonzero) + _pack_bits(a[nonzero] > 0)
    if entropy:
      out["tc"] = _tc_values(parts.values) + context_coding.encode(a + 1, 3)
    return out
  nonzero = (_uint_view(_contiguous(stored)) != 0)  # of the stored values (float16 may underflow)
  nnz = int(nonzero.sum())
  if array.size >= 16 and nnz < array.size:
    dense_values = _to_le_bytes(stored.reshape(-1)[nonzero.reshape(-1)])
    if (array.size + 7) // 8 + len(dense_values) < len(raw):
      out["sb"] = _pack_bits(nonzero) + dense_values
      if entropy and 0 < nnz:
        mask = context_coding.encode(nonzero.astype(np.int8), 2)
        out["sc"] = struct.pack("<I", len(mask)) + mask + dense_values
  return out


def _encode_leaf(path: str, array: np.ndarray, *, float16: bool, entropy: bool,
                 codecs) -> tuple[dict, bytes]:
  if array.dtype.name not in _DTYPES:
    raise ValueError(f"leaf {path!r}: dtype {array.dtype} is not supported "
                     f"(supported: {', '.join(_DTYPES)})")
  array = _contiguous(array)
  parts = ternary_parts(array)
  storage = array.dtype
  if float16 and parts is None and array.dtype.name in ("float32", "float64"):
    with np.errstate(over="ignore"):
      half = array.astype(np.float16)
    if (np.isfinite(half) == np.isfinite(array)).all():  # no overflow to inf
      storage = np.dtype(np.float16)
  streams = _candidates(array, storage, entropy, parts)
  if entropy and parts is None:  # exact codecs for per-filter ternary and codebook leaves
    want = lambda codec: codecs is None or codec in codecs
    filter_parts = filter_ternary_parts(array) if want("tf") else None
    if filter_parts is not None:
      streams["tf"] = _tf_stream(filter_parts)
    book = codebook_parts(array) if want("cb") else None
    if book is not None:
      streams["cb"] = _cb_stream(*book)
  allowed = {k: v for k, v in streams.items() if codecs is None or k in codecs}
  if not allowed:
    raise ValueError(f"leaf {path!r}: none of the codecs {sorted(codecs)} applies "
                     f"(applicable: {sorted(streams)})")
  codec = min(allowed, key=lambda k: (len(allowed[k]), CODECS.index(k)))
  if codec in EXACT_CODECS:
    storage = array.dtype
  record = {"c": codec, "d": array.dtype.name, "s": list(array.shape), "n": len(allowed[codec])}
  if storage != array.dtype:
    record["v"] = storage.name
  if codec in RANGE_CODED:  # CRC of what decoding must give back
    decoded = array if storage == array.dtype else array.astype(storage).astype(array.dtype)
    record["k"] = zlib.crc32(_to_le_bytes(decoded))
  return record, allowed[codec]


def _decode_leaf(record: LeafRecord, stream: bytes) -> np.ndarray:
  dtype, storage = _DTYPES[record.dtype], _DTYPES[record.storage]
  count = record.numel
  codec = record.codec
  if codec in ("raw", "zs"):
    raw = stream if codec == "raw" else _shuffle_decompress(
        stream, storage.itemsize, count, f"leaf {record.path!r}")
    flat = _from_le_bytes(raw, storage, count)
  elif codec in TERNARY_CODECS:
    if storage != dtype or dtype.name not in _FLOAT_NAMES:
      raise ExportFormatError(f"ternary leaf {record.path!r} has dtype {dtype}/{storage}")
    values, head = _decode_values(record, stream, dtype)
    if codec == "tb":
      nonzero = _unpack_bits(stream[head:head + (count + 7) // 8], count)
      nnz = int(nonzero.sum())
      positive = _unpack_bits(stream[head + (count + 7) // 8:], nnz)
      symbols = np.ones(count, np.int8)
      symbols[nonzero] = np.where(positive, 2, 0)
    else:
      try:
        decode = entropy_coding.decode_symbols if codec == "te" else context_coding.decode
        symbols = decode(stream[head:], record.shape, 3).reshape(-1)
      except (entropy_coding.CodingError, context_coding.CodingError) as e:
        raise ExportFormatError(f"leaf {record.path!r}: {e}") from None
    flat = values[symbols]
  elif codec in EXACT_CODECS:
    if storage != dtype or (codec == "tf" and dtype.name not in _FLOAT_NAMES):
      raise ExportFormatError(f"{codec!r} leaf {record.path!r} has dtype {dtype}/{storage}")
    decode = _decode_filter_ternary if codec == "tf" else _decode_codebook
    flat = decode(record, stream, dtype)
  elif codec in ("sb", "se", "sc"):
    if codec == "sb":
      nonzero = _unpack_bits(stream[:(count + 7) // 8], count)
      rest = stream[(count + 7) // 8:]
    else:
      if len(stream) < 4:
        raise ExportFormatError(f"leaf {record.path!r}: truncated sparse stream")
      (length,) = struct.unpack_from("<I", stream)
      if 4 + length > len(stream):
        raise ExportFormatError(f"leaf {record.path!r}: truncated mask stream")
      try:
        if codec == "se":
          nonzero = entropy_coding.decode_symbols(stream[4:4 + length], (count,), 2)
        else:
          nonzero = context_coding.decode(stream[4:4 + length], record.shape, 2)
        nonzero = nonzero.reshape(-1).astype(bool)
      except (entropy_coding.CodingError, context_coding.CodingError) as e:
        raise ExportFormatError(f"leaf {record.path!r}: {e}") from None
      rest = stream[4 + length:]
    values = _from_le_bytes(rest, storage, int(nonzero.sum()))
    flat = np.zeros(count, storage)
    flat[nonzero] = values
    if (_uint_view(values) == 0).any():
      raise ExportFormatError(f"sparse leaf {record.path!r} stores a zero as a non-zero")
  else:
    raise ExportFormatError(f"leaf {record.path!r}: unknown codec {codec!r}")
  if storage != dtype:
    flat = flat.astype(dtype)
  return flat.reshape(record.shape)


# ------------------------------------------------------------------------ container


def pack(tree, *, float16: bool = False, entropy_coding: bool = True,
         codecs=None, metadata: Optional[dict] = None, full_precision=()) -> bytes:
  """Encodes a parameter tree into the packed format.

  Args:
    tree: nested dicts / lists / tuples of arrays (Linen params, an NNX
      ``nnx.State`` or its ``to_pure_dict()``, an ``.npz`` state dict).
    float16: store non-ternary float32/float64 leaves as float16 (lossy; they
      come back in their original dtype). Ternary leaves stay exact.
    entropy_coding: allow the range-coded codecs (``tc``, ``sc``); with False
      ternary leaves use the paper's bitmasks.
    codecs: optional set restricting the codecs (``raw`` always needed as a
      fallback for leaves no other codec applies to).
    metadata: JSON-able dict stored in the header under ``meta["user"]``.
    full_precision: leaf paths kept in their own dtype even with ``float16``.

  Returns:
    The file's bytes.

  Raises:
    ValueError: for unsupported leaves (non-numeric, complex, ...).
  """
  leaves, structure = trees.flatten(tree)
  records, streams = [], []
  for path, array in leaves:
    record, stream = _encode_leaf(path, array, float16=float16 and path not in full_precision,
                                  entropy=entropy_coding,
                                  codecs=None if codecs is None else set(codecs))
    records.append(record)
    streams.append(stream)
  meta = {"writer": "ec2t_jax", "coder": f"constriction {_constriction_version()}"}
  if metadata:
    meta["user"] = metadata
  header = json.dumps({"tree": structure, "leaves": records, "meta": meta},
                      separators=(",", ":"), allow_nan=False).encode("utf-8")
  header = zlib.compress(header, 9)
  payload = b"".join(streams)
  body = _FIXED.pack(MAGIC, FORMAT_VERSION, 0, len(header), len(payload)) + header + payload
  return body + hashlib.sha256(body).digest()


def _constriction_version() -> str:
  try:
    from importlib.metadata import version
    return version("constriction")
  except Exception:  # pragma: no cover - metadata missing in odd installs
    return getattr(constriction, "__version__", "unknown")


def _check_container(data: bytes) -> tuple[int, int, int]:
  """Validates magic, version, flags, size and checksum; returns (version, H, P)."""
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f"expected bytes, got {type(data).__name__}")
  data = bytes(data)
  if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
    if MAGIC.startswith(data[:len(MAGIC)]) and len(data) < len(MAGIC):
      raise ExportFormatError(f"truncated file: {len(data)} bytes, not even a full magic number")
    raise ExportFormatError("not an ec2t packed file: bad magic number")
  if len(data) < _MIN_SIZE:
    raise ExportFormatError(f"truncated file: {len(data)} bytes, the fixed header and "
                            f"checksum alone take {_MIN_SIZE}")
  _, version, flags, header_len, payload_len = _FIXED.unpack_from(data)
  if version not in SUPPORTED_VERSIONS:
    raise ExportFormatError(f"unsupported format version {version} (this reader supports "
                            f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
  if flags:
    raise ExportFormatError(f"unsupported flags 0x{flags:04x} in a version-{version} file")
  expected = _FIXED.size + header_len + payload_len + _DIGEST
  if len(data) < expected:
    raise ExportFormatError(f"truncated file: {len(data)} bytes, its header announces {expected}")
  if len(data) > expected:
    raise ExportFormatError(f"{len(data) - expected} unexpected trailing bytes after the checksum "
                            f"(file has {len(data)} bytes, its header announces {expected})")
  if hashlib.sha256(data[:-_DIGEST]).digest() != data[-_DIGEST:]:
    raise ExportFormatError("checksum mismatch: the file is corrupted")
  return version, header_len, payload_len


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_STEP = np.zeros(256, np.int64)
_JSON_STEP[[ord("["), ord("{")]] = 1
_JSON_STEP[[ord("]"), ord("}")]] = -1


def _json_depth(text: bytes) -> int:
  """Largest nesting depth of ``[`` / ``{`` outside strings (no recursion)."""
  codes = np.frombuffer(_JSON_STRING.sub(b'""', text), np.uint8)
  return int(np.cumsum(_JSON_STEP[codes]).max(initial=0))


def _load_header_json(data: bytes, max_bytes: int):
  limit = min(MAX_HEADER_BYTES, max_bytes)
  text = inflate(data, limit, "corrupt header")
  depth = _json_depth(text)
  if depth > MAX_JSON_DEPTH:
    raise ExportFormatError(f"corrupt header: JSON nested {depth} deep "
                            f"(at most {MAX_JSON_DEPTH} allowed)")
  try:
    return json.loads(text.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise ExportFormatError(f"corrupt header: {e}") from None


def _is_count(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _record(path: str, r, version: int) -> LeafRecord:
  """Validates one raw header record (types and ranges, not yet sizes)."""
  try:
    codec, dtype, shape, nbytes = r["c"], r["d"], r["s"], r["n"]
    storage = r.get("v", dtype)
    crc = r.get("k")
    ok = (isinstance(shape, list) and len(shape) <= MAX_NDIM
          and all(_is_count(n) and n <= MAX_DIM for n in shape)
          and math.prod(n for n in shape if n) <= MAX_DIM
          and (crc is None or _is_count(crc)) and isinstance(codec, str)
          and isinstance(dtype, str) and isinstance(storage, str)
          and codec in CODECS_BY_VERSION[version] and dtype in _DTYPES and storage in _DTYPES
          and _is_count(nbytes)
          and (storage == dtype or (storage == "float16" and dtype in ("float32", "float64"))))
  except (TypeError, KeyError, AttributeError) as e:
    raise ExportFormatError(f"corrupt record for leaf {path!r}: {e}") from None
  if not ok:
    raise ExportFormatError(f"corrupt record for leaf {path!r}: {r!r:.120}")
  return LeafRecord(path, codec, dtype, tuple(shape), nbytes, storage, crc)


def _check_capacity(record: LeafRecord) -> None:
  """Rejects a record whose element count its stream cannot hold (see "Bounded decoding")."""
  count, size, codec = record.numel, record.nbytes, record.codec
  item = _DTYPES[record.storage].itemsize
  mask = (count + 7) // 8
  head = 3 * item
  if codec == "raw":
    ok = size == count * item
  elif codec == "zs":
    ok = 0 < size and count * item <= _ZLIB_MAX_RATIO * size
  elif codec == "tb":
    ok = head + mask <= size <= head + 2 * mask
  elif codec == "te":
    ok = size >= head and count <= entropy_coding.max_symbols(size - head, 3)
  elif codec == "sb":
    ok = mask <= size <= mask + count * item
  elif codec == "se":
    ok = size >= 4 and count <= entropy_coding.max_symbols(size - 4, 2)
  elif codec == "tc":
    head = 2 * item + 1
    ok = size > head and 0 < count <= context_coding.capacity(size - head, 3)
  elif codec == "tf":  # at least one scale before the assignment
    head = _TF_HEAD + item
    ok = size > head and 0 < count <= context_coding.capacity(size - head, 3)
  elif codec == "cb":  # at least two values; K = 2 has the largest capacity
    head = 2 + 2 * item
    ok = size >= head and 2 <= count <= codebook_coding.capacity(size - head, 2)
  else:  # "sc"
    ok = size > 4 and 0 < count <= context_coding.capacity(size - 4, 2)
  if not ok:
    raise ExportFormatError(
        f"leaf {record.path!r}: a {size:,}-byte {codec!r} stream cannot hold "
        f"{count:,} elements of shape {record.shape}")


def _parse_header(data: bytes, version: int, header_len: int, payload_len: int,
                  max_bytes: int) -> PackedInfo:
  start = _FIXED.size
  header = _load_header_json(data[start:start + header_len], max_bytes)
  if not isinstance(header, dict) or not {"tree", "leaves", "meta"} <= set(header):
    raise ExportFormatError("corrupt header: missing 'tree', 'leaves' or 'meta'")
  raw_records = header["leaves"]
  if not isinstance(raw_records, list):
    raise ExportFormatError("corrupt header: 'leaves' is not a list")
  if len(raw_records) > MAX_LEAVES:
    raise ExportFormatError(f"corrupt header: {len(raw_records):,} leaves "
                            f"(at most {MAX_LEAVES:,} allowed)")
  try:
    paths = trees.leaf_paths(header["tree"])
    trees.unflatten(list(range(len(paths))), header["tree"])  # validates the structure
  except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
    raise ExportFormatError(f"corrupt header: malformed tree structure ({e})") from None
  if len(paths) != len(raw_records):
    raise ExportFormatError(f"corrupt header: {len(raw_records)} leaf records for "
                            f"{len(paths)} tree leaves")
  records = [_record(path, r, version) for path, r in zip(paths, raw_records)]
  if sum(r.nbytes for r in records) != payload_len:
    raise ExportFormatError("corrupt header: leaf stream lengths do not add up to the payload")
  decoded = sum(r.numel * _DTYPES[r.dtype].itemsize for r in records)
  if decoded > max_bytes:
    raise ExportFormatError(f"the file declares {decoded:,} bytes of arrays, more than "
                            f"max_bytes={max_bytes:,}")
  for record in records:
    _check_capacity(record)
  meta = header["meta"] if isinstance(header["meta"], dict) else {}
  return PackedInfo(version, records, header["tree"], meta, header_len, payload_len,
                    _FIXED.size + header_len + payload_len + _DIGEST)


def _check_max_bytes(max_bytes) -> int:
  if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < 0:
    raise ValueError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
  return int(max_bytes)


def read_info(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> PackedInfo:
  """Validates a packed file and returns its header, without decoding leaves.

  Args:
    data: the file's bytes.
    max_bytes: largest decoded size (all arrays) accepted.

  Raises:
    ExportFormatError: wrong magic or version, truncated, corrupted, or
      declaring more than ``max_bytes`` or more than its streams can hold.
  """
  max_bytes = _check_max_bytes(max_bytes)
  version, header_len, payload_len = _check_container(data)
  return _parse_header(bytes(data), version, header_len, payload_len, max_bytes)


def unpack_leaves(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES
                  ) -> tuple[PackedInfo, list[np.ndarray]]:
  """Decodes every leaf of a packed file.

  Args:
    data: the file's bytes.
    max_bytes: largest decoded size (all arrays) accepted, checked from the
      header before anything is decoded.

  Returns:
    ``(info, arrays)`` with the arrays in leaf order.

  Raises:
    ExportFormatError: if anything about the file is wrong.
  """
  data = bytes(data)
  info = read_info(data, max_bytes=max_bytes)
  offset = _FIXED.size + info.header_bytes
  arrays = []
  for record in info.records:
    stream = data[offset:offset + record.nbytes]
    offset += record.nbytes
    array = _decode_leaf(record, stream)
    if record.crc is not None and zlib.crc32(_to_le_bytes(array)) != record.crc:
      raise ExportFormatError(
          f"leaf {record.path!r} decodes to different content than was written (CRC mismatch); "
          f"written with {info.meta.get('coder', '?')}, read with constriction "
          f"{_constriction_version()}")
    arrays.append(array)
  return info, arrays


def unpack(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES):
  """Decodes a packed file into the tree that was packed.

  Args:
    data: the file's bytes.
    max_bytes: largest decoded size (all arrays) accepted (see "Bounded
      decoding" in the module docstring).

  Returns:
    The tree (nested dicts / lists / tuples of numpy arrays).

  Raises:
    ExportFormatError: if anything about the file is wrong.
  """
  info, arrays = unpack_leaves(data, max_bytes=max_bytes)
  try:
    return trees.unflatten(arrays, info.structure)
  except ValueError as e:
    raise ExportFormatError(f"corrupt header: {e}") from None
