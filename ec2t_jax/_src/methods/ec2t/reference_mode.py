"""EC2T's exact-reference mode: the reference training step as one optimizer.

Same per-leaf state and step as the chain form (``_src/ec2t.py``); only the
latent and centroid increments come from separate optimizers fed with the
TTQ-converted raw gradients, as in the reference code.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ec2t_jax._src import core
from ec2t_jax._src.methods.ec2t import chain as ec2t
from ec2t_jax._src.core import selection as selection_lib
from ec2t_jax._src.methods.ec2t import ternary


class TernarizeReferenceState(NamedTuple):
  """State of :func:`ternarize_reference`: the three inner optimizers and the core."""
  params_state: optax.OptState
  latent_state: optax.OptState
  centroid_state: optax.OptState
  ternary: core.QuantizerState


def _gradients(grad, leaf: ec2t.EC2TLeaf, negative_centroid_sign):
  """TTQ conversion of ``dL/dT``: latent and ``(w_n, w_p)`` gradients (per
  slice of a stacked leaf)."""
  if isinstance(leaf, core.StackedLeaf):
    per_slice = lambda g, inner: _gradients(g, inner, negative_centroid_sign)
    return core.over_slices(per_slice, leaf.stack_ndim)(grad, leaf.inner)
  if isinstance(leaf, ec2t.ECPLeaf):
    zero = jnp.zeros((), jnp.float32)
    return jnp.asarray(grad, jnp.float32), zero, zero
  g_n, g_p = ternary.centroid_gradients(grad, leaf.assignment,
                                        negative_sign=negative_centroid_sign)
  return ternary.latent_gradient(grad, leaf.assignment, leaf.w_n, leaf.w_p), g_n, g_p


def _all_finite(arrays) -> jax.Array:
  """Whether every entry of ``arrays`` is finite (a bool scalar).

  ``max |x|`` is NaN or inf iff some entry of ``x`` is (cheaper than ``all(isfinite)``).
  The per-array maxima pass an ``optimization_barrier`` before they are combined: without
  it XLA rewrites their combination into a chain of scalar operations and copies the chain
  into every fusion that reads the answer. The whole update reads it (a non-finite gradient
  skips the step), so the compiled update grew with the square of the number of leaves: on
  the 12-layer GPT, 56-60 s of compilation.
  """
  if not arrays:
    return jnp.asarray(True)
  maxima = jnp.stack([jnp.max(jnp.abs(x)).astype(jnp.float32) for x in arrays])
  return jnp.isfinite(jnp.max(jax.lax.optimization_barrier(maxima)))


def ternarize_reference(
    params_optimizer: optax.GradientTransformation,
    latent_optimizer: optax.GradientTransformation,
    centroid_optimizer: optax.GradientTransformation,
    *,
    gamma: float = 0.0,
    init_scale: float = 0.3,
    selection: selection_lib.SelectionLike = None,
    negative_centroid_sign: ternary.CentroidSign = "exact",
    renormalization: ternary.Renormalization = "exact",
    ties: ternary.Ties = "zero",
    floor_factor: float = 0.675,
    zero_floor: float = 0.5,
    sustain: float = 0.05,
    latent_dtype: str = "float32",
    layout: str = "flat",
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

  If any gradient is non-finite, or a traced hyperparameter is non-finite or
  out of range, the whole step is skipped (all states kept, zero updates) and
  ``nonfinite_count`` (or ``invalid_hyper_count``) grows.

  When to use which: :func:`ternarize_transform` composes with any optimizer
  and schedule and is the everyday choice; this mode reproduces the paper's
  optimizers exactly (see :func:`reference_optimizer` for its defaults), at
  the cost of three optimizer states.

  Args:
    params_optimizer: optimizer of the leaves that are not selected.
    latent_optimizer: optimizer of the latent weights.
    centroid_optimizer: optimizer of the centroids (a tree ``{"w_n": ...,
      "w_p": ...}`` of scalars).
    gamma, init_scale, selection, renormalization, ties, floor_factor,
      zero_floor, sustain, latent_dtype: as in :func:`ternarize_transform`.
    negative_centroid_sign: ``"exact"`` (default) or ``"reference"``, the
      reference code's ``+sum`` (see :func:`centroid_gradients`).
    layout: ``"flat"`` (one flat buffer of the selected leaves' states, one trace of the
      step; the centroid increments enter it one per layer) or ``"grouped"`` (same-shape
      leaves stacked, one step per group), as :class:`~ec2t_jax.Quantizer`'s.

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`TernarizeReferenceState`.

  Example:
    >>> import optax
    >>> from ec2t_jax import ternarize_reference
    >>> tx = ternarize_reference(optax.adam(1e-4), optax.adam(1e-4), optax.adam(1e-5),
    ...                gamma=0.15)
  """
  ec2t.check_static(renormalization, latent_dtype, ties)
  core.check_choice("negative_centroid_sign", negative_centroid_sign,
                    ("exact", "reference"))
  core.check_choice("layout", layout, core.LAYOUTS)
  hyper = ec2t.EC2THyper(gamma, init_scale, floor_factor, zero_floor, sustain,
                         1.0)
  for name, valid in ec2t.HYPER_RANGES.items():
    core.check_range(name, getattr(hyper, name), valid)
  chosen = selection_lib.as_selection(selection)
  method = ec2t.method(renormalization=renormalization,
                       latent_dtype=latent_dtype, ties=ties)
  core.check_rules(method, chosen)

  def masked_params_optimizer(core_state: core.QuantizerState):
    # The leaves selected at init are those with a state; never re-planned.
    unselected = jax.tree.map(lambda leaf: leaf is None, core_state.leaves,
                              is_leaf=core.is_leaf_state)
    return optax.masked(params_optimizer, unselected)

  def init_fn(params):
    core_state = core.init_state(method, params, chosen, hyper, layout=layout)
    return TernarizeReferenceState(
        params_state=masked_params_optimizer(core_state).init(params),
        latent_state=latent_optimizer.init(core_state.latent),
        centroid_state=centroid_optimizer.init(
            {"w_n": core_state.field("w_n"), "w_p": core_state.field("w_p")}),
        ternary=core_state)

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError(core.NO_PARAMS_MSG)
    core_state = state.ternary
    core.check_same_tree("grads", grads, core_state.leaves)
    core.check_same_tree("params", params, core_state.leaves)
    contexts = core.leaf_contexts(core_state.leaves, params, chosen)
    flat_grads, treedef = jax.tree.flatten(grads)
    old, _ = core.flat_leaf_states(core_state.resolved_leaves())
    converted = [None if leaf is None else
                 _gradients(g, leaf, negative_centroid_sign)
                 for g, leaf in zip(flat_grads, old)]
    pick = lambda k: treedef.unflatten([None if c is None else c[k]
                                        for c in converted])

    param_updates, params_state = masked_params_optimizer(core_state).update(
        grads, state.params_state, params)
    latent_updates, latent_state = latent_optimizer.update(
        jax.tree.map(lambda g, w: g.astype(w.dtype), pick(0), core_state.latent),
        state.latent_state, core_state.latent)
    latent_state = optax.tree.where(core_state.frozen, state.latent_state,
                                    latent_state)
    centroid_updates, centroid_state = centroid_optimizer.update(
        {"w_n": pick(1), "w_p": pick(2)}, state.centroid_state,
        {"w_n": core_state.field("w_n"), "w_p": core_state.field("w_p")})

    inputs = [None if c is None else (latent, (n, p))
              for c, latent, n, p in zip(
                  contexts, treedef.flatten_up_to(latent_updates),
                  treedef.flatten_up_to(centroid_updates["w_n"]),
                  treedef.flatten_up_to(centroid_updates["w_p"]))]
    all_finite = _all_finite(flat_grads)
    hyper_ok = core.hyper_is_valid(hyper, ec2t.HYPER_RANGES)
    step = lambda x, leaf, ctx: ec2t.advance_leaf(
        leaf, x[0], x[1], ctx, hyper, core_state.phase,
        renormalization=renormalization, ties=ties)
    updates, new_core = core.advance(core_state, params, param_updates, step,
                                     inputs, contexts, ~(all_finite & hyper_ok))
    new_core = new_core._replace(
        nonfinite_count=core_state.nonfinite_count + (~all_finite).astype(jnp.int32),
        invalid_hyper_count=core_state.invalid_hyper_count
        + (all_finite & ~hyper_ok).astype(jnp.int32))
    accept = all_finite & hyper_ok
    # The core already kept its leaves (keep = ~accept); the inner
    # optimizers' states are kept here.
    inner = optax.tree.where(
        accept, (params_state, latent_state, centroid_state),
        (state.params_state, state.latent_state, state.centroid_state))
    return (optax.tree.where(accept, updates, optax.tree.zeros_like(updates)),
            TernarizeReferenceState(*inner, new_core))

  return optax.GradientTransformation(init_fn, update_fn)


