"""Post-training pruning via layer-wise calibration (Lazarevich, Kozlov, Malinin, 2021).

Examples build their model, params or optimizer state with the fixture
:func:`ec2t_jax.models.small_cnn_example`.

No training loop and no labels: only forward passes of the user's model on a
few hundred calibration inputs (real, or :func:`fractal_images` for the
data-free mode). At each sparsity level of a two-level ramp
(``target - 0.1``, then ``target``):

1. **Global magnitude pruning over L2-normalised layers**: every selected
   kernel is scored by ``|w| / ||W||_2`` and one threshold at the level's
   quantile over all of them prunes the smallest scores, so per-layer
   sparsity varies (:func:`global_magnitude_masks`).
2. **Per-output-channel statistics correction**: the surviving weights of
   each output channel are scaled and shifted, ``v -> a v + b``; by default
   as OpenVINO POT's ``MagnitudeSparsity`` does it,
   ``a = std(W) / std(W m)``, ``b = mean(W) - mean(a W m)``
   (:func:`pot_channel_statistics`), or (``statistics_correction="exact"``,
   this library's earlier reading) so that the channel, zeros included, has
   the dense channel's mean and standard deviation exactly
   (:func:`correct_channel_statistics`).
3. **Bias correction**: the layer's bias gets the mean (over the calibration
   set and positions) of the dense minus the pruned layer's output, on the
   full-precision model's inputs to that layer (:func:`bias_offset`).
4. **Layer-wise calibration**: each pruned layer alone (kernel and bias) is
   tuned with Adam (weights lr 1e-5, bias lr 1e-4) to match the dense
   layer's output on those inputs; gradients and updates are masked so the
   sparsity pattern stays. The default is OpenVINO POT's
   ``SparseModelFinetuning`` (:func:`make_pot_calibrator`): per level and
   layer, 30 tuning iterations, each of 40 Adam steps on a batch of 50 inputs
   drawn from the calibration pool (300 images in the paper): 1,200 steps; a
   step's gradient is computed only when the batch loss did not decrease
   since the previous step (``calculate_grads_on_loss_increase_only``; Adam
   still steps, on a zero gradient, otherwise: :func:`pot_tuning_step`), and
   the last iterate is kept. ``keep_best=True`` (with
   ``grads_on_loss_increase_only=False``, this library's earlier schedule)
   keeps the iterate with the smallest error on the whole pool instead. The fast schedule
   (``steps_per_level=N``, :func:`make_calibrator`) takes ``N`` steps over the
   calibration batches in turn (for tests and quick runs).

Steps 2 and 3 are this library's reading of POT's statistics and fast bias
correction (per-channel mean/std of the weights; per-channel mean output shift
on calibration data); POT's activation-channel alignment is not implemented.

Layers are Flax-style: the kernel's last axis and the layer output's last
axis are the output channels; the bias is the sibling leaf named ``bias``
(a layer without one skips bias correction and tunes only its kernel).

Example:
  >>> import jax
  >>> from ec2t_jax import fractal_images, prune_calibrated
  >>> from ec2t_jax.models import small_cnn_example
  >>> ex = small_cnn_example()  # a small CNN (fixture): ex.model, ex.params
  >>> apply_fn = lambda p, x: ex.model.apply({"params": p}, x)
  >>> images = fractal_images(300, (8, 8, 1), jax.random.key(0))  # doctest: +SKIP
  >>> pruned = prune_calibrated(ex.params, apply_fn, images, sparsity=0.5)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ec2t_jax._src.core import trees
from ec2t_jax._src.methods._support import common
from ec2t_jax._src.methods._support import layer_capture


# ---------------------------------------------------------------- pure functions


def check_sparsity(sparsity, name: str = "sparsity") -> float:
  """Validates a sparsity in ``[0, 1)``."""
  try:
    value = float(sparsity)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}") from None
  if not 0.0 <= value < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {sparsity!r}")
  return value


def sparsity_levels(sparsity: float, ramp: float = 0.1) -> tuple[float, ...]:
  """The two-level ramp ``(sparsity - ramp, sparsity)``, or ``(sparsity,)`` when too low."""
  return (sparsity - ramp, sparsity) if sparsity - ramp > 0 else (sparsity,)


def global_magnitude_masks(kernels: Sequence[jax.Array], sparsity: float) -> list[jax.Array]:
  """Keep-masks of one global magnitude threshold over L2-normalised layers.

  The ``round(sparsity * total)`` weights with the smallest ``|w| / ||W||_2``
  over all ``kernels`` are pruned (ties: the earlier weight first).

  Args:
    kernels: the layers' weights.
    sparsity: fraction of all their weights to prune, in ``[0, 1)``.

  Returns:
    Boolean masks (True = kept), one per kernel, with its shape.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax._src.methods.calibrated_pruning.pruning import global_magnitude_masks  # internal
    >>> [m.tolist() for m in global_magnitude_masks(
    ...     [jnp.array([3., 4.]), jnp.array([1., 0., 0.1])], 0.4)]
    [[True, True], [True, False, False]]
  """
  scores = [jnp.abs(k).reshape(-1) / jnp.maximum(jnp.linalg.norm(k.reshape(-1)), 1e-30)
            for k in kernels]
  flat = jnp.concatenate(scores)
  prune = int(round(sparsity * flat.size))
  order = jnp.argsort(flat, stable=True)
  keep = jnp.ones((flat.size,), bool).at[order[:prune]].set(False)
  masks, start = [], 0
  for k in kernels:
    masks.append(keep[start:start + k.size].reshape(k.shape))
    start += k.size
  return masks


STATISTICS_CORRECTIONS = ("pot", "exact", "none")
POT_STD_EPS = 1e-9


def pot_channel_statistics(weights: jax.Array, mask: jax.Array) -> jax.Array:
  """POT's per-output-channel correction of the survivors (``statistics_correction="pot"``).

  OpenVINO POT's ``MagnitudeSparsity._sparsify_node`` (``correct_weight_bias``),
  per output channel (the last axis here; POT's kernels have it first) of the
  current weights ``W`` and keep-mask ``m``:

  .. math:: a = \\frac{\\mathrm{std}(W)}{\\mathrm{std}(W m) + 10^{-9}}, \\quad
     b = \\mathrm{mean}(W) - \\mathrm{mean}(a W m), \\quad
     W' = (a W + b) m.

  The channel's mean and std come back only approximately (the zeros are
  not shifted); :func:`correct_channel_statistics` restores them exactly.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax._src.methods.calibrated_pruning.pruning import pot_channel_statistics  # internal
    >>> w = jnp.array([[1.0], [-1.0], [0.1], [-0.1]])
    >>> pot_channel_statistics(w, jnp.abs(w) > 0.5).ravel()  # a = std(W) / std(W m)
    Array([ 1.0049876, -1.0049876,  0.       ,  0.       ], dtype=float32)
  """
  out = weights.shape[-1]
  w = weights.reshape(-1, out).astype(jnp.float32)
  keep = mask.reshape(-1, out)
  sparse = jnp.where(keep, w, 0.0)
  a = jnp.std(w, axis=0) / (jnp.std(sparse, axis=0) + POT_STD_EPS)
  b = jnp.mean(w, axis=0) - jnp.mean(sparse * a, axis=0)
  corrected = jnp.where(keep, w * a + b, 0.0)
  return corrected.reshape(weights.shape).astype(weights.dtype)


def correct_channel_statistics(weights: jax.Array, mask: jax.Array, dense: jax.Array) -> jax.Array:
  """Scales and shifts each output channel's survivors to the dense channel's mean and std.

  Per channel (last axis) with ``n`` entries, ``m`` survivors ``v`` (mean
  ``v_bar``, variance ``s_v^2``) and dense mean ``mu`` and variance
  ``sigma^2``: the survivors become ``a v + b`` with survivor mean
  ``t = n mu / m`` and ``a^2 s_v^2 = n (sigma^2 + mu^2) / m - t^2``, so that
  the channel with its zeros has mean ``mu`` and variance ``sigma^2``. When
  that variance cannot be reached (right side <= 0, fewer than two
  survivors, or constant survivors) only the mean is restored (``a = 1``).

  Args:
    weights: current weights (pruned entries are ignored).
    mask: keep-mask, same shape.
    dense: the dense layer's weights whose statistics are restored.

  Returns:
    The corrected weights, exactly 0 where ``mask`` is False.
  """
  out = weights.shape[-1]
  w = weights.reshape(-1, out).astype(jnp.float32)
  keep = mask.reshape(-1, out)
  d = dense.reshape(-1, out).astype(jnp.float32)
  n = w.shape[0]
  m = keep.sum(0).astype(jnp.float32)
  mu, var = d.mean(0), d.var(0)
  safe_m = jnp.maximum(m, 1.0)
  v_mean = jnp.where(keep, w, 0).sum(0) / safe_m
  v_var = jnp.where(keep, (w - v_mean) ** 2, 0).sum(0) / safe_m
  t = n * mu / safe_m
  rhs = n * (var + mu ** 2) / safe_m - t ** 2
  ok = (m >= 2) & (v_var > 0) & (rhs > 0)
  a = jnp.where(ok, jnp.sqrt(jnp.where(ok, rhs, 1.0) / jnp.where(ok, v_var, 1.0)), 1.0)
  b = jnp.where(m > 0, t - a * v_mean, 0.0)
  corrected = jnp.where(keep, a * w + b, 0.0)
  return corrected.reshape(weights.shape).astype(weights.dtype)


def bias_offset(dense_outputs: Sequence[jax.Array],
                    pruned_outputs: Sequence[jax.Array]) -> jax.Array:
  """Per output channel (last axis), the mean of ``dense - pruned`` over all batches and positions."""
  total = sum(jnp.sum((d - p).reshape(-1, d.shape[-1]).astype(jnp.float32), 0)
              for d, p in zip(dense_outputs, pruned_outputs))
  count = sum(math.prod(d.shape[:-1]) for d in dense_outputs)
  return total / count


def layer_output_error(call: layer_capture.LayerCall, kernel, bias, targets) -> jax.Array:
  """Mean squared error of the layer's output (plus bias) against ``targets``, over all batches."""
  errors = [jnp.mean((call.output(x, kernel) + (0.0 if bias is None else bias) - t) ** 2)
            for x, t in zip(call.inputs, targets)]
  return sum(errors) / len(errors)


