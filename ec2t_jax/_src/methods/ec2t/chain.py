"""EC2T as a method of the shared core: its per-leaf state and step.

Examples build their model, params or optimizer state with the fixture
:func:`ec2t_jax.models.small_cnn_example`.

The pure math lives in ``_src/methods/ec2t/ternary.py``; this module says what one selected
leaf holds (:class:`EC2TLeaf`, or :class:`ECPLeaf` for entropy-constrained
pruning) and how one step moves it (:func:`advance_leaf`). The chain form
(:func:`ternarize_transform`) and the exact-reference mode
(``_src/methods/ec2t/reference_mode.py``) differ only in where the latent and centroid
steps come from.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ec2t_jax._src import core
from ec2t_jax._src.core import segments as segments_lib
from ec2t_jax._src.core import selection as selection_lib
from ec2t_jax._src.methods.ec2t import ternary
from ec2t_jax._src.methods._support import grids
from ec2t_jax._src.methods._support import registry


class EC2TLeaf(NamedTuple):
  """State of one ternarized leaf.

  Attributes:
    latent: latent full-precision weights ``W`` (``latent_dtype``, same shape
      and sharding as the param).
    w_n: magnitude of the negative centroid (float32 scalar; with
      ``centroids="channel"`` one per output channel, shaped to broadcast
      against ``latent``).
    w_p: value of the positive centroid (likewise).
    assignment: ``int8`` assignment in ``{-1, 0, 1}``.
    lam: lambda used by the last assignment (float32 scalar).
  """
  latent: jax.Array
  w_n: jax.Array
  w_p: jax.Array
  assignment: jax.Array
  lam: jax.Array

  def value(self, dtype) -> jax.Array:
    """``T`` with both centroids snapped to one grid (exact landing)."""
    w_n, w_p = core.snap_to_grid(jnp.stack([self.w_n, self.w_p]), dtype,
                                 jnp.maximum(jnp.abs(self.w_n), jnp.abs(self.w_p)))
    return ternary.ternary_values(self.assignment, w_n, w_p, dtype)

  def codes(self) -> jax.Array:
    """The assignment: a layer's symbols whether its centroids are per layer or per channel."""
    return self.assignment

  def describe(self) -> dict:
    return {"method": "EC2T", "mode": "ternary", "w_n": self.w_n,
            "w_p": self.w_p, "lam": self.lam}

  def latents_train(self, phase) -> jax.Array:
    """Phase 2 (``phase >= 1``) freezes the latent weights: no weight decay there either."""
    return phase < 1


class ECPLeaf(EC2TLeaf):
  """State of one entropy-constrained *pruned* leaf (reference section 7).

  Same fields as :class:`EC2TLeaf`; the param is ``W`` where the assignment
  is non-zero and 0 elsewhere, and the centroids are the means of the
  non-zero clusters.
  """
  __slots__ = ()

  def value(self, dtype) -> jax.Array:
    return jnp.where(self.assignment == 0, 0, self.latent).astype(dtype)

  def describe(self) -> dict:
    return {**super().describe(), "mode": "ecp"}


class EC2THyper(NamedTuple):
  """EC2T's numeric hyperparameters (see :func:`ternarize_transform`)."""
  gamma: Any = 0.0
  init_scale: Any = 0.3
  floor_factor: Any = 0.675
  zero_floor: Any = 0.5
  sustain: Any = 0.05
  centroid_update_scale: Any = 0.1
  # A budget's controller multiplier on every layer's lambda (1: none).
  lambda_multiplier: Any = 1.0


HYPER_RANGES = {
    "gamma": core.Range(0.0, 1.0),
    "init_scale": core.Range(0.0, low_open=True),
    "floor_factor": core.Range(0.0),
    "zero_floor": core.Range(0.0, 1.0, low_open=True),
    "sustain": core.Range(0.0),
    "centroid_update_scale": core.Range(0.0),
}


