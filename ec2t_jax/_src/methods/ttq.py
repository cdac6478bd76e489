"""Pure functions of Trained Ternary Quantization (Zhu, Han, Mao, Dally, 2017).

TTQ thresholds each layer at ``Delta = t max|W|`` (``t = 0.05``) and trains
two per-layer scales: ``T_i = W_p`` where ``W_i > Delta``, ``0`` where
``|W_i| <= Delta`` and ``-W_n`` where ``W_i < -Delta``. With ``g = dL/dT``:

.. math:: \\frac{\\partial L}{\\partial W_p} = \\sum_{i \\in p} g_i, \\quad
   \\frac{\\partial L}{\\partial W_n} = -\\sum_{i \\in n} g_i, \\quad
   \\frac{\\partial L}{\\partial W_i} = s_i g_i,
   \\; s = (W_n, 1, W_p) \\text{ on } (n, 0, p).

The scale gradients are exact calculus; the latent one is TTQ's scaled
straight-through estimator. A fixed-sparsity variant picks ``Delta`` so that a
fraction ``r`` of the weights is zero (:func:`ttq_sparsity_threshold`).

The official code (``czhu95/ternarynet`` ``examples/Ternary-Net/ternary.py``,
``tw_ternarize``) makes ``W_p`` and ``W_n`` ordinary variables initialised to
1.0 and trained by the network's optimizer (momentum SGD) on exactly these
gradients; :func:`ttq`'s defaults reproduce that step under ``optax.sgd``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ec2t_jax._src import core
from ec2t_jax._src.core import segments as segments_lib
from ec2t_jax._src.core import selection as selection_lib
from ec2t_jax._src.methods.ec2t import ternary
from ec2t_jax._src.methods._support import ternary_ops
from ec2t_jax._src.methods._support import grids
from ec2t_jax._src.methods._support import registry

DEFAULT_THRESHOLD = 0.05


def ttq_threshold(weights, threshold=DEFAULT_THRESHOLD, *, segments=None) -> jax.Array:
  """TTQ's layer threshold ``Delta = t * max|W|``.

  Args:
    weights: latent weights of one layer.
    threshold: the fraction ``t`` in ``[0, 1]``.
    segments: a flat buffer's ``FlatSegments`` (the core's flat path: one
      threshold per segment) instead of one layer.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import ttq_threshold
    >>> ttq_threshold(jnp.array([0.9, -0.05, 0.3, -0.6, 0.02, 0.1]))
    Array(0.045, dtype=float32)
  """
  ternary_ops.check_range("threshold", threshold, 0.0, 1.0)
  segments = segments_lib.LeafSegments() if segments is None else segments
  return ternary_ops.f32(threshold) * segments.max(jnp.abs(ternary_ops.f32(weights)))


def ttq_sparsity_threshold(weights, sparsity, *, segments=None) -> jax.Array:
  """The threshold that zeroes a fraction ``sparsity`` of the weights.

  With ``z = floor(sparsity * n)`` and ``m_(1) <= ... <= m_(n)`` the sorted
  magnitudes, ``Delta = m_(z)`` (0 for ``z = 0``): exactly ``z`` weights have
  ``|W| <= Delta`` unless magnitudes tie at the cut (then all tied ones are
  zeroed).

  Args:
    weights: latent weights of one layer.
    sparsity: the fraction ``r`` in ``[0, 1]``.
    segments: a flat buffer's ``FlatSegments`` (one threshold per segment,
      from a sort within each segment) instead of one layer.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import ttq_sparsity_threshold
    >>> ttq_sparsity_threshold(jnp.array([0.9, -0.05, 0.3, -0.6, 0.02, 0.1]), 0.5)
    Array(0.1, dtype=float32)
  """
  ternary_ops.check_range("sparsity", sparsity, 0.0, 1.0)
  segments = segments_lib.LeafSegments() if segments is None else segments
  m = segments.sort(jnp.abs(ternary_ops.f32(weights)))
  z = jnp.floor(ternary_ops.f32(sparsity) * segments.numel(weights)).astype(jnp.int32)
  return jnp.where(z > 0, m[segments.starts() + jnp.maximum(z - 1, 0)], 0.0)


def ttq_assign(weights, delta) -> jax.Array:
  """TTQ clusters: ``+1`` where ``W > Delta``, ``-1`` where ``W < -Delta``, else 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import ttq_assign
    >>> ttq_assign(jnp.array([0.9, -0.05, 0.3, -0.6, 0.02, 0.1]), 0.045)
    Array([ 1, -1,  1, -1,  0,  1], dtype=int8)
  """
  return ternary_ops.threshold_assign(weights, delta)


def ttq_gradients(grad, assignment, w_n, w_p) -> tuple[jax.Array, jax.Array, jax.Array]:
  """TTQ's gradients from ``g = dL/dT`` (see the module docstring).

  Args:
    grad: ``dL/dT`` of the layer.
    assignment: the layer's ``int8`` clusters (:func:`ttq_assign`).
    w_n: the negative scale ``W_n > 0``.
    w_p: the positive scale ``W_p > 0``.

  Returns:
    ``(latent_grad, grad_w_n, grad_w_p)``: float32, the first of ``grad``'s
    shape, the other two scalars.
  """
  grad_w_n, grad_w_p = ternary.centroid_gradients(grad, assignment)
  return ternary.latent_gradient(grad, assignment, w_n, w_p), grad_w_n, grad_w_p


# ---------------------------------------------------------------------------
# The transformation: TTQ's per-leaf state and step on the shared core.


class TTQLeaf(NamedTuple):
  """State of one TTQ leaf.

  Attributes:
    latent: latent full-precision weights ``W`` (float32).
    w_n: the trained negative scale ``W_n`` (float32 scalar, > 0).
    w_p: the trained positive scale ``W_p`` (float32 scalar, > 0).
    assignment: ``int8`` clusters in ``{-1, 0, 1}``.
  """
  latent: jax.Array
  w_n: jax.Array
  w_p: jax.Array
  assignment: jax.Array

  def value(self, dtype) -> jax.Array:
    """``T`` with ``W_n`` and ``W_p`` snapped to one grid (exact landing)."""
    # The quantum of the larger scale (per element on a flat buffer: its layer's).
    w_n, w_p = core.snap_to_grid(jnp.stack([self.w_n, self.w_p]), dtype,
                                 jnp.maximum(jnp.abs(self.w_n), jnp.abs(self.w_p)))
    return ternary.ternary_values(self.assignment, w_n, w_p, dtype)

  def describe(self) -> dict:
    return {"method": "TTQ", "mode": "ternary", "w_n": self.w_n, "w_p": self.w_p}


class TTQHyper(NamedTuple):
  """TTQ's numeric hyperparameters (see :func:`ttq`)."""
  threshold: Any = DEFAULT_THRESHOLD
  sparsity: Any = 0.0
  scale_update: Any = 1.0