def make_calibrator(call: layer_capture.LayerCall, has_bias: bool, *, steps: int,
                    weight_learning_rate: float, bias_learning_rate: float) -> Callable:
  """A jitted ``(kernel, bias, mask, targets) -> (kernel, bias, (before, after))`` for one layer.

  Adam on the layer's output MSE, one step per calibration batch in turn;
  kernel gradients are multiplied by ``mask`` and the kernel re-masked after
  every update. The returned iterate is the one with the smallest error over
  all batches among all visited, the starting point included, so ``after <=
  before``. Built once per layer and reused across sparsity levels (one
  compilation).
  """
  tx = optax.multi_transform(
      {"kernel": optax.adam(weight_learning_rate), "bias": optax.adam(bias_learning_rate)},
      {"kernel": "kernel", "bias": "bias"})
  count = len(call.inputs)

  def error(variables, inputs, targets, batch):
    b = variables["bias"] if has_bias else 0.0
    return jnp.mean((call.output(inputs[batch], variables["kernel"]) + b - targets[batch]) ** 2)

  def total_error(variables, inputs, targets):
    return sum(error(variables, inputs, targets, i) for i in range(count)) / count

  @jax.jit
  def run(variables, mask, inputs, targets):
    state = tx.init(variables)
    choose = lambda better, new, old: jax.tree.map(lambda n, o: jnp.where(better, n, o), new, old)

    def step(carry, i):
      variables, state, best, best_error = carry
      current = total_error(variables, inputs, targets)
      better = current < best_error
      best, best_error = choose(better, variables, best), jnp.where(better, current, best_error)
      grads = jax.grad(lambda v: jax.lax.switch(
          i % count, [lambda v, b=b: error(v, inputs, targets, b) for b in range(count)], v))(
              variables)
      grads = {"kernel": grads["kernel"] * mask,
               "bias": grads["bias"] if has_bias else jnp.zeros_like(grads["bias"])}
      updates, state = tx.update(grads, state, variables)
      variables = optax.apply_updates(variables, updates)
      variables["kernel"] = jnp.where(mask, variables["kernel"], 0.0)
      return (variables, state, best, best_error), current

    start_error = total_error(variables, inputs, targets)
    (last, _, best, best_error), _ = jax.lax.scan(
        step, (variables, state, variables, start_error), jnp.arange(steps))
    last_error = total_error(last, inputs, targets)
    best = choose(last_error < best_error, last, best)
    return best, start_error, jnp.minimum(best_error, last_error)

  def calibrate(kernel, bias, mask, targets):
    variables = {"kernel": kernel, "bias": bias if has_bias else jnp.zeros((), kernel.dtype)}
    best, before, after = run(variables, mask, tuple(call.inputs), tuple(targets))
    return best["kernel"], (best["bias"] if has_bias else None), (before, after)

  return calibrate


