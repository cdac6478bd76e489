r"""Per-layer statistics that one step computes for one leaf or for many at once.

A method's step reduces its weights per layer (a mean magnitude, cluster
counts, a standard deviation) or per output filter. Written against a
:class:`Segments` object (``segments.of(ctx)``), the same step serves

* one leaf (:class:`LeafSegments`): ``sum(x)`` is a scalar, ``sum(x,
  per_filter=True)`` keeps the output axis (size-1 axes elsewhere), and
  ``expand`` is the identity: both broadcast against ``x``;
* every selected leaf end to end in one flat buffer (:class:`FlatSegments`,
  ``_src/core/flat.py``): each layer (or slice of a stacked leaf) is a
  contiguous segment, ``sum(x)`` is one value per segment (``(S,)``; per
  filter ``(F,)``), and ``expand(v)`` gives it back per element.

A step keeps per-layer arithmetic (probabilities, logarithms, scales) on the
reduced values and calls ``expand`` where they meet the weights. A method
whose step reduces only through its segments (``Method(flat=True)``) is then
traced once per transformation with ``layout="flat"``, however many layers and
shapes the model has.

Example:
  >>> import jax.numpy as jnp
  >>> from ec2t_jax._src.core.segments import LeafSegments  # internal
  >>> segments = LeafSegments(output_axis=-1)
  >>> w = jnp.array([[1.0, -2.0], [3.0, 4.0]])
  >>> segments.sum(w), segments.sum(w, per_filter=True)
  (Array(6., dtype=float32), Array([[4., 2.]], dtype=float32))
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np


class Segments(Protocol):
  """Reductions per layer (or per output filter), and their way back to the weights."""

  def sum(self, x, per_filter: bool = False) -> jax.Array:
    """Sum per layer (per filter)."""

  def max(self, x, per_filter: bool = False) -> jax.Array:
    """Maximum per layer (per filter)."""

  def min(self, x, per_filter: bool = False) -> jax.Array:
    """Minimum per layer (per filter)."""

  def numel(self, like, per_filter: bool = False) -> np.ndarray:
    """Elements per layer (per filter), float32, static (numpy: known while tracing)."""

  def expand(self, values, per_filter: bool = False) -> jax.Array:
    """Per-layer (per-filter) values, broadcasting against the weights."""

  def filters_from_layers(self, values) -> jax.Array:
    """Per-layer values, one per filter (each filter its layer's)."""

  def layer_max_of_filters(self, values) -> jax.Array:
    """Per-filter values: the largest of each layer's filters."""

  def sort(self, x) -> jax.Array:
    """``x`` raveled and sorted within each layer (layers end to end, as in the buffer)."""

  def starts(self) -> jax.Array:
    """Each layer's first position in :meth:`sort`'s result (int32, per layer)."""

  def descending_rank(self, x) -> jax.Array:
    """Each element's rank within its layer by decreasing ``x`` (0: the largest; ties: the
    lower position first), int32, shaped like ``x``."""

  def cluster_sum(self, x) -> jax.Array:
    """Sum per layer of ``x`` shaped ``weights.shape + (k,)``, keeping the last axis (``k``
    values per layer: one per cluster of a codebook)."""


def mean(segments: Segments, x, per_filter: bool = False) -> jax.Array:
  """``sum(x) / numel`` per layer (per filter)."""
  return segments.sum(x, per_filter) / segments.numel(x, per_filter)


def std(segments: Segments, x, per_filter: bool = False, ddof: int = 0) -> jax.Array:
  """Standard deviation per layer (per filter), two-pass like ``jnp.std``."""
  x = jnp.asarray(x, jnp.float32)
  centred = x - segments.expand(mean(segments, x, per_filter), per_filter)
  count = segments.numel(x, per_filter)
  return jnp.sqrt(segments.sum(jnp.square(centred), per_filter)
                  / jnp.maximum(count - ddof, 0.0))


class LeafSegments(NamedTuple):
  """The reductions of one leaf (or one slice of a stacked leaf).

  Attributes:
    output_axis: the output-filter axis of ``per_filter`` reductions.
  """
  output_axis: int = -1

  def _axes(self, x, per_filter):
    if not per_filter or x.ndim == 0:
      return None
    keep = self.output_axis % x.ndim
    return tuple(a for a in range(x.ndim) if a != keep)

  def sum(self, x, per_filter=False):
    x = jnp.asarray(x)
    dtype = jnp.float32 if x.dtype == jnp.bool_ else None
    return jnp.sum(x, axis=self._axes(x, per_filter), keepdims=per_filter, dtype=dtype)

  def max(self, x, per_filter=False):
    x = jnp.asarray(x)
    return jnp.max(x, axis=self._axes(x, per_filter), keepdims=per_filter)

  def min(self, x, per_filter=False):
    x = jnp.asarray(x)
    return jnp.min(x, axis=self._axes(x, per_filter), keepdims=per_filter)

  def numel(self, like, per_filter=False):
    like = jnp.asarray(like)
    if per_filter and like.ndim:
      return np.float32(like.size // like.shape[self.output_axis])
    return np.float32(max(like.size, 1))

  def expand(self, values, per_filter=False):
    del per_filter  # a scalar or keepdims values broadcast as they are
    return values

  def filters_from_layers(self, values):
    return values

  def layer_max_of_filters(self, values):
    return jnp.max(values)

  def sort(self, x):
    return jnp.sort(jnp.ravel(x))

  def starts(self):
    return jnp.int32(0)

  def descending_rank(self, x):
    x = jnp.asarray(x)
    order = jnp.argsort(-x.ravel(), stable=True)
    rank = jnp.zeros((x.size,), jnp.int32).at[order].set(jnp.arange(x.size, dtype=jnp.int32))
    return rank.reshape(x.shape)

  def cluster_sum(self, x):
    x = _float_if_bool(x)
    return jnp.sum(x.reshape(-1, x.shape[-1]), axis=0)


def _float_if_bool(x) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.float32) if x.dtype == jnp.bool_ else x


def of(ctx) -> Segments:
  """The context's segments: ``ctx.segments``, or the leaf's own (:class:`LeafSegments`)."""
  segments = getattr(ctx, "segments", None)
  return LeafSegments(ctx.output_axis) if segments is None else segments


class SegmentTable(NamedTuple):
  """The static layout of a flat buffer's segments (numpy, known at trace time).

  Attributes:
    offsets: ``(S,)`` first element of each segment (a layer or one slice).
    sizes: ``(S,)`` elements per segment.
    filters: ``(S,)`` output filters per segment (the output axis' length).
    strides: ``(S,)`` elements between two filters' neighbours (the product of
      the axes after the output axis).
    filter_offsets: ``(S,)`` first filter of each segment in the flat filter
      numbering.
  """
  offsets: np.ndarray
  sizes: np.ndarray
  filters: np.ndarray
  strides: np.ndarray
  filter_offsets: np.ndarray

  @property
  def num_segments(self) -> int:
    return int(self.offsets.size)

  @property
  def num_filters(self) -> int:
    return int(self.filters.sum())

  @property
  def total(self) -> int:
    return int(self.sizes.sum())

  @property
  def chunk(self) -> int:
    """The largest chunk length that divides every segment (their sizes' gcd)."""
    return int(np.gcd.reduce(self.sizes)) if self.sizes.size else 1

  def chunk_segments(self) -> np.ndarray:
    """``(N / chunk,)`` each chunk's segment (sorted)."""
    return np.repeat(np.arange(self.num_segments, dtype=np.int32), self.sizes // self.chunk)

  def filter_segments(self) -> np.ndarray:
    """``(F,)`` each filter's segment (sorted)."""
    return np.repeat(np.arange(self.num_segments, dtype=np.int32), self.filters)


# Per-layer reductions go through chunks of this many elements or more (a reshape and a
# dense reduction, then a segment reduction of one value per chunk): XLA:CPU's scatter behind
# segment_sum costs ~40 ns per element, a dense row reduction ~0.5 ns.
MIN_CHUNK = 8


class FlatSegments:
  """The reductions of every segment of a flat buffer: one value per segment (filter).

  When every segment is a whole number of chunks of ``MIN_CHUNK`` or more
  elements (:attr:`SegmentTable.chunk`), the step sees the buffer as
  ``(chunks, chunk)`` (:attr:`element_shape`): a per-layer reduction is a dense
  row reduction then one segment reduction over the chunks, and :meth:`expand`
  gives one value per chunk, ``(chunks, 1)``, so per-layer arithmetic that meets
  the weights runs once per chunk, not per weight. Otherwise (and per filter)
  the buffer is ``(N,)`` and reductions go through per-element segment ids.
  """

  def __init__(self, table: SegmentTable):
    self.table = table
    self.chunk = table.chunk if table.chunk >= MIN_CHUNK else 0

  @property
  def element_shape(self) -> tuple:
    """The shape of an element field during a step: ``(chunks, chunk)`` or ``(N,)``."""
    total = self.table.total
    return (total // self.chunk, self.chunk) if self.chunk else (total,)

  @functools.cached_property
  def ids(self) -> jax.Array:
    """``(N,)`` each element's segment (int32, sorted)."""
    # From a binary search of the boundaries behind a barrier: a literal (N,) table would
    # be constant-folded by XLA at compile time (seconds for millions of weights).
    position = jax.lax.optimization_barrier(jax.lax.iota(jnp.int32, self.table.total))
    return jnp.searchsorted(jnp.asarray(self.table.offsets[1:], jnp.int32), position,
                            side="right").astype(jnp.int32).reshape(self.element_shape)

  @functools.cached_property
  def filter_ids(self) -> jax.Array:
    """``(N,)`` each element's filter in the flat filter numbering (int32)."""
    t = self.table
    position = jax.lax.iota(jnp.int32, t.total).reshape(self.element_shape)
    seg = self.ids
    local = position - jnp.asarray(t.offsets, jnp.int32)[seg]
    within = (local // jnp.asarray(t.strides, jnp.int32)[seg]) % jnp.asarray(t.filters,
                                                                          jnp.int32)[seg]
    return jnp.asarray(t.filter_offsets, jnp.int32)[seg] + within

  def expand(self, values, per_filter=False) -> jax.Array:
    values = jnp.asarray(values)
    if per_filter:
      return values[self.filter_ids]
    if not self.chunk:
      return values[self.ids]
    return values[jnp.asarray(self.table.chunk_segments())][:, None]

  def filters_from_layers(self, values):
    return jnp.asarray(values)[jnp.asarray(self.table.filter_segments())]

  def layer_max_of_filters(self, values):
    return jax.ops.segment_max(values, jnp.asarray(self.table.filter_segments()),
                               self.table.num_segments, indices_are_sorted=True)

  def _reduce(self, op, dense, x, per_filter):
    x = _float_if_bool(x)
    if per_filter:
      return op(x.ravel(), self.filter_ids.ravel(), self.table.num_filters)
    count = self.table.num_segments
    if not self.chunk:
      return op(x.ravel(), self.ids.ravel(), count, indices_are_sorted=True)
    partial = dense(x.reshape(-1, self.chunk), axis=1)
    return op(partial, jnp.asarray(self.table.chunk_segments()), count,
              indices_are_sorted=True)

  def sum(self, x, per_filter=False):
    return self._reduce(jax.ops.segment_sum, jnp.sum, x, per_filter)

  def max(self, x, per_filter=False):
    return self._reduce(jax.ops.segment_max, jnp.max, x, per_filter)

  def min(self, x, per_filter=False):
    return self._reduce(jax.ops.segment_min, jnp.min, x, per_filter)

  def numel(self, like, per_filter=False):
    del like
    t = self.table
    if per_filter:
      return np.repeat(t.sizes // t.filters, t.filters).astype(np.float32)
    return t.sizes.astype(np.float32)

  def sort(self, x):
    # One sort of (segment, value) pairs: each segment's values sorted in its own span.
    return jax.lax.sort((self.ids.ravel(), jnp.ravel(x)), num_keys=2)[1]

  def starts(self):
    return jnp.asarray(self.table.offsets, jnp.int32)

  def descending_rank(self, x):
    x = jnp.asarray(x)
    # Sorted by (segment, -x), stable: each segment's span holds its elements largest first.
    ids = self.ids.ravel()
    position = jax.lax.iota(jnp.int32, x.size)
    _, _, order = jax.lax.sort((ids, -x.ravel(), position), num_keys=2, is_stable=True)
    # The sort keeps each segment in its span, so position - offset is the rank there.
    within = position - jnp.asarray(self.table.offsets, jnp.int32)[ids]
    rank = jnp.zeros((x.size,), jnp.int32).at[order].set(within)
    return rank.reshape(x.shape)

  def cluster_sum(self, x):
    x = _float_if_bool(x)
    k = x.shape[-1]
    count = self.table.num_segments
    if not self.chunk:
      return jax.ops.segment_sum(x.reshape(-1, k), self.ids.ravel(), count,
                                 indices_are_sorted=True)
    partial = jnp.sum(x.reshape(-1, self.chunk, k), axis=1)
    return jax.ops.segment_sum(partial, jnp.asarray(self.table.chunk_segments()), count,
                               indices_are_sorted=True)