def cluster_means(values, assignment, fallback_n, fallback_p, *, channel_axis=None,
                  segments=None):
  """Means of ``values`` over clusters n and p, in one reduction.

  A cluster that is empty gets its fallback. With ``channel_axis``, one mean
  per channel (over the other axes, kept with size 1 so the means broadcast
  against ``values``); an empty cluster of a channel gets that channel's
  fallback. With a flat buffer's ``segments`` (the core's flat path), one
  mean per segment (per channel).

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax._src.methods.ec2t.chain import cluster_means  # internal
    >>> cluster_means(jnp.array([1.0, 3.0, -2.0]), jnp.array([1, 1, 0]), 0.0, 9.0)
    (Array(0., dtype=float32), Array(2., dtype=float32))
  """
  values = jnp.asarray(values, jnp.float32)
  in_n, in_p = assignment < 0, assignment > 0
  mean = lambda total, count, fallback: jnp.where(
      count > 0, total / jnp.maximum(count, 1.0), fallback)
  if segments is not None:
    per_channel = channel_axis is not None
    total = lambda x: segments.sum(x, per_channel)
    return (mean(total(jnp.where(in_n, values, 0.0)), total(in_n), fallback_n),
            mean(total(jnp.where(in_p, values, 0.0)), total(in_p), fallback_p))
  # Counts and sums of both clusters in one variadic reduction: one pass
  # and one compiled loop instead of four (exact counts below 2^24).
  terms = (in_n.astype(jnp.float32), in_p.astype(jnp.float32),
           jnp.where(in_n, values, 0.0), jnp.where(in_p, values, 0.0))
  keep = None if channel_axis is None else channel_axis % values.ndim
  axes = tuple(a for a in range(values.ndim) if a != keep)
  count_n, count_p, total_n, total_p = jax.lax.reduce(
      terms, (0.0,) * 4, lambda x, y: tuple(a + b for a, b in zip(x, y)), axes)
  if keep is not None:  # back to a shape that broadcasts against values
    shape = tuple(values.shape[a] if a == keep else 1 for a in range(values.ndim))
    count_n, count_p, total_n, total_p = (
        t.reshape(shape) for t in (count_n, count_p, total_n, total_p))
  return mean(total_n, count_n, fallback_n), mean(total_p, count_p, fallback_p)


def channel_axis(ctx: core.LeafContext, centroids: str):
  """The axis of per-channel centroids (``ctx.output_axis``), or None for one pair per layer."""
  return ctx.output_axis if centroids == "channel" else None


def channel_spread(latent, axis, segments=None):
  """``r_c = std(W_c) / std(W)`` per channel (1 where either is 0), shaped to broadcast
  (per segment of a flat buffer's ``segments``)."""
  w = jnp.asarray(latent, jnp.float32)
  segments = segments_lib.LeafSegments(axis) if segments is None else segments
  layer = segments.filters_from_layers(segments_lib.std(segments, w, ddof=1))
  channel = segments_lib.std(segments, w, per_filter=True, ddof=1)
  return jnp.where((channel > 0) & (layer > 0), channel / jnp.where(layer > 0, layer, 1.0), 1.0)


def _assign(latent, w_n, w_p, ctx: core.LeafContext, hyper: EC2THyper,
            renormalization, ties, centroids="layer"):
  """EC2T's assignment; with per-channel centroids the distortion of channel ``c`` is measured
  in units of its spread: ``((W - v) / r_c)^2 + lambda I`` (``r_c``: :func:`channel_spread`),
  so a channel of small weights is not zeroed whole by the layer's ``lambda``."""
  gamma = (hyper.gamma if ctx.gamma is None else ctx.gamma) * hyper.lambda_multiplier
  size_decay = (ctx.size_fraction + hyper.sustain) / (1.0 + hyper.sustain)
  axis = channel_axis(ctx, centroids)
  if axis is not None:
    spread = channel_spread(latent, axis, ctx.segments)
    latent = latent / segments_lib.of(ctx).expand(spread, per_filter=True)
    w_n, w_p = w_n / spread, w_p / spread
  return ternary.entropy_constrained_assign(
      latent, w_n, w_p, gamma=gamma, size_decay=size_decay,
      zero_floor=hyper.zero_floor, renormalization=renormalization, ties=ties,
      channel_axis=axis, segments=ctx.segments)