POT_TUNING_ITERATIONS = 30
POT_STEPS_PER_ITERATION = 40
POT_BATCH_SIZE = 50


def _layer_optimizer(weight_learning_rate, bias_learning_rate):
  return optax.multi_transform(
      {"kernel": optax.adam(weight_learning_rate), "bias": optax.adam(bias_learning_rate)},
      {"kernel": "kernel", "bias": "bias"})


def pot_tuning_step(loss_fn: Callable, tx, variables, state, previous_loss, mask,
                    has_bias: bool, *, increase_only: bool = True):
  """One of POT's layer-tuning steps: ``(variables, state, loss)`` after it.

  OpenVINO POT's ``LayerwiseModelFinetuning._fine_tuning_step`` with
  ``calculate_grads_on_loss_increase_only``: the batch loss ``L`` is
  computed; its gradient (kernel gradient masked) is used only if
  ``L >= previous_loss``, else the gradient is zero, and the optimizer
  steps either way (Adam then moves by its momentum alone); the kernel is
  re-masked. With ``increase_only=False`` every step uses the gradient.

  Returns:
    The new variables and optimizer state, and ``L`` (the next step's
    ``previous_loss``).
  """
  loss, grads = jax.value_and_grad(loss_fn)(variables)
  use = (loss >= previous_loss) if increase_only else jnp.asarray(True)
  grads = {"kernel": jnp.where(use, grads["kernel"] * mask, 0.0),
           "bias": jnp.where(use & has_bias, grads["bias"], 0.0)}
  updates, state = tx.update(grads, state, variables)
  variables = optax.apply_updates(variables, updates)
  variables["kernel"] = jnp.where(mask, variables["kernel"], 0.0)
  return variables, state, loss


