"""BitNet b1.58 (Ma et al., "The Era of 1-bit LLMs", 2024): absmean ternary weights.

Examples build their model, params or optimizer state with the fixture
:func:`ec2t_jax.models.small_cnn_example`.

Each layer's weights ``W`` are replaced by

.. math:: \\tilde W = g \\, \\mathrm{clip}(\\mathrm{round}(W / g), -1, 1),
   \\quad g = \\max\\Big(\\frac{1}{n} \\sum_i |W_i|, \\epsilon\\Big),

(the "absmean" rule; ``round`` is round-half-to-even, as ``torch.round``, so
``T_i = sign(W_i)`` exactly where ``|W_i| > g / 2``) and the full-precision
latent weights are trained through the straight-through estimator (the
gradient of ``\\tilde W`` is passed to ``W`` unchanged). Unlike TWN the scale
is the mean magnitude of *all* weights, not of the kept ones, and there is no
sparsity objective: zeros come from the rounding only (about a third of a
Gaussian layer's weights). ``epsilon = 1e-5`` is the clamp of the authors'
reference code (``w.abs().mean().clamp_(min=1e-5)``).

BitNet also quantizes activations to 8 bits per token (absmax);
:func:`quantize_activations_int8` is that model-side function, for users who
want BitNet's inputs as well.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ec2t_jax._src import core
from ec2t_jax._src.core import segments as segments_lib
from ec2t_jax._src.core import selection as selection_lib
from ec2t_jax._src.methods._support import grids
from ec2t_jax._src.methods._support import registry
from ec2t_jax._src.methods._support import ternary_ops

EPSILON = 1e-5


def absmean_ternarize(weights, epsilon=EPSILON) -> tuple[jax.Array, jax.Array]:
  """BitNet b1.58's absmean ternarization of one layer.

  .. math:: g = \\max(\\mathrm{mean}|W|, \\epsilon), \\quad
     T = \\mathrm{clip}(\\mathrm{round}(W / g), -1, 1)

  Args:
    weights: the layer's weights, any shape (one scale for the whole array).
    epsilon: lower bound of ``g`` (``> 0``), so an all-zero layer stays zero.

  Returns:
    ``(assignment, scale)``: ``int8`` ``T`` in ``{-1, 0, 1}`` and the float32
    scalar ``g``; the ternary weights are ``g * T``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import absmean_ternarize
    >>> a, g = absmean_ternarize(jnp.array([0.9, -0.05, 0.3, -0.6, 0.02, 0.1]))
    >>> a, g  # g = 1.97 / 6; |W| > g / 2 = 0.164 keeps 0.9, 0.3, -0.6
    (Array([ 1,  0,  1, -1,  0,  0], dtype=int8), Array(0.32833335, dtype=float32))
  """
  ternary_ops.check_range("epsilon", epsilon, 0.0, low_open=True)
  w = ternary_ops.f32(weights)
  scale = jnp.maximum(jnp.mean(jnp.abs(w)), ternary_ops.f32(epsilon))
  assignment = jnp.clip(jnp.round(w / scale), -1, 1).astype(jnp.int8)
  return assignment, scale


def quantize_activations_int8(x, epsilon=EPSILON) -> jax.Array:
  """BitNet's 8-bit activations: per-token absmax, straight-through gradient.

  Over the last axis (the features of one token),

  .. math:: s = 127 / \\max(\\max_j |x_j|, \\epsilon), \\quad
     \\hat x = \\mathrm{clip}(\\mathrm{round}(s x), -128, 127) / s,

  the forward value is ``\\hat x`` and the gradient is the identity
  (``x + stop_gradient(\\hat x - x)``), as in the authors' reference code.
  Call it on a linear layer's input inside the model.

  Args:
    x: activations, features on the last axis.
    epsilon: lower bound of the absmax (``> 0``).

  Returns:
    ``x`` on the per-token int8 grid, in ``x``'s dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import quantize_activations_int8
    >>> quantize_activations_int8(jnp.array([[1.0, -0.5, 0.25, 0.003]]))
    Array([[ 1.       , -0.503937 ,  0.2519685,  0.       ]], dtype=float32)
  """
  ternary_ops.check_range("epsilon", epsilon, 0.0, low_open=True)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim == 0:
    raise ValueError("quantize_activations_int8 needs floating activations with a feature "
                     f"axis, got dtype {x.dtype} and shape {x.shape}")
  xf = x.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
  scale = 127.0 / jnp.maximum(absmax, epsilon)
  quantized = jnp.clip(jnp.round(xf * scale), -128, 127) / scale
  return (xf + jax.lax.stop_gradient(quantized - xf)).astype(x.dtype)


# ---------------------------------------------------------------------------
# The transformation: BitNet's per-leaf state and step on the shared core.


class BitNetLeaf(ternary_ops.ScaledTernaryLeaf):
  """State of one BitNet leaf: ``latent``, ``assignment`` and ``scale`` ``g``, the
  float32 absmean of ``W`` (value ``g * T``)."""
  __slots__ = ()

  def describe(self) -> dict:
    return {"method": "BitNet", "mode": "ternary", "scale": self.scale}


class BitNetHyper(NamedTuple):
  """BitNet's numeric hyperparameter: the lower bound of ``g``."""
  epsilon: Any = EPSILON


