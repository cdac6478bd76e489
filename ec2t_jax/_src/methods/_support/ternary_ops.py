"""Array helpers shared by the train-time ternary methods (TWN, TTQ, STTN, Faraone et al.).

Conventions: a kernel's output filters lie along one axis, ``axis``: the
**last** by default (Flax ``Dense`` kernels are ``(in, out)``, ``Conv`` kernels
``(..., in, out)``), the leaf's ``LeafContext.output_axis`` in the methods
(e.g. ``0`` for an ``(out, in)`` kernel applied as ``x @ k.T``, from the trace
or a ``Rule``); "per filter" reduces over every other axis and keeps
dimensions for broadcasting (the reductions: ``_src/core/segments.py``).
Arithmetic is float32 whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ec2t_jax._src import core


class ScaledTernaryLeaf(NamedTuple):
  """A leaf that is ``scale * T``: latent weights, an assignment and its scale(s).

  The fields of :class:`~ec2t_jax.TWNLeaf` and :class:`~ec2t_jax.BitNetLeaf`
  (subclasses that add their ``describe``).

  Attributes:
    latent: latent full-precision weights ``W`` (float32).
    assignment: ``int8`` ``T`` in ``{-1, 0, 1}``.
    scale: a float32 scalar, or one per output filter (``(1, ..., 1, out)``).
  """
  latent: jax.Array
  assignment: jax.Array
  scale: jax.Array

  def value(self, dtype) -> jax.Array:
    """``scale * T``; each filter's scale snapped on its own grid (exact landing)."""
    return core.scaled_assignment(self.scale, self.assignment, dtype)


def f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def check_range(name, value, low, high=math.inf, *, low_open=False):
  """Raises ``ValueError`` naming ``name`` if a concrete ``value`` is out of range.

  The core's check (:func:`ec2t_jax._src.core.check_range`): traced values are
  not checked here.
  """
  core.check_range(name, value, core.Range(low, high, low_open))


def segment_masked_mean(segments, values, mask, per_filter: bool) -> jax.Array:
  """Mean of ``values`` where ``mask`` holds, per layer (per filter) of ``segments``
  (``_src/core/segments.py``); 0 where the mask is empty."""
  total = segments.sum(jnp.where(mask, values, 0.0), per_filter)
  count = segments.sum(mask, per_filter)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def threshold_assign(weights, threshold) -> jax.Array:
  """Ternary assignment by a symmetric threshold.

  .. math:: a_i = \\mathrm{sign}(W_i) \\, [\\, |W_i| > \\Delta \\,]

  Args:
    weights: weights, any shape.
    threshold: ``Delta >= 0``, a scalar or anything broadcasting against
      ``weights`` (e.g. one value per output filter).

  Returns:
    ``int8`` assignment in ``{-1, 0, 1}`` of ``weights``' shape.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import threshold_assign
    >>> threshold_assign(jnp.array([0.5, -0.1, -0.4]), 0.2)
    Array([ 1,  0, -1], dtype=int8)
  """
  w = f32(weights)
  keep = jnp.abs(w) > f32(threshold)
  return jnp.where(keep, jnp.sign(w), 0.0).astype(jnp.int8)