def make_pot_calibrator(call: layer_capture.LayerCall, has_bias: bool, *,
                        iterations: int = POT_TUNING_ITERATIONS,
                        steps_per_iteration: int = POT_STEPS_PER_ITERATION,
                        batch_size: int = POT_BATCH_SIZE, weight_learning_rate: float = 1e-5,
                        bias_learning_rate: float = 1e-4, seed: int = 0,
                        grads_on_loss_increase_only: bool = True,
                        keep_best: bool = False) -> Callable:
  """POT's schedule: ``iterations`` x ``steps_per_iteration`` Adam steps on random sub-batches.

  The calibration batches are pooled; each tuning iteration draws
  ``batch_size`` of the pooled inputs (without replacement, key from
  ``seed`` and the iteration) and takes ``steps_per_iteration`` masked Adam
  steps on them (:func:`pot_tuning_step`: by default a gradient only where
  the batch loss did not decrease, as POT). The last iterate is returned
  (POT), or with ``keep_best`` the one with the smallest error over the whole
  pool, measured after each iteration (the start included, so ``after <=
  before``). Same call signature as :func:`make_calibrator`'s result;
  ``after`` is the returned iterate's error.
  """
  tx = _layer_optimizer(weight_learning_rate, bias_learning_rate)

  def error(variables, inputs, targets):
    b = variables["bias"] if has_bias else 0.0
    return jnp.mean((call.output(inputs, variables["kernel"]) + b - targets) ** 2)

  @jax.jit
  def run(variables, mask, inputs, targets):
    n = inputs.shape[0]
    size = min(batch_size, n)
    choose = lambda better, new, old: jax.tree.map(lambda a, b: jnp.where(better, a, b), new, old)

    def inner(carry, _):
      variables, state, previous, x, t = carry
      variables, state, previous = pot_tuning_step(
          lambda v: error(v, x, t), tx, variables, state, previous, mask, has_bias,
          increase_only=grads_on_loss_increase_only)
      return (variables, state, previous, x, t), None

    def iteration(carry, key):
      variables, state, previous, best, best_error = carry
      idx = jax.random.choice(key, n, (size,), replace=False)
      (variables, state, previous, _, _), _ = jax.lax.scan(
          inner, (variables, state, previous, inputs[idx], targets[idx]), None,
          length=steps_per_iteration)
      current = error(variables, inputs, targets)
      better = (current < best_error) if keep_best else jnp.asarray(True)
      return (variables, state, previous, choose(better, variables, best),
              jnp.where(better, current, best_error)), None

    start = error(variables, inputs, targets)
    keys = jax.random.split(jax.random.key(seed), max(iterations, 1))[:iterations]
    # POT's "previous loss" starts at 0, so the first step always computes a gradient.
    (_, _, _, best, best_error), _ = jax.lax.scan(
        iteration, (variables, tx.init(variables), jnp.zeros((), jnp.float32), variables, start),
        keys)
    return best, start, best_error

  def calibrate(kernel, bias, mask, targets):
    variables = {"kernel": kernel, "bias": bias if has_bias else jnp.zeros((), kernel.dtype)}
    inputs = jnp.concatenate(list(call.inputs), axis=0)
    best, before, after = run(variables, mask, inputs, jnp.concatenate(list(targets), axis=0))
    return best["kernel"], (best["bias"] if has_bias else None), (before, after)

  return calibrate


