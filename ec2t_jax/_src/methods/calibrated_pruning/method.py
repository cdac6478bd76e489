"""Calibrated pruning as a method of the shared core (one-shot and training).

:func:`~ec2t_jax.prune_calibrated` (``calibrated_pruning.py``) is a tree-level
algorithm: one global threshold over all selected kernels, then per-layer
calibration on data. Here it is the method's ``prepare`` hook, so the same
:class:`~core.Quantizer` serves one-shot use (``.instant(params)`` returns
exactly what ``prune_calibrated`` returns, corrected biases included) and
training (``.transform()``: the pruned kernels' survivors retrain, the mask
stays, as jaxpruner's updater keeps its masks).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ec2t_jax._src import core
from ec2t_jax._src.core import trees
from ec2t_jax._src.methods.calibrated_pruning import pruning as calibrated_pruning
from ec2t_jax._src.methods._support import common
from ec2t_jax._src.methods._support import grids
from ec2t_jax._src.methods._support import registry


class PrunedLeaf(NamedTuple):
  """State of one calibrated-pruning leaf.

  Attributes:
    latent: the calibrated kernel (float32; exactly the one-shot result), then
      its retrained survivors.
    mask: bool, the survivors.
  """
  latent: jax.Array
  mask: jax.Array

  def value(self, dtype) -> jax.Array:
    """The survivors (snapped for exact landing), +0.0 where pruned."""
    kept = core.snap_to_grid(self.latent, dtype, jnp.max(jnp.abs(self.latent)))
    return jnp.where(self.mask, kept, 0.0).astype(dtype)

  def instant_value(self, dtype) -> jax.Array:
    """The kernel :func:`~ec2t_jax.prune_calibrated` returns, bitwise."""
    return self.latent.astype(dtype)

  def describe(self) -> dict:
    return {"method": "Calibrated pruning", "mode": "pruned", "kept": jnp.mean(self.mask)}


class PruneHyper(NamedTuple):
  """No traced hyperparameters: the pruning happens once, in ``prepare``."""


def quantizer(apply_fn: Callable, calibration_data: Any, sparsity: float = 0.5, *,
              selection=None, steps_per_level: Optional[int] = None,
              tuning_iterations: int = calibrated_pruning.POT_TUNING_ITERATIONS,
              steps_per_iteration: int = calibrated_pruning.POT_STEPS_PER_ITERATION,
              tuning_batch_size: int = calibrated_pruning.POT_BATCH_SIZE, seed: int = 0,
              weight_learning_rate: float = 1e-5, bias_learning_rate: float = 1e-4,
              ramp: float = 0.1, statistics_correction: str = "pot",
              bias_correction: bool = True, grads_on_loss_increase_only: bool = True,
              keep_best: bool = False) -> core.Quantizer:
  """Calibrated pruning as a :class:`~core.Quantizer`.

  Args:
    apply_fn, calibration_data, sparsity, selection, steps_per_level,
      tuning_iterations, steps_per_iteration, tuning_batch_size, seed,
      weight_learning_rate, bias_learning_rate, ramp, statistics_correction,
      bias_correction, grads_on_loss_increase_only, keep_best: as for :func:`~ec2t_jax.prune_calibrated` (the same
      defaults; the contract suite checks them).

  Returns:
    A quantizer whose ``.instant(params)`` equals ``prune_calibrated(params,
    apply_fn, calibration_data, sparsity, selection=selection, ...)`` with the
    same options.
  """
  calibrated_pruning.check_sparsity(sparsity)
  batches = calibrated_pruning._batches(calibration_data)  # pylint: disable=protected-access
  if not callable(apply_fn):
    raise ValueError(f"apply_fn must be callable (params, x) -> outputs, got {apply_fn!r}")
  steps = steps_per_level
  if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 0):
    raise ValueError(f"steps_per_level must be a non-negative integer or None, got {steps!r}")
  options = dict(steps_per_level=steps_per_level, tuning_iterations=tuning_iterations,
                 steps_per_iteration=steps_per_iteration, tuning_batch_size=tuning_batch_size,
                 seed=seed, weight_learning_rate=weight_learning_rate,
                 bias_learning_rate=bias_learning_rate, ramp=ramp,
                 statistics_correction=statistics_correction, bias_correction=bias_correction,
                 grads_on_loss_increase_only=grads_on_loss_increase_only, keep_best=keep_best)

  def prepare(params, selection, hyper) -> core.TreeInfo:
    del hyper
    pruned = calibrated_pruning.prune_calibrated(params, apply_fn, batches, sparsity,
                                                 selection=selection, **options)
    refined = common.with_forward_order(selection, apply_fn, params, batches[0])
    flat, _ = jax.tree_util.tree_flatten_with_path(trees.pure_tree(pruned))
    values = {trees.path_to_str(p): v for p, v in flat}
    return core.TreeInfo(leaf_info=values, selection=refined, replace=values)

  def init_leaf(param, ctx, hyper) -> PrunedLeaf:
    del param, hyper
    kernel = jnp.asarray(ctx.info)
    return PrunedLeaf(kernel.astype(jnp.float32), kernel != 0)

  def step_leaf(update, leaf: PrunedLeaf, ctx, hyper, phase) -> PrunedLeaf:
    del ctx, hyper, phase
    return leaf._replace(latent=jnp.where(leaf.mask, leaf.latent + update, 0.0))

  method = core.Method("prune", init_leaf, step_leaf, prepare=prepare)
  return core.Quantizer(method, PruneHyper(), {}, selection)


registry.register_method(registry.MethodSpec(
    name="prune", kind="one_shot", quantizer=quantizer,
    one_shot=calibrated_pruning.prune_calibrated, inputs=("apply_fn", "calibration_data"),
    knobs={"sparsity": registry.Knob(core.Range(0.0, 1.0), (0.5, 0.7, 0.8, 0.9),
                                     doc="target fraction of zeros, in [0, 1)"),
           "steps_per_level": registry.Knob(
               core.Range(0.0), (None, 30),
               doc="None: POT's schedule; N: N Adam steps per level and layer (fast)"),
           "tuning_iterations": registry.Knob(core.Range(0.0), doc="POT schedule"),
           "steps_per_iteration": registry.Knob(core.Range(0.0), doc="POT schedule"),
           "tuning_batch_size": registry.Knob(core.Range(1.0), doc="POT schedule"),
           "seed": registry.Knob(core.Range(0.0), doc="seed of POT's batch draws"),
           "weight_learning_rate": registry.Knob(core.Range(0.0)),
           "bias_learning_rate": registry.Knob(core.Range(0.0)),
           "ramp": registry.Knob(core.Range(0.0), (0.0, 0.1)),
           "statistics_correction": registry.Knob(
               calibrated_pruning.STATISTICS_CORRECTIONS, ("pot", "exact"),
               doc="pot: POT's a = std(W)/std(Wm); exact: mean and std restored"),
           "bias_correction": registry.Knob((True, False)),
           "grads_on_loss_increase_only": registry.Knob(
               (True, False), doc="POT: a gradient only when the batch loss rose"),
           "keep_best": registry.Knob((True, False),
                                      doc="keep the best iterate on the pool (else the last)")},
    grid=lambda o: grids.Grid(None, min_sparsity=o["sparsity"], ternary=False),
    description="Post-training pruning with layer-wise calibration (Lazarevich et al. 2021)"))
