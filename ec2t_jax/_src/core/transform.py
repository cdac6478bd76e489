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
* **stacked layers**: a leaf holding several layers along leading axes
  (``nn.scan`` / ``nnx.vmap`` stacks, see :class:`~ec2t_jax.Selection`) gets
  one state per slice (:class:`StackedLeaf`); the method's ``init_leaf`` and
  ``step_leaf`` are ``vmap``-ed over the stack axes, so every per-layer
  statistic is per slice without per-method code;
* **compile time**: a method whose step reduces through its segments
  (``Method(flat=True)``: every train-time method) keeps the states of all
  compatible leaves end to end in one flat buffer (``_src/core/flat.py``),
  stepped by one trace whatever the number and shapes of the layers; for the
  others (and leaves that may be sharded, or ``layout="grouped"``) same-shape
  leaves keep their states stacked and one ``vmap``-ed step serves each group
  (:func:`group_states`, :func:`step_groups`);
* **latent weight decay**: the update accepts ``latent_decay`` (what
  :func:`~ec2t_jax.chain` computes: the inner optimizer's decoupled decay of
  each latent field), added to the latent weights before the method's step
  (:func:`decay_latents`);
* **shared tools**: :func:`~ec2t_jax.quantized_params`, :func:`~ec2t_jax.summary`,
  :func:`~ec2t_jax.set_phase` / :func:`~ec2t_jax.freeze_assignment` and the
  export work for every method through :class:`QuantizerState`.

Writing a method: see the docstring of ``_src/core/protocol.py``; a
:class:`Quantizer` bundles a method with its hyperparameters and selection
and serves training (:meth:`Quantizer.transform`) and one-shot use
(:meth:`Quantizer.instant`) alike.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ec2t_jax._src.core import budget as budget_lib
from ec2t_jax._src.core import flat as flat_lib
from ec2t_jax._src.core import selection as selection_lib
from ec2t_jax._src.core.grid import exact_update
from ec2t_jax._src.core.hyper import check_choice, check_range, hyper_is_valid, Range
from ec2t_jax._src.core.protocol import is_leaf_state, LeafContext, Method, NO_PARAMS_MSG, QuantizerState
from ec2t_jax._src.core.protocol import GroupSlot
from ec2t_jax._src.core.protocol import TreeInfo
from ec2t_jax._src.core import rule_options
from ec2t_jax._src.core.protocol import over_slices
from ec2t_jax._src.core.protocol import StackedLeaf
from ec2t_jax._src.core.trees import as_mapping
from ec2t_jax._src.core.trees import path_to_str
from ec2t_jax._src.core.trees import pure_tree

LAYOUTS = ("grouped", "flat")

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


def _contexts(named_leaves, stack_ndims, rules) -> list[Optional[LeafContext]]:
  """Per leaf ``(path, array)``, its context (``None`` where ``stack_ndims``
  is ``None``: unselected); ``shape`` and ``size_fraction`` of one slice."""
  slice_sizes = [math.prod(np.shape(leaf)[k:])
                 for (_, leaf), k in zip(named_leaves, stack_ndims) if k is not None]
  largest = max(slice_sizes, default=1)
  out = []
  for (path, leaf), k, rule in zip(named_leaves, stack_ndims, rules):
    if k is None:
      out.append(None)
      continue
    shape = tuple(np.shape(leaf))
    out.append(LeafContext(path, shape[k:], jnp.dtype(leaf.dtype), rule.mode,
                           rule.gamma, math.prod(shape[k:]) / largest,
                           stack_shape=shape[:k],
                           output_axis=getattr(rule, "output_axis", -1)))
  return out


def _stack_ndim(state) -> Optional[int]:
  if state is None:
    return None
  return state.stack_ndim if isinstance(state, StackedLeaf) else 0


