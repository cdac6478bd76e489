"""The method protocol: what a method provides and the state every method keeps."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax
import numpy as np

NO_PARAMS_MSG = ("The quantizer's update needs the current params: call "
                 "`tx.update(updates, state, params)`.")


class LeafContext(NamedTuple):
  """Static facts about one selected leaf, given to a method's functions.

  Attributes:
    path: the leaf's ``/``-joined path.
    shape: its shape.
    dtype: the param's dtype.
    mode: the selecting rule's mode (``"ternary"``, ``"ecp"``, ...).
    gamma: the selecting rule's knob, or None for the transformation's.
    size_fraction: ``numel / max numel`` over all selected layers (slices of
      stacked leaves count as layers).
    stack_shape: the leading stack axes' lengths of a stacked leaf (one layer
      per slice, e.g. ``(L,)`` for ``nn.scan``-ed blocks); ``()`` otherwise.
      ``shape`` and ``size_fraction`` are then those of one slice.
    slice_index: the slice's flat index into ``stack_shape`` (a traced int32
      inside the core's ``vmap``; 0 for an unstacked leaf).
  """
  path: str
  shape: tuple
  dtype: Any
  mode: str
  gamma: Optional[float]
  size_fraction: float
  stack_shape: tuple = ()
  slice_index: Any = 0


class LeafState(Protocol):
  """What a method's per-leaf state (a ``NamedTuple``) provides."""
  latent: jax.Array

  def value(self, dtype) -> jax.Array:
    """The value the params hold, on the method's grid."""

  def describe(self) -> dict:
    """For :func:`~ec2t_jax.summary`: ``"method"`` and ``"mode"`` names and
    the method's own scalars (beyond sparsity/entropy, which are generic)."""

  # Optional: ``codes() -> Array`` of integer symbols whose zeroth-order
  # entropy is the layer's information when the values alone overstate it
  # (per-filter scales: TWN "filter", STTN). :func:`~ec2t_jax.summary` uses
  # it for bits/weight and levels; without it, the values are the symbols.


class Method(NamedTuple):
  """A quantization method: its per-leaf functions.

  Attributes:
    name: shown by :func:`~ec2t_jax.summary`.
    init_leaf: ``(param, ctx, hyper) -> LeafState`` from the pretrained value.
    step_leaf: ``(update, leaf, ctx, hyper, phase) -> LeafState``; ``update``
      is what the inner optimizer proposes to add to the quantized param
      (float32, finite), ``phase`` a traced int32 (see :func:`set_phase`).
      Pure and ``vmap``-able.
  """
  name: str
  init_leaf: Callable[..., Any]
  step_leaf: Callable[..., Any]


class QuantizerState(NamedTuple):
  """State of every method's transformation.

  Attributes:
    count: number of updates (int32).
    phase: the training phase (int32); EC2T's phase 2 (frozen assignment) is
      1, staged methods count their stages.
    nonfinite_count: updates in which some selected leaf received a
      non-finite update; such a leaf keeps its state for that step.
    invalid_hyper_count: updates skipped (all selected leaves kept their
      state) because a traced hyperparameter was non-finite or out of range.
    leaves: a tree like the params: a method's :class:`LeafState` at each
      selected leaf (a :class:`StackedLeaf` for a stack of layers, a
      :class:`GroupSlot` for a leaf whose state lives in ``groups``),
      ``None`` elsewhere.
    groups: :class:`StackedLeaf` states of same-shape leaves kept stacked,
      so that one ``vmap``-ed step serves them all (compile time that does
      not grow with depth); read them per leaf with :meth:`field` or
      :meth:`resolved_leaves`.
  """
  count: jax.Array
  phase: jax.Array
  nonfinite_count: jax.Array
  invalid_hyper_count: jax.Array
  leaves: Any
  groups: tuple = ()

  @property
  def frozen(self) -> jax.Array:
    """EC2T's phase 2 flag: ``phase >= 1``."""
    return self.phase >= 1

  def field(self, name: str):
    """The tree of one per-leaf field (``None`` where unselected or absent).

    Example:
      >>> state.field("latent")["Conv_1"]["kernel"].shape
      (3, 3, 4, 8)
      >>> state.field("w_p")["Conv_0"]  # unselected (first layer)
      {'bias': None, 'kernel': None}
    """
    def get(leaf):
      if isinstance(leaf, GroupSlot):
        stacked = getattr(self.groups[leaf.group].inner, name, None)
        return None if stacked is None else stacked[leaf.index]
      return getattr(leaf, name, None)
    return jax.tree.map(get, self.leaves, is_leaf=is_leaf_state)

  def resolved_leaves(self):
    """:attr:`leaves` with each :class:`GroupSlot` replaced by its leaf's
    own state (sliced out of its group)."""
    return jax.tree.map(
        lambda leaf: (self.groups[leaf.group].slice(leaf.index)
                      if isinstance(leaf, GroupSlot) else leaf),
        self.leaves, is_leaf=is_leaf_state)

  @property
  def latent(self):
    """The tree of latent weights (``None`` at unselected leaves)."""
    return self.field("latent")


