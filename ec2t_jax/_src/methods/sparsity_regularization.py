"""Sparsity-inducing regularisation for ternary networks (Faraone et al., 2017).

Examples build their model, params or optimizer state with the fixture
:func:`ec2t_jax.models.small_cnn_example`.

Faraone et al. train in three stages: (1) with L2 plus a regulariser that
pushes weights under the ternarisation threshold, (2) prune the weights that
quantise to zero, (3) retrain the survivors as a ternary network. The paper's
regulariser formula could not be found, so **this library's interpretation**
is a smooth count of the non-zero ternary weights. For one layer with ``n``
weights and TWN's threshold ``Delta = c mean|W|`` (held constant in the
gradient, so the penalty moves weights rather than the threshold):

.. math:: D(W) = \\frac{1}{n} \\sum_i \\sigma\\!\\left(\\frac{|W_i| - \\Delta}{\\tau \\Delta}\\right),
   \\qquad R(W) = \\frac{\\lambda_2}{2} \\sum_i W_i^2 + \\lambda_q D(W),

where ``D`` is the layer's expected density (the fraction of weights above
the threshold, smoothed with temperature ``tau``), summed over the selected
layers. Its gradient ``lambda_q sigma'(z_i) sign(W_i) / (n tau Delta)`` shrinks
``|W_i|`` and is concentrated on weights within a few ``tau Delta`` of the
threshold: weights just above it are pulled under it (they become zeros after
ternarisation), weights far above it (the important ones) are left alone.
Stages 2 and 3 are :func:`quantization_pruning`'s phase switch.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from ec2t_jax._src import core
from ec2t_jax._src.core import segments as segments_lib
from ec2t_jax._src.core import selection as selection_lib
from ec2t_jax._src.methods._support import ternary_ops
from ec2t_jax._src.methods import twn
from ec2t_jax._src.methods._support import grids
from ec2t_jax._src.methods._support import registry
from ec2t_jax._src.core.trees import pure_tree


# Measured on MNIST LeNet-5, 600 steps: of strengths 0 / 3 / 30 / 300, 3 gave the best accuracy
# (benchmarks/RESULTS_methods.md: 73.1% sparse at -0.28 points, against 48.8% at -0.72 without
# the regulariser); the former default 1e-2 is ~300x below it and behaves like plain pruning.
# benchmarks/compare_methods.py sweeps it again (RESULTS_compare.md: 75.7% at -0.38 points).
DEFAULT_STRENGTH = 3.0


def threshold_density(weights, factor=twn.LAYER_FACTOR, temperature=0.25) -> jax.Array:
  """The smooth fraction ``D(W)`` of weights above TWN's threshold.

  Args:
    weights: one layer's weights.
    factor: ``c`` in ``Delta = c mean|W|`` (``> 0``).
    temperature: ``tau > 0``, width of the sigmoid relative to ``Delta``.

  Returns:
    float32 scalar in ``(0, 1)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import threshold_density
    >>> d = threshold_density(jnp.array([1.0, -1.0]), factor=0.5, temperature=0.25)
    >>> round(float(d), 4)  # sigmoid((1 - 0.5) / 0.125) = sigmoid(4)
    0.982
  """
  ternary_ops.check_range("temperature", temperature, 0.0, low_open=True)
  w = ternary_ops.f32(weights)
  delta = jax.lax.stop_gradient(twn.twn_threshold(w, factor))
  scale = ternary_ops.f32(temperature) * delta
  safe = jnp.where(scale > 0, scale, 1.0)
  return jnp.mean(jax.nn.sigmoid((jnp.abs(w) - delta) / safe))


def sparsity_regularizer(
    l2: float = 0.0,
    strength: float = DEFAULT_STRENGTH,
    *,
    factor: float = twn.LAYER_FACTOR,
    temperature: float = 0.25,
    selection: selection_lib.SelectionLike = None,
) -> Callable[..., jax.Array]:
  """Stage 1 of Faraone et al.: the loss term ``R`` (module docstring).

  Add it to the training loss of the full-precision model; it applies to the
  leaves ``selection`` picks (by default the paper's rule: every kernel but the
  first and the last), the same leaves :func:`quantization_pruning` ternarises.

  Args:
    l2: ``lambda_2 >= 0``, the L2 coefficient (``lambda_2 / 2 sum W^2``).
    strength: ``lambda_q >= 0``, weight of the summed layer densities (the
      default, 3, is the value measured to work on MNIST LeNet-5 with a
      cross-entropy loss: the densities are fractions, so ``lambda_q`` must be
      of the loss's order to move weights).
    factor: ``c > 0`` of TWN's threshold ``Delta = c mean|W|``.
    temperature: ``tau > 0``, the sigmoid's width relative to ``Delta``.
    selection: as in :func:`ternarize_transform`.

  Returns:
    ``regularizer(params) -> float32 scalar``, differentiable with
    ``jax.grad``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from ec2t_jax import sparsity_regularizer
    >>> from ec2t_jax.models import small_cnn_example
    >>> ex = small_cnn_example()  # a small CNN (fixture): ex.model, ex.params, ex.x
    >>> reg = sparsity_regularizer(l2=1e-4, strength=1e-2)
    >>> cross_entropy = optax.softmax_cross_entropy_with_integer_labels
    >>> loss = lambda p, x, y: cross_entropy(ex.model.apply({"params": p}, x), y).mean() + reg(p)
    >>> bool(loss(ex.params, ex.x, jnp.array([3, 7])) > 0)
    True
  """
  ternary_ops.check_range("l2", l2, 0.0)
  ternary_ops.check_range("strength", strength, 0.0)
  ternary_ops.check_range("factor", factor, 0.0, low_open=True)
  ternary_ops.check_range("temperature", temperature, 0.0, low_open=True)
  chosen = selection_lib.as_selection(selection)

  def regularizer(params) -> jax.Array:
    leaves = jax.tree.leaves(pure_tree(params))
    total = jnp.zeros((), jnp.float32)
    for leaf, plan in zip(leaves, chosen.plan(params)):
      if plan is None:
        continue
      w = ternary_ops.f32(leaf)
      total += 0.5 * l2 * jnp.sum(jnp.square(w))
      total += strength * threshold_density(w, factor, temperature)
    return total

  return regularizer


# ---------------------------------------------------------------------------
# Stages 2 and 3: quantization pruning and retraining of the survivors.


class PrunedTernaryLeaf(NamedTuple):
  """State of one leaf of :func:`quantization_pruning`.

  Attributes:
    latent: latent weights ``W`` (float32); pruned ones are held at 0.
    mask: bool, the survivors (all True before pruning).
    pruned: bool scalar, whether stage 2 has happened.
    scale: ``alpha``, mean ``|W|`` of the survivors (float32 scalar).
  """
  latent: jax.Array
  mask: jax.Array
  pruned: jax.Array
  scale: jax.Array

  def value(self, dtype) -> jax.Array:
    """Before pruning ``W``; after, ``alpha sign(W)`` on the survivors, 0 elsewhere."""
    alpha = core.snap_to_grid(self.scale, dtype, reference=self.scale)
    ternary = alpha * jnp.sign(self.latent) * self.mask
    return jnp.where(self.pruned, ternary, self.latent).astype(dtype)

  def describe(self) -> dict:
    return {"method": "Faraone", "mode": "ternary", "scale": self.scale,
            "pruned": self.pruned}


class PruningHyper(NamedTuple):
  """The pruning threshold factor: ``Delta = factor mean|W|`` at stage 2."""
  factor: Any = twn.LAYER_FACTOR


_HYPER_RANGES = {"factor": core.Range(0.0, low_open=True)}


def pruning_method() -> core.Method:
  """Faraone et al.'s stages as one :class:`~core.Method` with a phase switch."""

  def init_leaf(param, ctx, hyper) -> PrunedTernaryLeaf:
    del ctx
    latent = ternary_ops.f32(param)
    return PrunedTernaryLeaf(latent, jnp.ones(latent.shape, bool), jnp.asarray(False),
                             jnp.zeros((), jnp.float32))

  def step_leaf(update, leaf: PrunedTernaryLeaf, ctx, hyper: PruningHyper, phase):
    segments = segments_lib.of(ctx)
    prune_now = (phase >= 1) & ~leaf.pruned
    threshold = twn.twn_threshold(leaf.latent, hyper.factor, segments=segments)
    survivors = jnp.abs(leaf.latent) > segments.expand(threshold)
    mask = jnp.where(segments.expand(prune_now), survivors, leaf.mask)
    pruned = leaf.pruned | prune_now
    latent = jnp.where(mask, leaf.latent + update, 0.0)
    scale = ternary_ops.segment_masked_mean(segments, jnp.abs(latent), mask & (latent != 0),
                                            per_filter=False)
    return PrunedTernaryLeaf(latent, mask, pruned, jnp.where(pruned, scale, 0.0))

  return core.Method("quantization_pruning", init_leaf, step_leaf, flat=True)


def quantization_pruning(factor=twn.LAYER_FACTOR, *,
                         selection: selection_lib.SelectionLike = None):
  """Stages 2 and 3 of Faraone et al. as the last transformation of an optax chain.

  Phase 0 (stage 1): the params are the full-precision latent weights (the
  update passes through, ``W += u``); train them with
  :func:`sparsity_regularizer` added to the loss. ``ec2t.set_phase(opt_state,
  1)`` switches to stage 2 + 3: at the next update each selected layer prunes
  the weights that TWN's threshold ``Delta = factor mean|W|`` quantises to zero
  (for good), and from then on the params hold the ternary
  ``alpha sign(W)`` on the survivors, ``alpha`` their mean ``|W|``, while the
  survivors retrain with the identity straight-through step ``W += u`` (they
  may change sign but not become zeros).

  Args:
    factor: ``> 0``, the pruning threshold factor (0.7, TWN's).
    selection: which leaves; use the same as for the regulariser.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`QuantizerState`
    whose leaves are :class:`PrunedTernaryLeaf`.

  Example:
    >>> import optax
    >>> from ec2t_jax import quantization_pruning, set_phase, sparsity_regularizer
    >>> from ec2t_jax.models import small_cnn_example
    >>> params = small_cnn_example().params  # a small CNN (fixture)
    >>> reg = sparsity_regularizer(l2=1e-4, strength=1e-2)
    >>> tx = optax.chain(optax.adam(1e-3), quantization_pruning())
    >>> opt_state = tx.init(params)
    >>> # ... train with loss + reg(params), then:
    >>> opt_state = set_phase(opt_state, 1)   # prune, retrain ternary
  """
  return quantizer(factor, selection=selection).transform()


def quantizer(factor=twn.LAYER_FACTOR, *,
              selection: selection_lib.SelectionLike = None) -> core.Quantizer:
  """Faraone et al.'s stages 2 and 3 as a :class:`~core.Quantizer` (see :func:`quantization_pruning`)."""
  return core.Quantizer(pruning_method(), PruningHyper(factor), _HYPER_RANGES, selection)


registry.register_method(registry.MethodSpec(
    name="faraone", kind="train", quantizer=quantizer, transform=quantization_pruning,
    knobs={"factor": registry.Knob(core.Range(0.0, low_open=True),
                                   (0.5, 0.7, 0.9), traced=True,
                                   doc="pruning threshold Delta = factor mean|W|")},
    grid=lambda o: grids.ternary_grid(), last_phase=lambda o, layers: 1,
    description="Faraone et al.: phase 0 regularised full precision, phase 1 pruned ternary",
    regularizer=sparsity_regularizer,
    regularizer_knobs={
        "strength": registry.Knob(core.Range(0.0), (0.3, 1.0, 3.0, 10.0, 30.0),
                                  doc="lambda_q, weight of the summed layer densities"),
        "l2": registry.Knob(core.Range(0.0), (0.0,), doc="lambda_2 of the L2 term"),
        "temperature": registry.Knob(core.Range(0.0, low_open=True), (0.25,),
                                     doc="width of the density's sigmoid, relative to Delta")}))