_HYPER_RANGES = {"threshold": core.Range(0.0, 1.0), "sparsity": core.Range(0.0, 1.0),
                 "scale_update": core.Range(0.0)}


def _delta(latent, hyper: TTQHyper, fixed_sparsity: bool, segments):
  if fixed_sparsity:
    return ttq_sparsity_threshold(latent, hyper.sparsity, segments=segments)
  return ttq_threshold(latent, hyper.threshold, segments=segments)


def _cluster_mean(values, mask, segments):
  return ternary_ops.segment_masked_mean(segments, values, mask, per_filter=False)


def _cluster_sum(values, mask, segments):
  return segments.sum(jnp.where(mask, ternary_ops.f32(values), 0.0))


LATENT_STEPS = ("gradient", "update")
SCALE_STEPS = ("sum", "mean")
OFFICIAL_INIT_SCALE = 1.0


def method(fixed_sparsity: bool, init_scale: Optional[float],
           latent_step: str = "gradient", scale_step: str = "sum") -> core.Method:
  """TTQ's :class:`~core.Method` (chain form, see :func:`ttq`)."""
  core.check_choice("latent_step", latent_step, LATENT_STEPS)
  core.check_choice("scale_step", scale_step, SCALE_STEPS)
  tiny = jnp.finfo(jnp.float32).tiny
  reduce = _cluster_sum if scale_step == "sum" else _cluster_mean

  def init_leaf(param, ctx, hyper: TTQHyper) -> TTQLeaf:
    segments = segments_lib.of(ctx)
    latent = ternary_ops.f32(param)
    assignment = ttq_assign(latent, segments.expand(_delta(latent, hyper, fixed_sparsity,
                                                           segments)))
    if init_scale is None:  # least-squares fit of each side
      w_n = _cluster_mean(-latent, assignment < 0, segments)
      w_p = _cluster_mean(latent, assignment > 0, segments)
    else:  # the official code: both variables start at 1.0
      w_n = w_p = jnp.full((), init_scale, jnp.float32)
    return TTQLeaf(latent, jnp.maximum(w_n, tiny), jnp.maximum(w_p, tiny), assignment)

  def step_leaf(update, leaf: TTQLeaf, ctx, hyper: TTQHyper, phase) -> TTQLeaf:
    del phase  # one phase
    segments = segments_lib.of(ctx)
    if latent_step == "update":  # the inner optimizer's step, as it is
      step = ternary_ops.f32(update)
    else:  # the official scaled straight-through map: (W_n, 1, W_p) on (n, 0, p)
      step = ternary.latent_gradient(update, leaf.assignment, segments.expand(leaf.w_n),
                                     segments.expand(leaf.w_p))
    k = ternary_ops.f32(hyper.scale_update)
    w_n = leaf.w_n - k * reduce(update, leaf.assignment < 0, segments)
    w_p = leaf.w_p + k * reduce(update, leaf.assignment > 0, segments)
    latent = leaf.latent + step
    assignment = ttq_assign(latent, segments.expand(_delta(latent, hyper, fixed_sparsity,
                                                           segments)))
    return TTQLeaf(latent, jnp.maximum(w_n, tiny), jnp.maximum(w_p, tiny), assignment)

  return core.Method("ttq", init_leaf, step_leaf, flat=True)