def leaf_contexts(state_leaves, params, selection) -> list[Optional[LeafContext]]:
  """Per-leaf :class:`LeafContext` (flattening order), ``None`` if unselected.

  Which leaves are selected, and their stack axes, come from the state
  (decided at ``init``); the mode and gamma from the rule matching each
  selected path, the output axis as :meth:`Selection.output_axis` gave it at
  ``init`` (rule, else trace, else the last axis).
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  states, _ = flat_leaf_states(state_leaves)
  named = [(path_to_str(path), leaf) for path, leaf in flat]
  rules = [None if s is None else selection.leaf_rule(name)._replace(
               output_axis=selection.output_axis(name, leaf, _stack_ndim(s)))
           for (name, leaf), s in zip(named, states)]
  return _contexts(named, [_stack_ndim(s) for s in states], rules)


def slice_indices(stack_shape: tuple) -> jax.Array:
  """Each slice's flat index, shaped like the stack (int32)."""
  return jnp.arange(math.prod(stack_shape), dtype=jnp.int32).reshape(stack_shape)


def init_leaf_state(method: Method, param, ctx: LeafContext, hyper):
  """``method.init_leaf``; per slice (``vmap``) for a stacked leaf."""
  if not ctx.stack_shape:
    return method.init_leaf(param, ctx, hyper)
  init = lambda p, i: method.init_leaf(p, ctx._replace(slice_index=i), hyper)
  k = len(ctx.stack_shape)
  return StackedLeaf(over_slices(init, k)(param, slice_indices(ctx.stack_shape)), k)


def prepare_tree(method: Method, params, selection, hyper) -> TreeInfo:
  """The method's tree-level :class:`TreeInfo` (empty without a ``prepare`` hook)."""
  if method.prepare is None:
    return TreeInfo()
  return method.prepare(params, selection, hyper)


def init_state(method: Method, params, selection, hyper,
               info: Optional[TreeInfo] = None, *, group: bool = True,
               layout: str = "flat") -> QuantizerState:
  """Selects leaves (once) and initialises each selected leaf's state.

  The method's ``prepare`` hook runs first (or ``info``, its result, is
  given); its refined selection, if any, plans the leaves, and each selected
  leaf's ``leaf_info`` entry reaches ``init_leaf`` as ``ctx.info``. Every
  selected leaf's rule options are checked against ``method.accepts``.

  A stacked leaf (see :class:`~ec2t_jax.Selection`) gets one state per slice,
  stacked (:class:`StackedLeaf`): ``method.init_leaf`` is ``vmap``-ed over
  its stack axes with the context of one slice. With ``group``, the states
  of a ``Method(flat=True)`` go into flat buffers (``layout="flat"``, the
  default; not the leaves of a param that may be sharded over devices,
  ``flat.may_be_sharded``), then same-shape leaves keep their states stacked
  (:func:`group_states`).
  """
  check_choice("layout", layout, LAYOUTS)
  if info is None:
    info = prepare_tree(method, params, selection, hyper)
  selection = selection if info.selection is None else info.selection
  leaf_info = info.leaf_info or {}
  plans = selection.plan(params)
  rule_options.check_plans(method, plans)
  # nnx.State would turn the NamedTuples nested in it into States on
  # nnx.update; plain nested dicts keep them.
  params = as_mapping(params)
  flat, treedef = jax.tree.flatten(params)
  paths = _paths(params)
  contexts = _contexts(list(zip(paths, flat)),
                       [None if plan is None else plan.stack_ndim for plan in plans],
                       plans)
  leaves, sharded = [], []
  for leaf, ctx in zip(flat, contexts):
    sharded.append(flat_lib.may_be_sharded(leaf))
    if ctx is None:
      leaves.append(None)
      continue
    # A copy, so no leaf state aliases a param buffer (a step that donates
    # both params and optimizer state would donate one buffer twice).
    leaf = jnp.array(leaf, copy=True)
    leaves.append(init_leaf_state(method, leaf, ctx._replace(info=leaf_info.get(ctx.path)),
                                  hyper))
  groups: tuple = ()
  if group and method.flat and layout == "flat":
    leaves, groups = flat_states(leaves, contexts, sharded)
  if group:
    leaves, groups = group_states(leaves, contexts, groups)
  zero = jnp.zeros((), jnp.int32)
  return QuantizerState(count=zero, phase=zero, nonfinite_count=zero,
                        invalid_hyper_count=zero, off_grid_count=zero,
                        leaves=treedef.unflatten(leaves), groups=groups)


