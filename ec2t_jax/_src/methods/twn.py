"""Pure functions of Ternary Weight Networks (Li, Zhang, Liu, 2016).

Examples build their model, params or optimizer state with the fixture
:func:`ec2t_jax.models.small_cnn_example`.

TWN approximates ``W`` by ``alpha * T`` with ``T in {-1, 0, 1}``, minimising
``||W - alpha T||^2``. For a threshold ``Delta`` (``T_i = sign(W_i)`` where
``|W_i| > Delta``) the best scale is the mean magnitude of the kept weights,

.. math:: \\alpha^*(\\Delta) = \\frac{1}{|I_\\Delta|} \\sum_{i \\in I_\\Delta} |W_i|,
   \\quad I_\\Delta = \\{i : |W_i| > \\Delta\\},

and the best threshold maximises ``(sum_{I} |W_i|)^2 / |I|``
(:func:`twn_optimal_threshold`). Training uses the rule of thumb
``Delta = 0.7 mean|W|`` per layer (2016 paper) or ``0.75 mean|W|`` per output
filter with per-filter ``alpha`` (2022 revision), and the identity
straight-through gradient to the latent full-precision weights.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ec2t_jax._src import core
from ec2t_jax._src.core import segments as segments_lib
from ec2t_jax._src.core import selection as selection_lib
from ec2t_jax._src.methods._support import ternary_ops
from ec2t_jax._src.methods._support import grids
from ec2t_jax._src.methods._support import registry

LAYER_FACTOR = 0.7
FILTER_FACTOR = 0.75


def twn_threshold(weights, factor=LAYER_FACTOR, *, per_filter: bool = False,
                  axis: int = -1, segments=None) -> jax.Array:
  """TWN's rule-of-thumb threshold ``Delta = factor * mean|W|``.

  Args:
    weights: latent weights of one layer (output filters on the last axis).
    factor: the multiplier, ``> 0`` (0.7 per layer, 0.75 per filter in TWN).
    per_filter: one threshold per output filter (shape ``(1, ..., 1, out)``)
      instead of one scalar per layer.
    axis: the output-filter axis (default: the last).
    segments: a flat buffer's ``FlatSegments`` (the core's flat path: one
      threshold per segment or filter) instead of one leaf along ``axis``.

  Returns:
    float32 threshold(s), broadcastable against ``weights``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import twn_threshold
    >>> twn_threshold(jnp.array([0.9, -0.05, 0.3, -0.6, 0.02, 0.1]))  # 0.7 * 0.32833
    Array(0.22983333, dtype=float32)
  """
  ternary_ops.check_range("factor", factor, 0.0, low_open=True)
  segments = segments_lib.LeafSegments(axis) if segments is None else segments
  w = ternary_ops.f32(weights)
  return ternary_ops.f32(factor) * segments_lib.mean(segments, jnp.abs(w), per_filter)


def twn_scale(weights, assignment, *, per_filter: bool = False, axis: int = -1,
              segments=None) -> jax.Array:
  """The least-squares scale ``alpha``: mean ``|W|`` over the non-zero assignment.

  Zero where nothing is kept (an all-zero layer or filter). ``axis``: the
  output-filter axis of ``per_filter`` (default: the last); ``segments``: a
  flat buffer's ``FlatSegments`` instead (one scale per segment or filter).

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import twn_scale
    >>> w = jnp.array([0.9, -0.05, 0.3, -0.6, 0.02, 0.1])
    >>> twn_scale(w, jnp.array([1, 0, 1, -1, 0, 0], jnp.int8))
    Array(0.6, dtype=float32)
  """
  segments = segments_lib.LeafSegments(axis) if segments is None else segments
  w = ternary_ops.f32(weights)
  return ternary_ops.segment_masked_mean(segments, jnp.abs(w), jnp.asarray(assignment) != 0,
                                         per_filter)


def twn_ternarize(weights, threshold="layer") -> tuple[jax.Array, jax.Array]:
  """TWN's ternarization of one layer: assignment and scale.

  Args:
    weights: latent weights (output filters on the last axis).
    threshold: ``"layer"`` (``0.7 mean|W|``, one ``alpha``), ``"filter"``
      (``0.75 mean|W|`` and ``alpha`` per output filter) or ``"optimal"``
      (:func:`twn_optimal_threshold`, per layer).

  Returns:
    ``(assignment, alpha)``: ``int8`` in ``{-1, 0, 1}`` and the float32
    scale(s); the ternary weights are ``alpha * assignment``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import twn_ternarize
    >>> a, alpha = twn_ternarize(jnp.array([0.9, -0.05, 0.3, -0.6, 0.02, 0.1]))
    >>> a, alpha
    (Array([ 1,  0,  1, -1,  0,  0], dtype=int8), Array(0.6, dtype=float32))
  """
  if threshold not in ("layer", "filter", "optimal"):
    raise ValueError("threshold must be 'layer', 'filter' or 'optimal', got "
                     f"{threshold!r}")
  per_filter = threshold == "filter"
  if threshold == "optimal":
    delta = twn_optimal_threshold(weights)
  else:
    delta = twn_threshold(weights, FILTER_FACTOR if per_filter else LAYER_FACTOR,
                          per_filter=per_filter)
  assignment = ternary_ops.threshold_assign(weights, delta)
  return assignment, twn_scale(weights, assignment, per_filter=per_filter)


def twn_optimal_threshold(weights) -> jax.Array:
  """The exact TWN threshold of one layer.

  Keeping the ``k`` largest magnitudes, ``||W - alpha* T||^2 =
  ||W||^2 - S_k^2 / k`` with ``S_k`` their sum, so the optimum keeps the ``k``
  maximising ``S_k^2 / k``. Only ``k`` that split the sorted magnitudes
  strictly (no tie across the cut) are candidates, so the keep set
  ``{|W| > Delta}`` is exactly the optimum. Returns ``Delta`` = the largest
  magnitude not kept (0 when everything is kept). ``O(n log n)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import twn_optimal_threshold
    >>> twn_optimal_threshold(jnp.array([0.9, -0.05, 0.3, -0.6, 0.02, 0.1]))
    Array(0.3, dtype=float32)
  """
  m = jnp.sort(jnp.abs(ternary_ops.f32(weights)).ravel())[::-1]
  if m.size == 0:
    return jnp.zeros((), jnp.float32)
  k = jnp.arange(1, m.size + 1, dtype=jnp.float32)
  sums = jnp.cumsum(m)
  following = jnp.concatenate([m[1:], jnp.full((1,), -1.0, jnp.float32)])
  valid = m > following  # no tie across the cut after position k
  objective = jnp.where(valid, jnp.square(sums) / k, -jnp.inf)
  best = jnp.argmax(objective)
  return jnp.maximum(following[best], 0.0)


# ---------------------------------------------------------------------------
# The transformation: TWN's per-leaf state and step on the shared core.


class TWNLeaf(ternary_ops.ScaledTernaryLeaf):
  """State of one TWN leaf: ``latent``, ``assignment`` and ``scale`` ``alpha`` (a
  float32 scalar, or one per output filter), value ``alpha * T``."""
  __slots__ = ()

  def describe(self) -> dict:
    return {"method": "TWN", "mode": "ternary", "scale": self.scale}

  def codes(self) -> jax.Array:
    """The assignment: its entropy is the layer's information (scales aside)."""
    return self.assignment


