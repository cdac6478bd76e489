r"""Flat buffers: many leaves' states in one, stepped by one trace of the method.

For a method whose step reduces only through ``ctx.segments``
(``Method(flat=True)``, see ``_src/core/segments.py``) and a transformation with
``layout="flat"``, the core concatenates the selected leaves' states into
:class:`FlatGroup`\ s at ``init``: each field
of the method's state is stored once for all members,

* an **element** field (shaped like the leaf: latent weights, assignments) as
  the members' raveled values end to end, ``(N,)``;
* a **layer** field (a scalar per leaf or per slice: a scale, a centroid) as
  one value per segment, ``(S,)``;
* a **filter** field (one value per output filter) as one per filter, ``(F,)``;
* a **codebook** field (``k`` values per layer: a clustering's levels; the state
  class names them in ``codebook_fields``, since a ``(k,)`` field cannot be told
  from a 1-d leaf by its shape) as ``(S, k)``.

A step runs the method's ``step_leaf`` once on the whole buffer, with a
context whose ``segments`` are :class:`~ec2t_jax._src.core.segments.FlatSegments`
(reductions give one value per segment, ``expand`` brings them back to the
elements) and whose ``gamma``, ``size_fraction`` and ``slice_index`` are one
per segment; it guards non-finite inputs per segment as the per-leaf path does
per leaf. A codebook field reaches the step as ``(S, k)``; ``segments.expand``
gives it per element (``element_shape[:-1] + (1, k)`` or ``(N, k)``), and
``segments.cluster_sum`` reduces ``(..., k)`` arrays back to ``(S, k)``. An
input of one value per layer (shaped like each member's stack, e.g. EC2T's
reference-mode centroid increments) reaches it as ``(S,)``. The persistent
state is no larger than per leaf; the params' values (``value``) are computed
on the state with its layer and filter fields expanded.

Leaves stay out of a flat buffer (and keep the per-leaf or grouped path) when
their param may be sharded over several devices (a flat buffer would reshard
it every step; see :func:`may_be_sharded`: a param traced by ``jax.jit(tx.init)``
with several devices counts), or when a field is neither element-, layer- nor
filter-shaped (or codebook-shaped, for a field the class names).

Read a member's state back with :meth:`FlatGroup.slice` (what
``QuantizerState.resolved_leaves`` and ``field`` do).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ec2t_jax._src.core import segments as segments_lib
from ec2t_jax._src.core.protocol import LeafContext
from ec2t_jax._src.core.protocol import StackedLeaf

ELEMENT, LAYER, FILTER, CODEBOOK = "element", "layer", "filter", "codebook"


class Member(NamedTuple):
  """One leaf of a flat buffer (static).

  Attributes:
    offset: its first element in the buffer.
    stack_shape: its stack axes (``()`` for an unstacked leaf).
    slice_shape: one slice's shape.
    output_axis: one slice's output-filter axis (non-negative).
    first_segment: its first segment (one per slice).
    first_filter: its first filter in the flat filter numbering.
  """
  offset: int
  stack_shape: tuple
  slice_shape: tuple
  output_axis: int
  first_segment: int
  first_filter: int

  @property
  def slices(self) -> int:
    return math.prod(self.stack_shape)

  @property
  def slice_size(self) -> int:
    return math.prod(self.slice_shape)

  @property
  def filters(self) -> int:
    """Output filters of one slice."""
    return self.slice_shape[self.output_axis] if self.slice_shape else 1


class FlatLayout(NamedTuple):
  r"""Where each member lives in a flat buffer, and what each field holds (static).

  Attributes:
    members: the :class:`Member`\ s, in the state's flattening order.
    kinds: per field of the method's state, ``"element"``, ``"layer"``, ``"filter"`` or
      ``"codebook"``.
    gammas: per segment, the rule's gamma (None for the transformation's; all
      members agree on None or not).
    size_fractions: per segment, ``LeafContext.size_fraction``.
    slice_indices: per segment, its slice index within its leaf.
  """
  members: tuple
  kinds: tuple
  gammas: tuple
  size_fractions: tuple
  slice_indices: tuple

  def table(self) -> segments_lib.SegmentTable:
    offsets, sizes, filters, strides, filter_offsets = [], [], [], [], []
    for m in self.members:
      axis = m.output_axis
      stride = math.prod(m.slice_shape[axis + 1:]) if m.slice_shape else 1
      for k in range(m.slices):
        offsets.append(m.offset + k * m.slice_size)
        sizes.append(m.slice_size)
        filters.append(m.filters)
        strides.append(stride)
        filter_offsets.append(m.first_filter + k * m.filters)
    arr = lambda v: np.asarray(v, np.int64)
    return segments_lib.SegmentTable(arr(offsets), arr(sizes), arr(filters), arr(strides),
                                     arr(filter_offsets))


@jax.tree_util.register_pytree_node_class
class FlatGroup:
  """The states of several leaves in one flat buffer (see the module docstring).

  Attributes:
    inner: the method's state class with flat fields (see :class:`FlatLayout`).
    layout: the static :class:`FlatLayout`.
  """
  __slots__ = ("inner", "layout")

  def __init__(self, inner, layout: FlatLayout):
    self.inner = inner
    self.layout = layout

  def tree_flatten(self):
    return (self.inner,), self.layout

  @classmethod
  def tree_unflatten(cls, layout, children):
    return cls(children[0], layout)

  def __repr__(self):
    return f"FlatGroup({type(self.inner).__name__}, {len(self.layout.members)} leaves)"

  @property
  def table(self) -> segments_lib.SegmentTable:
    return _table(self.layout)

  def expanded(self, segments: segments_lib.FlatSegments):
    """The state as a step sees it: element fields in ``segments.element_shape``, layer,
    filter and codebook fields expanded to broadcast against them (a codebook with a
    trailing ``k`` axis)."""
    def expand(kind, x):
      if kind == ELEMENT:
        return x.reshape(segments.element_shape)
      return segments.expand(x, per_filter=kind == FILTER)
    return self.inner._replace(**{f: expand(k, getattr(self.inner, f))
                                  for f, k in zip(self.inner._fields, self.layout.kinds)})

  def with_element_shape(self, segments: segments_lib.FlatSegments):
    """The state with its element fields in ``segments.element_shape`` (others compact)."""
    return self.inner._replace(**{
        f: getattr(self.inner, f).reshape(segments.element_shape) if k == ELEMENT
        else getattr(self.inner, f) for f, k in zip(self.inner._fields, self.layout.kinds)})

  def value(self, dtype) -> jax.Array:
    """Every member's value, end to end (``(N,)``)."""
    segments = segments_lib.FlatSegments(self.table)
    return jnp.broadcast_to(self.expanded(segments).value(dtype),
                            segments.element_shape).reshape(-1)

  def off_grid(self, member_params: list) -> jax.Array:
    """Whether some member's param is not its state's value (bool scalar).

    The test of ``core.transform.params_off_grid`` for every member at once: a member is
    off when ``max |param - value|`` over the leaf exceeds ``4 eps max(|param|, |value|)``
    (``eps`` of the params' dtype, which the members share).
    """
    segments = segments_lib.FlatSegments(self.table)
    dtype = jnp.asarray(member_params[0]).dtype
    p = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in member_params]).reshape(
        segments.element_shape)
    v = self.value(dtype).reshape(segments.element_shape).astype(jnp.float32)
    members = jnp.asarray(np.repeat(np.arange(len(self.layout.members), dtype=np.int32),
                                    [m.slices for m in self.layout.members]))
    per_member = lambda x: jax.ops.segment_max(x, members, len(self.layout.members),
                                               indices_are_sorted=True)
    difference = per_member(segments.max(jnp.abs(p - v)))
    scale = per_member(jnp.maximum(segments.max(jnp.abs(p)), segments.max(jnp.abs(v))))
    return jnp.any(difference > 4 * float(jnp.finfo(dtype).eps) * scale)

  def member_value(self, values: jax.Array, index: int) -> jax.Array:
    """Member ``index``'s slice of :meth:`value`, in its param shape."""
    m = self.layout.members[index]
    size = m.slices * m.slice_size
    return values[m.offset:m.offset + size].reshape(m.stack_shape + m.slice_shape)

  def slice(self, index: int):
    """Member ``index``'s own state (a :class:`StackedLeaf` for a stacked leaf)."""
    m = self.layout.members[index]
    fields = {}
    for f, kind in zip(self.inner._fields, self.layout.kinds):
      x = getattr(self.inner, f)
      if kind == ELEMENT:
        fields[f] = x[m.offset:m.offset + m.slices * m.slice_size].reshape(
            m.stack_shape + m.slice_shape)
      elif kind == LAYER:
        fields[f] = x[m.first_segment:m.first_segment + m.slices].reshape(m.stack_shape)
      elif kind == CODEBOOK:
        fields[f] = x[m.first_segment:m.first_segment + m.slices].reshape(
            m.stack_shape + x.shape[1:])
      else:
        shape = tuple(n if a == m.output_axis else 1 for a, n in enumerate(m.slice_shape))
        fields[f] = x[m.first_filter:m.first_filter + m.slices * m.filters].reshape(
            m.stack_shape + shape)
    state = self.inner._replace(**fields)
    return StackedLeaf(state, len(m.stack_shape)) if m.stack_shape else state

  def context(self, template: LeafContext, segments: segments_lib.FlatSegments) -> LeafContext:
    """The context of the whole buffer: per-segment facts, one per segment (``(S,)``)."""
    layout = self.layout
    gamma = None if layout.gammas[0] is None else jnp.asarray(layout.gammas, jnp.float32)
    return template._replace(
        path=f"<flat buffer of {len(layout.members)} leaves>", shape=(self.table.total,),
        gamma=gamma, size_fraction=jnp.asarray(layout.size_fractions, jnp.float32),
        stack_shape=(), slice_index=jnp.asarray(layout.slice_indices, jnp.int32),
        info=None, output_axis=0, segments=segments)