def flat_states(leaves: list, contexts: list, sharded: list) -> tuple[list, tuple]:
  """Puts the states of a ``Method(flat=True)`` into flat buffers (``_src/core/flat.py``).

  Two or more leaves whose states share a class, mode, dtypes and field kinds
  share a :class:`~ec2t_jax._src.core.flat.FlatGroup` (a lone leaf keeps its
  own state: one trace either way). A leaf of a param that may be sharded over
  several devices, or whose state has a field that is neither element-,
  layer- nor filter-shaped, keeps its own state.

  Returns:
    ``(leaves with GroupSlots, groups)``.
  """
  members: dict = {}
  for i, (leaf, ctx) in enumerate(zip(leaves, contexts)):
    if leaf is None or sharded[i]:
      continue
    found = flat_lib.flat_key(leaf, ctx)
    if found is not None:
      members.setdefault(found, []).append(i)
  out, groups = list(leaves), []
  for (_, kinds), indices in members.items():
    if len(indices) < 2:
      continue
    for j, i in enumerate(indices):
      out[i] = GroupSlot(len(groups), j)
    groups.append(flat_lib.pack([leaves[i] for i in indices], [contexts[i] for i in indices],
                                kinds))
  return out, tuple(groups)


def group_states(leaves: list, contexts: list, groups: tuple = ()) -> tuple[list, tuple]:
  """Stacks the states of leaves that one ``vmap``-ed step can serve.

  Leaves group when their contexts are equal but for the path (same shape,
  dtype, mode, gamma, size fraction) and their states have the same type,
  structure, shapes and dtypes. Each group of two or more becomes one
  :class:`StackedLeaf` of ``QuantizerState.groups``; its leaves hold a
  :class:`GroupSlot`. Stacked leaves (layers of one leaf) are not grouped.

  Args:
    leaves: per leaf, its state (None if unselected; a GroupSlot is left as it is).
    contexts: per leaf, its context.
    groups: groups made before (new ones are numbered after them).

  Returns:
    ``(leaves with GroupSlots, groups)``.
  """
  members: dict = {}
  for i, (leaf, ctx) in enumerate(zip(leaves, contexts)):
    if leaf is None or isinstance(leaf, (StackedLeaf, GroupSlot)):
      continue
    arrays = jax.tree.leaves(leaf)
    key = (type(leaf), ctx._replace(path="", slice_index=0), jax.tree.structure(leaf),
           tuple((x.shape, jnp.dtype(x.dtype)) for x in arrays))
    members.setdefault(key, []).append(i)
  out, groups = list(leaves), list(groups)
  for indices in members.values():
    if len(indices) < 2:
      continue
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[leaves[i] for i in indices])
    for j, i in enumerate(indices):
      out[i] = GroupSlot(len(groups), j)
    groups.append(StackedLeaf(stacked, 1))
  return out, tuple(groups)


def step_leaves(step: Callable, inputs: list, old: list, contexts: list,
                keep: jax.Array) -> tuple[list, jax.Array]:
  """Applies ``step(input, leaf, ctx) -> new leaf`` to every selected leaf.

  A leaf whose input holds a non-finite number, or every leaf when ``keep``
  is true, keeps its old state. A stacked leaf (:class:`StackedLeaf`) is
  stepped per slice (``vmap`` over its stack axes, each slice with its own
  ``slice_index`` in the context), and the non-finite guard is per slice.

  Each leaf is traced on its own; leaves whose state lives in a group
  (:class:`GroupSlot`) are skipped here and stepped by :func:`step_groups`.
  (An earlier version stacked same-shape leaves' states *and* inputs under
  ``jax.vmap`` at every step and compiled slower on XLA:CPU, 5.5 s against
  3.6 s for ResNet-20; groups keep the states stacked between steps.)

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

  def per_slice(x, leaf: StackedLeaf, ctx):
    run = lambda x, inner, i: guarded(x, inner, ctx._replace(slice_index=i))
    inner, bad = over_slices(run, leaf.stack_ndim)(
        x, leaf.inner, slice_indices(ctx.stack_shape))
    return StackedLeaf(inner, leaf.stack_ndim), jnp.any(bad)

  new = list(old)
  nonfinite = []
  for i, ctx in enumerate(contexts):
    if ctx is not None and not isinstance(old[i], GroupSlot):
      run = per_slice if isinstance(old[i], StackedLeaf) else guarded
      new[i], bad = run(inputs[i], old[i], ctx)
      nonfinite.append(bad)
  any_bad = jnp.any(jnp.stack(nonfinite)) if nonfinite else jnp.asarray(False)
  return new, any_bad


def _values(groups: tuple) -> Callable:
  """``value(leaf, dtype)``: a leaf state's value; a leaf in a group takes its
  slice of the group's value (computed once per group and dtype)."""
  values: dict = {}

  def value(leaf, dtype):
    if isinstance(leaf, GroupSlot):
      group = groups[leaf.group]
      if (leaf.group, dtype) not in values:
        values[leaf.group, dtype] = group.value(dtype)
      if isinstance(group, flat_lib.FlatGroup):
        return group.member_value(values[leaf.group, dtype], leaf.index)
      return values[leaf.group, dtype][leaf.index]
    return leaf.value(dtype)
  return value


