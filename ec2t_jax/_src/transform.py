"""EC2T as optax gradient transformations.

Two ways to train, sharing one state and one per-leaf step:

* :func:`ternarize_transform` goes **last** in ``optax.chain(inner, ...)`` and
  turns whatever the inner optimizer proposes into a ternary step.
* :func:`ternarize` is the **exact-reference mode**: it consumes raw gradients
  and runs the reference training step (separate optimizers for the
  non-ternary parameters, the latent weights and the centroids, TTQ-converted
  gradients, floor, reassignment), for paper-faithful results.

In both, the model's params hold the ternary weights ``T`` of every selected
leaf, and the state holds the latent full-precision weights, the centroids,
the assignment and the lambda of the last step. Each update returns
``T_new - params`` (corrected so that ``params + update`` rounds to exactly
``T_new``), so ``optax.apply_updates`` lands exactly on ``{-w_n, 0, w_p}``.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ec2t_jax._src import selection as selection_lib
from ec2t_jax._src import ternary

_NO_PARAMS_MSG = (
    "EC2T's update needs the current params: call "
    "`tx.update(updates, state, params)`.")


class TernarizeState(NamedTuple):
  """State of :func:`ternarize_transform` (and the core of :func:`ternarize`).

  Every tree field has the structure of the params with ``None`` at the leaves
  that are not selected.

  Attributes:
    count: number of updates applied (int32).
    frozen: phase 2 flag (bool scalar): when set, the assignment and the latent
      weights are frozen and only the centroids (and the non-ternary params)
      train. See :func:`freeze_assignment`.
    nonfinite_count: number of updates in which a selected leaf received a
      non-finite update; such a leaf keeps its state for that step.
    latent: latent full-precision weights ``W`` (``latent_dtype``, same shape
      and sharding as the param).
    w_n: magnitude of the negative centroid per leaf (float32 scalar).
    w_p: value of the positive centroid per leaf (float32 scalar).
    assignment: ``int8`` assignment in ``{-1, 0, 1}`` per leaf.
    lam: lambda used by the last assignment of each leaf (float32 scalar).
    ecp: per leaf, whether it is entropy-constrained *pruned* (bool scalar):
      its params are ``W`` where the assignment is non-zero and 0 elsewhere.
  """
  count: jax.Array
  frozen: jax.Array
  nonfinite_count: jax.Array
  latent: Any
  w_n: Any
  w_p: Any
  assignment: Any
  lam: Any
  ecp: Any


class TernarizeReferenceState(NamedTuple):
  """State of :func:`ternarize`: the three inner optimizers and the core."""
  params_state: optax.OptState
  latent_state: optax.OptState
  centroid_state: optax.OptState
  ternary: TernarizeState


class _LeafConfig(NamedTuple):
  ecp: bool
  gamma: Any  # rule's gamma, or the global (possibly traced) gamma
  size_decay: Any
  dtype: Any  # dtype of the param


class _Hyper(NamedTuple):
  gamma: Any
  init_scale: Any
  floor_factor: Any
  zero_floor: Any
  sustain: Any
  renormalization: str


def _is_concrete(x) -> bool:
  return isinstance(x, numbers.Number) or (
      isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer))


def _check_range(name, value, low, high=None, *, low_open=False):
  """Raises ValueError if a concrete ``value`` is outside its range."""
  if not _is_concrete(value):
    return  # traced under inject_hyperparams / jit: checked when concrete
  v = float(np.asarray(value))
  bad = (not np.isfinite(v) or (v <= low if low_open else v < low)
         or (high is not None and v > high))
  if bad:
    interval = (f"{'(' if low_open else '['}{low}, "
                f"{high if high is not None else 'inf'}{']' if high is not None else ')'}")
    raise ValueError(f"{name} must be in {interval}, got {value!r}")


def _validate(hyper: _Hyper, latent_dtype) -> None:
  _check_range("gamma", hyper.gamma, 0.0, 1.0)
  _check_range("init_scale", hyper.init_scale, 0.0, low_open=True)
  _check_range("floor_factor", hyper.floor_factor, 0.0)
  _check_range("zero_floor", hyper.zero_floor, 0.0, 1.0, low_open=True)
  _check_range("sustain", hyper.sustain, 0.0)
  if hyper.renormalization not in ("exact", "reference"):
    raise ValueError("renormalization must be 'exact' or 'reference', got "
                     f"{hyper.renormalization!r}")
  if not jnp.issubdtype(jnp.dtype(latent_dtype), jnp.floating):
    raise ValueError(f"latent_dtype must be a floating dtype, got {latent_dtype!r}")


def _leaf_configs(params, selection, hyper: _Hyper):
  """Per-leaf config (flattening order), ``None`` for unselected leaves."""
  plans = selection.plan(params)
  leaves = jax.tree.leaves(params)
  numels = [leaf.size for leaf, plan in zip(leaves, plans) if plan]
  decays = iter(ternary.layer_size_decay(numels, hyper.sustain))
  return [None if plan is None else _LeafConfig(
      plan.mode == "ecp", hyper.gamma if plan.gamma is None else plan.gamma,
      next(decays), jnp.dtype(leaf.dtype))
          for leaf, plan in zip(leaves, plans)]


def _snap_centroids(w_n, w_p, dtype):
  """Rounds both centroids to a shared power-of-two grid of the param dtype.

  With ``q = 2^(e - p + 2)``, ``2^e > max(w_n, w_p)`` and ``p`` the significand
  bits of ``dtype``, every difference of old and new ternary values is exactly
  representable, so ``params + (T_new - params)`` rounds to exactly ``T_new``
  (for arbitrary floats it can be off by one ulp). Only the values written
  into the params are snapped (relative change at most ``2^(1-p)``); the state
  keeps the exact centroids, so small centroid steps still accumulate.
  """
  bits = jnp.finfo(dtype).nmant + 1
  _, exponent = jnp.frexp(jnp.maximum(w_n, w_p))
  quantum = jnp.ldexp(jnp.float32(1.0), exponent - bits + 2)
  snap = lambda w: jnp.round(w / quantum) * quantum
  return snap(w_n), snap(w_p)


def _assign(config: _LeafConfig, latent, w_n, w_p, hyper: _Hyper):
  return ternary.entropy_constrained_assign(
      latent, w_n, w_p, gamma=config.gamma, size_decay=config.size_decay,
      zero_floor=hyper.zero_floor, renormalization=hyper.renormalization)


def _init_state(params, selection, hyper: _Hyper, latent_dtype) -> TernarizeState:
  configs = _leaf_configs(params, selection, hyper)
  leaves, treedef = jax.tree.flatten(params)
  fields = {k: [] for k in ("latent", "w_n", "w_p", "assignment", "lam", "ecp")}
  for leaf, config in zip(leaves, configs):
    if config is None:
      for values in fields.values():
        values.append(None)
      continue
    latent = jnp.asarray(leaf).astype(latent_dtype)
    w_n, w_p = ternary.initial_centroids(latent, hyper.init_scale)
    fields["latent"].append(latent)
    fields["w_n"].append(w_n)
    fields["w_p"].append(w_p)
    fields["assignment"].append(ternary.nearest_centroid_assign(latent, w_n, w_p))
    fields["lam"].append(jnp.zeros((), jnp.float32))
    fields["ecp"].append(jnp.asarray(config.ecp))
  return TernarizeState(
      count=jnp.zeros((), jnp.int32), frozen=jnp.zeros((), bool),
      nonfinite_count=jnp.zeros((), jnp.int32),
      **{k: treedef.unflatten(v) for k, v in fields.items()})


class LeafState(NamedTuple):
  """The state of one selected leaf, gathered from the TernarizeState trees."""
  latent: jax.Array
  w_n: jax.Array
  w_p: jax.Array
  assignment: jax.Array
  lam: jax.Array


def _advance_leaf(config: _LeafConfig, leaf: LeafState, latent_step,
                  centroid_step, frozen, finite, hyper: _Hyper) -> LeafState:
  """One EC2T step of one leaf, given the latent and centroid increments.

  Order as in the reference: move latent weights (unless frozen) and centroids,
  floor the centroids at ``floor_factor * std(W)``, reassign (unless frozen).
  An ECP leaf's centroids are the means of its non-zero clusters instead.
  A leaf whose incoming step is not finite keeps its whole state.
  """
  latent = jnp.where(frozen, leaf.latent,
                     (leaf.latent + latent_step).astype(leaf.latent.dtype))
  if config.ecp:
    w_n = _cluster_mean(-latent, leaf.assignment < 0, leaf.w_n)
    w_p = _cluster_mean(latent, leaf.assignment > 0, leaf.w_p)
  else:
    w_n, w_p = leaf.w_n + centroid_step[0], leaf.w_p + centroid_step[1]
  w_n, w_p = ternary.centroid_floor(latent, w_n, w_p, hyper.floor_factor)
  # Keep centroids strictly positive even for constant layers (std = 0).
  tiny = jnp.finfo(jnp.float32).tiny
  w_n, w_p = jnp.maximum(w_n, tiny), jnp.maximum(w_p, tiny)
  assignment, lam = _assign(config, latent, w_n, w_p, hyper)
  assignment = jnp.where(frozen, leaf.assignment, assignment)
  lam = jnp.where(frozen, leaf.lam, lam)
  new = LeafState(latent, w_n, w_p, assignment, lam)
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, leaf)


def _cluster_mean(values, mask, fallback):
  count = jnp.sum(mask)
  total = jnp.sum(jnp.where(mask, values, 0.0), dtype=jnp.float32)
  return jnp.where(count > 0, total / jnp.maximum(count, 1), fallback)


def leaf_value(leaf: LeafState, ecp: bool, dtype) -> jax.Array:
  """The param value of a leaf: ``T`` (snapped centroids), or ``W`` masked (ECP)."""
  if ecp:
    return jnp.where(leaf.assignment == 0, 0, leaf.latent).astype(dtype)
  w_n, w_p = _snap_centroids(leaf.w_n, leaf.w_p, dtype)
  return ternary.ternary_values(leaf.assignment, w_n, w_p, dtype)


def _exact_update(target, current) -> jax.Array:
  """``target - current``; exact when both lie on the snapped centroid grid.

  See :func:`_snap_centroids`. If ``current`` is off the grid (params never
  passed through :func:`ternary_params`), the sum may miss by one ulp once and
  is exact again from the next step on.
  """
  current = jnp.asarray(current)
  return target.astype(current.dtype) - current


def _flat_state(state: TernarizeState, treedef):
  return [
      None if latent is None else LeafState(latent, w_n, w_p, a, lam)
      for latent, w_n, w_p, a, lam in zip(*(
          treedef.flatten_up_to(t) for t in
          (state.latent, state.w_n, state.w_p, state.assignment, state.lam)))]


def _step_state(state: TernarizeState, params, configs, latent_steps,
                centroid_steps, finites, hyper: _Hyper):
  """Advances every selected leaf; returns (new leaf states, new state)."""
  treedef = jax.tree.structure(params)
  old = _flat_state(state, treedef)
  new = [None if config is None else _advance_leaf(
      config, leaf_state, latent_step, centroid_step, state.frozen, finite, hyper)
         for config, leaf_state, latent_step, centroid_step, finite in zip(
             configs, old, latent_steps, centroid_steps, finites)]
  all_finite = jnp.all(jnp.stack([jnp.asarray(f) for f, c in zip(finites, configs)
                                  if c is not None]))
  field = lambda i: treedef.unflatten([None if s is None else s[i] for s in new])
  new_state = state._replace(
      count=optax.safe_increment(state.count),
      nonfinite_count=state.nonfinite_count + (~all_finite).astype(jnp.int32),
      latent=field(0), w_n=field(1), w_p=field(2), assignment=field(3),
      lam=field(4))
  return new, new_state


def _emit(updates, params, configs, new_leaves):
  """Updates: passthrough for unselected leaves, exact ternary steps else."""
  flat_updates, treedef = jax.tree.flatten(updates)
  flat_params = treedef.flatten_up_to(params)
  out = [u if config is None else _exact_update(
      leaf_value(leaf, config.ecp, jnp.asarray(p).dtype), p)
         for u, p, config, leaf in zip(flat_updates, flat_params, configs,
                                       new_leaves)]
  return treedef.unflatten(out)


def ternarize_transform(
    gamma: float = 0.0,
    init_scale: float = 0.3,
    *,
    selection: selection_lib.SelectionLike = None,
    centroid_update_scale: float = 1.0,
    floor_factor: float = 0.675,
    zero_floor: float = 0.5,
    sustain: float = 0.05,
    renormalization: ternary.Renormalization = "exact",
    latent_dtype: str = "float32",
) -> optax.GradientTransformation:
  """EC2T as the last transformation of an optax chain.

  ``optax.chain(optax.adam(1e-4), ternarize_transform(gamma=0.2))`` trains
  sparse ternary weights with any inner optimizer. The incoming update ``u``
  of a selected leaf is what the inner optimizer wants to add to ``T``. It is
  read as a step in the ternary weights and drives the state as follows
  (``a`` = current assignment):

  * latent weights, TTQ-scaled straight-through:
    ``W += s * u`` with ``s = w_p`` on cluster p, ``1`` on 0, ``w_n`` on n;
  * centroids, least-squares fit of the proposed weights ``T + u`` with the
    assignment held: ``w_p += k * mean_{i in p} u_i`` and
    ``w_n -= k * mean_{i in n} u_i`` (``k = centroid_update_scale``; the minus
    because the value is ``-w_n``, so the sign is exact);
  * floor ``w_n, w_p >= floor_factor * std(W)``, then EC2T's
    entropy-constrained reassignment (:func:`entropy_constrained_assign`).

  Why: with ``optax.sgd(lr)`` as the inner optimizer, ``u = -lr * g`` and the
  latent step is exactly SGD on the scaled straight-through gradient, while
  the centroid step is SGD on the exact centroid gradient ``sum_p g`` with a
  per-cluster rate ``k * lr / |p|`` that keeps the step independent of the
  layer size. With adaptive optimizers (Adam) the step of each centroid is the
  mean of the normalised steps of its members, so it stays bounded by the
  learning rate. For paper-faithful optimizers use :func:`ternarize`.

  The returned update is ``T_new - params`` for selected leaves (so params land
  exactly on ``{-w_n, 0, w_p}``) and the inner update unchanged for the others.
  Call :func:`ternary_params` once after ``init`` so that the first forward
  pass is already ternary.

  Every numeric argument can be changed between steps with
  ``optax.inject_hyperparams(ternarize_transform)(gamma=...)`` (pass a callable
  ``selection`` in ``static_args``).

  Args:
    gamma: global EC2T knob in ``[0, 1]``; 0 = nearest-centroid assignment.
    init_scale: initial centroid scaler ``s > 0``: ``w_p = s |max W|``.
    selection: which leaves to ternarize: ``None`` (paper's rule), a
      :class:`Selection`, a sequence of :class:`Rule` or a callable
      ``(path, leaf) -> bool``.
    centroid_update_scale: ``k`` above (``>= 0``; 0 freezes the centroids).
    floor_factor: centroid floor ``f`` in ``f * std(W)`` (0.675).
    zero_floor: lower bound of ``P_0`` in the information content (0.5).
    sustain: sustain of the layer-size decay (0.05).
    renormalization: ``"exact"`` or the reference's ``"reference"`` (see
      :func:`cluster_probabilities`).
    latent_dtype: dtype of the latent weights (float32 also for bf16 params,
      so small steps are not lost).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`TernarizeState`.

  Example:
    >>> tx = optax.chain(optax.adam(1e-3), ternarize_transform(gamma=0.2))
    >>> opt_state = tx.init(params)
    >>> params = ternary_params(params, opt_state)
    >>> updates, opt_state = tx.update(grads, opt_state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  hyper = _Hyper(gamma, init_scale, floor_factor, zero_floor, sustain,
                 renormalization)
  _validate(hyper, latent_dtype)
  _check_range("centroid_update_scale", centroid_update_scale, 0.0)
  chosen = selection_lib.as_selection(selection)
  latent_dtype = jnp.dtype(latent_dtype)

  def init_fn(params):
    return _init_state(params, chosen, hyper, latent_dtype)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(_NO_PARAMS_MSG)
    configs = _leaf_configs(params, chosen, hyper)
    flat_updates, treedef = jax.tree.flatten(updates)
    leaf_states = _flat_state(state, treedef)
    latent_steps, centroid_steps, finites = [], [], []
    for u, config, leaf in zip(flat_updates, configs, leaf_states):
      if config is None:
        latent_steps.append(None), centroid_steps.append(None), finites.append(None)
        continue
      u = jnp.asarray(u, jnp.float32)
      finites.append(jnp.all(jnp.isfinite(u)))
      u = jnp.where(jnp.isfinite(u), u, 0.0)
      if config.ecp:
        latent_steps.append(u)
        centroid_steps.append(None)
        continue
      latent_steps.append(ternary.latent_gradient(u, leaf.assignment, leaf.w_n,
                                                  leaf.w_p))
      k = jnp.asarray(centroid_update_scale, jnp.float32)
      mean_n = _cluster_mean(u, leaf.assignment < 0, 0.0)
      mean_p = _cluster_mean(u, leaf.assignment > 0, 0.0)
      centroid_steps.append((-k * mean_n, k * mean_p))
    new_leaves, new_state = _step_state(state, params, configs, latent_steps,
                                        centroid_steps, finites, hyper)
    return _emit(updates, params, configs, new_leaves), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def ternarize(
    params_optimizer: optax.GradientTransformation,
    latent_optimizer: optax.GradientTransformation,
    centroid_optimizer: optax.GradientTransformation,
    *,
    gamma: float = 0.0,
    init_scale: float = 0.3,
    selection: selection_lib.SelectionLike = None,
    negative_centroid_sign: ternary.CentroidSign = "exact",
    renormalization: ternary.Renormalization = "exact",
    floor_factor: float = 0.675,
    zero_floor: float = 0.5,
    sustain: float = 0.05,
    latent_dtype: str = "float32",
) -> optax.GradientTransformation:
  """Exact-reference EC2T: the reference training step as one optimizer.

  Use it *instead of* a chain: it consumes the raw gradients ``g = dL/dparams``
  of the ternary model and, in the reference's order,

  1. steps the non-selected params with ``params_optimizer``;
  2. converts the gradients of each selected leaf (TTQ): latent
     ``s * g`` (:func:`latent_gradient`; identity for ECP leaves) and centroids
     ``(-sum_n g, sum_p g)`` (:func:`centroid_gradients`);
  3. steps the latent weights with ``latent_optimizer`` (skipped while frozen)
     and the centroids with ``centroid_optimizer``;
  4. floors the centroids at ``floor_factor * std(W)``;
  5. reassigns every selected leaf (skipped while frozen).

  If any gradient is non-finite the whole step is skipped (all states kept,
  zero updates) and ``nonfinite_count`` grows.

  When to use which: :func:`ternarize_transform` composes with any optimizer
  and schedule and is the everyday choice; this mode reproduces the paper's
  optimizers exactly (see :func:`reference_optimizer` for its defaults), at
  the cost of three optimizer states.

  Args:
    params_optimizer: optimizer of the leaves that are not selected.
    latent_optimizer: optimizer of the latent weights.
    centroid_optimizer: optimizer of the centroids (a tree ``{"w_n": ...,
      "w_p": ...}`` of scalars).
    gamma, init_scale, selection, renormalization, floor_factor, zero_floor,
      sustain, latent_dtype: as in :func:`ternarize_transform`.
    negative_centroid_sign: ``"exact"`` (default) or ``"reference"``, the
      reference code's ``+sum`` (see :func:`centroid_gradients`).

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`TernarizeReferenceState`.
  """
  hyper = _Hyper(gamma, init_scale, floor_factor, zero_floor, sustain,
                 renormalization)
  _validate(hyper, latent_dtype)
  if negative_centroid_sign not in ("exact", "reference"):
    raise ValueError("negative_centroid_sign must be 'exact' or 'reference', "
                     f"got {negative_centroid_sign!r}")
  chosen = selection_lib.as_selection(selection)
  latent_dtype = jnp.dtype(latent_dtype)

  def unselected_mask(params):
    configs = _leaf_configs(params, chosen, hyper)
    return jax.tree.unflatten(jax.tree.structure(params),
                              [c is None for c in configs])

  masked_params_optimizer = optax.masked(params_optimizer, unselected_mask)

  def init_fn(params):
    core = _init_state(params, chosen, hyper, latent_dtype)
    return TernarizeReferenceState(
        params_state=masked_params_optimizer.init(params),
        latent_state=latent_optimizer.init(core.latent),
        centroid_state=centroid_optimizer.init({"w_n": core.w_n, "w_p": core.w_p}),
        ternary=core)

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError(_NO_PARAMS_MSG)
    core = state.ternary
    configs = _leaf_configs(params, chosen, hyper)
    flat_grads, treedef = jax.tree.flatten(grads)
    leaf_states = _flat_state(core, treedef)
    all_finite = jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(g)) for g in flat_grads]))

    param_updates, params_state = masked_params_optimizer.update(
        grads, state.params_state, params)

    latent_grads, grads_n, grads_p = [], [], []
    for g, config, leaf in zip(flat_grads, configs, leaf_states):
      if config is None:
        latent_grads.append(None), grads_n.append(None), grads_p.append(None)
        continue
      if config.ecp:
        latent_grads.append(jnp.asarray(g, latent_dtype))
        grads_n.append(jnp.zeros((), jnp.float32))
        grads_p.append(jnp.zeros((), jnp.float32))
        continue
      latent_grads.append(ternary.latent_gradient(
          g, leaf.assignment, leaf.w_n, leaf.w_p).astype(latent_dtype))
      g_n, g_p = ternary.centroid_gradients(
          g, leaf.assignment, negative_sign=negative_centroid_sign)
      grads_n.append(g_n), grads_p.append(g_p)

    latent_updates, latent_state = latent_optimizer.update(
        treedef.unflatten(latent_grads), state.latent_state, core.latent)
    latent_state = optax.tree.where(core.frozen, state.latent_state, latent_state)
    centroid_updates, centroid_state = centroid_optimizer.update(
        {"w_n": treedef.unflatten(grads_n), "w_p": treedef.unflatten(grads_p)},
        state.centroid_state, {"w_n": core.w_n, "w_p": core.w_p})

    steps_n = treedef.flatten_up_to(centroid_updates["w_n"])
    steps_p = treedef.flatten_up_to(centroid_updates["w_p"])
    centroid_steps = [None if c is None else (n, p)
                      for c, n, p in zip(configs, steps_n, steps_p)]
    finites = [None if c is None else all_finite for c in configs]
    new_leaves, new_core = _step_state(
        core, params, configs, treedef.flatten_up_to(latent_updates),
        centroid_steps, finites, hyper)
    updates = _emit(param_updates, params, configs, new_leaves)

    new_state = TernarizeReferenceState(params_state, latent_state,
                                        centroid_state, new_core)
    kept = state._replace(ternary=core._replace(
        count=new_core.count, nonfinite_count=new_core.nonfinite_count))
    return (optax.tree.where(all_finite, updates, optax.tree.zeros_like(updates)),
            optax.tree.where(all_finite, new_state, kept))

  return optax.GradientTransformation(init_fn, update_fn)