@functools.lru_cache(maxsize=64)
def _table(layout: FlatLayout) -> segments_lib.SegmentTable:
  return layout.table()


def field_kind(field_shape: tuple, slice_shape: tuple, output_axis: int) -> Optional[str]:
  """Whether a per-slice field is an element, layer or filter field (None: neither)."""
  if field_shape == slice_shape:
    return ELEMENT
  if field_shape == ():
    return LAYER
  if slice_shape and len(field_shape) == len(slice_shape) and all(
      n == (slice_shape[a] if a == output_axis else 1) for a, n in enumerate(field_shape)):
    return FILTER
  return None


def may_be_sharded(param) -> bool:
  """Whether a param may be split over several devices (it then stays out of flat buffers).

  A concrete param says so by its sharding. A traced one (``jax.jit(tx.init)``) does not
  show its sharding while tracing, so with several devices it may be: the safe answer.
  """
  if isinstance(param, jax.core.Tracer):
    return jax.device_count() > 1
  sharding = getattr(param, "sharding", None)
  if sharding is None:
    return False
  try:
    return len(sharding.device_set) > 1 and not sharding.is_fully_replicated
  except AttributeError:
    return False


def flat_key(state, ctx: LeafContext):
  """What members of one flat buffer share, or None if the state cannot be flattened.

  Returns:
    ``(key, kinds)``: the key (state class, mode, whether gamma is the rule's, the param
    dtype, the fields' dtypes and kinds) and the fields' kinds.
  """
  stack_ndim = len(ctx.stack_shape)
  inner = state.inner if isinstance(state, StackedLeaf) else state
  axis = ctx.output_axis % len(ctx.shape) if ctx.shape else 0
  codebook = getattr(type(inner), "codebook_fields", ())
  kinds, codebook_sizes = [], []
  for f in inner._fields:
    x = getattr(inner, f)
    if not isinstance(x, jax.Array) and not isinstance(x, np.ndarray):
      return None
    if f in codebook:
      if x.ndim != stack_ndim + 1:
        return None
      kind = CODEBOOK
      codebook_sizes.append(x.shape[-1])
    else:
      kind = field_kind(tuple(x.shape[stack_ndim:]), tuple(ctx.shape), axis)
    if kind is None:
      return None
    kinds.append(kind)
  dtypes = tuple(jnp.dtype(getattr(inner, f).dtype) for f in inner._fields)
  key = (type(inner), ctx.mode, ctx.gamma is None, jnp.dtype(ctx.dtype), dtypes, tuple(kinds),
         tuple(codebook_sizes))
  return key, tuple(kinds)