def ttq(threshold: float = DEFAULT_THRESHOLD, *, sparsity: Optional[float] = None,
        init_scale: Optional[float] = OFFICIAL_INIT_SCALE, scale_update: float = 1.0,
        latent_step: str = "gradient", scale_step: str = "sum",
        selection: selection_lib.SelectionLike = None):
  """Trained Ternary Quantization as the last transformation of an optax chain.

  Each selected leaf keeps latent weights ``W`` and two trained scales; the
  params hold ``T = W_p`` where ``W > Delta``, ``-W_n`` where ``W < -Delta``
  and 0 elsewhere, with ``Delta = threshold * max|W|`` (or the fixed-sparsity
  threshold, :func:`ttq_sparsity_threshold`) recomputed after every step. The
  incoming update ``u`` (what the inner optimizer proposes to add to ``T``;
  ``u = -lr g`` under ``optax.sgd``):

  * latent weights: TTQ's scaled straight-through ``W += s u`` with
    ``s = (W_n, 1, W_p)`` on ``(n, 0, p)`` (``latent_step="gradient"``, the
    default, the official code's gradient), or ``W += u``
    (``latent_step="update"``: an adaptive inner optimizer such as Adam has
    already normalised ``u``, and multipliers below 1 would only slow the
    non-zero weights against the zeros);
  * scales, the official code's variables: ``W_p += k sum_{p}(u)``,
    ``W_n -= k sum_{n}(u)`` (``scale_step="sum"``, the default; ``k =
    scale_update``; with ``optax.sgd(lr)`` this is SGD on ``sum_p g`` and
    ``-sum_n g``, the official step), or the least-squares step
    ``W_p += k mean_{p}(u)``, ``W_n -= k mean_{n}(u)`` (``scale_step="mean"``,
    this library's earlier default: ``|p|`` times smaller, bounded by ``k``
    times the learning rate under Adam).

  With the defaults and ``optax.sgd(lr, momentum=0.9)`` (the official
  optimizer) a step is the official one. Under Adam prefer
  ``latent_step="update", scale_step="mean", init_scale=None`` (the earlier
  defaults; the benchmarks say which they ran).

  Initial scales: ``W_p = W_n = init_scale`` (1.0, the official variables'
  initialiser; suited to networks with batch normalisation), or ``None``:
  the least-squares fit (mean ``|W|`` of each cluster), so a pretrained
  network without normalisation keeps its scale.

  Args:
    threshold: ``t`` in ``[0, 1]`` (0.05 in TTQ).
    sparsity: if given, the fraction ``r`` in ``[0, 1]`` of zeros per layer
      (the fixed-sparsity variant; ``threshold`` is then unused).
    init_scale: the initial ``W_p = W_n`` (``> 0``; 1.0 official) or ``None``
      (fit).
    scale_update: ``k >= 0`` above (0 freezes the scales).
    latent_step: ``"gradient"`` (default) or ``"update"`` (see above).
    scale_step: ``"sum"`` (default) or ``"mean"`` (see above).
    selection: which leaves (TTQ keeps the first and last layer in full
      precision: the default rule).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`QuantizerState`
    whose leaves are :class:`TTQLeaf`.

  Example:
    >>> import optax
    >>> from ec2t_jax import ttq
    >>> tx = optax.chain(optax.adam(1e-3), ttq(threshold=0.05))
    >>> tx_sparse = optax.chain(optax.adam(1e-3), ttq(sparsity=0.6))
  """
  return quantizer(threshold, sparsity=sparsity, init_scale=init_scale,
                   scale_update=scale_update, latent_step=latent_step,
                   scale_step=scale_step, selection=selection).transform()