def init_leaf(param, ctx: core.LeafContext, hyper: EC2THyper, *,
              latent_dtype, ties="zero", centroids="layer") -> EC2TLeaf:
  """Centroids ``s |min W|, s |max W|`` (of the layer, or of each output channel with
  ``centroids="channel"``) and the nearest-centroid assignment."""
  if centroids == "channel" and len(ctx.shape) < 2:
    raise ValueError(f"centroids='channel' needs leaves with an output-channel axis and at "
                     f"least one other; leaf {ctx.path!r} has shape {ctx.shape}")
  latent = jnp.asarray(param).astype(latent_dtype)
  w_n, w_p = ternary.initial_centroids(latent, hyper.init_scale,
                                       channel_axis=channel_axis(ctx, centroids))
  cls = ECPLeaf if ctx.mode == "ecp" else EC2TLeaf
  return cls(latent, w_n, w_p,
             ternary.nearest_centroid_assign(latent, w_n, w_p, ties=ties),
             jnp.zeros((), jnp.float32))


def advance_leaf(leaf: EC2TLeaf, latent_step, centroid_step, ctx, hyper,
                 phase, *, renormalization, ties="zero", centroids="layer") -> EC2TLeaf:
  """One EC2T step of one leaf, given the latent and centroid increments.

  Order as in the reference: move the latent weights (unless frozen, i.e.
  ``phase >= 1``) and the centroids, floor the centroids at
  ``floor_factor * std(W)``, reassign (unless frozen). An ECP leaf's
  centroids are the means of its non-zero clusters instead.

  Args:
    leaf: the old state.
    latent_step: increment of the latent weights.
    centroid_step: ``(step_n, step_p)`` increments of ``w_n`` and ``w_p``
      (ignored for ECP leaves).
    ctx: the leaf's :class:`~core.LeafContext`.
    hyper: :class:`EC2THyper`.
    phase: int32; ``>= 1`` freezes the assignment and the latent weights.
    renormalization: see :func:`~ec2t_jax.cluster_probabilities`.
    ties: the assignments' tie rule (:func:`~ec2t_jax.assign_by_cost`).
    centroids: ``"layer"`` or ``"channel"`` (one pair per output channel,
      ``ctx.output_axis``: floored at each channel's std).

  Returns:
    The new state, of the same class.
  """
  axis = channel_axis(ctx, centroids)
  frozen = phase >= 1
  latent = jnp.where(frozen, leaf.latent,
                     (leaf.latent + latent_step).astype(leaf.latent.dtype))
  if isinstance(leaf, ECPLeaf):
    mean_n, w_p = cluster_means(latent, leaf.assignment, -leaf.w_n, leaf.w_p,
                                channel_axis=axis, segments=ctx.segments)
    w_n = -mean_n
  else:
    w_n, w_p = leaf.w_n + centroid_step[0], leaf.w_p + centroid_step[1]
  w_n, w_p = ternary.centroid_floor(latent, w_n, w_p, hyper.floor_factor, channel_axis=axis,
                                    segments=ctx.segments)
  # Keep centroids strictly positive even for constant layers (std = 0).
  tiny = jnp.finfo(jnp.float32).tiny
  w_n, w_p = jnp.maximum(w_n, tiny), jnp.maximum(w_p, tiny)
  assignment, lam = _assign(latent, w_n, w_p, ctx, hyper, renormalization, ties, centroids)
  return type(leaf)(latent, w_n, w_p,
                    jnp.where(frozen, leaf.assignment, assignment),
                    jnp.where(frozen, leaf.lam, lam))


