"""Pure functions of Soft Threshold Ternary Networks (Xu et al., IJCAI 2020).

STTN trains two binary latent kernels per layer and one shared scale per
output filter (output filters on the leaf's ``LeafContext.output_axis``, the
last axis by default; ``n`` elements per filter):

.. math:: \\alpha = \\frac{\\|W_1\\|_1 + \\|W_2\\|_1}{2n}, \\quad
   B_j = \\alpha \\, \\mathrm{sgn}(W_j), \\quad T = B_1 + B_2 \\in \\{-2\\alpha, 0, 2\\alpha\\}

(``sgn(0) = +1``). ``T`` is zero wherever the two signs disagree, so the
threshold is learned rather than set. Inference adds the two binary kernels
into one ternary kernel.

Gradients, ``g = dL/dT`` (``gradient=`` option):

* ``"official"`` (default): the official code's ``updateBinaryGradWeight``
  (``WeixiangXu/STTN`` ``util.py``), run on each binary kernel on its own:
  a plain straight-through term (no ``alpha``, cut at ``|W| > 1.96``) plus
  XNOR-Net's scale term over the kernel's *own* signs, ``n`` elements per
  filter (torch's ``sign(0) = 0``):

  .. math:: \\frac{\\partial L}{\\partial W_{j,i}} = [|W_{j,i}| \\le 1.96] g_i
     + \\frac{\\mathrm{sign}(W_{j,i})}{n} \\sum_{k \\in f(i)}
     \\mathrm{sign}(W_{j,k}) g_k;

* ``"exact"`` (this library's earlier reading): the exact gradient of the
  forward above with the sign replaced by the clipped straight-through
  estimator ``d sgn(x)/dx = [|x| <= 1]``, i.e. the scale term over *both*
  kernels' signs, which differs from the official one where ``T = 0``:

  .. math:: \\frac{\\partial L}{\\partial W_{j,i}} = \\alpha [|W_{j,i}| \\le 1] g_i
     + \\frac{\\mathrm{sign}(W_{j,i})}{2n} \\sum_{k \\in f(i)} g_k
     (\\mathrm{sgn} W_{1,k} + \\mathrm{sgn} W_{2,k}).

Latent weights are clamped to ``[-1, 1]`` after each step (the official
``clampConvParams``), so the official cut at 1.96 never acts.

In the chain form the incoming update ``u`` is what the inner optimizer
proposes for ``T``; the latent kernels move by the chosen map applied to
``u`` (it is linear). The official map has no ``alpha``; with
``gradient="exact"`` and ``latent_step="update"`` (:func:`sttn_latent_steps`)
the latent kernels move by the exact map *without* the factor ``alpha`` of the
straight-through term (``alpha`` is 0.006-0.011 on LeNet-5: with it the latent
weights would move ~100x slower than the inner optimizer's step).
``latent_step="gradient"`` keeps the exact map (:func:`sttn_gradients`), the
right choice under ``optax.sgd``, where ``u = -lr g``.
Activations can be ternarised to ``{-1, 0, 1}`` at ``+-0.5`` with
:func:`ternary_activation` (straight-through inside ``|x| < 1``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ec2t_jax._src import core
from ec2t_jax._src.core import segments as segments_lib
from ec2t_jax._src.core import selection as selection_lib
from ec2t_jax._src.methods._support import ternary_ops
from ec2t_jax._src.methods import twn
from ec2t_jax._src.methods._support import grids
from ec2t_jax._src.methods._support import registry


def _sgn(x) -> jax.Array:
  return jnp.where(x >= 0, 1.0, -1.0)


def _segments(segments, axis):
  """The reductions: a flat buffer's (the core's flat path) or the one leaf's along ``axis``."""
  return segments_lib.LeafSegments(axis) if segments is None else segments


