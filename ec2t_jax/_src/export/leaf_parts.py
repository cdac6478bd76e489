"""What a leaf is made of: ternary, per-filter ternary or codebook parts (the codecs' analyses).

A leaf is *ternary* when it is floating point, finite and holds exactly three
distinct bit patterns: one negative value ``-w_n``, one zero and one positive
value ``w_p``; *per-filter ternary* when every slice along one axis is
(:func:`filter_ternary_parts`); a *codebook* leaf holds 2 to
:data:`MAX_CODEBOOK` distinct bit patterns (:func:`codebook_parts`).

Example:
  >>> import numpy as np
  >>> from ec2t_jax.export import ternary_parts
  >>> ternary_parts(np.array([0.3, 0.0, -0.2, 0.3], np.float32)).w_p
  0.30000001192092896
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from ec2t_jax._src.export import codebook_coding
from ec2t_jax._src.export.leaf_bytes import DTYPES, FLOAT_NAMES, contiguous, uint_view

MAX_CODEBOOK = codebook_coding.MAX_ALPHABET  # most distinct values of a ``cb`` leaf


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


def ternary_parts(array) -> Optional[TernaryParts]:
  """Splits ``array`` into assignment and values if it is ternary, else ``None``.

  Ternary means: floating point, finite, exactly three distinct bit patterns,
  one negative, one zero (``+0`` or ``-0``) and one positive.

  Args:
    array: any array.

  Returns:
    :class:`TernaryParts` or ``None``.

  Example:
    >>> import numpy as np
    >>> from ec2t_jax.export import ternary_parts
    >>> ternary_parts(np.array([0.3, 0.0, -0.2, 0.3], np.float32)).assignment
    array([ 1,  0, -1,  1], dtype=int8)
  """
  array = np.asarray(array)
  if array.dtype.name not in FLOAT_NAMES or array.size < 3:
    return None
  flat = contiguous(array).reshape(-1)
  bits = uint_view(flat)
  if np.unique(bits[:64]).size > 3:  # cheap rejection of dense float leaves
    return None
  patterns, inverse = np.unique(bits, return_inverse=True)
  if patterns.size != 3:
    return None
  values = patterns.view(array.dtype)
  order = ternary_order(values)
  if order is None:
    return None
  rank = np.empty(3, np.int8)
  rank[order] = np.array([-1, 0, 1], np.int8)
  return TernaryParts(rank[inverse].reshape(array.shape), values[order])


def ternary_order(values: np.ndarray) -> Optional[np.ndarray]:
  """The order that sorts three distinct values to ``(negative, 0, positive)``, or ``None``
  unless they are finite and exactly that: one negative, a zero and one positive.

  Example:
    >>> import numpy as np
    >>> from ec2t_jax._src.export.leaf_parts import ternary_order  # internal
    >>> ternary_order(np.array([0.5, -0.25, 0.0], np.float32)).tolist()
    [1, 2, 0]
    >>> ternary_order(np.array([0.5, 0.25, 0.0], np.float32)) is None
    True
  """
  as_float = np.asarray(values).astype(np.float64)
  if not np.isfinite(as_float).all():
    return None
  order = np.argsort(as_float, kind="stable")
  neg, zero, pos = as_float[order]
  return order if neg < 0 and zero == 0 and pos > 0 else None


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
    both = (uint_view(self.negative) != 0) & (uint_view(self.positive) != 0)
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
    >>> import numpy as np
    >>> from ec2t_jax.export import filter_ternary_parts
    >>> w = np.array([[0.5, 0.0], [-0.5, 2.0], [0.0, -2.0]], np.float32)
    >>> parts = filter_ternary_parts(w)
    >>> parts.axis, parts.positive.tolist(), parts.symmetric
    (1, [0.5, 2.0], True)
  """
  array = np.asarray(array)
  if array.dtype.name not in FLOAT_NAMES or array.ndim < 2 or array.size < 3:
    return None
  array = contiguous(array)
  zero = array == 0
  zero_bits = np.unique(uint_view(array[zero]))
  if zero_bits.size > 1:
    return None
  with np.errstate(invalid="ignore"):
    if not np.isfinite(array.astype(np.float64)).all():
      return None
  if np.unique(uint_view(array.reshape(-1)[:4096])).size > 2 * max(array.shape) + 1:
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
    >>> import numpy as np
    >>> from ec2t_jax.export import codebook_parts
    >>> values, indices = codebook_parts(np.array([4, 1, 4, 4], np.int32))
    >>> values.tolist(), indices.tolist()
    ([1, 4], [1, 0, 1, 1])
  """
  array = contiguous(np.asarray(array))
  if array.size < 2 or array.dtype.name not in DTYPES:
    return None
  bits = uint_view(array.reshape(-1))
  if np.unique(bits[:4 * max_values]).size > max_values:  # cheap rejection of dense leaves
    return None
  patterns, inverse = np.unique(bits, return_inverse=True)
  if not 2 <= patterns.size <= max_values:
    return None
  return patterns.view(array.dtype), inverse.astype(np.uint8).reshape(array.shape)