class TWNHyper(NamedTuple):
  """TWN's numeric hyperparameter: ``Delta = factor * mean|W|``."""
  factor: Any = LAYER_FACTOR


_HYPER_RANGES = {"factor": core.Range(0.0, low_open=True)}


def _ternarize_leaf(latent, factor, per_filter, segments):
  delta = twn_threshold(latent, factor, per_filter=per_filter, segments=segments)
  assignment = ternary_ops.threshold_assign(latent, segments.expand(delta, per_filter))
  return assignment, twn_scale(latent, assignment, per_filter=per_filter, segments=segments)


def method(per_filter: bool = False) -> core.Method:
  """TWN's :class:`~core.Method`: identity straight-through, re-threshold each step."""

  def init_leaf(param, ctx, hyper: TWNHyper) -> TWNLeaf:
    latent = ternary_ops.f32(param)
    return TWNLeaf(latent, *_ternarize_leaf(latent, hyper.factor, per_filter,
                                            segments_lib.of(ctx)))

  def step_leaf(update, leaf: TWNLeaf, ctx, hyper: TWNHyper, phase) -> TWNLeaf:
    del phase  # one phase
    latent = leaf.latent + update
    return TWNLeaf(latent, *_ternarize_leaf(latent, hyper.factor, per_filter,
                                            segments_lib.of(ctx)))

  return core.Method("twn", init_leaf, step_leaf, flat=True)