def emit_updates(updates, params, new_leaves: list, groups: tuple = ()):
  """Exact steps to ``leaf.value`` at selected leaves, ``updates`` elsewhere.

  A leaf in a group takes its slice of the group's value.
  """
  flat_updates, treedef = jax.tree.flatten(updates)
  flat_params = treedef.flatten_up_to(params)
  value = _values(groups)
  out = [u if leaf is None else exact_update(value(leaf, jnp.asarray(p).dtype), p)
         for u, p, leaf in zip(flat_updates, flat_params, new_leaves)]
  return treedef.unflatten(out)


def latent_fields(leaf_state) -> tuple[str, ...]:
  """The fields of a method's leaf state that hold latent weights.

  ``("latent",)`` for a state with a ``latent`` field; a state class may name
  others in a class attribute ``latent_fields`` (STTN: ``("latent",
  "latent2")``); ``()`` for a state without latent weights. Stacked and
  grouped states answer for their inner state's class.

  Example:
    >>> import jax.numpy as jnp
    >>> import ec2t_jax as ec2t
    >>> from ec2t_jax._src.core.transform import latent_fields  # internal
    >>> state = ec2t.sttn(selection=lambda path, leaf: True).init({"w": jnp.ones((3, 2))})
    >>> latent_fields(state.leaves["w"])
    ('latent', 'latent2')
  """
  if isinstance(leaf_state, (StackedLeaf, flat_lib.FlatGroup)):
    leaf_state = leaf_state.inner
  cls = type(leaf_state)
  fields = getattr(cls, "_fields", ())
  named = getattr(cls, "latent_fields", ("latent",))
  return tuple(f for f in named if f in fields)


def decay_latents(leaf, decay: dict, phase=0):
  """``leaf`` with ``decay[f]`` added to each latent field ``f`` (zeros keep it bitwise).

  The decoupled weight decay of the latent weights, applied before the
  method's step (as ``torch.optim.AdamW`` decays before the Adam step). A
  state whose method freezes its latent weights in some phase says so with
  an optional ``latents_train(phase) -> bool`` (EC2T: not in phase 2); there
  the latents keep their values.
  """
  trains = getattr(leaf, "latents_train", None)
  keep = jnp.asarray(False) if trains is None else ~jnp.asarray(trains(phase))

  def add(f):
    old = getattr(leaf, f)
    d = decay[f]
    return jnp.where((d == 0) | keep, old, old + d).astype(old.dtype)
  return leaf._replace(**{f: add(f) for f in decay})


def _leaf_decays(latent_decay: dict, updates, old: list, groups: tuple) -> list:
  """Per leaf (flattening order), ``{field: float32 decay}`` of its latent
  fields (None where unselected); ``latent_decay`` maps a field to a tree
  like the params."""
  for name, tree in latent_decay.items():
    check_same_tree(f"latent_decay[{name!r}]", tree, updates)
  flat = {name: jax.tree.leaves(tree) for name, tree in latent_decay.items()}
  out = []
  for i, leaf in enumerate(old):
    if leaf is None:
      out.append(None)
      continue
    state = groups[leaf.group] if isinstance(leaf, GroupSlot) else leaf
    out.append({f: jnp.asarray(flat[f][i], jnp.float32)
                for f in latent_fields(state) if f in flat})
  return out


