"""Per-channel codebook records, ``fc`` (version 3; ParetoQ per channel, per-column ternary).

Every output channel ``c`` (index ``c`` of the *last* axis, Flax's output
features) holds at most :data:`MAX_CHANNEL_VALUES` distinct values (bit
patterns): ParetoQ's 2-4-bit codes times one scale per channel
(``{-2, -1, 0, 1} s_c``, ...), or asymmetric per-column ternary
``{-w_n[c], 0, w_p[c]}``. Channel ``c``'s codebook holds its ``k_c`` distinct
values sorted by bit pattern, and every element is stored as the index
``0 <= i < k_c`` of its value in its channel's codebook.

Stream (``C = shape[-1]`` channels, ``K = max k_c``)::

    u16 K                2 to 256 (alphabet of the indices)
    u8  k_c - 1          C bytes, each k_c in [1, K], and some k_c = K
    values               sum(k_c) values in the leaf's dtype (itemsize each),
                         channel 0's first, each channel's strictly increasing
                         by bit pattern
    indices              every element's index in C order, coded by
                         :data:`symbol_coding.CODEBOOK` (adaptive order 0,
                         alphabet K); an index must be < k_c of its channel

The size is about ``numel x H0(indices) / 8 + C + sum(k_c) x itemsize``
bytes. Bounded decoding: the capacity check uses ``K = 2`` (the largest
capacity) and the smallest head a record of ``C`` channels can have
(``2 + C + (C + 1) x itemsize``) before anything is read; the ``C`` sizes and
the ``sum(k_c)`` values are checked against the stream's length before they
are read.

Example:
  >>> import numpy as np
  >>> from ec2t_jax._src.export import container  # internal
  >>> scale = np.array([0.5, 0.25, 2.0], np.float32)
  >>> codes = np.random.default_rng(0).integers(-2, 2, size=(64, 3))
  >>> w = (codes * scale).astype(np.float32)
  >>> data = container.pack({"w": w})
  >>> container.read_info(data).records[0].codec, container.read_info(data).version
  ('fc', 3)
  >>> bool((container.unpack(data)["w"] == w).all())
  True
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Optional

import numpy as np

from ec2t_jax._src.export import symbol_coding
from ec2t_jax._src.export.errors import ExportFormatError
from ec2t_jax._src.export.leaf_bytes import (DTYPES, contiguous, from_le_bytes, to_le_bytes,
                                             uint_view)
from ec2t_jax._src.export.leaf_parts import MAX_CODEBOOK
from ec2t_jax._src.export.record_codecs.protocol import Leaf, LeafRecord, RecordCodec

MAX_CHANNEL_VALUES = MAX_CODEBOOK  # most distinct values of one channel (256)
_SIZE = struct.Struct("<H")
_SAMPLE_ROWS = 4 * MAX_CHANNEL_VALUES  # rows of the cheap rejection of dense leaves


class ChannelCodebookParts(NamedTuple):
  """A leaf split into per-channel codebooks and indices (channels: the last axis).

  Attributes:
    sizes: ``(C,)`` int64, ``k_c`` distinct values of channel ``c``.
    values: ``(sum k_c,)`` in the leaf's dtype, channel by channel, each
      channel's sorted by bit pattern.
    indices: ``uint8`` array of the leaf's shape, each element's index in its
      channel's codebook.
  """
  sizes: np.ndarray
  values: np.ndarray
  indices: np.ndarray

  @property
  def alphabet(self) -> int:
    """``K = max k_c``."""
    return int(self.sizes.max())


def channel_codebook_parts(array, max_values: int = MAX_CHANNEL_VALUES
                           ) -> Optional[ChannelCodebookParts]:
  """Per-channel codebooks of ``array`` (last axis), or ``None`` if it is not such a leaf.

  Such a leaf has at least two axes and two elements, every channel holds at
  most ``max_values`` distinct bit patterns and some channel holds two or
  more. ``-0.0`` and ``+0.0`` are distinct values, NaNs keep their patterns.

  Args:
    array: any array of a supported dtype.
    max_values: most distinct values one channel may hold (2 to 256).

  Returns:
    :class:`ChannelCodebookParts` or ``None``.

  Example:
    >>> import numpy as np
    >>> from ec2t_jax._src.export.record_codecs.channel_codebook import channel_codebook_parts  # internal
    >>> w = np.array([[0.5, 0.0], [-0.5, 2.0], [0.5, 0.0], [0.5, 2.0]], np.float32)
    >>> parts = channel_codebook_parts(w)
    >>> parts.sizes.tolist(), parts.values.tolist(), parts.indices.tolist()
    ([2, 2], [0.5, -0.5, 0.0, 2.0], [[0, 0], [1, 1], [0, 0], [0, 1]])
  """
  array = np.asarray(array)
  if array.ndim < 2 or array.size < 2 or array.dtype.name not in DTYPES:
    return None
  channels = array.shape[-1]
  if channels == 0:
    return None
  bits = uint_view(contiguous(array).reshape(-1, channels))
  sample = np.sort(bits[:_SAMPLE_ROWS, :8], axis=0)  # cheap rejection of dense leaves
  if (1 + (sample[1:] != sample[:-1]).sum(axis=0)).max() > max_values:
    return None
  order = np.argsort(bits, axis=0, kind="stable")
  ordered = np.take_along_axis(bits, order, axis=0)
  first = np.ones(ordered.shape, bool)
  first[1:] = ordered[1:] != ordered[:-1]
  sizes = first.sum(axis=0).astype(np.int64)
  if sizes.max() > max_values or sizes.max() < 2 or 2 * sizes.sum() > bits.size:
    return None  # more values than a channel may hold, or a codebook as large as the leaf
  rank = (np.cumsum(first, axis=0) - 1).astype(np.uint8)
  indices = np.empty(ordered.shape, np.uint8)
  np.put_along_axis(indices, order, rank, axis=0)
  values = ordered.T[first.T].view(array.dtype)  # channel by channel, increasing bits
  return ChannelCodebookParts(sizes, values, indices.reshape(array.shape))


def fc_stream(parts: ChannelCodebookParts) -> bytes:
  """``fc``: u16 K, the ``k_c - 1`` bytes, the values, the coded indices."""
  alphabet = parts.alphabet
  return (_SIZE.pack(alphabet) + (parts.sizes - 1).astype(np.uint8).tobytes()
          + to_le_bytes(parts.values) + symbol_coding.CODEBOOK.encode(parts.indices, alphabet))


def _encode(leaf: Leaf):
  if not leaf.entropy or leaf.ternary is not None:
    return None
  parts = channel_codebook_parts(leaf.array)
  return None if parts is None else fc_stream(parts)


def _head(record: LeafRecord, stream: bytes) -> tuple[int, np.ndarray, np.ndarray, int]:
  """Parses ``K``, the sizes and the values: ``(K, sizes, values, start of the indices)``."""
  channels = record.shape[-1]
  if len(stream) < _SIZE.size + channels:
    raise ExportFormatError(f"a {len(stream):,}-byte stream cannot hold the codebook sizes "
                            f"of {channels:,} channels")
  (alphabet,) = _SIZE.unpack_from(stream)
  sizes = np.frombuffer(stream, np.uint8, channels, _SIZE.size).astype(np.int64) + 1
  if not 2 <= alphabet <= MAX_CHANNEL_VALUES or sizes.max() != alphabet:
    raise ExportFormatError(f"corrupt codebook sizes: K = {alphabet} (2 to "
                            f"{MAX_CHANNEL_VALUES} allowed), largest channel codebook "
                            f"{int(sizes.max())}")
  total = int(sizes.sum())
  head = _SIZE.size + channels + total * record.itemsize
  if head >= len(stream):
    raise ExportFormatError(f"a {len(stream):,}-byte stream cannot hold {total:,} "
                            f"codebook values and the indices")
  values = from_le_bytes(stream[_SIZE.size + channels:head], record.dtype_, total)
  bits = uint_view(values)
  starts = np.zeros(total, bool)
  starts[np.cumsum(sizes)[:-1]] = True  # a channel's first value need not exceed the last one's
  if not ((bits[1:] > bits[:-1]) | starts[1:]).all():
    raise ExportFormatError("a channel's codebook values are not distinct and sorted")
  return alphabet, sizes, values, head


def _decode(record: LeafRecord, stream: bytes) -> np.ndarray:
  alphabet, sizes, values, head = _head(record, stream)
  indices = symbol_coding.CODEBOOK.decode(stream[head:], record.shape, alphabet)
  indices = indices.reshape(-1, record.shape[-1])
  if (indices >= sizes).any():
    raise ExportFormatError("an index lies beyond its channel's codebook")
  offsets = np.cumsum(sizes) - sizes
  return values[offsets + indices].reshape(-1)


def _fits(r: LeafRecord) -> bool:  # every channel one value, one of them two; K = 2
  if len(r.shape) < 2 or r.numel < 2:
    return False
  channels = r.shape[-1]
  head = _SIZE.size + channels + (channels + 1) * r.itemsize
  return r.nbytes > head and r.numel <= symbol_coding.CODEBOOK.capacity(r.nbytes - head, 2)


FC = RecordCodec("fc", versions=(3,), encode=_encode, fits=_fits, decode=_decode,
                 own_dtype=True, range_coded=True)