def sttn_scale(w1, w2, *, per_filter: bool = True, axis: int = -1,
               segments=None) -> jax.Array:
  """The shared scale ``alpha = (||W1||_1 + ||W2||_1) / (2n)``.

  Args:
    w1: first latent kernel.
    w2: second latent kernel (same shape).
    per_filter: one ``alpha`` per output filter (kept for broadcasting; the
      paper) or one for the whole kernel.
    axis: the output-filter axis (default: the last).
    segments: a flat buffer's ``FlatSegments`` (the core's flat path) instead
      of one leaf along ``axis``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import sttn_scale
    >>> sttn_scale(jnp.array([0.5, -0.2, 0.3, -0.4]),
    ...            jnp.array([0.1, 0.3, -0.2, -0.6]), per_filter=False)
    Array(0.325, dtype=float32)
  """
  w1, w2 = ternary_ops.f32(w1), ternary_ops.f32(w2)
  segments = _segments(segments, axis)
  return 0.5 * (segments_lib.mean(segments, jnp.abs(w1), per_filter)
                + segments_lib.mean(segments, jnp.abs(w2), per_filter))


def sttn_ternarize(w1, w2, *, per_filter: bool = True,
                   axis: int = -1, segments=None) -> tuple[jax.Array, jax.Array]:
  """The ternary kernel ``T = B1 + B2`` as ``(assignment, alpha)``.

  Returns:
    ``int8`` assignment ``(sgn W1 + sgn W2) / 2`` in ``{-1, 0, 1}`` and
    ``alpha``; the kernel is ``2 * alpha * assignment``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import sttn_ternarize
    >>> a, alpha = sttn_ternarize(jnp.array([0.5, -0.2, 0.3, -0.4]),
    ...                           jnp.array([0.1, 0.3, -0.2, -0.6]), per_filter=False)
    >>> a, 2 * alpha * a
    (Array([ 1,  0,  0, -1], dtype=int8), Array([ 0.65,  0.  ,  0.  , -0.65], dtype=float32))
  """
  w1, w2 = ternary_ops.f32(w1), ternary_ops.f32(w2)
  assignment = (0.5 * (_sgn(w1) + _sgn(w2))).astype(jnp.int8)
  return assignment, sttn_scale(w1, w2, per_filter=per_filter, axis=axis, segments=segments)


OFFICIAL_STE_CLIP = 1.96
GRADIENTS = ("official", "exact")


def sttn_official_gradients(grad, w1, w2, *, per_filter: bool = True, axis: int = -1,
                            segments=None) -> tuple[jax.Array, jax.Array]:
  """The official ``(dL/dW1, dL/dW2)`` from ``g = dL/dT`` (``gradient="official"``).

  Per binary kernel ``W_j`` on its own (``updateBinaryGradWeight`` of
  ``WeixiangXu/STTN``): ``[|W_j| <= 1.96] g + sign(W_j) * sum_f(sign(W_j) g) / n``,
  ``n`` the elements of one filter (output filters on ``axis``), ``sign(0) = 0``. Linear in ``grad``, so it
  is also the latent step for an optimizer's proposed change of ``T``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import sttn_official_gradients
    >>> g1, g2 = sttn_official_gradients(jnp.array([0.1, 0.1]), jnp.array([0.5, -0.5]),
    ...                                  jnp.array([0.5, 0.5]), per_filter=False)
    >>> g1, g2  # W1's own signs cancel: no scale term; W2's: (0.1 + 0.1) / 2
    (Array([0.1, 0.1], dtype=float32), Array([0.2, 0.2], dtype=float32))
  """
  g = ternary_ops.f32(grad)
  segments = _segments(segments, axis)
  n = segments.numel(g, per_filter)

  def step(w):
    w = ternary_ops.f32(w)
    scale_term = segments.sum(jnp.sign(w) * g, per_filter) / n
    return ((jnp.abs(w) <= OFFICIAL_STE_CLIP) * g
            + jnp.sign(w) * segments.expand(scale_term, per_filter))

  return step(w1), step(w2)