def chain_steps(update, leaf: EC2TLeaf, hyper: EC2THyper, latent_step_rule="plain",
                axis=None, segments=None):
  """The chain form's ``(latent_step, centroid_step)`` from an update ``u``.

  ``W += u`` (``latent_step_rule="plain"``) or ``W += s * u`` (``"ttq"``,
  :func:`~ec2t_jax.latent_gradient`'s scaling);
  ``w_p += k * mean_p(u)``, ``w_n -= k * mean_n(u)`` (per channel along
  ``axis`` with per-channel centroids: the means over each channel's members).
  An ECP leaf's latent weights take ``u`` unscaled.
  """
  if isinstance(leaf, ECPLeaf):
    return update, None
  k = jnp.asarray(hyper.centroid_update_scale, jnp.float32)
  if latent_step_rule == "ttq":
    per_channel = axis is not None
    expand = (segments or segments_lib.LeafSegments()).expand
    latent_step = ternary.latent_gradient(update, leaf.assignment,
                                          expand(leaf.w_n, per_channel),
                                          expand(leaf.w_p, per_channel))
  else:
    latent_step = jnp.asarray(update, jnp.float32)
  mean_n, mean_p = cluster_means(update, leaf.assignment, 0.0, 0.0, channel_axis=axis,
                                 segments=segments)
  return latent_step, (-k * mean_n, k * mean_p)


def method(*, renormalization="exact", latent_dtype="float32",
           ties="zero", latent_step="plain", centroids="layer") -> core.Method:
  """EC2T's chain-form :class:`~core.Method`."""
  latent_dtype = jnp.dtype(latent_dtype)
  latent_step_rule = latent_step

  def step_leaf(update, leaf, ctx, hyper, phase):
    latent_step, centroid_step = chain_steps(update, leaf, hyper, latent_step_rule,
                                             channel_axis(ctx, centroids), ctx.segments)
    return advance_leaf(leaf, latent_step, centroid_step, ctx, hyper, phase,
                        renormalization=renormalization, ties=ties, centroids=centroids)

  def init(param, ctx, hyper):
    return init_leaf(param, ctx, hyper, latent_dtype=latent_dtype, ties=ties,
                     centroids=centroids)

  return core.Method("ec2t", init, step_leaf,
                     accepts=core.RuleOptions(modes=("ternary", "ecp"), rule_gamma=True),
                     flat=True)


def check_static(renormalization, latent_dtype, ties="zero", latent_step="plain",
                 centroids="layer") -> None:
  """Raises ``ValueError`` for a bad string or dtype option."""
  core.check_choice("centroids", centroids, ("layer", "channel"))
  core.check_choice("renormalization", renormalization, ("exact", "reference"))
  core.check_choice("ties", ties, ("zero", "reference"))
  core.check_choice("latent_step", latent_step, ("plain", "ttq"))
  if not jnp.issubdtype(jnp.dtype(latent_dtype), jnp.floating):
    raise ValueError(f"latent_dtype must be a floating dtype, got {latent_dtype!r}")


# The operating point of ``ternarize_transform()`` without arguments (see its
# docstring and benchmarks/RESULTS_budget.md).
DEFAULT_GAMMA = 0.2
# What a budget's controller drives: a multiplier m in [0, 1] on every
# selected layer's lambda (gamma = m x the layer's Rule gamma, else m),
# starting at 0 (the first assignment is nearest-centroid); 0.05 per bit of
# rate error (or per unit of sparsity) and step.
BUDGET_CONTROLLED = core.budget.ControlledHyper("lambda_multiplier", initial=0.0, low=0.0,
                                                high=1.0, gain=0.05)