def reference_optimizer(
    gamma: float = 0.0,
    init_scale: float = 0.3,
    *,
    learning_rate: float = 1e-4,
    weight_decay: float = 5e-6,
    latent_learning_rate: float = 1e-4,
    centroid_learning_rate: float = 1e-5,
    selection: selection_lib.SelectionLike = None,
    negative_centroid_sign: ternary.CentroidSign = "exact",
    renormalization: ternary.Renormalization = "exact",
) -> optax.GradientTransformation:
  """:func:`ternarize` with the reference's three Adam optimizers.

  Non-selected params: Adam(``learning_rate``) with PyTorch-style L2 weight
  decay ``weight_decay`` added to the gradient; latent weights:
  Adam(``latent_learning_rate``); centroids: Adam(``centroid_learning_rate``).
  For a bit-for-bit reproduction of the reference code set
  ``negative_centroid_sign="reference"`` and ``renormalization="reference"``.

  Example:
    >>> tx = reference_optimizer(gamma=0.15, init_scale=0.3)
  """
  return ternarize(
      optax.chain(optax.add_decayed_weights(weight_decay),
                  optax.adam(learning_rate)),
      optax.adam(latent_learning_rate),
      optax.adam(centroid_learning_rate),
      gamma=gamma, init_scale=init_scale, selection=selection,
      negative_centroid_sign=negative_centroid_sign,
      renormalization=renormalization)