def sttn_gradients(grad, w1, w2, *, per_filter: bool = True,
                   axis: int = -1, segments=None) -> tuple[jax.Array, jax.Array]:
  """``(dL/dW1, dL/dW2)`` from ``g = dL/dT`` (formula in the module docstring).

  Linear in ``grad``, so it also maps an optimizer's proposed change of ``T``
  to the change of the latent kernels.
  """
  g, w1, w2 = ternary_ops.f32(grad), ternary_ops.f32(w1), ternary_ops.f32(w2)
  segments = _segments(segments, axis)
  alpha = sttn_scale(w1, w2, per_filter=per_filter, segments=segments)
  scale_term = segments.expand(segments.sum(g * (_sgn(w1) + _sgn(w2)), per_filter) / (
      2.0 * segments.numel(g, per_filter)), per_filter)
  alpha = segments.expand(alpha, per_filter)
  step = lambda w: alpha * (jnp.abs(w) <= 1.0) * g + jnp.sign(w) * scale_term
  return step(w1), step(w2)


def sttn_latent_steps(update, w1, w2, *, per_filter: bool = True, axis: int = -1,
                      segments=None) -> tuple[jax.Array, jax.Array]:
  """The latent steps for an already normalised update ``u`` (``latent_step="update"``).

  :func:`sttn_gradients` with the straight-through term's ``alpha`` replaced
  by 1 (:math:`[|W_{j,i}| \\le 1] u_i + \\mathrm{sign}(W_{j,i}) \\sum_{k \\in f(i)}
  u_k (\\mathrm{sgn} W_{1,k} + \\mathrm{sgn} W_{2,k}) / 2n`), so a latent weight
  moves by the inner optimizer's step, not ``alpha`` times it.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax._src.methods.sttn import sttn_latent_steps  # internal
    >>> s1, s2 = sttn_latent_steps(jnp.array([0.1, 0.1]), jnp.array([0.5, 2.0]),
    ...                            jnp.array([0.5, -0.5]), per_filter=False)
    >>> s1, s2  # scale term: (0.1 * 2 + 0.1 * 0) / 4 = 0.05
    (Array([0.15, 0.05], dtype=float32), Array([0.15, 0.05], dtype=float32))
  """
  u, w1, w2 = ternary_ops.f32(update), ternary_ops.f32(w1), ternary_ops.f32(w2)
  segments = _segments(segments, axis)
  scale_term = segments.expand(segments.sum(u * (_sgn(w1) + _sgn(w2)), per_filter) / (
      2.0 * segments.numel(u, per_filter)), per_filter)
  step = lambda w: (jnp.abs(w) <= 1.0) * u + jnp.sign(w) * scale_term
  return step(w1), step(w2)


LATENT_STEPS = ("update", "gradient")


def check_latent_step(latent_step: str) -> str:
  """Validates ``latent_step`` (``"update"`` or ``"gradient"``), naming it."""
  if latent_step not in LATENT_STEPS:
    raise ValueError(f"latent_step must be one of {LATENT_STEPS}, got {latent_step!r}")
  return latent_step