def calibrate_layer(call: layer_capture.LayerCall, kernel: jax.Array, bias: Optional[jax.Array],
                    mask: jax.Array, targets: Sequence[jax.Array], *, steps: int,
                    weight_learning_rate: float, bias_learning_rate: float):
  """Tunes one layer alone to match ``targets`` (the dense layer's outputs), keeping ``mask``.

  See :func:`make_calibrator`.

  Returns:
    ``(kernel, bias, (error_before, error_after))`` with ``error_after <= error_before``.
  """
  return make_calibrator(call, bias is not None, steps=steps,
                         weight_learning_rate=weight_learning_rate,
                         bias_learning_rate=bias_learning_rate)(kernel, bias, mask, targets)


# ------------------------------------------------------------------ the method


def _batches(calibration_data) -> list[jax.Array]:
  if calibration_data is None:
    raise ValueError("calibration_data must be an array or an iterable of batches, got None")
  if hasattr(calibration_data, "shape"):
    batches = [calibration_data]
  elif isinstance(calibration_data, Iterable):
    batches = list(calibration_data)
  else:
    raise ValueError(f"calibration_data must be an array or an iterable of batches, got "
                     f"{type(calibration_data).__name__}")
  batches = [jnp.asarray(b) for b in batches]
  if not batches or any(b.ndim == 0 or b.shape[0] == 0 for b in batches):
    raise ValueError("calibration_data is empty: pass at least one non-empty batch "
                     "(e.g. 300 images, or fractal_images(300, shape, key))")
  return batches


