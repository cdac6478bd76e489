"""What the report needs to know about one leaf, read in bounded memory.

Zeros, non-finite values and, for a ternary leaf, its three values and how
many weights hold each: read in chunks of :data:`CHUNK_ELEMENTS` elements, so
the memory used beyond the leaf itself is a few chunks, never a copy of the
leaf (the report of a file is then bounded by about its decoded size).

A leaf is ternary exactly when :func:`ec2t_jax.export.ternary_parts` says so:
floating point, at least three elements, exactly three distinct bit patterns,
all finite, one negative, one zero (``+0`` or ``-0``) and one positive.

Example:
  >>> import numpy as np
  >>> from ec2t_jax._src.report.leaf_statistics import leaf_statistics  # internal
  >>> s = leaf_statistics(np.array([0.3, 0.0, -0.2, 0.3, 0.0], np.float32))
  >>> s.zeros, s.counts, round(s.w_n, 6), round(s.w_p, 6)
  (2, (1, 2, 2), 0.2, 0.3)
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Optional

import numpy as np

from ec2t_jax._src.export import leaf_parts
from ec2t_jax._src.export.leaf_bytes import FLOAT_NAMES
from ec2t_jax._src.export.record_codecs import channel_codebook

CHUNK_ELEMENTS = 1 << 20  # about 4 MiB of float32 per step


class LeafStatistics(NamedTuple):
  """Counts of one leaf (see the module docstring).

  Attributes:
    numel: number of elements.
    zeros: elements equal to zero (``+0`` and ``-0``).
    nonfinite: NaN or infinite elements (0 for non-float leaves).
    values: for a ternary leaf, ``[-w_n, zero, w_p]`` in the leaf's dtype;
      else ``None``.
    counts: for a ternary leaf, how many elements hold each of ``values``.
  """
  numel: int
  zeros: int
  nonfinite: int
  values: Optional[np.ndarray] = None
  counts: Optional[tuple[int, int, int]] = None

  @property
  def ternary(self) -> bool:
    return self.values is not None

  @property
  def w_n(self) -> Optional[float]:
    return None if self.values is None else float(-self.values[0])

  @property
  def w_p(self) -> Optional[float]:
    return None if self.values is None else float(self.values[2])

  def entropy_bits(self) -> Optional[float]:
    """Zeroth-order entropy of a ternary leaf in bits per weight, ``-sum P_c log2 P_c``."""
    if self.counts is None:
      return None
    return -sum(c / self.numel * math.log2(c / self.numel) for c in self.counts if c)


def _is_float(array: np.ndarray) -> bool:
  return array.dtype.name in FLOAT_NAMES or array.dtype.kind in "fc"


def chunks(array) -> Iterator[np.ndarray]:
  """The elements of ``array`` as consecutive 1-d pieces (views when it is contiguous)."""
  array = np.asarray(array)
  flat = array.reshape(-1, order="A") if array.flags.forc else np.ravel(array)
  for start in range(0, flat.size, CHUNK_ELEMENTS):
    yield flat[start:start + CHUNK_ELEMENTS]


def count_nonfinite(array) -> int:
  """NaN and infinite elements of ``array`` (0 for non-float arrays), chunk by chunk."""
  array = np.asarray(array)
  if not _is_float(array):
    return 0
  as_float = array.dtype.name == "bfloat16"  # numpy's isfinite has no bfloat16 loop
  return sum(int(c.size - np.count_nonzero(np.isfinite(c.astype(np.float32) if as_float else c)))
             for c in chunks(array))


def _bit_pattern_counts(array: np.ndarray) -> Optional[dict[int, int]]:
  """``{bit pattern: count}`` of a float leaf, or ``None`` once it has more than three."""
  unsigned = f"u{array.dtype.itemsize}"
  found: dict[int, int] = {}
  for chunk in chunks(array):
    patterns, counts = np.unique(chunk.view(unsigned), return_counts=True)
    for pattern, count in zip(patterns.tolist(), counts.tolist()):
      found[pattern] = found.get(pattern, 0) + count
    if len(found) > 3:
      return None
  return found


def _ternary_values(array: np.ndarray):
  """``(values, counts)`` ordered negative, zero, positive, or ``None`` if not ternary."""
  if array.dtype.name not in FLOAT_NAMES or array.size < 3:
    return None
  found = _bit_pattern_counts(array)
  if found is None or len(found) != 3:
    return None
  patterns = np.array(list(found), f"u{array.dtype.itemsize}")
  values = patterns.view(array.dtype)
  order = leaf_parts.ternary_order(values)
  if order is None:
    return None
  counts = [found[int(p)] for p in patterns[order]]
  return values[order], (counts[0], counts[1], counts[2])


def channel_code_entropy_bits(array) -> Optional[float]:
  """Zeroth-order entropy, in bits per weight, of a per-channel codebook leaf's indices.

  The leaf's output channels (last axis) each hold a few values (ParetoQ per
  channel, per-column ternary: the packed file's ``fc`` records); each weight
  is the index of its value in its channel's sorted codebook, and this is
  ``-sum P_i log2 P_i`` over those indices (``None`` if the leaf is not such
  a leaf). Unlike :func:`leaf_statistics` it sorts a copy of the leaf.

  Example:
    >>> import numpy as np
    >>> from ec2t_jax._src.report.leaf_statistics import channel_code_entropy_bits  # internal
    >>> channel_code_entropy_bits(np.array([[0.5, 0.0], [-0.5, 2.0]] * 2, np.float32))
    1.0
  """
  parts = channel_codebook.channel_codebook_parts(array)
  if parts is None:
    return None
  counts = np.bincount(parts.indices.reshape(-1))
  p = counts[counts > 0] / parts.indices.size
  return float(-(p * np.log2(p)).sum())


def leaf_statistics(array) -> LeafStatistics:
  """Zeros, non-finite values and ternary values / counts of one leaf, in bounded memory.

  Args:
    array: any numeric array.

  Returns:
    :class:`LeafStatistics`.
  """
  array = np.asarray(array)
  zeros = int(array.size - np.count_nonzero(array))
  nonfinite = count_nonfinite(array)
  ternary = None if nonfinite else _ternary_values(array)
  if ternary is None:
    return LeafStatistics(int(array.size), zeros, nonfinite)
  return LeafStatistics(int(array.size), zeros, nonfinite, *ternary)