def sttn_init(weights, factor=twn.LAYER_FACTOR) -> tuple[jax.Array, jax.Array]:
  """Two latent kernels from pretrained weights (this library's choice).

  ``W1 = clip((W + Delta) / 2)``, ``W2 = clip((W - Delta) / 2)`` with TWN's
  ``Delta = factor * mean|W|``, clipped to ``[-1, 1]``: the initial ternary
  kernel is zero exactly where ``|W| < Delta`` (TWN's assignment), and its
  magnitude ``2 alpha`` is the mean of ``max(|W|, Delta)`` per filter.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import sttn_init
    >>> w1, w2 = sttn_init(jnp.array([0.5, 0.125, -0.5]), factor=1.0)  # Delta = 0.375
    >>> w1, w2
    (Array([ 0.4375,  0.25  , -0.0625], dtype=float32), Array([ 0.0625, -0.125 , -0.4375], dtype=float32))
  """
  w = ternary_ops.f32(weights)
  delta = twn.twn_threshold(w, factor)
  return (jnp.clip(0.5 * (w + delta), -1.0, 1.0),
          jnp.clip(0.5 * (w - delta), -1.0, 1.0))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def ternary_activation(x, threshold: float = 0.5) -> jax.Array:
  """STTN's activation ternarization with a straight-through gradient.

  Forward ``sign(x) [|x| > threshold]`` in ``{-1, 0, 1}`` (``x``'s dtype);
  backward ``dL/dx = [|x| < 1] dL/dy``. Use it as an activation function in
  Linen or NNX models (``nn.Sequential([..., ec2t.ternary_activation])``).

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import ternary_activation
    >>> ternary_activation(jnp.array([-0.7, 0.2, 0.6]))
    Array([-1.,  0.,  1.], dtype=float32)
  """
  return jnp.where(jnp.abs(x) > threshold, jnp.sign(x), 0).astype(jnp.result_type(x))


@ternary_activation.defjvp
def _ternary_activation_jvp(threshold, primals, tangents):
  (x,), (dx,) = primals, tangents
  return ternary_activation(x, threshold), jnp.where(jnp.abs(x) < 1, dx, jnp.zeros_like(dx))


# ---------------------------------------------------------------------------
# The transformation: STTN's per-leaf state and step on the shared core.


class STTNLeaf(NamedTuple):
  """State of one STTN leaf.

  Attributes:
    latent: the first binary kernel's latent weights ``W1`` (float32, in
      ``[-1, 1]``).
    latent2: the second one's, ``W2``.
    assignment: ``int8`` ``(sgn W1 + sgn W2) / 2`` in ``{-1, 0, 1}``.
    scale: ``alpha`` per output filter (shape ``(1, ..., 1, out)``, the
      size-``out`` axis being the leaf's ``LeafContext.output_axis``).
  """
  latent: jax.Array
  latent2: jax.Array
  assignment: jax.Array
  scale: jax.Array
  # Both kernels are latent weights: a decoupled weight decay shrinks both.
  latent_fields = ("latent", "latent2")

  def value(self, dtype) -> jax.Array:
    """``T = B1 + B2 = 2 alpha * assignment``; each filter snapped on its own grid."""
    two_alpha = core.snap_to_grid(2.0 * self.scale, dtype, reference=2.0 * self.scale)
    return (two_alpha * self.assignment).astype(dtype)

  def describe(self) -> dict:
    return {"method": "STTN", "mode": "ternary", "scale": self.scale}

  def codes(self) -> jax.Array:
    """The assignment: its entropy is the layer's information (scales aside)."""
    return self.assignment


class STTNHyper(NamedTuple):
  """STTN's numeric hyperparameter: the initial threshold factor."""
  init_factor: Any = twn.LAYER_FACTOR


_HYPER_RANGES = {"init_factor": core.Range(0.0, low_open=True)}


def check_gradient(gradient: str) -> str:
  """Validates ``gradient`` (``"official"`` or ``"exact"``), naming it."""
  if gradient not in GRADIENTS:
    raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
  return gradient


def method(per_filter: bool = True, latent_step: str = "update",
           gradient: str = "official") -> core.Method:
  """STTN's :class:`~core.Method` (chain form, see :func:`sttn`)."""
  check_latent_step(latent_step)
  if check_gradient(gradient) == "official":
    steps_of = sttn_official_gradients  # no alpha: the same map for both latent steps
  else:
    steps_of = sttn_latent_steps if latent_step == "update" else sttn_gradients

  def leaf_from(w1, w2, segments) -> STTNLeaf:
    return STTNLeaf(w1, w2, *sttn_ternarize(w1, w2, per_filter=per_filter, segments=segments))

  def init_leaf(param, ctx, hyper: STTNHyper) -> STTNLeaf:
    return leaf_from(*sttn_init(param, hyper.init_factor), segments_lib.of(ctx))

  def step_leaf(update, leaf: STTNLeaf, ctx, hyper, phase) -> STTNLeaf:
    del hyper, phase  # one phase
    segments = segments_lib.of(ctx)
    step1, step2 = steps_of(update, leaf.latent, leaf.latent2, per_filter=per_filter,
                            segments=segments)
    return leaf_from(jnp.clip(leaf.latent + step1, -1.0, 1.0),
                     jnp.clip(leaf.latent2 + step2, -1.0, 1.0), segments)

  return core.Method("sttn", init_leaf, step_leaf, flat=True)


