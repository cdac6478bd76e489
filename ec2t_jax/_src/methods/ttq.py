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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ec2t_jax._src import ternary
from ec2t_jax._src.methods import common

DEFAULT_THRESHOLD = 0.05


def ttq_threshold(weights, threshold=DEFAULT_THRESHOLD) -> jax.Array:
  """TTQ's layer threshold ``Delta = t * max|W|``.

  Args:
    weights: latent weights of one layer.
    threshold: the fraction ``t`` in ``[0, 1)``.

  Example:
    >>> ttq_threshold(jnp.array([0.9, -0.05, 0.3, -0.6, 0.02, 0.1]))
    Array(0.045, dtype=float32)
  """
  common.check_range("threshold", threshold, 0.0, 1.0, high_open=True)
  return common.f32(threshold) * jnp.max(jnp.abs(common.f32(weights)))


def ttq_sparsity_threshold(weights, sparsity) -> jax.Array:
  """The threshold that zeroes a fraction ``sparsity`` of the weights.

  With ``z = floor(sparsity * n)`` and ``m_(1) <= ... <= m_(n)`` the sorted
  magnitudes, ``Delta = m_(z)`` (0 for ``z = 0``): exactly ``z`` weights have
  ``|W| <= Delta`` unless magnitudes tie at the cut (then all tied ones are
  zeroed).

  Args:
    weights: latent weights of one layer.
    sparsity: the fraction ``r`` in ``[0, 1)``.

  Example:
    >>> ttq_sparsity_threshold(jnp.array([0.9, -0.05, 0.3, -0.6, 0.02, 0.1]), 0.5)
    Array(0.1, dtype=float32)
  """
  common.check_range("sparsity", sparsity, 0.0, 1.0, high_open=True)
  m = jnp.sort(jnp.abs(common.f32(weights)).ravel())
  z = jnp.floor(common.f32(sparsity) * m.size).astype(jnp.int32)
  return jnp.where(z > 0, m[jnp.maximum(z - 1, 0)], 0.0)


def ttq_assign(weights, delta) -> jax.Array:
  """TTQ clusters: ``+1`` where ``W > Delta``, ``-1`` where ``W < -Delta``, else 0.

  Example:
    >>> ttq_assign(jnp.array([0.9, -0.05, 0.3, -0.6, 0.02, 0.1]), 0.045)
    Array([ 1, -1,  1, -1,  0,  1], dtype=int8)
  """
  return common.threshold_assign(weights, delta)


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