def pack(states: list, contexts: list, kinds: tuple) -> FlatGroup:
  """One :class:`FlatGroup` of the given leaf states (each with its context)."""
  members, gammas, fractions, slice_ids = [], [], [], []
  offset = segment = first_filter = 0
  for state, ctx in zip(states, contexts):
    axis = ctx.output_axis % len(ctx.shape) if ctx.shape else 0
    m = Member(offset, tuple(ctx.stack_shape), tuple(ctx.shape), axis, segment, first_filter)
    members.append(m)
    offset += m.slices * m.slice_size
    segment += m.slices
    first_filter += m.slices * m.filters
    gammas += [ctx.gamma] * m.slices
    fractions += [float(ctx.size_fraction)] * m.slices
    slice_ids += list(range(m.slices))
  inners = [s.inner if isinstance(s, StackedLeaf) else s for s in states]
  ravel = lambda x, kind: (jnp.reshape(x, (-1, x.shape[-1])) if kind == CODEBOOK
                           else jnp.ravel(x))
  fields = {f: jnp.concatenate([ravel(getattr(s, f), kind) for s in inners])
            for f, kind in zip(inners[0]._fields, kinds)}
  layout = FlatLayout(tuple(members), kinds, tuple(gammas), tuple(fractions), tuple(slice_ids))
  return FlatGroup(inners[0]._replace(**fields), layout)