def sttn(init_factor=twn.LAYER_FACTOR, *, per_filter: bool = True,
         latent_step: str = "update", gradient: str = "official",
         selection: selection_lib.SelectionLike = None):
  """Soft Threshold Ternary Networks as the last transformation of an optax chain.

  Each selected leaf keeps two latent kernels ``W1, W2`` (initialised by
  :func:`sttn_init`); the params hold ``T = B1 + B2`` with values
  ``{-2 alpha, 0, 2 alpha}`` per output filter. The incoming update ``u`` (what
  the inner optimizer proposes to add to ``T``) moves both kernels by the
  official gradient map :func:`sttn_official_gradients` (``gradient="official"``,
  the default: each kernel's own scale term, no ``alpha``; with
  ``optax.sgd(lr)`` it is SGD as the official code runs it), or, with
  ``gradient="exact"``, by :func:`sttn_latent_steps` (``latent_step="update"``,
  for adaptive inner optimizers: the step is not shrunk by ``alpha``) or the
  exact gradient map of :func:`sttn_gradients` (``latent_step="gradient"``);
  then both are clamped to ``[-1, 1]``.

  Args:
    init_factor: ``c > 0`` of the initial threshold ``c mean|W|``.
    per_filter: one ``alpha`` per output filter (the paper) or per layer.
    latent_step: ``"update"`` (default) or ``"gradient"`` (see above; with
      ``gradient="official"`` both are the official map).
    gradient: ``"official"`` (default) or ``"exact"`` (see the module
      docstring: the earlier reading, scale term over both kernels' signs).
    selection: which leaves (see :func:`ternarize_transform`).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`QuantizerState`
    whose leaves are :class:`STTNLeaf`.

  Example:
    >>> import optax
    >>> from ec2t_jax import sttn
    >>> tx = optax.chain(optax.adam(1e-3), sttn())
  """
  return quantizer(init_factor, per_filter=per_filter, latent_step=latent_step,
                   gradient=gradient, selection=selection).transform()


def quantizer(init_factor=twn.LAYER_FACTOR, *, per_filter: bool = True,
              latent_step: str = "update", gradient: str = "official",
              selection: selection_lib.SelectionLike = None) -> core.Quantizer:
  """STTN as a :class:`~core.Quantizer` (training: :func:`sttn`; one-shot: ``.instant``)."""
  return core.Quantizer(method(per_filter, latent_step, gradient), STTNHyper(init_factor),
                        _HYPER_RANGES, selection)


registry.register_method(registry.MethodSpec(
    name="sttn", kind="train", quantizer=quantizer, transform=sttn,
    knobs={"init_factor": registry.Knob(core.Range(0.0, low_open=True), (0.5, 0.7, 1.0, 1.5),
                                        traced=True, doc="initial threshold factor c"),
           "per_filter": registry.Knob((True, False), (True,),
                                       doc="one alpha per output filter"),
           "latent_step": registry.Knob(LATENT_STEPS,
                                        doc="gradient='exact': steps not shrunk by alpha, or "
                                            "the gradient map"),
           "gradient": registry.Knob(GRADIENTS, ("official", "exact"),
                                     doc="official (own-sign scale term) or exact")},
    grid=lambda o: grids.ternary_grid(per_filter=o["per_filter"], symmetric_filters=True),
    description="Soft Threshold Ternary Networks (Xu et al. 2020)"))