def _bias_leaf(paths: list[str], kernel_index: int) -> Optional[int]:
  path = paths[kernel_index]
  if not path.endswith("kernel"):
    return None
  target = path[:-len("kernel")] + "bias"
  return next((i for i, p in enumerate(paths) if p == target), None)


def _check_options(apply_fn, steps_per_level) -> None:
  if not callable(apply_fn):
    raise ValueError(f"apply_fn must be callable (params, x) -> outputs, got {apply_fn!r}")
  if steps_per_level is None:
    return
  if (isinstance(steps_per_level, bool) or int(steps_per_level) != steps_per_level
      or steps_per_level < 0):
    raise ValueError(f"steps_per_level must be a non-negative integer or None, got "
                     f"{steps_per_level!r}")


def check_finite(params, batches: Sequence[jax.Array]) -> None:
  """Raises ``ValueError`` naming the first params leaf or calibration batch with NaN/inf."""
  flat, _ = jax.tree_util.tree_flatten_with_path(trees.pure_tree(params))
  for path, leaf in flat:
    value = np.asarray(leaf)
    if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
      raise ValueError(f"params leaf {trees.path_to_str(path)!r} holds non-finite values "
                       f"({int((~np.isfinite(value)).sum())} of {value.size}); prune a model "
                       "with finite weights")
  for i, batch in enumerate(batches):
    value = np.asarray(batch)
    if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
      raise ValueError(f"calibration_data batch {i} holds non-finite values "
                       f"({int((~np.isfinite(value)).sum())} of {value.size})")


class _Layers(NamedTuple):
  """What the pruning loop needs about the selected layers (by leaf index)."""
  leaves: list
  treedef: Any
  paths: list[str]
  indices: list[int]
  calls: dict
  dense: dict
  biases: dict
  targets: dict


def _capture(params, apply_fn, batches, selection):
  """The selection in forward order and each selected kernel's captured layer call."""
  try:
    selection = common.with_forward_order(selection, apply_fn, params, batches[0])
  except Exception as e:  # the user's function: report it, naming the argument
    raise ValueError(f"apply_fn failed on the calibration batch (shape "
                     f"{tuple(batches[0].shape)}): {type(e).__name__}: {e}") from e
  chosen = common.selected_leaves(params, selection)
  flat, _ = jax.tree_util.tree_flatten_with_path(trees.pure_tree(params))
  paths = [trees.path_to_str(p) for p, _ in flat]
  indices = [i for i, c in enumerate(chosen) if c]
  try:
    calls, _ = layer_capture.capture_layer_inputs(apply_fn, params, batches, indices)
  except Exception as e:  # the user's function: report it, naming the argument
    shapes = ", ".join(str(tuple(b.shape)) for b in batches[:3])
    raise ValueError(f"apply_fn failed on the calibration batch (shape {shapes}): "
                     f"{type(e).__name__}: {e}") from e
  missing = [paths[i] for i in indices if i not in calls]
  if missing:
    raise ValueError(f"selected leaves {missing} are not used as the weight of a dense or "
                     "conv layer by apply_fn; choose others with selection=[Rule(...)]")
  return paths, indices, calls


def _dense_targets(call, kernel, bias, path: str) -> list:
  """The dense layer's outputs (plus bias) on its captured inputs."""
  outs = [call.output(x, kernel) for x in call.inputs]
  if outs[0].shape[-1] != kernel.shape[-1]:
    raise ValueError(f"leaf {path!r}: the layer's output channels are not its last axis "
                     f"(output {outs[0].shape}, kernel {kernel.shape})")
  return [o + (0.0 if bias is None else bias) for o in outs]


