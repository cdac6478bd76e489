"""The method protocol: what a method provides and the state every method keeps.

Examples build their model, params or optimizer state with the fixture
:func:`ec2t_jax.models.small_cnn_example`.

A method is a :class:`Method`: a per-leaf ``init_leaf`` and ``step_leaf``
over a per-leaf state (a ``NamedTuple`` following :class:`LeafState`), plus
what it declares about itself:

* ``accepts`` (:class:`RuleOptions`): which :class:`~ec2t_jax.Rule` options it
  understands (modes, per-rule gamma). The core checks every rule and every
  selected leaf against it, for all methods alike, at construction and at
  ``init`` (a ``ValueError`` naming the rule or path and the value).
* ``prepare`` (optional): a tree-level hook for what needs the whole tree
  before any leaf is initialised: MLQ's forward ranks, MCQ's per-leaf keys,
  calibrated pruning's calibration pass. It returns a :class:`TreeInfo`; each
  selected leaf's entry of ``TreeInfo.leaf_info`` reaches ``init_leaf`` as
  ``ctx.info``. Nothing mutates a closure.

The same :class:`Method` serves training (``quantize_transform``, the last
transformation of an optax chain) and one-shot use
(:meth:`~ec2t_jax._src.core.transform.Quantizer.instant`, like jaxpruner's
``instant_sparsify``): a :class:`~ec2t_jax._src.core.transform.Quantizer`
holds the method with its hyperparameters and selection and offers both.

Writing a method, then registering it (see
``ec2t_jax/_src/methods/_support/registry.py``)::

  class MyLeaf(NamedTuple):            # the state of one selected leaf
    latent: jax.Array
    scale: jax.Array
    def value(self, dtype):            # what the params hold (exact landing)
      return (core.snap_to_grid(self.scale, dtype) * jnp.sign(self.latent)).astype(dtype)
    def describe(self):                # columns of ec2t.summary
      return {"method": "Mine", "mode": "ternary", "scale": self.scale}

  def init_leaf(param, ctx, hyper): ...                   # ctx: LeafContext
  def step_leaf(update, leaf, ctx, hyper, phase): ...     # pure, vmap-able

  def quantizer(factor=0.7, *, selection=None) -> core.Quantizer:
    return core.Quantizer(core.Method("mine", init_leaf, step_leaf),
                          MyHyper(factor), {"factor": core.Range(0.0)}, selection)

  def mine(factor=0.7, *, selection=None):                # the public function
    return quantizer(factor, selection=selection).transform()
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol

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
    info: this leaf's entry of the method's :class:`TreeInfo` (``init_leaf``
      only; None without a ``prepare`` hook or at ``update``).
    output_axis: the output-channel axis of one slice (index into ``shape``;
      per-channel statistics and scales run along the other axes). The
      selection plan sets it (``LeafPlan.output_axis``); default: the last.
    segments: where a step's per-layer (per-filter) reductions go
      (``_src/core/segments.py``; read it with ``segments.of(ctx)``): None for
      one leaf; a flat buffer's ``FlatSegments``, where ``gamma``,
      ``size_fraction`` and ``slice_index`` are then per element.
  """
  path: str
  shape: tuple
  dtype: Any
  mode: str
  gamma: Optional[float]
  size_fraction: float
  stack_shape: tuple = ()
  slice_index: Any = 0
  info: Any = None
  output_axis: int = -1
  segments: Any = None


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
  #
  # Optional: a class attribute ``latent_fields`` naming the fields that hold
  # latent weights (default ``("latent",)``; STTN: ``("latent", "latent2")``),
  # and ``latents_train(phase) -> bool``, false in phases that freeze them
  # (EC2T's phase 2): :func:`~ec2t_jax.chain`'s weight decay acts on those
  # fields in those phases (``core.transform.decay_latents``).
  #
  # Optional: a class attribute ``codebook_fields`` naming fields of ``k``
  # values per layer (SLQ/MLQ's ``levels`` and ``locked``): a flat buffer
  # keeps them ``(layers, k)`` (``_src/core/flat.py``), where a ``(k,)`` field
  # could not be told from a 1-d leaf by its shape.
  #
  # Optional: ``instant_value(dtype) -> Array``, what a one-shot use returns
  # when it differs from ``value`` (MCQ: the unsnapped ``q * scale`` that
  # ``ec2t.mcq`` returns; ``value`` snaps the scale for exact landing).


