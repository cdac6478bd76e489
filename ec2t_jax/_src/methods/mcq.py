"""Monte Carlo Quantization (Mordido, Van Keirsbilck, Keller, 2019): the pure functions.

Post-training, no retraining. Each group of weights (a layer, or one output
neuron) is treated as a distribution ``p_i = |w_i| / sum_j |w_j|`` and
sampled ``N = K n`` times (``K`` samples per weight, ``n`` weights in the
group). A weight's integer value is its signed hit count ``q_i = sign(w_i) h_i``,
and the layer is reconstructed as ``q_i * sum|w| / N``: an unbiased estimate of
``w`` whose precision and sparsity grow with ``K`` (weights never hit are
pruned).

**The library's interpretation** (the paper's exact sampler was not
verified): systematic stratified sampling through the cumulative distribution
``C_i = sum_{j <= i} p_j``, samples ``x_k = (k + xi) / N`` for ``k = 0..N-1``
with one uniform offset ``xi`` per group. Then the hit count has the closed form
``h_i = ceil(N C_i - xi) - ceil(N C_{i-1} - xi)`` (samples in ``[C_{i-1}, C_i)``),
so a layer costs ``O(n)`` time and memory whatever ``N`` is.

Test vector (``w = [0.5, -0.3, 0.2, 0]``, ``N = 4``, ``xi = 0.5``): hits
``[2, 1, 1, 0]``, ``q = [2, -1, 1, 0]``, scale ``0.25``.

Example:
  >>> hits, scale = mcq_hits(jnp.array([0.5, -0.3, 0.2, 0.0]), 4, 0.5)
  >>> hits, scale
  (Array([ 2, -1,  1,  0], dtype=int32), Array(0.25, dtype=float32))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mcq_hits(weights: jax.Array, num_samples, offset) -> tuple[jax.Array, jax.Array]:
  """Signed hit counts and the scale of one group.

  Args:
    weights: the group's weights (any shape; flattened in C order).
    num_samples: ``N``, the number of samples (positive; may be traced).
    offset: ``xi`` in ``[0, 1)``, the systematic sampling offset.

  Returns:
    ``(q, scale)``: int32 ``q = sign(w) * hits`` with the shape of
    ``weights`` and ``sum |q| = N`` (unless all weights are zero, then 0), and
    the float32 scale ``sum|w| / N``; ``q * scale`` reconstructs the group.
  """
  magnitude = jnp.abs(weights.reshape(-1)).astype(jnp.float32)
  total = jnp.sum(magnitude)
  cumulative = jnp.cumsum(magnitude)
  # Divide by the last entry (not ``total``) so that C_n is exactly 1.
  cumulative = cumulative / jnp.where(cumulative[-1] > 0, cumulative[-1], 1.0)
  n = jnp.asarray(num_samples, jnp.float32)
  upper = jnp.ceil(n * cumulative - offset)
  lower = jnp.concatenate([jnp.zeros((1,), jnp.float32) + jnp.ceil(-offset), upper[:-1]])
  hits = jnp.where(total > 0, upper - lower, 0.0).astype(jnp.int32)
  signed = jnp.where(weights.reshape(-1) < 0, -hits, hits).reshape(weights.shape)
  return signed, (total / n).astype(jnp.float32)


def mcq_quantize(weights: jax.Array, samples_per_weight, key: jax.Array, *,
                 per_neuron: bool = False) -> tuple[jax.Array, jax.Array]:
  """MCQ of one layer: signed hit counts and scales (per layer or per neuron).

  Args:
    weights: the layer's weights; neurons are the last axis (Flax kernels).
    samples_per_weight: ``K``; ``N = ceil(K * n)`` samples per group of ``n``.
    key: ``jax.random`` key for the sampling offsets.
    per_neuron: one group per output neuron (last axis) instead of per layer.

  Returns:
    ``(q, scales)``: int32 ``q`` shaped like ``weights``; ``scales`` a scalar,
    or shape ``(weights.shape[-1],)`` with ``per_neuron``. The dequantized
    layer is ``q * scales``.
  """
  if per_neuron:
    columns = weights.reshape(-1, weights.shape[-1]).T
    n = jnp.ceil(samples_per_weight * columns.shape[1])
    offsets = jax.random.uniform(key, (columns.shape[0],))
    q, scales = jax.vmap(lambda c, o: mcq_hits(c, n, o))(columns, offsets)
    return q.T.reshape(weights.shape), scales
  n = jnp.ceil(samples_per_weight * weights.size)
  return mcq_hits(weights, n, jax.random.uniform(key, ()))


def mcq_dequantize(q: jax.Array, scales: jax.Array, dtype=jnp.float32) -> jax.Array:
  """``q * scales`` in ``dtype`` (+0.0 for unsampled weights)."""
  return (q.astype(jnp.float32) * scales).astype(dtype) + jnp.zeros((), dtype)


def check_samples(samples_per_weight) -> float:
  try:
    if isinstance(samples_per_weight, (str, bytes, bool)):
      raise TypeError
    value = float(samples_per_weight)
  except (TypeError, ValueError):
    raise ValueError(f"samples_per_weight must be a positive number, got "
                     f"{samples_per_weight!r}") from None
  if not value > 0 or value != value or value == float("inf"):
    raise ValueError(f"samples_per_weight must be a positive finite number, got "
                     f"{samples_per_weight!r}")
  return value


def mcq(params, samples_per_weight: float = 1.0, *, key: jax.Array, per_neuron: bool = False,
        selection=None, return_integers: bool = False):
  """Monte Carlo Quantization of a model's selected layers (post-training).

  Every selected leaf (by default the paper's rule: all kernels but the first
  and the last, see :class:`ec2t.Selection`) is replaced by ``q * scale`` from
  :func:`mcq_quantize`; other leaves are returned unchanged. More samples per
  weight give more distinct values (higher precision) and fewer zeros.

  Args:
    params: a parameter tree (Linen params, ``nnx.State``, dict of arrays).
    samples_per_weight: ``K > 0``; each group of ``n`` weights is sampled
      ``ceil(K n)`` times.
    key: a ``jax.random`` key; the same key gives the same result.
    per_neuron: sample each output neuron (last axis) separately.
    selection: which leaves (``None`` = the paper's rule, or rules).
    return_integers: also return the integer form.

  Returns:
    The quantized params (same structure and dtypes). With
    ``return_integers``, ``(params, integers)`` where ``integers`` has the
    structure of ``params`` with ``(q, scales)`` at selected leaves (int32 hit
    counts and float32 scales, ``q * scales`` = the quantized leaf) and
    ``None`` elsewhere.

  Raises:
    ValueError: if a selected leaf holds NaN or infinity (naming the leaf), or
      ``samples_per_weight`` is not a positive finite number.

  Example:
    >>> params = {"a": jnp.ones((3, 3)), "b": jnp.arange(12.).reshape(3, 4),
    ...           "c": jnp.ones((4, 2))}
    >>> quantized = mcq(params, 2.0, key=jax.random.key(0))
    >>> int(jnp.sum(quantized["b"] != 0)) <= 12
    True
  """
  from ec2t_jax._src.methods import common  # pylint: disable=g-import-not-at-top
  samples = check_samples(samples_per_weight)
  chosen = common.selected_leaves(params, selection)
  for (path, leaf), picked in zip(jax.tree_util.tree_leaves_with_path(params), chosen):
    if picked and not bool(jnp.all(jnp.isfinite(leaf))):  # one inf would make its group NaN
      raise ValueError(f"mcq: leaf {jax.tree_util.keystr(path)} holds non-finite weights "
                       "(NaN or inf); MCQ needs finite weights")
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  quantize = jax.jit(mcq_quantize, static_argnames="per_neuron")
  out, integers = [], []
  for leaf, chosen_leaf, leaf_key in zip(leaves, chosen, keys):
    if not chosen_leaf:
      out.append(leaf)
      integers.append(None)
      continue
    q, scales = quantize(leaf, samples, leaf_key, per_neuron=per_neuron)
    out.append(mcq_dequantize(q, scales, leaf.dtype))
    integers.append((q, scales))
  quantized = treedef.unflatten(out)
  if return_integers:
    return quantized, treedef.unflatten(integers)
  return quantized
