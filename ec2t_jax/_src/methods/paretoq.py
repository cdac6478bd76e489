"""ParetoQ's weight quantizers (Liu et al., Meta, 2025): ternary, 2, 3 and 4 bits.

Examples build their model, params or optimizer state with the fixture
:func:`ec2t_jax.models.small_cnn_example`.

Each layer holds latent weights ``W`` and a learnable scale ``alpha`` per
output channel (one per layer with ``layerwise``); with
``x = W / max(alpha, 1e-5)``, ``c = 1 - 10^-2`` and ``N`` the layer's number
of weights:

* **ternary** (the official ``w_bits=0``, here ``bits=1.58``) and **2 bits**:
  the *stretched elastic* quantizer with ``n = 1.5, s = 0`` (ternary) or
  ``n = 2, s = 0.5`` (2 bits),

  .. math:: Q(x) = \\frac{\\mathrm{round}(n \\, \\mathrm{clip}(x, -c, c) - s) + s}{n},

  levels ``{-2/3, 0, 2/3}`` and ``{-3/4, -1/4, 1/4, 3/4}`` (times ``alpha``);
* **3 and 4 bits**: LSQ, ``Q(x) = clip(round(x), Q_n, Q_p)`` with
  ``Q_n = -2^(b-1)``, ``Q_p = 2^(b-1) - 1``: levels ``-4..3`` and ``-8..7``.

The forward value is ``alpha Q(x)`` (``round`` is half-to-even, as
``torch.round``). Gradients, with ``g = dL/d(alpha Q)`` (the official
``backward``): the latent weights get the straight-through ``g`` inside the
range and 0 outside (``|x| > c`` for the stretched quantizer, ``x < Q_n`` or
``x > Q_p`` for LSQ); the scale gets LSQ's gradient

.. math:: \\frac{\\partial L}{\\partial \\alpha} = \\gamma \\sum_i d_i g_i,
   \\quad d_i = \\begin{cases} Q_n & \\text{below the range} \\\\
   Q_p & \\text{above} \\\\ Q(x_i) - x_i & \\text{inside} \\end{cases},
   \\quad \\gamma = \\frac{1}{\\sqrt{N q}}

summed over the channel (the layer with ``layerwise``), with ``Q_p = 1``
(ternary), ``3/4`` (2 bits) for the stretched quantizer, ``Q_n = -Q_p``, and
``q = 1, 1, 3, 7`` for 1.58, 2, 3, 4 bits (``grad_scale``). The initial scale is
``max|W|`` per output channel (ternary, 2 bits) or
``max|W| / (2^(b-1) - 1)`` (3, 4 bits), as the official ``train.py`` sets it.

Every value is an integer code times one step per channel
(:func:`paretoq_codes`, :func:`paretoq_step`): ternary codes ``{-1, 0, 1}``
with step ``alpha / 1.5``, 2-bit codes ``{-3, -1, 1, 3}`` with step
``alpha / 4``, 3- and 4-bit codes ``Q_n..Q_p`` with step ``alpha``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ec2t_jax._src import core
from ec2t_jax._src.core import segments as segments_lib
from ec2t_jax._src.core import selection as selection_lib
from ec2t_jax._src.methods._support import grids
from ec2t_jax._src.methods._support import registry

TERNARY = 1.58
BITS = (TERNARY, 2, 3, 4)
CLIP = 1.0 - 1e-2  # the stretched quantizer's clip of x = W / alpha
EPSILON = 1e-5  # the official lower bound of alpha in the forward
SCALE_STEPS = ("mean", "gradient")


class Width(NamedTuple):
  """What one width of ParetoQ is made of (see the module docstring).

  Attributes:
    bits: 1.58 (ternary), 2, 3 or 4.
    stretched: the stretched elastic quantizer (ternary, 2 bits) or LSQ.
    n_levels: ``n`` of the stretched quantizer (LSQ: 1).
    shift: ``s`` of the stretched quantizer (LSQ: 0).
    low, high: ``Q_n``, ``Q_p`` of the scale gradient outside the range.
    grad_q: ``q`` of ``grad_scale = 1 / sqrt(N q)``.
    divisor: the spacing of the levels is ``alpha / divisor``.
    codes: the integer codes, ascending (value = code * alpha / divisor).
  """
  bits: float
  stretched: bool
  n_levels: float
  shift: float
  low: float
  high: float
  grad_q: int
  divisor: float
  codes: tuple

  @property
  def name(self) -> str:
    return "ternary" if self.bits == TERNARY else f"{int(self.bits)}-bit"


_WIDTHS = {
    TERNARY: Width(TERNARY, True, 1.5, 0.0, -1.0, 1.0, 1, 1.5, (-1, 0, 1)),
    2: Width(2, True, 2.0, 0.5, -0.75, 0.75, 1, 4.0, (-3, -1, 1, 3)),
    3: Width(3, False, 1.0, 0.0, -4.0, 3.0, 3, 1.0, tuple(range(-4, 4))),
    4: Width(4, False, 1.0, 0.0, -8.0, 7.0, 7, 1.0, tuple(range(-8, 8))),
}


def width(bits) -> Width:
  """The :class:`Width` of ``bits``; ``ValueError`` naming ``bits`` if unsupported.

  Example:
    >>> from ec2t_jax._src.methods.paretoq import width  # internal
    >>> width(2).codes
    (-3, -1, 1, 3)
  """
  if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, float, np.number)):
    raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
  for key, w in _WIDTHS.items():
    if abs(float(bits) - key) < 1e-3:  # np.float32(1.58) too
      return w
  hint = " (ParetoQ's w_bits=0 is ternary: bits=1.58)" if bits == 0 else ""
  raise ValueError(f"bits must be one of {BITS}, got {bits!r}{hint}")


def paretoq_levels(bits=TERNARY) -> np.ndarray:
  """The values ``Q(x)`` a weight may take, in units of its scale ``alpha``.

  Example:
    >>> from ec2t_jax import paretoq_levels
    >>> paretoq_levels(1.58).round(4).tolist(), paretoq_levels(2).tolist()
    ([-0.6667, 0.0, 0.6667], [-0.75, -0.25, 0.25, 0.75])
    >>> paretoq_levels(3).tolist()
    [-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]
  """
  w = width(bits)
  return np.asarray(w.codes, np.float64) / w.divisor


def reduce_axes(ndim: int, output_axis: int = -1, layerwise: bool = False) -> tuple:
  """The axes a channel's statistics run over: all but ``output_axis`` (all with
  ``layerwise``). ``ValueError`` if ``output_axis`` is not an axis of ``ndim``.

  Example:
    >>> from ec2t_jax._src.methods.paretoq import reduce_axes  # internal
    >>> reduce_axes(4, -1), reduce_axes(2, 0), reduce_axes(2, 0, layerwise=True)
    ((0, 1, 2), (1,), (0, 1))
  """
  if layerwise:
    return tuple(range(ndim))
  if not -ndim <= output_axis < ndim:
    raise ValueError(f"output_axis must be an axis of a {ndim}-axis leaf, got {output_axis}")
  axis = output_axis % ndim
  return tuple(a for a in range(ndim) if a != axis)


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _effective(scale) -> jax.Array:
  # The official forward: alpha = where(alpha > eps, alpha, eps).
  scale = _f32(scale)
  return jnp.where(scale > EPSILON, scale, EPSILON)


def paretoq_init_scale(weights, bits=TERNARY, *, layerwise: bool = False,
                       output_axis: int = -1) -> jax.Array:
  """The official initial scale: ``max|W|`` per output channel (ternary, 2 bits) or
  ``max|W| / (2^(b-1) - 1)`` (3, 4 bits).

  Args:
    weights: one layer's weights.
    bits: 1.58 (ternary), 2, 3 or 4.
    layerwise: one scale for the layer (max over all weights) instead.
    output_axis: the output-channel axis (negative counts from the end).

  Returns:
    float32, one per output channel with the reduced axes kept (broadcasts
    against ``weights``), or a scalar with ``layerwise``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import paretoq_init_scale
    >>> w = jnp.array([[0.9, -0.3], [-0.6, 0.1], [0.2, 0.0]])  # (in, out)
    >>> paretoq_init_scale(w)
    Array([[0.9, 0.3]], dtype=float32)
    >>> paretoq_init_scale(w, 3, output_axis=0)  # max|W| / 3 per row
    Array([[0.3       ],
           [0.20000002],
           [0.06666667]], dtype=float32)
  """
  w = width(bits)
  x = _f32(weights)
  largest = jnp.max(jnp.abs(x), axis=reduce_axes(x.ndim, output_axis, layerwise),
                    keepdims=not layerwise)
  return largest if w.stretched else largest / w.high


def paretoq_codes(weights, scale, bits=TERNARY) -> jax.Array:
  """The integer code of each weight: ``Q(W / alpha) = code * step / alpha``.

  Args:
    weights: the latent weights.
    scale: ``alpha``, broadcasting against ``weights`` (values ``<= 1e-5``
      act as ``1e-5``, as in the official forward).
    bits: 1.58 (ternary), 2, 3 or 4.

  Returns:
    ``int8`` codes: ``{-1, 0, 1}`` (ternary), ``{-3, -1, 1, 3}`` (2 bits),
    ``-4..3`` (3 bits), ``-8..7`` (4 bits).

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import paretoq_codes
    >>> w = jnp.array([1.2, 0.5, 0.3, -0.05, -0.4])
    >>> paretoq_codes(w, 1.0), paretoq_codes(w, 1.0, bits=2)
    (Array([ 1,  1,  0,  0, -1], dtype=int8), Array([ 3,  1,  1, -1, -1], dtype=int8))
  """
  w = width(bits)
  x = _f32(weights) / _effective(scale)
  if w.stretched:
    r = jnp.round(w.n_levels * jnp.clip(x, -CLIP, CLIP) - w.shift)
    codes = r if w.shift == 0 else 2 * r + 1  # (r + 1/2) / 2 = (2r + 1) / 4
  else:
    codes = jnp.clip(jnp.round(x), w.low, w.high)
  return codes.astype(jnp.int8)


def paretoq_step(scale, bits=TERNARY) -> jax.Array:
  """The spacing of the levels: ``alpha / 1.5`` (ternary), ``alpha / 4`` (2 bits),
  ``alpha`` (3, 4 bits), with ``alpha`` bounded below by ``1e-5``.

  Example:
    >>> from ec2t_jax import paretoq_step
    >>> paretoq_step(0.3), paretoq_step(0.3, bits=2), paretoq_step(0.0, bits=3)
    (Array(0.2, dtype=float32), Array(0.075, dtype=float32), Array(1.e-05, dtype=float32))
  """
  return _effective(scale) / width(bits).divisor


def paretoq_quantize(weights, scale, bits=TERNARY) -> jax.Array:
  """The forward value ``alpha Q(W / alpha)`` (float32), as ``code * step``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import paretoq_quantize
    >>> paretoq_quantize(jnp.array([1.2, 0.5, 0.2, -0.05, -0.4]), 0.75)  # |W| > 0.25
    Array([ 0.5,  0.5,  0. ,  0. , -0.5], dtype=float32)
  """
  return paretoq_codes(weights, scale, bits).astype(jnp.float32) * paretoq_step(scale, bits)


def scale_derivative(weights, scale, bits=TERNARY) -> tuple[jax.Array, jax.Array]:
  """LSQ's ``d = d(alpha Q)/d alpha`` per weight and the in-range mask.

  Returns:
    ``(d, inside)``: float32 ``d`` (``Q_n`` below the range, ``Q_p`` above,
    ``Q(x) - x`` inside) and the boolean mask where the latent weights get
    the straight-through gradient.
  """
  w = width(bits)
  x = _f32(weights) / _effective(scale)
  if w.stretched:
    below, above = x < -CLIP, x > CLIP
    level = paretoq_codes(weights, scale, bits).astype(jnp.float32) / w.divisor
  else:
    below, above = x < w.low, x > w.high
    level = jnp.round(x)
  d = jnp.where(below, w.low, jnp.where(above, w.high, level - x))
  return d, ~(below | above)


def grad_scale(numel: int, bits=TERNARY) -> float:
  """LSQ's ``grad_scale = 1 / sqrt(N q)`` (``N``: the layer's weights).

  Example:
    >>> from ec2t_jax._src.methods.paretoq import grad_scale  # internal
    >>> grad_scale(12, 3)
    0.16666666666666666
  """
  return 1.0 / math.sqrt(max(int(numel), 1) * width(bits).grad_q)


def paretoq_gradients(grad, weights, scale, bits=TERNARY, *, layerwise: bool = False,
                      output_axis: int = -1) -> tuple[jax.Array, jax.Array]:
  """The official backward: gradients of the latent weights and of the scale.

  Args:
    grad: ``g = dL/d(alpha Q)``, shaped like ``weights``.
    weights: the latent weights of one layer.
    scale: ``alpha`` (per output channel with the reduced axes kept, or a
      scalar with ``layerwise``).
    bits: 1.58 (ternary), 2, 3 or 4.
    layerwise: one scale for the layer (the sum runs over every weight).
    output_axis: the output-channel axis.

  Returns:
    ``(latent_grad, scale_grad)``: ``g`` inside the range and 0 outside;
    ``grad_scale * sum d g`` per channel (shape of ``scale``).

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import paretoq_gradients
    >>> w = jnp.array([[1.2, 0.5], [0.3, -0.4]])
    >>> gw, ga = paretoq_gradients(jnp.ones((2, 2)), w, jnp.array([[1.0, 1.0]]))
    >>> gw, ga  # d = [[1, 1/6], [-0.3, -0.2667]] / sqrt(4)
    (Array([[0., 1.],
           [1., 1.]], dtype=float32), Array([[ 0.35, -0.05]], dtype=float32))
  """
  g = _f32(grad)
  d, inside = scale_derivative(weights, scale, bits)
  axes = reduce_axes(g.ndim, output_axis, layerwise)
  scale_grad = grad_scale(g.size, bits) * jnp.sum(d * g, axis=axes, keepdims=not layerwise)
  return jnp.where(inside, g, 0.0), scale_grad


# ---------------------------------------------------------------------------
# The transformation: ParetoQ's per-leaf state and step on the shared core.


class ParetoQLeaf(NamedTuple):
  """State of one ParetoQ leaf.

  Attributes:
    latent: latent full-precision weights ``W`` (float32).
    scale: the learnable ``alpha`` (float32): one per output channel with the
      other axes kept (shape like ``(1, out)`` for an ``(in, out)`` kernel,
      ``(out, 1)`` for ``(out, in)``), or a scalar (``layerwise``).
    code: ``int8`` codes (:func:`paretoq_codes`).
    bits: the width (float32 scalar: 1.58, 2, 3 or 4), so that the state
      describes itself.
  """
  latent: jax.Array
  scale: jax.Array
  code: jax.Array
  bits: jax.Array

  def value(self, dtype) -> jax.Array:
    """``code * step`` with each channel's step snapped on its own grid (exact landing).

    The grid's reference is the width's largest ``|code|`` times the step (1, 3, 4, 8 for
    ternary, 2, 3, 4 bits), whatever codes the channel holds now: element-wise, so a flat
    buffer's value needs no per-channel reduction.
    """
    bits = jnp.asarray(self.bits, jnp.float32)
    divisor = jnp.where(bits < 2, 1.5, jnp.where(bits < 3, 4.0, 1.0))
    step = _effective(self.scale) / divisor
    largest = jnp.where(bits < 2, 1.0, jnp.where(bits < 3, 3.0, jnp.where(bits < 4, 4.0,
                                                                             8.0)))
    reference = step * largest
    snapped = core.snap_to_grid(step, dtype, reference=reference)
    return (snapped * self.code.astype(jnp.float32)).astype(dtype)

  def describe(self) -> dict:
    bits = float(np.asarray(self.bits))
    mode = "ternary" if bits < 2 else f"{int(round(bits))}-bit"
    return {"method": "ParetoQ", "mode": mode, "scale": self.scale}

  def codes(self) -> jax.Array:
    """The integer codes: their entropy is the layer's information (scales aside)."""
    return self.code