def params_off_grid(params, old_leaves: list, groups: tuple = ()) -> jax.Array:
  """Whether some selected leaf of ``params`` is not its state's value.

  After an update the params hold the states' values (exact landing), so at
  the next update they still do unless something changed them in between: a
  transformation placed after the quantizer, params edited between steps.
  A leaf counts as off the grid when ``max |params - value|`` exceeds
  ``4 eps max(|params|, |value|)`` (``eps`` of the param dtype): the landing
  of a value that is not on a snapped grid (ECP's latent weights) may be off
  by an ulp, a foreign step is far larger.

  Args:
    params: the incoming params (flattening order matches ``old_leaves``).
    old_leaves: per leaf, the state before this update (None if unselected).
    groups: :attr:`QuantizerState.groups`.

  Returns:
    A bool scalar.
  """
  value = _values(groups)
  off = []
  flat_members: dict = {}  # a flat buffer's members are tested together
  for p, leaf in zip(jax.tree.leaves(params), old_leaves):
    if leaf is None:
      continue
    if isinstance(leaf, GroupSlot) and isinstance(groups[leaf.group], flat_lib.FlatGroup):
      flat_members.setdefault(leaf.group, {})[leaf.index] = p
      continue
    p = jnp.asarray(p)
    eps = float(jnp.finfo(p.dtype).eps)
    v = value(leaf, p.dtype).astype(jnp.float32)
    p = p.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(p)), jnp.max(jnp.abs(v)))
    tolerance = 4 * eps * scale
    off.append(jnp.max(jnp.abs(p - v)) > tolerance)
  for g, members in flat_members.items():
    off.append(groups[g].off_grid([members[i] for i in sorted(members)]))
  return jnp.any(jnp.stack(off)) if off else jnp.asarray(False)


def advance(state: QuantizerState, params, updates, step: Callable, inputs,
            contexts, keep) -> tuple[Any, QuantizerState]:
  """Steps the selected leaves and returns ``(updates, new_state)``.

  The shared tail of every transformation: ``inputs`` (per leaf, flattening
  order) drive ``step``; unselected leaves pass ``updates`` through.
  """
  old, treedef = flat_leaf_states(state.leaves)
  off_grid = params_off_grid(params, old, state.groups) & (state.count > 0)
  new, any_bad = step_leaves(step, inputs, old, contexts, keep)
  groups, group_bad = step_groups(step, inputs, old, contexts, state.groups, keep)
  any_bad = any_bad | group_bad
  new_state = state._replace(
      count=optax.safe_increment(state.count),
      nonfinite_count=state.nonfinite_count + (any_bad & ~keep).astype(jnp.int32),
      invalid_hyper_count=state.invalid_hyper_count + keep.astype(jnp.int32),
      off_grid_count=state.off_grid_count + off_grid.astype(jnp.int32),
      leaves=treedef.unflatten(new), groups=groups)
  return emit_updates(updates, params, new, groups), new_state


def step_groups(step: Callable, inputs: list, slots: list, contexts: list,
                groups: tuple, keep: jax.Array) -> tuple[tuple, jax.Array]:
  """Steps every group of ``QuantizerState.groups``, each with one trace of ``step``.

  A flat buffer's inputs are concatenated (:func:`flat_lib.step`); a
  stacked group's inputs are stacked (the only per-step stacking: the
  states stay stacked), then stepped like the slices of a stacked leaf.

  Returns:
    ``(new groups, any non-finite input)``.
  """
  if not groups:
    return groups, jnp.asarray(False)
  members: list[list[int]] = [[] for _ in groups]
  for i, slot in enumerate(slots):
    if isinstance(slot, GroupSlot):
      members[slot.group].append(i)
  new, bad = [], []
  for group, indices in zip(groups, members):
    if isinstance(group, flat_lib.FlatGroup):
      leaf, any_bad = flat_lib.step(step, [inputs[i] for i in indices], group,
                                    contexts[indices[0]], keep)
      new.append(leaf)
      bad.append(any_bad)
      continue
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[inputs[i] for i in indices])
    ctx = contexts[indices[0]]._replace(stack_shape=(len(indices),))
    (leaf,), any_bad = step_leaves(step, [stacked], [group], [ctx], keep)
    new.append(leaf)
    bad.append(any_bad)
  return tuple(new), jnp.any(jnp.stack(bad))