def _layers(params, apply_fn, batches, selection) -> _Layers:
  """Step 0: capture the selected layers, their biases and the dense targets."""
  paths, indices, calls = _capture(params, apply_fn, batches, selection)
  leaves, treedef = jax.tree.flatten(params)
  dense = {i: jnp.asarray(leaves[i]) for i in indices}
  biases = {}
  for i in indices:
    j = _bias_leaf(paths, i)
    if j is not None and tuple(np.shape(leaves[j])) == (dense[i].shape[-1],):
      biases[i] = j
  targets = {i: _dense_targets(calls[i], dense[i], leaves[biases[i]] if i in biases else None,
                               paths[i]) for i in indices}
  return _Layers(leaves, treedef, paths, indices, calls, dense, biases, targets)


def _prune_layer(layers: _Layers, i: int, kernel, bias, mask, calibrator, *,
                 statistics_correction: str, bias_correction: bool):
  """Steps 1-4 for one layer at one level: mask, statistics, bias, calibration."""
  call, dense = layers.calls[i], layers.dense[i]
  if statistics_correction == "pot":  # from the current weights, pruned entries included
    kernel = pot_channel_statistics(kernel.astype(dense.dtype), mask)
  kernel = jnp.where(mask, kernel, 0.0).astype(dense.dtype)
  if statistics_correction == "exact":
    kernel = correct_channel_statistics(kernel, mask, dense)
  if bias is not None and bias_correction:
    pruned_outs = [call.output(x, kernel) + bias for x in call.inputs]
    bias = (bias + bias_offset(layers.targets[i], pruned_outs)).astype(bias.dtype)
  kernel, bias, errors = calibrator(kernel, bias, mask, layers.targets[i])
  return jnp.where(mask, kernel, 0.0).astype(dense.dtype), bias, errors


def _assemble(layers: _Layers, kernels: dict, new_bias: dict):
  out = list(layers.leaves)
  for i in layers.indices:
    out[i] = kernels[i]
  for i, j in layers.biases.items():
    out[j] = new_bias[i].astype(np.asarray(layers.leaves[j]).dtype)
  return layers.treedef.unflatten(out)


class LayerReport(NamedTuple):
  """One pruned layer: path, sparsity, output error before/after calibration (last level)."""
  path: str
  sparsity: float
  error_before: float
  error_after: float