def reference_optimizer(
    gamma: float = 0.0, init_scale: float = 0.3, *, learning_rate: float = 1e-4,
    weight_decay: float = 5e-6, latent_learning_rate: float = 1e-4,
    centroid_learning_rate: float = 1e-5, selection: selection_lib.SelectionLike = None,
    negative_centroid_sign: ternary.CentroidSign = "exact",
    renormalization: ternary.Renormalization = "exact", ties: ternary.Ties = "zero",
    floor_factor: float = 0.675, zero_floor: float = 0.5, sustain: float = 0.05,
    latent_dtype: str = "float32", layout: str = "flat") -> optax.GradientTransformation:
  """:func:`ternarize_reference` with the reference's three Adam optimizers.

  Non-selected params: Adam(``learning_rate``) with PyTorch-style L2 weight
  decay ``weight_decay`` added to the gradient; latent weights:
  Adam(``latent_learning_rate``); centroids: Adam(``centroid_learning_rate``).
  For a bit-for-bit reproduction of the reference code set
  ``negative_centroid_sign="reference"``, ``renormalization="reference"`` and
  ``ties="reference"``.
  Every other argument is forwarded to :func:`ternarize_reference`.

  Example:
    >>> from ec2t_jax import reference_optimizer
    >>> tx = reference_optimizer(gamma=0.15, init_scale=0.3)
  """
  return ternarize_reference(
      optax.chain(optax.add_decayed_weights(weight_decay),
                  optax.adam(learning_rate)),
      optax.adam(latent_learning_rate),
      optax.adam(centroid_learning_rate),
      gamma=gamma, init_scale=init_scale, selection=selection,
      negative_centroid_sign=negative_centroid_sign,
      renormalization=renormalization, ties=ties, floor_factor=floor_factor,
      zero_floor=zero_floor, sustain=sustain, latent_dtype=latent_dtype, layout=layout)
