"""The machinery every quantization method plugs into.

A method is a :class:`Method`: a per-leaf init, a per-leaf step and the
per-leaf state class (a ``NamedTuple`` that knows its param value and how to
describe itself). :func:`quantize_transform` turns it into an optax
transformation that goes **last** in ``optax.chain(inner, ...)`` and does, for
every method alike:

* **selection**: which leaves are quantized is decided once, by the
  :class:`~ec2t_jax.Selection` at ``init``; the state records it (``None`` at
  unselected leaves), so ``update`` never re-plans from re-sorted keys;
* **latent state**: params hold the quantized weights, the state holds each
  selected leaf's :class:`LeafState` (latent full-precision weights and
  whatever else the method keeps);
* **exact landing**: the update of a selected leaf is ``value(new) - params``
  with values on a grid where that difference is exact
  (:func:`snap_to_grid`), so ``optax.apply_updates`` lands bit-exactly on the
  method's grid;
* **guards**: a leaf whose incoming update is not finite keeps its state for
  that step (``nonfinite_count``); traced hyperparameters (e.g. set through
  ``optax.inject_hyperparams``) that are non-finite or out of range make the
  whole step keep the state (``invalid_hyper_count``); a tree that does not
  match the one given to ``init`` is an error naming the first differing path;
* **compile time**: each selected leaf is traced once per step; the shared
  pure functions keep their passes few (one reduction for several
  statistics), see :func:`step_leaves`;
* **shared tools**: :func:`~ec2t_jax.ternary_params`, :func:`~ec2t_jax.summary`,
  :func:`~ec2t_jax.set_phase` / :func:`~ec2t_jax.freeze_assignment` and the
  export work for every method through :class:`QuantizerState`.

Writing a method (see ``_src/ec2t.py`` for EC2T itself)::

  class MyLeaf(NamedTuple):            # the state of one selected leaf
    latent: jax.Array
    scale: jax.Array
    def value(self, dtype):            # what the params hold
      return snap_to_grid(self.scale, dtype) * jnp.sign(self.latent)
    def describe(self):                # columns of ec2t.summary
      return {"scale": self.scale}

  def init_leaf(param, ctx, hyper): ...
  def step_leaf(update, leaf, ctx, hyper, phase): ...   # pure, vmap-able

  my_method = Method("mine", init_leaf, step_leaf)
  tx = quantize_transform(my_method, MyHyper(...), hyper_ranges, selection=...)
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ec2t_jax._src import selection as selection_lib
from ec2t_jax._src.trees import as_mapping
from ec2t_jax._src.trees import path_to_str

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
    size_fraction: ``numel / max numel`` over all selected leaves.
  """
  path: str
  shape: tuple
  dtype: Any
  mode: str
  gamma: Optional[float]
  size_fraction: float


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
      selected leaf, ``None`` elsewhere.
  """
  count: jax.Array
  phase: jax.Array
  nonfinite_count: jax.Array
  invalid_hyper_count: jax.Array
  leaves: Any

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
    return jax.tree.map(lambda leaf: getattr(leaf, name, None), self.leaves,
                        is_leaf=is_leaf_state)

  @property
  def latent(self):
    """The tree of latent weights (``None`` at unselected leaves)."""
    return self.field("latent")


def is_leaf_state(x) -> bool:
  """Whether ``x`` is one selected leaf's state (or ``None``)."""
  return x is None or (isinstance(x, tuple) and hasattr(x, "_fields")
                       and hasattr(x, "value") and hasattr(x, "describe"))


# ---------------------------------------------------------------------------
# Exact landing on the grid.