def _concatenate_input(xs, members, segments: segments_lib.FlatSegments) -> jax.Array:
  """The members' pieces of one input, end to end: in ``segments.element_shape`` when each is
  shaped like its param, ``(S,)`` when each is one value per slice (a per-layer increment,
  such as EC2T's reference-mode centroid steps)."""
  shapes = [tuple(jnp.shape(v)) for v in xs]
  if all(s == m.stack_shape + m.slice_shape for s, m in zip(shapes, members)):
    return jnp.concatenate([jnp.ravel(v) for v in xs]).reshape(segments.element_shape)
  if all(s == m.stack_shape for s, m in zip(shapes, members)):
    return jnp.concatenate([jnp.ravel(v) for v in xs])
  raise ValueError(f"a flat buffer's step input must be shaped like each member's param or "
                   f"its stack (one value per layer); got shapes {shapes} for members of "
                   f"shapes {[m.stack_shape + m.slice_shape for m in members]}")


def step(step_fn, inputs: list, group: FlatGroup, template: LeafContext,
         keep: jax.Array) -> tuple[FlatGroup, jax.Array]:
  """One step of a whole flat buffer: ``step_fn(input, state, ctx)`` traced once.

  Args:
    step_fn: the per-leaf step (closing over hyperparameters and phase).
    inputs: the members' inputs (pytrees of arrays in their param shapes, or of one value
      per layer: their stack shapes).
    group: the old :class:`FlatGroup`.
    template: a member's context (mode and the other shared facts).
    keep: bool scalar: keep every state (invalid hyperparameters).

  Returns:
    ``(new group, any non-finite input)``; a segment with a non-finite input keeps its
    state, as a leaf does on the per-leaf path.
  """
  segments = segments_lib.FlatSegments(group.table)
  members = group.layout.members
  x = jax.tree.map(lambda *xs: _concatenate_input(xs, members, segments), *inputs)
  # A segment is finite iff max |v| over it is (as the per-leaf guard, per segment).
  per_segment = lambda v: v if v.shape == (segments.table.num_segments,) else segments.max(v)
  finite = jnp.all(jnp.stack([jnp.isfinite(per_segment(jnp.abs(v)))
                              for v in jax.tree.leaves(x)]), axis=0)
  x = jax.tree.map(lambda v: jnp.where(jnp.isfinite(v), v, 0), x)
  old = group.with_element_shape(segments)
  new = step_fn(x, old, group.context(template, segments))
  accept = finite & ~keep
  per_kind = {ELEMENT: segments.expand(accept), LAYER: accept,
              FILTER: segments.filters_from_layers(accept), CODEBOOK: accept[:, None]}
  fields = {}
  for f, kind in zip(old._fields, group.layout.kinds):
    n, o = getattr(new, f), getattr(old, f)
    if jnp.shape(n) != o.shape:
      raise ValueError(f"the flat step of {type(old).__name__} returned its field {f!r} with "
                       f"shape {jnp.shape(n)}, not {o.shape} ({kind} field): a per-layer value "
                       "computed on expanded arrays? Keep it per segment (segments.expand only "
                       "where it meets the weights)")
    kept = jnp.where(per_kind[kind], n, o).astype(o.dtype)
    fields[f] = kept.reshape(-1) if kind == ELEMENT else kept
  return FlatGroup(old._replace(**fields), group.layout), ~jnp.all(finite)