def quantizer(threshold: float = DEFAULT_THRESHOLD, *, sparsity: Optional[float] = None,
              init_scale: Optional[float] = OFFICIAL_INIT_SCALE, scale_update: float = 1.0,
              latent_step: str = "gradient", scale_step: str = "sum",
              selection: selection_lib.SelectionLike = None) -> core.Quantizer:
  """TTQ as a :class:`~core.Quantizer` (training: :func:`ttq`; one-shot: ``.instant``)."""
  if init_scale is not None:
    core.check_range("init_scale", init_scale, core.Range(0.0, low_open=True))
  hyper = TTQHyper(threshold, 0.0 if sparsity is None else sparsity, scale_update)
  return core.Quantizer(method(sparsity is not None, init_scale, latent_step, scale_step),
                        hyper, _HYPER_RANGES, selection)


registry.register_method(registry.MethodSpec(
    name="ttq", kind="train", quantizer=quantizer, transform=ttq,
    knobs={"threshold": registry.Knob(core.Range(0.0, 1.0), (0.02, 0.05, 0.1), traced=True,
                                      doc="Delta = threshold max|W|"),
           "sparsity": registry.Knob(core.Range(0.0, 1.0), (0.5, 0.7, 0.8, 0.9),
                                     doc="fixed fraction of zeros (replaces threshold)"),
           "init_scale": registry.Knob(core.Range(0.0, low_open=True), (None, 1.0),
                                       doc="initial W_p = W_n (1.0: official); None: fit"),
           "scale_update": registry.Knob(core.Range(0.0), (0.1, 1.0), traced=True,
                                         doc="k of the scale steps"),
           "latent_step": registry.Knob(LATENT_STEPS, LATENT_STEPS,
                                        doc="gradient (official scaled STE) or update"),
           "scale_step": registry.Knob(SCALE_STEPS, SCALE_STEPS,
                                       doc="sum (official) or mean of u per cluster")},
    grid=lambda o: grids.ternary_grid(),
    description="Trained Ternary Quantization (Zhu et al. 2017)"))