def snap_to_grid(values, dtype, reference=None) -> jax.Array:
  """Rounds ``values`` to a power-of-two grid of ``dtype`` (float32 result).

  With ``q = 2^(e - p + 2)``, ``2^e > max |reference|`` and ``p`` the
  significand bits of ``dtype``, every difference of two values on the grid is
  exactly representable, so ``params + (new - params)`` rounds to exactly
  ``new`` (for arbitrary floats it can be off by one ulp). Snap all the
  scales one element can take together (EC2T: ``w_n`` and ``w_p``), or each
  filter's own scale on its own (``reference`` = that scale). The relative
  change is at most ``2^(1 - p)``; keep the unsnapped values in the state.
  A zero, subnormal or non-finite reference gives ``q = 2^(2 - p)``.

  Args:
    values: scales to snap.
    dtype: the param dtype.
    reference: magnitudes that set the quantum (broadcast with ``values``);
      default ``max |values|``.

  Returns:
    ``values`` on the grid, float32.

  Example:
    >>> snap_to_grid(jnp.array([0.1, 0.3]), jnp.float32)  # q = 2^-23
    Array([0.10000002, 0.29999995], dtype=float32)
  """
  values = jnp.asarray(values, jnp.float32)
  if reference is None:
    reference = jnp.max(jnp.abs(values))
  bits = jnp.finfo(dtype).nmant + 1
  # 2^(e-1) <= |reference| < 2^e: keep the exponent bits of the float32
  # (cheaper to compile than frexp / ldexp, same quantum for normal numbers).
  reference = jnp.asarray(reference, jnp.float32)
  power = jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(reference, jnp.int32) & 0x7F800000,
      jnp.float32)
  quantum = jnp.where((power > 0) & jnp.isfinite(power),
                      power * 2.0 ** (3 - bits), 2.0 ** (2 - bits))
  return jnp.round(values / quantum) * quantum


def exact_update(target, current) -> jax.Array:
  """``target - current`` in ``current``'s dtype; exact on a snapped grid."""
  current = jnp.asarray(current)
  return jnp.asarray(target).astype(current.dtype) - current


# ---------------------------------------------------------------------------
# Hyperparameters.


class Range(NamedTuple):
  """Valid interval of a numeric hyperparameter."""
  low: float
  high: float = math.inf
  low_open: bool = False

  def __str__(self):
    high = "inf)" if self.high == math.inf else f"{self.high:g}]"
    return f"{'(' if self.low_open else '['}{self.low:g}, {high}"

  def contains(self, v):
    above = v > self.low if self.low_open else v >= self.low
    return above & (v <= self.high)


def is_concrete(x) -> bool:
  """A Python number or a concrete (non-traced) array."""
  return isinstance(x, numbers.Number) or (
      isinstance(x, (np.ndarray, np.generic, jax.Array))
      and not isinstance(x, jax.core.Tracer))


def check_range(name: str, value, valid: Range) -> None:
  """Raises ``ValueError`` if a concrete ``value`` is outside ``valid``.

  Traced values (``inject_hyperparams``) are checked at each update instead,
  see :func:`hyper_is_valid`.
  """
  if not is_concrete(value):
    return
  v = np.asarray(value, np.float64)
  if v.size != 1 or not np.isfinite(v) or not valid.contains(float(v)):
    raise ValueError(f"{name} must be in {valid} (finite), got {value!r}")


def check_choice(name: str, value, choices) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def hyper_is_valid(hyper: NamedTuple, ranges: dict[str, Range]) -> jax.Array:
  """Whether every numeric hyperparameter is finite and in range (traced)."""
  ok = jnp.asarray(True)
  for name, valid in ranges.items():
    v = jnp.asarray(getattr(hyper, name), jnp.float32)
    ok &= jnp.all(jnp.isfinite(v) & valid.contains(v))
  return ok


# ---------------------------------------------------------------------------
# Trees.


def _paths(tree) -> list[str]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [path_to_str(p) for p, _ in flat]


def flat_leaf_states(leaves) -> tuple[list, Any]:
  """``(per-leaf states in flattening order, their treedef)``; None kept."""
  return jax.tree.flatten(leaves, is_leaf=is_leaf_state)