class QuantizerTransformation(optax.GradientTransformationExtraArgs):
  """A method's transformation: an optax transformation whose update also takes
  ``latent_decay``.

  ``update(updates, state, params, *, latent_decay=None, **extra_args)``:
  ``latent_decay`` maps a latent field name (see :func:`latent_fields`) to a
  tree like the params; at each selected leaf it is added to that latent field
  before the method's step (:func:`decay_latents`). :func:`~ec2t_jax.chain`
  computes it from the inner optimizer; in a plain ``optax.chain`` it is
  absent and other extra arguments are ignored.
  """
  __slots__ = ()


def quantize_transform(
    method: Method,
    hyper: NamedTuple,
    hyper_ranges: dict[str, Range],
    *,
    selection: selection_lib.SelectionLike = None,
    budget: Optional[budget_lib.Budget] = None,
    controlled: Optional[budget_lib.ControlledHyper] = None,
    budget_target=None,
    layout: str = "flat",
) -> optax.GradientTransformation:
  """A method as the last transformation of an optax chain.

  Args:
    method: the :class:`Method`.
    hyper: the method's numeric (traceable) hyperparameters.
    hyper_ranges: valid range of each name in ``hyper`` that must be checked;
      concrete values are checked here, traced ones at every update.
    selection: which leaves to quantize (see :class:`~ec2t_jax.Selection`).
    budget: a size :class:`~ec2t_jax.Budget`: every step then uses the
      method's ``controlled`` hyperparameter (a field of ``hyper``) at the
      controller's multiplier,
      measures the new assignments and updates the multiplier (see
      ``_src/core/budget.py``); the controller holds in ``phase >= 1``.
    controlled: which hyperparameter the controller drives (needed with
      ``budget``).
    budget_target: the budget's target value if not ``budget``'s own (may be
      traced, e.g. through ``optax.inject_hyperparams``); a traced value that
      is non-finite or out of range skips the step like an invalid
      hyperparameter.
    layout: ``"flat"`` (the default: a ``Method(flat=True)`` keeps its
      leaves' states in flat buffers, one trace of its step whatever the
      depth; other methods, and leaves that may be sharded, as ``"grouped"``)
      or ``"grouped"`` (same-shape leaves share a stacked state, one
      ``vmap``-ed step per shape: the path the flat one is tested against).

  Returns:
    A :class:`QuantizerTransformation` with state :class:`QuantizerState`.
  """
  check_choice("layout", layout, LAYOUTS)
  for name, valid in hyper_ranges.items():
    check_range(name, getattr(hyper, name), valid)
  chosen = selection_lib.as_selection(selection)
  rule_options.check_rules(method, chosen)
  if budget is not None:
    if controlled is None:
      raise ValueError(f"method {method.name!r} does not accept a Budget")
    target = budget.target if budget_target is None else budget_target
    budget_lib.check_target(budget.kind, target)

  def plan_of(params, state_leaves):
    states, _ = flat_leaf_states(state_leaves)
    return budget_lib.plan_budget(budget, controlled, jax.tree.leaves(params), states)

  def init_fn(params):
    state = init_state(method, params, chosen, hyper, layout=layout)
    if budget is None:
      return state
    # Leaves kept stacked in groups are read per leaf (GroupSlot resolved).
    leaves = state.resolved_leaves()
    states, _ = flat_leaf_states(leaves)
    return state._replace(budget=budget_lib.init_budget_state(
        plan_of(params, leaves), states, target))

  def update_fn(updates, state, params=None, *, latent_decay=None, **extra_args):
    del extra_args  # e.g. a loss value other members of an optax chain use
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
      plan = plan_of(params, state.resolved_leaves())
      keep |= ~budget_lib.target_is_valid(budget.kind, target, plan.smallest_bytes())
      step_hyper = hyper._replace(**{controlled.name: state.budget.multiplier})
    step = lambda u, leaf, ctx: method.step_leaf(u, leaf, ctx, step_hyper,
                                                 state.phase)
    if latent_decay is not None:
      decays = _leaf_decays(latent_decay, updates, flat_leaf_states(state.leaves)[0],
                            state.groups)
      inputs = [None if u is None else (u, d) for u, d in zip(inputs, decays)]
      step = lambda x, leaf, ctx: method.step_leaf(
          x[0], decay_latents(leaf, x[1], state.phase), ctx, step_hyper, state.phase)
    updates, new_state = advance(state, params, updates, step, inputs, contexts, keep)
    if budget is None:
      return updates, new_state
    states, _ = flat_leaf_states(new_state.resolved_leaves())
    controller = budget_lib.update_budget_state(
        plan, state.budget, states, target, state.count, state.phase >= 1, keep)
    return updates, new_state._replace(budget=controller)

  return QuantizerTransformation(init_fn, update_fn)