_HYPER_RANGES = {"epsilon": core.Range(0.0, low_open=True)}


def _check_leaf(ctx: core.LeafContext) -> None:
  # The selection and the core already refuse these; BitNet's scale needs them too.
  if not jnp.issubdtype(ctx.dtype, jnp.floating):
    raise ValueError(f"bitnet selects leaf {ctx.path!r} of dtype {ctx.dtype}; only "
                     "floating-point leaves can be ternarized")
  if len(ctx.shape) == 0:
    raise ValueError(f"bitnet selects leaf {ctx.path!r} of shape (): a scalar has no "
                     "absmean scale of its own")


def method() -> core.Method:
  """BitNet's :class:`~core.Method`: identity straight-through, re-round each step."""

  def init_leaf(param, ctx, hyper: BitNetHyper) -> BitNetLeaf:
    _check_leaf(ctx)
    latent = ternary_ops.f32(param)
    return BitNetLeaf(latent, *absmean_ternarize(latent, hyper.epsilon))

  def step_leaf(update, leaf: BitNetLeaf, ctx, hyper: BitNetHyper, phase) -> BitNetLeaf:
    del phase  # one phase
    latent = leaf.latent + update
    return BitNetLeaf(latent, *_absmean(latent, hyper.epsilon, segments_lib.of(ctx)))

  return core.Method("bitnet", init_leaf, step_leaf, flat=True)


def _absmean(latent, epsilon, segments):
  # absmean_ternarize without the concrete range check (epsilon may be traced), per segment.
  scale = jnp.maximum(segments_lib.mean(segments, jnp.abs(latent)),
                      jnp.asarray(epsilon, jnp.float32))
  codes = jnp.round(latent / segments.expand(scale))
  return jnp.clip(codes, -1, 1).astype(jnp.int8), scale


def bitnet(epsilon=EPSILON, *, selection: selection_lib.SelectionLike = None):
  """BitNet b1.58's absmean ternary weights as the last transformation of an optax chain.

  Each selected leaf keeps latent weights ``W`` in the state; the params hold
  ``g T`` with ``g = max(mean|W|, epsilon)`` and ``T = clip(round(W / g), -1, 1)``
  (:func:`absmean_ternarize`), recomputed after every step. The incoming update
  ``u`` (what the inner optimizer proposes to add to the ternary weights) moves
  the latent weights unchanged, ``W += u``: the straight-through estimator.
  ``g`` is one scale per layer (per slice of a leaf that stacks layers).

  Args:
    epsilon: lower bound of ``g`` (``> 0``; the authors' code uses ``1e-5``).
    selection: which leaves (see :func:`ternarize_transform`). BitNet
      ternarizes every linear layer of the blocks and keeps the embedding and
      the LM head in full precision, which is the paper's default rule for a
      tied-embedding transformer.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`QuantizerState`
    whose leaves are :class:`BitNetLeaf`.

  Example:
    >>> import optax
    >>> from ec2t_jax import bitnet, quantized_params
    >>> from ec2t_jax.models import small_cnn_example
    >>> params = small_cnn_example().params  # a small CNN (fixture)
    >>> tx = optax.chain(optax.adamw(1e-3), bitnet())
    >>> opt_state = tx.init(params)
    >>> params = quantized_params(params, opt_state)
  """
  return quantizer(epsilon, selection=selection).transform()


def quantizer(epsilon=EPSILON, *,
              selection: selection_lib.SelectionLike = None) -> core.Quantizer:
  """BitNet as a :class:`~core.Quantizer` (training: :func:`bitnet`; one-shot: ``.instant``)."""
  return core.Quantizer(method(), BitNetHyper(epsilon), _HYPER_RANGES, selection)


registry.register_method(registry.MethodSpec(
    name="bitnet", kind="train", quantizer=quantizer, transform=bitnet,
    knobs={"epsilon": registry.Knob(core.Range(0.0, low_open=True), (1e-5,),
                                    traced=True, doc="lower bound of the absmean scale g")},
    grid=lambda options: grids.ternary_grid(),
    description="BitNet b1.58: absmean ternary weights, straight-through (Ma et al. 2024)"))