def check_same_tree(name: str, tree, leaves) -> None:
  """Raises a ``ValueError`` naming the first path where ``tree`` differs.

  ``leaves`` is :attr:`QuantizerState.leaves` (the tree given to ``init``).
  Only paths are compared, so e.g. an ``nnx.State`` and the plain dict of the
  same params match.
  """
  states, treedef = flat_leaf_states(leaves)
  # Paths of the init tree, with one placeholder per (possibly None) leaf.
  expected = _paths(treedef.unflatten([0] * len(states)))
  got = _paths(tree)
  if expected == got:
    return
  for i, (e, g) in enumerate(zip(expected, got)):
    if e != g:
      raise ValueError(
          f"{name} does not match the params given to init: leaf {i} is "
          f"{g!r} where init had {e!r}")
  extra = got[len(expected)] if len(got) > len(expected) else expected[len(got)]
  raise ValueError(
      f"{name} does not match the params given to init: it has {len(got)} "
      f"leaves where init had {len(expected)} (first unmatched path {extra!r})")


# ---------------------------------------------------------------------------
# The machinery.


def leaf_contexts(state_leaves, params, selection) -> list[Optional[LeafContext]]:
  """Per-leaf :class:`LeafContext` (flattening order), ``None`` if unselected.

  Which leaves are selected comes from the state (decided at ``init``);
  the mode and gamma from the rule matching each selected path.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  states, _ = flat_leaf_states(state_leaves)
  sizes = [math.prod(np.shape(leaf)) for (_, leaf), s in zip(flat, states)
           if s is not None]
  largest = max(sizes, default=1)
  out = []
  for (path, leaf), s in zip(flat, states):
    if s is None:
      out.append(None)
      continue
    name = path_to_str(path)
    rule = selection.leaf_rule(name)
    out.append(LeafContext(name, tuple(np.shape(leaf)), jnp.dtype(leaf.dtype),
                           rule.mode, rule.gamma,
                           math.prod(np.shape(leaf)) / largest))
  return out


def init_state(method: Method, params, selection, hyper) -> QuantizerState:
  """Selects leaves (once) and initialises each selected leaf's state."""
  plans = selection.plan(params)
  # nnx.State would turn the NamedTuples nested in it into States on
  # nnx.update; plain nested dicts keep them.
  params = as_mapping(params)
  flat, treedef = jax.tree.flatten(params)
  sizes = [leaf.size for leaf, plan in zip(flat, plans) if plan]
  largest = max(sizes, default=1)
  paths = _paths(params)
  leaves = []
  for leaf, plan, path in zip(flat, plans, paths):
    if plan is None:
      leaves.append(None)
      continue
    # A copy, so no leaf state aliases a param buffer (a step that donates
    # both params and optimizer state would donate one buffer twice).
    leaf = jnp.array(leaf, copy=True)
    ctx = LeafContext(path, leaf.shape, leaf.dtype, plan.mode, plan.gamma,
                      leaf.size / largest)
    leaves.append(method.init_leaf(leaf, ctx, hyper))
  zero = jnp.zeros((), jnp.int32)
  return QuantizerState(count=zero, phase=zero, nonfinite_count=zero,
                        invalid_hyper_count=zero,
                        leaves=treedef.unflatten(leaves))