class ParetoQHyper(NamedTuple):
  """ParetoQ's numeric hyperparameter: ``k`` of the scale steps (see :func:`paretoq`)."""
  scale_update: Any = 1.0


_HYPER_RANGES = {"scale_update": core.Range(0.0)}


def _check_leaf(ctx: core.LeafContext, layerwise: bool) -> None:
  if not jnp.issubdtype(ctx.dtype, jnp.floating):
    raise ValueError(f"paretoq selects leaf {ctx.path!r} of dtype {ctx.dtype}; only "
                     "floating-point leaves can be quantized")
  ndim = len(ctx.shape)
  if ndim == 0:
    raise ValueError(f"paretoq selects leaf {ctx.path!r} of shape (): a scalar has no "
                     "scale of its own")
  if not layerwise and ndim < 2:
    raise ValueError(f"paretoq(layerwise=False) keeps one scale per output channel, but leaf "
                     f"{ctx.path!r} has shape {ctx.shape}: use layerwise=True or leave it "
                     "unselected")
  if not -ndim <= ctx.output_axis < ndim:
    raise ValueError(f"leaf {ctx.path!r} of shape {ctx.shape} has no output_axis "
                     f"{ctx.output_axis}")


def method(bits=TERNARY, layerwise: bool = False, init_scale: float = 1.0,
           scale_step: str = "mean") -> core.Method:
  """ParetoQ's :class:`~core.Method` (chain form, see :func:`paretoq`)."""
  w = width(bits)

  def init_leaf(param, ctx, hyper: ParetoQHyper) -> ParetoQLeaf:
    del hyper
    _check_leaf(ctx, layerwise)
    latent = _f32(param)
    scale = init_scale * paretoq_init_scale(latent, w.bits, layerwise=layerwise,
                                            output_axis=ctx.output_axis % len(ctx.shape))
    return ParetoQLeaf(latent, scale, paretoq_codes(latent, scale, w.bits), _f32(w.bits))

  def step_leaf(update, leaf: ParetoQLeaf, ctx, hyper: ParetoQHyper, phase) -> ParetoQLeaf:
    del phase  # one phase
    segments = segments_lib.of(ctx)
    per_channel = not layerwise
    u = _f32(update)
    d, inside = scale_derivative(leaf.latent, segments.expand(leaf.scale, per_channel), w.bits)
    k = _f32(hyper.scale_update)
    du = segments.sum(d * u, per_channel)
    if scale_step == "gradient":
      # LSQ's 1 / sqrt(N q), N the layer's weights: computed here, in float64 as grad_scale.
      numel = np.asarray(segments.numel(u), np.float64)
      factor = jnp.asarray(1.0 / np.sqrt(np.maximum(numel, 1.0) * w.grad_q), jnp.float32)
      if per_channel:
        factor = segments.filters_from_layers(factor)
      scale_change = k * factor * du
    else:
      weight = segments.sum(jnp.abs(d), per_channel)
      scale_change = k * jnp.where(weight > 0, du / jnp.where(weight > 0, weight, 1.0), 0.0)
    latent = leaf.latent + jnp.where(inside, u, 0.0)
    scale = leaf.scale + scale_change
    return ParetoQLeaf(latent, scale,
                       paretoq_codes(latent, segments.expand(scale, per_channel), w.bits),
                       leaf.bits)

  return core.Method("paretoq", init_leaf, step_leaf, flat=True)