def ternarize_transform(
    gamma: Optional[float] = None,
    init_scale: float = 0.3,
    *,
    budget: Optional[core.budget.Budget] = None,
    budget_target=None,
    selection: selection_lib.SelectionLike = None,
    centroid_update_scale: float = 0.1,
    floor_factor: float = 0.675,
    zero_floor: float = 0.5,
    sustain: float = 0.05,
    renormalization: ternary.Renormalization = "exact",
    ties: ternary.Ties = "zero",
    latent_dtype: str = "float32",
    latent_step: str = "plain",
    centroids: str = "layer",
):
  """EC2T as the last transformation of an optax chain.

  ``optax.chain(optax.adam(1e-4), ternarize_transform(gamma=0.2))`` trains
  sparse ternary weights with any inner optimizer. The incoming update ``u``
  of a selected leaf is what the inner optimizer wants to add to ``T``. It is
  read as a step in the ternary weights and drives the state as follows
  (``a`` = current assignment):

  * latent weights, straight-through: ``W += u`` (``latent_step="plain"``,
    the default), or TTQ-scaled ``W += s * u`` with ``s = w_p`` on cluster p,
    ``1`` on 0, ``w_n`` on n (``latent_step="ttq"``);
  * centroids, least-squares fit of the proposed weights ``T + u`` with the
    assignment held: ``w_p += k * mean_{i in p} u_i`` and
    ``w_n -= k * mean_{i in n} u_i`` (``k = centroid_update_scale``; the minus
    because the value is ``-w_n``, so the sign is exact);
  * floor ``w_n, w_p >= floor_factor * std(W)``, then EC2T's
    entropy-constrained reassignment (:func:`entropy_constrained_assign`).

  Why: with an adaptive inner optimizer (Adam) ``u`` is already normalised
  per element, so the plain step moves every latent weight by about the
  learning rate, as the reference mode's Adam on the TTQ-scaled gradient does
  (Adam cancels a per-element scale); the TTQ-scaled step would slow the
  non-zero weights by ``w_p`` or ``w_n`` against the zero ones. With
  ``optax.sgd(lr)``, ``u = -lr * g`` and ``"ttq"`` is exactly SGD on the
  scaled straight-through gradient, while
  the centroid step is SGD on the exact centroid gradient ``sum_p g`` with a
  per-cluster rate ``k * lr / |p|`` that keeps the step independent of the
  layer size. With adaptive optimizers (Adam) the step of each centroid is the
  mean of the normalised steps of its members, so it stays bounded by
  ``k`` times the learning rate.

  Why ``k = 0.1`` and ``"plain"`` by default: the reference trains the
  centroids ten times slower than the latent weights (Adam 1e-5 vs 1e-4), and
  its Adam moves every latent weight at about the learning rate. Measured on
  MNIST LeNet-5 from one pretrained model (99.24%; Adam 1e-3 with a cosine,
  15 epochs, ``benchmarks/RESULTS_mnist.md``): plain, ``k = 0.1``: 99.19% at
  90.8% sparsity; plain, ``k = 1``: 99.00% at 92.8%; TTQ, ``k = 0.1``: 99.12%
  at 87.0%; TTQ, ``k = 1`` (the former defaults): 97.3% validation accuracy
  after 6 of 10 phase-1 epochs, against 98.5% for the new defaults. For
  paper-faithful optimizers use :func:`ternarize_reference`.

  The returned update is ``T_new - params`` for selected leaves (so params land
  exactly on ``{-w_n, 0, w_p}``) and the inner update unchanged for the others.
  Call :func:`quantized_params` once after ``init`` so that the first forward
  pass is already ternary.

  Every numeric argument can be changed between steps with
  ``optax.inject_hyperparams(ternarize_transform)(gamma=...)`` (a ``gamma``
  left at its None default is not injected; pass a callable
  ``selection`` in ``static_args``). A traced value that is non-finite or out
  of its range is not applied: that step keeps every selected leaf's state
  (params stay where they are, the inner update of the other leaves still
  applies) and ``invalid_hyper_count`` grows (shown by :func:`summary`).

  **Default operating point.** Without ``gamma`` or ``budget`` the entropy
  constraint is on at ``gamma = DEFAULT_GAMMA = 0.2`` (before, ``gamma``
  defaulted to 0.0, plain nearest-centroid ternarization; pass
  ``gamma=0.0`` for that): the largest gamma of the measured sweeps that
  costs at most 0.05 nats on the character GPT and no accuracy on MNIST
  LeNet-5 (``benchmarks/RESULTS_budget.md``, the library's ``sustain=0.05``):
  LeNet-5 98.33% (FP 98.00%, reduced training) at 80.4% sparsity; GPT
  1.9340 val loss (FP 1.8829) at 85.8%. Gamma 0.35, the earlier default,
  gives LeNet-5 98.01% at 88.4% but costs the GPT 0.25 nats.

  **Size budgets.** ``budget=Budget(bits_per_weight=...)`` (or ``bytes=``,
  ``sparsity=``) replaces ``gamma``: every selected layer's lambda is
  ``m x gamma_l x delta_l x lambda_max_l`` (``gamma_l`` its Rule's gamma, else
  1) with one multiplier ``m`` in ``[0, 1]`` that a controller updates after
  every step from the size of the new assignment (dual ascent,
  ``ec2t_jax/_src/core/budget.py``); its state is
  :attr:`QuantizerState.budget`.

  Args:
    gamma: global EC2T knob in ``[0, 1]``; 0 = nearest-centroid assignment;
      None (default): ``DEFAULT_GAMMA`` (0.2) without a budget.
    init_scale: initial centroid scaler ``s > 0``: ``w_p = s |max W|``.
    budget: a :class:`Budget` (size target) instead of ``gamma``.
    budget_target: the budget's target if not its own; pass it to
      ``optax.inject_hyperparams`` to trace or schedule it (a NaN or
      out-of-range value skips the step, counted in ``invalid_hyper_count``).
    selection: which leaves to ternarize: ``None`` (paper's rule), a
      :class:`Selection`, a sequence of :class:`Rule` or a callable
      ``(path, leaf) -> bool``. Decided once, at ``init``.
    centroid_update_scale: ``k`` above (``>= 0``; 0 freezes the centroids;
      default 0.1, see above).
    floor_factor: centroid floor ``f`` in ``f * std(W)`` (0.675).
    zero_floor: lower bound of ``P_0`` in the information content (0.5).
    sustain: sustain of the layer-size decay (0.05).
    renormalization: ``"exact"`` or the reference's ``"reference"`` (see
      :func:`cluster_probabilities`).
    ties: where an exact cost tie goes: ``"zero"`` (to zero) or the
      reference's ``"reference"`` (an n/0 tie to n; see
      :func:`assign_by_cost`).
    latent_dtype: dtype of the latent weights (float32 also for bf16 params,
      so small steps are not lost).
    latent_step: ``"plain"`` (``W += u``, default) or ``"ttq"``
      (``W += s * u``), see above.
    centroids: ``"layer"`` (default: one ``w_n``, ``w_p`` per layer, the
      paper's) or ``"channel"``: one pair per output channel (the axis is the
      selection's ``output_axis``, the last for a Flax kernel), initialised
      from each channel's extremes, stepped by the means of ``u`` over each
      channel's clusters and floored at each channel's std; the cluster
      probabilities, information content and ``lambda`` stay the layer's
      (:func:`lambda_max` with ``channel_axis``), and each channel's
      distortion is measured in units of its spread
      (``((W - v) / r_c)^2 + lambda I``, ``r_c = std(W_c) / std(W)``, so
      ``lambda`` is in the layer's units and no channel of small weights is
      zeroed whole). The param holds
      ``{-w_n[c], 0, w_p[c]}`` in channel ``c``; the export stores it as a
      per-filter ternary record (``tf``).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`QuantizerState`
    whose leaves are :class:`EC2TLeaf` (or :class:`ECPLeaf`).

  Example:
    >>> import optax
    >>> from ec2t_jax import ternarize_transform, quantized_params
    >>> from ec2t_jax.models import small_cnn_example
    >>> params, grads = small_cnn_example()[:2]  # a small CNN (fixture)
    >>> tx = optax.chain(optax.adam(1e-3), ternarize_transform(gamma=0.2))
    >>> opt_state = tx.init(params)
    >>> params = quantized_params(params, opt_state)
    >>> updates, opt_state = tx.update(grads, opt_state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  return quantizer(gamma, init_scale, budget=budget, budget_target=budget_target,
                   selection=selection,
                   centroid_update_scale=centroid_update_scale, floor_factor=floor_factor,
                   zero_floor=zero_floor, sustain=sustain, renormalization=renormalization,
                   ties=ties, latent_dtype=latent_dtype, latent_step=latent_step,
                   centroids=centroids).transform()


def quantizer(gamma: Optional[float] = None, init_scale: float = 0.3, *,
              budget: Optional[core.budget.Budget] = None, budget_target=None,
              selection: selection_lib.SelectionLike = None, centroid_update_scale: float = 0.1,
              floor_factor: float = 0.675, zero_floor: float = 0.5, sustain: float = 0.05,
              renormalization: ternary.Renormalization = "exact", ties: ternary.Ties = "zero",
              latent_dtype: str = "float32", latent_step: str = "plain",
              centroids: str = "layer") -> core.Quantizer:
  """EC2T (chain form) as a :class:`~core.Quantizer`; see :func:`ternarize_transform`."""
  check_static(renormalization, latent_dtype, ties, latent_step, centroids)
  if budget is not None and gamma is not None:
    raise ValueError(f"ternarize_transform takes gamma or budget, not both (gamma={gamma!r}, "
                     f"budget={budget!r}); with a budget the controller sets the multiplier "
                     "of every layer's lambda (a Rule's gamma stays its ratio)")
  if budget is None and budget_target is not None:
    raise ValueError(f"budget_target={budget_target!r} needs a budget=Budget(...)")
  if budget is not None and not isinstance(budget, core.budget.Budget):
    raise ValueError(f"budget must be an ec2t.Budget, got {budget!r}")
  if gamma is None:
    gamma = 1.0 if budget is not None else DEFAULT_GAMMA
  hyper = EC2THyper(gamma, init_scale, floor_factor, zero_floor, sustain,
                    centroid_update_scale)
  return core.Quantizer(
      method(renormalization=renormalization, latent_dtype=latent_dtype, ties=ties,
             latent_step=latent_step, centroids=centroids),
      hyper, HYPER_RANGES, selection, budget=budget,
      controlled=None if budget is None else BUDGET_CONTROLLED, budget_target=budget_target)


_knob = registry.Knob
registry.register_method(registry.MethodSpec(
    name="ec2t", kind="train", quantizer=quantizer, transform=ternarize_transform,
    knobs={
        "gamma": _knob(HYPER_RANGES["gamma"], (0.0, 0.2, 0.35, 0.5, 0.7), traced=True,
                       doc="the EC2T knob: sparsity against accuracy (None: "
                           "DEFAULT_GAMMA = 0.2)"),
        "init_scale": _knob(HYPER_RANGES["init_scale"], (0.2, 0.3, 0.5), traced=True),
        "budget": _knob(core.budget.Budget, doc="a size target instead of gamma"),
        "budget_target": _knob(traced=True, doc="the budget's target if not its own"),
        "centroid_update_scale": _knob(HYPER_RANGES["centroid_update_scale"], (0.1, 1.0),
                                       traced=True),
        "floor_factor": _knob(HYPER_RANGES["floor_factor"], (0.675,), traced=True),
        "zero_floor": _knob(HYPER_RANGES["zero_floor"], (0.5,), traced=True),
        "sustain": _knob(HYPER_RANGES["sustain"], (0.05,), traced=True),
        "renormalization": _knob(("exact", "reference")),
        "ties": _knob(("zero", "reference")),
        "latent_dtype": _knob(),
        "latent_step": _knob(("plain", "ttq")),
        "centroids": _knob(("layer", "channel"), ("layer",),
                           doc="one centroid pair per layer or per output channel"),
    },
    grid=lambda o: grids.ternary_grid(per_filter=o["centroids"] == "channel"),
    description="Entropy-Constrained Trained Ternarization (chain form)"))