def is_leaf_state(x) -> bool:
  """Whether ``x`` is one selected leaf's state (or ``None``)."""
  return x is None or isinstance(x, (StackedLeaf, GroupSlot)) or (
      isinstance(x, tuple) and hasattr(x, "_fields") and hasattr(x, "value")
      and hasattr(x, "describe"))


def over_slices(fn: Callable, stack_ndim: int) -> Callable:
  """``fn`` vmapped over ``stack_ndim`` leading axes of every argument."""
  for _ in range(stack_ndim):
    fn = jax.vmap(fn)
  return fn


@jax.tree_util.register_pytree_node_class
class StackedLeaf:
  """The state of a stacked leaf: one method state per slice (layer).

  A leaf of shape ``stack_shape + slice_shape`` (``nn.scan`` / ``nnx.vmap``
  stacks of layers) holds ``inner``, the method's state with every field
  stacked along ``stack_ndim`` leading axes (the core ``vmap``-s the
  method's ``init_leaf`` / ``step_leaf`` over them). Reading a field
  (``leaf.w_p``, ``state.field("w_p")``) gives the stacked field, e.g. shape
  ``(L,)`` for EC2T's scalar centroids; :meth:`value` is the whole leaf's
  value; :meth:`slices` yields one ``(suffix, state)`` per layer for
  per-layer tables (``blocks/c_fc/kernel[3]``).

  Attributes:
    inner: the method's state with stacked fields.
    stack_ndim: the number of leading stack axes (static).
  """
  __slots__ = ("inner", "stack_ndim")

  def __init__(self, inner, stack_ndim: int):
    self.inner = inner
    self.stack_ndim = int(stack_ndim)

  def tree_flatten(self):
    return (self.inner,), self.stack_ndim

  @classmethod
  def tree_unflatten(cls, stack_ndim, children):
    return cls(children[0], stack_ndim)

  def __getattr__(self, name):
    if name in ("inner", "stack_ndim") or name.startswith("__"):
      raise AttributeError(name)
    attr = getattr(self.inner, name)
    if callable(attr):  # methods of the inner state: one call per slice
      raise AttributeError(
          f"{name!r} of a stacked leaf state: call it per slice "
          "(StackedLeaf.slices()) or through StackedLeaf.value")
    return attr

  def __repr__(self):
    return f"StackedLeaf({self.inner!r}, stack_ndim={self.stack_ndim})"

  @property
  def stack_shape(self) -> tuple:
    return tuple(jax.tree.leaves(self.inner)[0].shape[:self.stack_ndim])

  def value(self, dtype) -> jax.Array:
    """The stacked leaf's value: every slice's ``value(dtype)``."""
    return over_slices(lambda s: s.value(dtype), self.stack_ndim)(self.inner)

  def describe(self) -> dict:
    """The first slice's description (method and mode names); per-slice
    statistics come from :meth:`slices`."""
    return self.slice(0).describe()

  def slice(self, flat_index: int):
    """The method state of one slice (flat index into ``stack_shape``)."""
    index = np.unravel_index(flat_index, self.stack_shape)
    return jax.tree.map(lambda x: x[index], self.inner)

  def slices(self):
    """Yields ``(suffix, state)`` per slice, ``suffix`` like ``"[3]"``."""
    for flat in range(math.prod(self.stack_shape)):
      index = np.unravel_index(flat, self.stack_shape)
      yield (slice_suffix(index), jax.tree.map(lambda x: x[index], self.inner))


@jax.tree_util.register_pytree_node_class
class GroupSlot:
  """Where a leaf's state is: slice ``index`` of ``QuantizerState.groups[group]``.

  Holds no arrays (static), so a state's leaves stay a tree like the params
  while same-shape leaves share one stacked state.
  """
  __slots__ = ("group", "index")

  def __init__(self, group: int, index: int):
    self.group, self.index = int(group), int(index)

  def tree_flatten(self):
    return (), (self.group, self.index)

  @classmethod
  def tree_unflatten(cls, aux, children):
    del children
    return cls(*aux)

  def __eq__(self, other):
    return (isinstance(other, GroupSlot)
            and (self.group, self.index) == (other.group, other.index))

  def __hash__(self):
    return hash((GroupSlot, self.group, self.index))

  def __repr__(self):
    return f"GroupSlot(group={self.group}, index={self.index})"


def slice_suffix(index) -> str:
  """``"[3]"`` (or ``"[1,2]"``): how a slice is named after its leaf's path."""
  return "[" + ",".join(str(int(i)) for i in index) + "]"

