"""Bytes of leaves: the dtypes the format stores, little-endian values, bit masks, bounded zlib.

Shared by the container (:mod:`container`) and the record codecs
(:mod:`record_codecs`). Every reader here checks a length before it trusts it
and raises :class:`ExportFormatError`.

Example:
  >>> import numpy as np
  >>> from ec2t_jax._src.export.leaf_bytes import from_le_bytes, to_le_bytes  # internal
  >>> x = np.array([1.5, -2.0], np.float32)
  >>> from_le_bytes(to_le_bytes(x), x.dtype, 2).tolist()
  [1.5, -2.0]
"""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np

from ec2t_jax._src.export.errors import ExportFormatError

DTYPES = {np.dtype(t).name: np.dtype(t) for t in (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
    np.uint32, np.uint64, np.float16, np.float32, np.float64, ml_dtypes.bfloat16)}
FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def contiguous(array) -> np.ndarray:
  """C-contiguous array, keeping 0-d arrays 0-d (unlike ``np.ascontiguousarray``)."""
  return np.require(np.asarray(array), requirements="C")


def uint_view(array: np.ndarray) -> np.ndarray:
  """The same memory as unsigned integers of the same width (bit patterns)."""
  return array.view(f"u{array.dtype.itemsize}")


def to_le_bytes(array: np.ndarray) -> bytes:
  """C-order little-endian bytes (through an unsigned view: works for bfloat16)."""
  array = contiguous(array)
  return uint_view(array).astype(f"<u{array.dtype.itemsize}", copy=False).tobytes()


# Values per zlib.crc32 call in :func:`crc32_le` (bounds the little-endian copy on big-endian hosts).
CRC_CHUNK = 1 << 20


def crc32_le(array: np.ndarray) -> int:
  """``zlib.crc32(to_le_bytes(array))``, chunk by chunk: no copy of the whole array.

  Example:
    >>> import zlib
    >>> import numpy as np
    >>> from ec2t_jax._src.export.leaf_bytes import crc32_le, to_le_bytes  # internal
    >>> x = np.arange(5, dtype=np.float32)
    >>> crc32_le(x) == zlib.crc32(to_le_bytes(x))
    True
  """
  array = contiguous(array)
  words = uint_view(array).reshape(-1)
  crc = 0
  for start in range(0, words.size, CRC_CHUNK):
    chunk = words[start:start + CRC_CHUNK].astype(f"<u{array.dtype.itemsize}", copy=False)
    crc = zlib.crc32(np.ascontiguousarray(chunk), crc)
  return crc


def from_le_bytes(data: bytes, dtype: np.dtype, count: int) -> np.ndarray:
  """``count`` values of ``dtype`` from exactly ``count * itemsize`` little-endian bytes."""
  if len(data) != count * dtype.itemsize:
    raise ExportFormatError(f"expected {count * dtype.itemsize} value bytes, got {len(data)}")
  words = np.frombuffer(data, f"<u{dtype.itemsize}", count=count)
  return words.astype(f"=u{dtype.itemsize}").view(dtype)


def pack_bits(mask: np.ndarray) -> bytes:
  """``numel`` bits, ``np.packbits(bitorder="little")``, zero padding."""
  return np.packbits(mask.reshape(-1).astype(bool), bitorder="little").tobytes()


def mask_bytes(count: int) -> int:
  """Bytes of a ``count``-bit mask."""
  return (count + 7) // 8


def unpack_bits(data: bytes, count: int) -> np.ndarray:
  """Inverse of :func:`pack_bits`; the length and the padding bits are checked."""
  if len(data) != mask_bytes(count):
    raise ExportFormatError(f"bit mask of {count} bits needs {mask_bytes(count)} bytes, "
                            f"got {len(data)}")
  bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
  if bits[count:].any():
    raise ExportFormatError("bit mask has non-zero padding bits")
  return bits[:count].astype(bool)


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


def sign_flipped(values: np.ndarray) -> np.ndarray:
  """``-values`` bit for bit (the sign bit flipped), ``+0`` kept ``+0``."""
  bits = uint_view(contiguous(values))
  sign = np.array(1 << (8 * values.dtype.itemsize - 1), bits.dtype)
  return np.where(bits == 0, bits, bits ^ sign).view(values.dtype)
