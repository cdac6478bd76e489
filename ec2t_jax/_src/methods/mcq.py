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
  >>> import jax.numpy as jnp
  >>> from ec2t_jax._src.methods.mcq import mcq_hits  # internal
  >>> hits, scale = mcq_hits(jnp.array([0.5, -0.3, 0.2, 0.0]), 4, 0.5)
  >>> hits, scale
  (Array([ 2, -1,  1,  0], dtype=int32), Array(0.25, dtype=float32))
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ec2t_jax._src import core
from ec2t_jax._src.core import trees
from ec2t_jax._src.methods._support import grids
from ec2t_jax._src.methods._support import registry


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


# ---------------------------------------------------------------------------
# MCQ as a method of the shared core: one-shot (``mcq``) and training.

_quantize = jax.jit(mcq_quantize, static_argnames="per_neuron")


class MCQLeaf(NamedTuple):
  """State of one MCQ leaf.

  Attributes:
    latent: full-precision weights (float32); training moves them.
    hits: int32 signed hit counts ``q``.
    scale: float32 scale, a scalar or one per output neuron (last axis).
    key: the leaf's sampling key (``jax.random.key_data``), kept so that
      training re-samples with the same offsets.
  """
  latent: jax.Array
  hits: jax.Array
  scale: jax.Array
  key: jax.Array

  def value(self, dtype) -> jax.Array:
    """``q * scale`` with the scale snapped so that ``apply_updates`` lands exactly."""
    reference = self.scale * jnp.maximum(jnp.max(jnp.abs(self.hits), axis=tuple(
        range(self.hits.ndim - 1)) if self.scale.ndim else None), 1)
    scale = core.snap_to_grid(self.scale, dtype, reference=reference)
    return mcq_dequantize(self.hits, scale, dtype)

  def instant_value(self, dtype) -> jax.Array:
    """``q * scale`` as :func:`mcq` returns it (unsnapped)."""
    return mcq_dequantize(self.hits, self.scale, dtype)

  def describe(self) -> dict:
    return {"method": "MCQ", "mode": "hit counts", "scale": jnp.mean(self.scale)}

  def codes(self) -> jax.Array:
    """The hit counts: their entropy is the layer's information (scales aside)."""
    return self.hits


class MCQHyper(NamedTuple):
  """MCQ's numeric hyperparameter: ``K``, samples per weight."""
  samples_per_weight: Any = 1.0


HYPER_RANGES = {"samples_per_weight": core.Range(0.0, low_open=True)}


def _leaf_keys(key):
  """The tree-level hook: one key per leaf of the whole tree, as :func:`mcq` splits them."""

  def prepare(params, selection, hyper) -> core.TreeInfo:
    del selection, hyper
    flat, _ = jax.tree_util.tree_flatten_with_path(trees.pure_tree(params))
    keys = jax.random.split(key, len(flat))
    return core.TreeInfo(leaf_info={trees.path_to_str(p): k for (p, _), k in zip(flat, keys)})

  return prepare


def quantizer(samples_per_weight: float = 1.0, *, key: jax.Array, per_neuron: bool = False,
              selection=None) -> core.Quantizer:
  """MCQ as a :class:`~core.Quantizer`: ``.instant(params)`` is :func:`mcq`;
  ``.transform()`` trains the latent weights straight through, re-sampling
  each step with the leaf's own offsets."""
  samples = check_samples(samples_per_weight)

  def init_leaf(param, ctx, hyper) -> MCQLeaf:
    q, scales = _quantize(param, hyper.samples_per_weight, ctx.info, per_neuron=per_neuron)
    return MCQLeaf(jnp.asarray(param, jnp.float32), q, scales, jax.random.key_data(ctx.info))

  def step_leaf(update, leaf: MCQLeaf, ctx, hyper, phase) -> MCQLeaf:
    del ctx, phase
    latent = leaf.latent + update
    q, scales = mcq_quantize(latent, hyper.samples_per_weight,
                             jax.random.wrap_key_data(leaf.key), per_neuron=per_neuron)
    return MCQLeaf(latent, q, scales, leaf.key)

  method = core.Method("mcq", init_leaf, step_leaf, prepare=_leaf_keys(key))
  return core.Quantizer(method, MCQHyper(samples), HYPER_RANGES, selection)


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
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import mcq
    >>> params = {"a": jnp.ones((3, 3)), "b": jnp.arange(12.).reshape(3, 4),
    ...           "c": jnp.ones((4, 2))}
    >>> quantized = mcq(params, 2.0, key=jax.random.key(0))
    >>> int(jnp.sum(quantized["b"] != 0)) <= 12
    True
  """
  from ec2t_jax._src.methods._support import common  # pylint: disable=g-import-not-at-top
  chosen = common.selected_leaves(params, selection)
  for (path, leaf), picked in zip(jax.tree_util.tree_leaves_with_path(params), chosen):
    if picked and not bool(jnp.all(jnp.isfinite(leaf))):  # one inf would make its group NaN
      raise ValueError(f"mcq: leaf {jax.tree_util.keystr(path)} holds non-finite weights "
                       "(NaN or inf); MCQ needs finite weights")
  quantized, state = quantizer(samples_per_weight, key=key, per_neuron=per_neuron,
                               selection=selection).instant(params, return_state=True)
  if not return_integers:
    return quantized
  _, treedef = jax.tree.flatten(params)
  states, _ = core.flat_leaf_states(state.resolved_leaves())
  return quantized, treedef.unflatten(
      [None if leaf is None else (leaf.hits, leaf.scale) for leaf in states])


registry.register_method(registry.MethodSpec(
    name="mcq", kind="one_shot", quantizer=quantizer, one_shot=mcq, inputs=("key",),
    knobs={"samples_per_weight": registry.Knob(core.Range(0.0, low_open=True),
                                               (0.25, 0.5, 1.0, 2.0), traced=True,
                                               doc="K: samples per weight"),
           "per_neuron": registry.Knob((True, False), (False, True),
                                       doc="one scale per output neuron")},
    grid=lambda o: grids.Grid(None, per_filter=o["per_neuron"],
                              leaf_checks=(grids.integer_multiples(o["per_neuron"]),),
                              ternary=False),
    description="Monte Carlo Quantization (Mordido et al. 2019), post-training"))