def twn(threshold: str = "layer", factor=None, *,
        selection: selection_lib.SelectionLike = None,
        budget: Optional[core.budget.Budget] = None, budget_target=None):
  """Ternary Weight Networks as the last transformation of an optax chain.

  Each selected leaf keeps latent weights ``W`` in the state; the params hold
  ``alpha * T`` with ``T = sign(W) [|W| > Delta]``, ``Delta = factor mean|W|``
  and ``alpha`` the mean kept ``|W|`` (:func:`twn_ternarize`), recomputed after
  every step. The incoming update ``u`` (what the inner optimizer proposes to
  add to the ternary weights) moves the latent weights unchanged,
  ``W += u``: TWN's identity straight-through gradient.

  Args:
    threshold: ``"layer"`` (one ``Delta`` and ``alpha`` per layer, factor 0.7,
      the 2016 paper) or ``"filter"`` (per output filter, factor 0.75, the
      2022 revision).
    factor: override of the threshold factor (``> 0``).
    selection: which leaves (see :func:`ternarize_transform`).
    budget: a :class:`~ec2t_jax.Budget` (``sparsity`` or ``bits_per_weight``;
      ``bytes`` with ``threshold="layer"``): the factor is then set every step
      by the budget's controller (dual ascent on the size error, gain 0.5 per
      unit, factor in ``[0.001, 5]``, starting at the default factor) instead
      of ``factor``; held in ``phase >= 1``.
    budget_target: the budget's target if not its own (traceable, see
      :func:`ternarize_transform`).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`QuantizerState`
    whose leaves are :class:`TWNLeaf`.

  Example:
    >>> import optax
    >>> from ec2t_jax import twn, quantized_params
    >>> from ec2t_jax.models import small_cnn_example
    >>> params = small_cnn_example().params  # a small CNN (fixture)
    >>> tx = optax.chain(optax.adam(1e-3), twn(threshold="layer"))
    >>> opt_state = tx.init(params)
    >>> params = quantized_params(params, opt_state)
  """
  return quantizer(threshold, factor, selection=selection, budget=budget,
                   budget_target=budget_target).transform()


def quantizer(threshold: str = "layer", factor=None, *,
              selection: selection_lib.SelectionLike = None,
              budget: Optional[core.budget.Budget] = None,
              budget_target=None) -> core.Quantizer:
  """TWN as a :class:`~core.Quantizer` (training: :func:`twn`; one-shot: ``.instant``)."""
  core.check_choice("threshold", threshold, ("layer", "filter"))
  per_filter = threshold == "filter"
  if budget is not None and factor is not None:
    raise ValueError(f"twn takes factor or budget, not both (factor={factor!r}, "
                     f"budget={budget!r})")
  if budget is not None and per_filter and budget.kind == "bytes":
    raise ValueError("twn(threshold='filter') stores one scale per filter; Budget(bytes=...) "
                     "models one pair of centroids per layer: use threshold='layer', or a "
                     "sparsity or bits_per_weight budget")
  if budget is None and budget_target is not None:
    raise ValueError(f"budget_target={budget_target!r} needs a budget=Budget(...)")
  if factor is None:
    factor = FILTER_FACTOR if per_filter else LAYER_FACTOR
  controlled = None if budget is None else core.budget.ControlledHyper(
      "factor", initial=factor, low=1e-3, high=5.0, gain=0.5)
  return core.Quantizer(method(per_filter), TWNHyper(factor), _HYPER_RANGES, selection,
                        budget=budget, controlled=controlled, budget_target=budget_target)


registry.register_method(registry.MethodSpec(
    name="twn", kind="train", quantizer=quantizer, transform=twn,
    knobs={"threshold": registry.Knob(("layer", "filter"), ("layer", "filter"),
                                      doc="one Delta/alpha per layer (0.7) or per filter (0.75)"),
           "factor": registry.Knob(core.Range(0.0, low_open=True), (0.5, 0.7, 1.0, 1.4),
                                   traced=True, doc="Delta = factor mean|W|"),
           "budget": registry.Knob(core.budget.Budget,
                                   doc="a size target; the controller sets the factor"),
           "budget_target": registry.Knob(traced=True,
                                          doc="the budget's target if not its own")},
    grid=lambda o: grids.ternary_grid(per_filter=o["threshold"] == "filter",
                                      symmetric_filters=True),
    description="Ternary Weight Networks (Li et al. 2016)"))