class RuleOptions(NamedTuple):
  """Which :class:`~ec2t_jax.Rule` options a method accepts.

  Attributes:
    modes: the rule modes it quantizes (``"skip"`` is always accepted).
    rule_gamma: whether a rule may set its own ``gamma``.
  """
  modes: tuple = ("ternary",)
  rule_gamma: bool = False


class TreeInfo(NamedTuple):
  """What a method's ``prepare`` hook found in the whole tree.

  Attributes:
    leaf_info: selected path -> anything; reaches ``init_leaf`` as
      ``ctx.info``.
    selection: a refined :class:`~ec2t_jax.Selection` to plan with (e.g.
      with the traced forward order), or None to keep the given one.
    replace: path -> new value of an *unselected* leaf, for one-shot use
      only (calibrated pruning's corrected biases); a transformation cannot
      change such leaves.
  """
  leaf_info: Optional[Mapping[str, Any]] = None
  selection: Any = None
  replace: Optional[Mapping[str, Any]] = None


class Method(NamedTuple):
  """A quantization method: its per-leaf functions and what it accepts.

  Attributes:
    name: shown by :func:`~ec2t_jax.summary` and named in errors.
    init_leaf: ``(param, ctx, hyper) -> LeafState`` from the pretrained value.
    step_leaf: ``(update, leaf, ctx, hyper, phase) -> LeafState``; ``update``
      is what the inner optimizer proposes to add to the quantized param
      (float32, finite), ``phase`` a traced int32 (see :func:`set_phase`).
      Pure and ``vmap``-able.
    accepts: the :class:`RuleOptions` it understands (default: mode
      ``"ternary"`` only, no per-rule gamma).
    prepare: optional tree-level hook ``(params, selection, hyper) ->
      TreeInfo``, called once by ``init`` before any leaf is initialised.
    flat: whether ``step_leaf`` and the state's ``value`` serve a flat buffer
      of many leaves: every per-layer (per-filter) reduction of the step goes
      through ``segments.of(ctx)`` and stays one value per segment, meeting
      the weights through ``segments.expand``; ``value`` is element-wise
      (broadcasting); the step reads none of ``ctx.shape``,
      ``ctx.output_axis``, ``ctx.info``. The core then steps all compatible
      leaves with one trace (``_src/core/flat.py``).
  """
  name: str
  init_leaf: Callable[..., Any]
  step_leaf: Callable[..., Any]
  accepts: RuleOptions = RuleOptions()
  prepare: Optional[Callable[..., TreeInfo]] = None
  flat: bool = False


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
    off_grid_count: updates (after the first) whose incoming params were not
      the state's values: something changed the params after the previous
      update (a transformation placed *after* the quantizer in the chain,
      params edited between steps), so they left the method's grid.
      :func:`~ec2t_jax.summary` reports it and warns.
    leaves: a tree like the params: a method's :class:`LeafState` at each
      selected leaf (a :class:`StackedLeaf` for a stack of layers, a
      :class:`GroupSlot` for a leaf whose state lives in ``groups``),
      ``None`` elsewhere.
    groups: states shared by several leaves, so that one trace of the
      method's step serves them all (compile time that does not grow with
      depth): a ``FlatGroup`` (``_src/core/flat.py``: the leaves' states end to
      end, for ``Method(flat=True)``) or a :class:`StackedLeaf` of same-shape
      leaves (one ``vmap``-ed step); read them per leaf with :meth:`field` or
      :meth:`resolved_leaves`.
    budget: the size-budget controller's ``BudgetState`` (multiplier,
      target, reached size), or ``None`` without a :class:`~ec2t_jax.Budget`.
  """
  count: jax.Array
  phase: jax.Array
  nonfinite_count: jax.Array
  invalid_hyper_count: jax.Array
  off_grid_count: jax.Array
  leaves: Any
  groups: tuple = ()
  budget: Any = None

  @property
  def frozen(self) -> jax.Array:
    """EC2T's phase 2 flag: ``phase >= 1``."""
    return self.phase >= 1

  def field(self, name: str):
    """The tree of one per-leaf field (``None`` where unselected or absent).

    Example:
      >>> from ec2t_jax.models import small_cnn_example
      >>> state = small_cnn_example().state  # a small CNN (fixture)
      >>> state.field("latent")["Conv_1"]["kernel"].shape
      (3, 3, 4, 8)
      >>> state.field("w_p")["Conv_0"]  # unselected (first layer)
      {'bias': None, 'kernel': None}
    """
    def get(leaf):
      if isinstance(leaf, GroupSlot):
        return getattr(self.groups[leaf.group].slice(leaf.index), name, None)
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

