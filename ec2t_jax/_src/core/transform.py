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
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ec2t_jax._src.core import budget as budget_lib
from ec2t_jax._src.core import selection as selection_lib
from ec2t_jax._src.core.grid import exact_update
from ec2t_jax._src.core.hyper import check_range, hyper_is_valid, Range
from ec2t_jax._src.core.protocol import is_leaf_state, LeafContext, Method, NO_PARAMS_MSG, QuantizerState
from ec2t_jax._src.core.trees import as_mapping
from ec2t_jax._src.core.trees import path_to_str

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
    budget: Optional[budget_lib.Budget] = None,
    knob: Optional[budget_lib.Knob] = None,
    budget_target=None,
) -> optax.GradientTransformation:
  """A method as the last transformation of an optax chain.

  Args:
    method: the :class:`Method`.
    hyper: the method's numeric (traceable) hyperparameters.
    hyper_ranges: valid range of each name in ``hyper`` that must be checked;
      concrete values are checked here, traced ones at every update.
    selection: which leaves to quantize (see :class:`~ec2t_jax.Selection`).
    budget: a size :class:`~ec2t_jax.Budget`: every step then uses the
      method's ``knob`` (a field of ``hyper``) at the controller's multiplier,
      measures the new assignments and updates the multiplier (see
      ``_src/core/budget.py``); the controller holds in ``phase >= 1``.
    knob: which hyperparameter the controller drives (needed with ``budget``).
    budget_target: the budget's target value if not ``budget``'s own (may be
      traced, e.g. through ``optax.inject_hyperparams``); a traced value that
      is non-finite or out of range skips the step like an invalid
      hyperparameter.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`QuantizerState`.
  """
  for name, valid in hyper_ranges.items():
    check_range(name, getattr(hyper, name), valid)
  chosen = selection_lib.as_selection(selection)
  if budget is not None:
    if knob is None:
      raise ValueError(f"method {method.name!r} does not accept a Budget")
    target = budget.target if budget_target is None else budget_target
    budget_lib.check_target(budget.kind, target)

  def plan_of(params, state_leaves):
    states, _ = flat_leaf_states(state_leaves)
    return budget_lib.plan_budget(budget, knob, jax.tree.leaves(params), states)

  def init_fn(params):
    state = init_state(method, params, chosen, hyper)
    if budget is None:
      return state
    states, _ = flat_leaf_states(state.leaves)
    return state._replace(budget=budget_lib.init_budget_state(
        plan_of(params, state.leaves), states, target))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(NO_PARAMS_MSG)
    check_same_tree("updates", updates, state.leaves)
    check_same_tree("params", params, state.leaves)
    contexts = leaf_contexts(state.leaves, params, chosen)
    inputs = [None if ctx is None else jnp.asarray(u, jnp.float32)
              for u, ctx in zip(jax.tree.leaves(updates), contexts)]
    keep = ~hyper_is_valid(hyper, hyper_ranges)
    step_hyper = hyper
    if budget is not None:
      plan = plan_of(params, state.leaves)
      keep |= ~budget_lib.target_is_valid(budget.kind, target, plan.smallest_bytes())
      step_hyper = hyper._replace(**{knob.name: state.budget.multiplier})
    step = lambda u, leaf, ctx: method.step_leaf(u, leaf, ctx, step_hyper,
                                                 state.phase)
    updates, new_state = advance(state, params, updates, step, inputs, contexts, keep)
    if budget is None:
      return updates, new_state
    states, _ = flat_leaf_states(new_state.leaves)
    controller = budget_lib.update_budget_state(
        plan, state.budget, states, target, state.count, state.phase >= 1, keep)
    return updates, new_state._replace(budget=controller)

  return optax.GradientTransformation(init_fn, update_fn)