def prune_calibrated(params, apply_fn: Callable, calibration_data: Union[jax.Array, Iterable],
                     sparsity: float = 0.5, *, selection=None,
                     steps_per_level: Optional[int] = None,
                     tuning_iterations: int = POT_TUNING_ITERATIONS,
                     steps_per_iteration: int = POT_STEPS_PER_ITERATION,
                     tuning_batch_size: int = POT_BATCH_SIZE, seed: int = 0,
                     weight_learning_rate: float = 1e-5, bias_learning_rate: float = 1e-4,
                     ramp: float = 0.1, statistics_correction: str = "pot",
                     bias_correction: bool = True, grads_on_loss_increase_only: bool = True,
                     keep_best: bool = False, return_report: bool = False):
  """Prunes a trained model to ``sparsity`` with layer-wise calibration, post-training.

  See the module docstring for the four steps. Only forward passes of
  ``apply_fn`` run (and small per-layer fits), so a few hundred calibration
  inputs suffice; :func:`fractal_images` stands in for real data.

  Args:
    params: trained parameters (Linen params, ``nnx.State``, a dict...).
    apply_fn: ``apply_fn(params, x)`` returns the model's outputs, e.g.
      ``lambda p, x: model.apply({"params": p}, x)`` or, for NNX,
      ``lambda s, x: nnx.merge(graphdef, s)(x)``.
    calibration_data: an array (one batch) or an iterable of batches.
    sparsity: target fraction of zeros over the selected kernels, in ``[0, 1)``.
    selection: which kernels (``None`` = the paper's rule: all but the first
      and the last, in the forward order traced from ``apply_fn``; or
      :class:`ec2t.Rule`\\ s / a :class:`ec2t.Selection`).
    steps_per_level: ``None`` (default): POT's schedule, ``tuning_iterations``
      x ``steps_per_iteration`` Adam steps on batches of ``tuning_batch_size``
      inputs drawn from the pooled calibration data (30 x 40 on 50, i.e.
      1,200 steps per level and layer; :func:`make_pot_calibrator`). An
      integer ``N``: the fast schedule, ``N`` steps over the calibration
      batches in turn (:func:`make_calibrator`; 0 skips calibration).
    tuning_iterations, steps_per_iteration, tuning_batch_size: POT's schedule.
    seed: seed of the POT schedule's batch draws.
    weight_learning_rate, bias_learning_rate: Adam learning rates.
    ramp: the first level is ``sparsity - ramp`` (skipped when not positive).
    statistics_correction: ``"pot"`` (default, :func:`pot_channel_statistics`),
      ``"exact"`` (:func:`correct_channel_statistics`) or ``"none"``.
    bias_correction: correct biases on the calibration data.
    grads_on_loss_increase_only: POT's step rule (:func:`pot_tuning_step`;
      POT schedule only).
    keep_best: keep the iterate with the smallest pool error instead of the
      last (POT schedule only; the fast schedule always keeps the best).
    return_report: also return a list of :class:`LayerReport`.

  Returns:
    The pruned params (same structure and dtypes; pruned weights are
    exactly ``+0.0``), and with ``return_report`` the per-layer reports.

  Raises:
    ValueError: ``sparsity`` outside ``[0, 1)``, empty ``calibration_data``,
      a params leaf or calibration batch with NaN or inf (named),
      ``apply_fn`` failing on the calibration batch, or a selected leaf that no
      dense/conv layer of the model consumes.
  """
  target = check_sparsity(sparsity)
  if statistics_correction not in STATISTICS_CORRECTIONS:
    raise ValueError(f"statistics_correction must be one of {STATISTICS_CORRECTIONS}, got "
                     f"{statistics_correction!r}")
  batches = _batches(calibration_data)
  _check_options(apply_fn, steps_per_level)
  check_finite(params, batches)
  layers = _layers(params, apply_fn, batches, selection)

  def calibrator(i):
    rates = dict(weight_learning_rate=weight_learning_rate,
                 bias_learning_rate=bias_learning_rate)
    if steps_per_level is not None:  # the fast schedule
      return make_calibrator(layers.calls[i], i in layers.biases, steps=int(steps_per_level),
                             **rates)
    return make_pot_calibrator(layers.calls[i], i in layers.biases, iterations=tuning_iterations,
                               steps_per_iteration=steps_per_iteration,
                               batch_size=tuning_batch_size, seed=seed + i,
                               grads_on_loss_increase_only=grads_on_loss_increase_only,
                               keep_best=keep_best, **rates)

  calibrators = {i: calibrator(i) for i in layers.indices}
  kernels = dict(layers.dense)
  new_bias = {i: jnp.asarray(layers.leaves[j]) for i, j in layers.biases.items()}
  reports = []
  for level in sparsity_levels(target, ramp):
    masks = dict(zip(layers.indices,
                     global_magnitude_masks([kernels[i] for i in layers.indices], level)))
    reports = []
    for i in layers.indices:
      kernels[i], bias, (before, after) = _prune_layer(
          layers, i, kernels[i], new_bias.get(i), masks[i], calibrators[i],
          statistics_correction=statistics_correction, bias_correction=bias_correction)
      if bias is not None:
        new_bias[i] = bias
      reports.append(LayerReport(layers.paths[i], float(1.0 - masks[i].mean()), float(before),
                                 float(after)))
  pruned = _assemble(layers, kernels, new_bias)
  return (pruned, reports) if return_report else pruned