def step_leaves(step: Callable, inputs: list, old: list, contexts: list,
                keep: jax.Array) -> tuple[list, jax.Array]:
  """Applies ``step(input, leaf, ctx) -> new leaf`` to every selected leaf.

  A leaf whose input holds a non-finite number, or every leaf when ``keep``
  is true, keeps its old state.

  Each leaf is traced on its own. Stacking leaves of one shape under
  ``jax.vmap`` was measured to compile *slower* on XLA:CPU (ResNet-20's
  chained update: 5.5 s against 3.6 s of CPU time; the stacking and
  unstacking around the vmapped body cost more than the body saves), so the
  compile time grows with the number of selected leaves.

  Args:
    step: the per-leaf step (closing over hyperparameters and phase).
    inputs: per leaf, a pytree of arrays driving the step (None if
      unselected). Non-finite entries are zeroed before ``step`` sees them.
    old: per leaf, the old state (None if unselected).
    contexts: per leaf, its :class:`LeafContext` (None if unselected).
    keep: bool scalar: keep every leaf's state (invalid hyperparameters).

  Returns:
    ``(new_states, any_nonfinite)``.
  """

  def guarded(x, leaf, ctx):
    # max |v| is NaN or inf iff some entry is (cheaper than all(isfinite)).
    finite = jnp.all(jnp.stack([jnp.isfinite(jnp.max(jnp.abs(v)))
                                for v in jax.tree.leaves(x)]))
    x = jax.tree.map(lambda v: jnp.where(jnp.isfinite(v), v, 0), x)
    new = step(x, leaf, ctx)
    accept = finite & ~keep
    new = jax.tree.map(lambda n, o: jnp.where(accept, n, o).astype(o.dtype),
                       new, leaf)
    return new, ~finite

  new = list(old)
  nonfinite = []
  for i, ctx in enumerate(contexts):
    if ctx is not None:
      new[i], bad = guarded(inputs[i], old[i], ctx)
      nonfinite.append(bad)
  any_bad = jnp.any(jnp.stack(nonfinite)) if nonfinite else jnp.asarray(False)
  return new, any_bad


def emit_updates(updates, params, new_leaves: list):
  """Exact steps to ``leaf.value`` at selected leaves, ``updates`` elsewhere."""
  flat_updates, treedef = jax.tree.flatten(updates)
  flat_params = treedef.flatten_up_to(params)
  out = [u if leaf is None else
         exact_update(leaf.value(jnp.asarray(p).dtype), p)
         for u, p, leaf in zip(flat_updates, flat_params, new_leaves)]
  return treedef.unflatten(out)


def advance(state: QuantizerState, params, updates, step: Callable, inputs,
            contexts, keep) -> tuple[Any, QuantizerState]:
  """Steps the selected leaves and returns ``(updates, new_state)``.

  The shared tail of every transformation: ``inputs`` (per leaf, flattening
  order) drive ``step``; unselected leaves pass ``updates`` through.
  """
  old, treedef = flat_leaf_states(state.leaves)
  new, any_bad = step_leaves(step, inputs, old, contexts, keep)
  new_state = state._replace(
      count=optax.safe_increment(state.count),
      nonfinite_count=state.nonfinite_count + (any_bad & ~keep).astype(jnp.int32),
      invalid_hyper_count=state.invalid_hyper_count + keep.astype(jnp.int32),
      leaves=treedef.unflatten(new))
  return emit_updates(updates, params, new), new_state


def quantize_transform(
    method: Method,
    hyper: NamedTuple,
    hyper_ranges: dict[str, Range],
    *,
    selection: selection_lib.SelectionLike = None,
) -> optax.GradientTransformation:
  """A method as the last transformation of an optax chain.

  Args:
    method: the :class:`Method`.
    hyper: the method's numeric (traceable) hyperparameters.
    hyper_ranges: valid range of each name in ``hyper`` that must be checked;
      concrete values are checked here, traced ones at every update.
    selection: which leaves to quantize (see :class:`~ec2t_jax.Selection`).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`QuantizerState`.
  """
  for name, valid in hyper_ranges.items():
    check_range(name, getattr(hyper, name), valid)
  chosen = selection_lib.as_selection(selection)

  def init_fn(params):
    return init_state(method, params, chosen, hyper)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(NO_PARAMS_MSG)
    check_same_tree("updates", updates, state.leaves)
    check_same_tree("params", params, state.leaves)
    contexts = leaf_contexts(state.leaves, params, chosen)
    inputs = [None if ctx is None else jnp.asarray(u, jnp.float32)
              for u, ctx in zip(jax.tree.leaves(updates), contexts)]
    keep = ~hyper_is_valid(hyper, hyper_ranges)
    step = lambda u, leaf, ctx: method.step_leaf(u, leaf, ctx, hyper,
                                                 state.phase)
    return advance(state, params, updates, step, inputs, contexts, keep)

  return optax.GradientTransformation(init_fn, update_fn)