def paretoq(bits=TERNARY, *, layerwise: bool = False, init_scale: float = 1.0,
            scale_update: float = 1.0, scale_step: str = "mean",
            selection: selection_lib.SelectionLike = None):
  """ParetoQ's quantizers as the last transformation of an optax chain.

  Each selected leaf keeps latent weights ``W`` and a learnable scale
  ``alpha`` per output channel (``layerwise``: per layer); the params hold
  ``alpha Q(W / alpha)`` (module docstring; levels :func:`paretoq_levels`),
  recomputed after every step. The output channel is the leaf's
  ``output_axis`` (the selection's plan; default the last axis, Flax's
  ``(in, out)`` kernels), so an ``(out, in)`` kernel planned with
  ``output_axis=0`` gets one scale per row, as the official code.

  The incoming update ``u`` (what the inner optimizer proposes to add to the
  quantized weights) drives, from the current ``W`` and ``alpha``:

  * latent weights, straight-through inside the range and frozen outside:
    ``W += u`` where ``|W / alpha| <= 1 - 10^-2`` (ternary, 2 bits) or
    ``Q_n <= W / alpha <= Q_p`` (3, 4 bits), as the official backward;
  * scales, by LSQ's chain rule ``d_i = d(alpha Q_i)/d alpha``
    (:func:`paretoq_gradients`) applied to ``u``:

    - ``scale_step="mean"`` (default): ``alpha += k sum_i d_i u_i /
      sum_i |d_i|`` over the channel, the ``|d|``-weighted mean of the
      members' proposed changes, each signed by its ``d`` (0 where every
      ``d_i`` is 0). This is how TTQ and EC2T train their scales in the chain
      form (there ``d_i = 1`` on a cluster: the cluster mean of ``u``).
    - ``scale_step="gradient"``: ``alpha += k grad_scale sum_i d_i u_i``.
      With ``optax.sgd(lr)`` (``u = -lr g``) and ``k = 1`` this is exactly
      SGD on ``(W, alpha)`` with the official gradients at the same ``lr``.

  Why ``"mean"`` is the chain form of what AdamW does to ``weight_clip_val``
  in the official code (there ``alpha`` is an ordinary parameter of the same
  AdamW at the same learning rate, weight decay 0 in its script): Adam is
  invariant to the scale of a gradient, so ``grad_scale`` plays no part
  there, and Adam moves ``alpha`` by at most about ``lr`` per step, in the
  sign of ``-sum d g``. With an adaptive inner optimizer each ``|u_i|`` is at
  most about ``lr``, so the weighted mean moves ``alpha`` by at most ``k lr``
  per step, in the direction of the LSQ gradient of the inner optimizer's
  step (exactly the official direction under ``optax.sgd``, where it is SGD on
  LSQ's gradient with a per-channel rate ``k lr / (grad_scale sum|d|)``).
  ``"gradient"`` instead scales the step by ``grad_scale sum|d|``, far from
  ``lr`` under Adam for large layers. What differs: ``alpha`` has no moments
  of its own, and the members' steps are each normalised by Adam before they
  are summed, so noisy members cancel where the official gradient sum is
  dominated by a few large ones. Measured (``benchmarks/paretoq_scale_step.py``,
  a 128 x 64 toy regression, Adam 1e-3, 300 steps): the official Adam moves
  the ternary ``alpha`` 0.71 ``lr`` per step on average, ``"mean"`` 0.20
  (``k = 1``), 0.43 (``k = 3``), 0.62 (``k = 10``); final losses, ternary: official 3.57,
  ``k = 1`` 5.23, ``k = 3`` 4.28, ``k = 10`` 3.26; 2 bits: 2.07, 3.12, 2.52,
  2.04. ``k = 1`` keeps Adam's bound; sweep ``scale_update`` (1, 3, 10) on
  your model. Weight decay is not applied to ``alpha`` (the official script
  uses none).

  Args:
    bits: 1.58 (ternary, the default; the official ``w_bits=0``), 2, 3 or 4.
    layerwise: one scale per layer instead of per output channel (initial
      ``max|W|`` over the layer, ``/ (2^(b-1) - 1)`` for 3, 4 bits).
    init_scale: factor ``> 0`` on the official initial scale (1: as
      ``train.py``).
    scale_update: ``k >= 0`` above (0 freezes the scales).
    scale_step: ``"mean"`` (default) or ``"gradient"`` (see above).
    selection: which leaves (see :func:`ternarize_transform`); every leaf
      needs an output axis and another axis unless ``layerwise``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`QuantizerState`
    whose leaves are :class:`ParetoQLeaf`.

  Raises:
    ValueError: an unsupported ``bits``, ``init_scale`` not finite and
      ``> 0``, ``layerwise`` not a bool, an unknown ``scale_step``.

  Example:
    >>> import optax
    >>> import ec2t_jax as ec2t
    >>> from ec2t_jax.models import small_cnn_example
    >>> params = small_cnn_example().params  # a small CNN (fixture)
    >>> tx = optax.chain(optax.adamw(1e-3, weight_decay=0.0), ec2t.paretoq())
    >>> opt_state = tx.init(params)
    >>> params = ec2t.quantized_params(params, opt_state)
    >>> ec2t.summary(opt_state).layers[0].mode
    'ternary'
  """
  return quantizer(bits, layerwise=layerwise, init_scale=init_scale, scale_update=scale_update,
                   scale_step=scale_step, selection=selection).transform()