def _instant_value(leaf_state, dtype):
  """The state's ``instant_value`` (else ``value``), per slice when stacked."""
  value = lambda s: getattr(s, "instant_value", s.value)(dtype)
  if isinstance(leaf_state, StackedLeaf):
    return over_slices(value, leaf_state.stack_ndim)(leaf_state.inner)
  return value(leaf_state)


class Quantizer(NamedTuple):
  """One method, ready for training and for one-shot use.

  The library's transformations are ``Quantizer(...).transform()``; the same
  object quantizes a model at once with :meth:`instant` (as jaxpruner's
  updater does with ``instant_sparsify``), from the same per-leaf state.

  Attributes:
    method: the :class:`Method`.
    hyper: its numeric (traceable) hyperparameters.
    hyper_ranges: valid range of each name in ``hyper`` that must be checked.
    selection: which leaves (see :class:`~ec2t_jax.Selection`).
    budget, controlled, budget_target: a size budget and the hyperparameter its
      controller drives (see :func:`quantize_transform`); None: no budget.
    layout: how the states are kept in training (see :func:`quantize_transform`).

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax._src.methods import twn  # internal
    >>> q = twn.quantizer("layer", selection=lambda path, leaf: True)
    >>> q.instant({"w": jnp.array([[1.0, -0.05, 0.5], [-0.75, 0.02, 0.1]])})["w"]
    Array([[ 0.75,  0.  ,  0.75],
           [-0.75,  0.  ,  0.  ]], dtype=float32)
  """
  method: Method
  hyper: Any
  hyper_ranges: Any
  selection: Any = None
  budget: Any = None
  controlled: Any = None
  budget_target: Any = None
  layout: str = "flat"

  def transform(self) -> optax.GradientTransformation:
    """The method as the last transformation of an optax chain (:func:`quantize_transform`)."""
    return quantize_transform(self.method, self.hyper, self.hyper_ranges,
                              selection=self.selection, budget=self.budget,
                              controlled=self.controlled,
                              budget_target=self.budget_target, layout=self.layout)

  def instant(self, params, *, return_state: bool = False):
    """Quantizes ``params`` at once: each selected leaf becomes its initial state's value.

    Leaves a one-shot method's ``prepare`` hook replaced (``TreeInfo.replace``)
    take their new value; every other leaf is returned as it is.

    Args:
      params: a parameter tree (Linen params, ``nnx.State``, dict of arrays).
      return_state: also return the :class:`QuantizerState`.

    Returns:
      The quantized params (same structure and dtypes), and with
      ``return_state`` the state as well.
    """
    for name, valid in self.hyper_ranges.items():
      check_range(name, getattr(self.hyper, name), valid)
    chosen = selection_lib.as_selection(self.selection)
    rule_options.check_rules(self.method, chosen)
    info = prepare_tree(self.method, params, chosen, self.hyper)
    state = init_state(self.method, params, chosen, self.hyper, info, group=False)
    replace = info.replace or {}
    flat, treedef = jax.tree.flatten(params)
    states, _ = flat_leaf_states(state.leaves)
    out = []
    for leaf, path, leaf_state in zip(flat, _paths(pure_tree(params)), states):
      if leaf_state is None:
        out.append(replace.get(path, leaf))
        continue
      out.append(_instant_value(leaf_state, jnp.asarray(leaf).dtype))
    quantized = treedef.unflatten(out)
    return (quantized, state) if return_state else quantized