def quantizer(bits=TERNARY, *, layerwise: bool = False, init_scale: float = 1.0,
              scale_update: float = 1.0, scale_step: str = "mean",
              selection: selection_lib.SelectionLike = None) -> core.Quantizer:
  """ParetoQ as a :class:`~core.Quantizer` (training: :func:`paretoq`; one-shot: ``.instant``)."""
  width(bits)
  if not isinstance(layerwise, (bool, np.bool_)):
    raise ValueError(f"layerwise must be True or False, got {layerwise!r}")
  core.check_range("init_scale", init_scale, core.Range(0.0, low_open=True))
  core.check_choice("scale_step", scale_step, SCALE_STEPS)
  return core.Quantizer(method(bits, bool(layerwise), float(init_scale), scale_step),
                        ParetoQHyper(scale_update), _HYPER_RANGES, selection)


def grid(bits=TERNARY, layerwise: bool = False) -> grids.Grid:
  """The values a ParetoQ layer holds: the width's level count per output channel
  (last axis; per layer with ``layerwise``), each channel on one scale."""
  w = width(bits)
  per_filter = not layerwise
  if w.bits == TERNARY:
    return grids.ternary_grid(per_filter=per_filter, symmetric_filters=per_filter)
  return grids.Grid(len(w.codes), per_filter, (grids.integer_multiples(per_filter),),
                    ternary=False)


registry.register_method(registry.MethodSpec(
    name="paretoq", kind="train", quantizer=quantizer, transform=paretoq,
    knobs={"bits": registry.Knob(BITS, (TERNARY, 2),
                                 doc="1.58 (ternary), 2, 3 or 4"),
           "layerwise": registry.Knob((False, True), (False, True),
                                      doc="one scale per layer instead of per output channel"),
           "init_scale": registry.Knob(core.Range(0.0, low_open=True), (1.0,),
                                       doc="factor on the official initial scale"),
           "scale_update": registry.Knob(core.Range(0.0), (1.0, 3.0, 10.0), traced=True,
                                         doc="k of the scale steps"),
           "scale_step": registry.Knob(SCALE_STEPS, SCALE_STEPS,
                                       doc="weighted mean of u, or SGD-exact LSQ gradient")},
    grid=lambda o: grid(o["bits"], o["layerwise"]),
    description="ParetoQ: stretched elastic / LSQ quantizers, learnable scales "
                "(Liu et al. 2025)"))
