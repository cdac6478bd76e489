r"""Issue 26, "measure before you choose": does one flat buffer make compile time depth-free?

The probe that preceded the library's flat buffers (``ec2t_jax/_src/core/flat.py``, now the
default layout; ``step_overhead.py`` measures them). It compiles the training step of a model
under

* ``adam``: ``optax.adam`` alone (the baseline),
* ``twn``: ``optax.chain(optax.adam, ec2t.twn(selection=...))``, the library's TWN on the
  shared core (same-shape leaves stacked in groups, one ``vmap``-ed step per group),
* ``twn_flat``: the same TWN written over **one flat buffer**: every selected leaf's latent
  weights concatenated into one float32 vector in the state, per-layer statistics as
  segment reductions (``jax.ops.segment_sum`` over sorted segment ids, found by a binary
  search of the layer boundaries), the per-layer
  threshold and scale gathered back per element, the params' updates sliced out. Its
  step is instantiated once, whatever the number and shapes of the layers,

and prints the compile wall and process-CPU time of each (medians of interleaved rounds)
and the ratio to Adam's, for models of growing depth. ``twn`` and ``twn_flat`` are checked
to give the same params after two steps before anything is timed, but for weights at the
threshold, which sums in another order may tip (at most 1e-4 of the weights may flip).

Run (repository root)::

  python benchmarks/flat_step_probe.py --models resnet20,resnet56,gpt12,gpt48 --compile_rounds 2
"""

from __future__ import annotations

import os
import statistics
from typing import NamedTuple

from absl import app
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ec2t_jax as ec2t
from ec2t_jax._src.core.trees import path_to_str
from ec2t_jax import models
import step_overhead  # pylint: disable=g-import-not-at-top  (its GPT and step builder)

# step_overhead (imported for its GPT and step builder) defines --models and --rounds.
_MODELS, _ROUNDS = step_overhead._MODELS, step_overhead._COMPILE_ROUNDS
_LEARNING_RATE = 1e-4
_FACTOR = 0.7  # TWN's layer-wise threshold factor


class FlatTWNState(NamedTuple):
  """The selected leaves' latent weights, concatenated in selection order."""
  latent: jax.Array


def _layout(tree, selected: list[str]):
  """``(paths, sizes)`` of the selected leaves, in a fixed order."""
  flat = {path_to_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  return [flat[p] for p in selected], [int(np.prod(flat[p].shape)) for p in selected]


def flat_twn(selected: list[str]) -> optax.GradientTransformation:
  """TWN (layer-wise ``Delta = 0.7 mean|W|``, ``alpha`` = mean kept ``|W|``) over one flat
  buffer of the ``selected`` leaves' latent weights; the last transformation of a chain."""
  def ternary(latent, sizes):
    layers = len(sizes)
    # Segment ids by a binary search of the layer boundaries, behind a barrier: XLA would
    # otherwise constant-fold a (weights,)-long id table at compile time (seconds).
    position = jax.lax.optimization_barrier(jax.lax.iota(jnp.int32, latent.size))
    segments = jnp.searchsorted(jnp.asarray(np.cumsum(sizes)[:-1], jnp.int32), position,
                                side="right")
    count = jnp.asarray(sizes, jnp.float32)
    magnitude = jnp.abs(latent)
    delta = _FACTOR * jax.ops.segment_sum(magnitude, segments, layers,
                                          indices_are_sorted=True) / count
    keep = magnitude > delta[segments]
    kept = jax.ops.segment_sum(jnp.where(keep, magnitude, 0.0), segments, layers,
                               indices_are_sorted=True)
    kept_count = jax.ops.segment_sum(keep.astype(jnp.float32), segments, layers,
                                     indices_are_sorted=True)
    alpha = kept / jnp.maximum(kept_count, 1.0)
    return alpha[segments] * jnp.sign(latent) * keep

  def init(params):
    leaves, _ = _layout(params, selected)
    return FlatTWNState(jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves]))

  def update(updates, state, params):
    incoming, sizes = _layout(updates, selected)
    latent = state.latent + jnp.concatenate([jnp.ravel(u) for u in incoming])
    value = ternary(latent, sizes)
    offsets = np.cumsum([0, *sizes])
    index = {p: i for i, p in enumerate(selected)}

    def landed(path, update, param):
      if path_to_str(path) not in index:
        return update
      i = index[path_to_str(path)]
      new = value[offsets[i]:offsets[i + 1]].reshape(param.shape).astype(param.dtype)
      return new - param

    params_updates = jax.tree_util.tree_map_with_path(landed, updates, params)
    return params_updates, FlatTWNState(latent)

  return optax.GradientTransformation(init, update)


def _models():
  return {
      "resnet20": ("ResNet-20", models.cifar_resnet(20), (32, 32, 3)),
      "resnet56": ("ResNet-56", models.cifar_resnet(56), (32, 32, 3)),
      "gpt12": ("GPT 12x128 unrolled", step_overhead._GPTModel(12, scan=False), "tokens"),
      "gpt48": ("GPT 48x128 unrolled", step_overhead._GPTModel(48, scan=False), "tokens"),
  }


def _probe(name, model, input_shape, rounds):
  x, y, _ = step_overhead._inputs(input_shape, 32)
  variables = model.init(jax.random.key(2), x)
  params = variables["params"]
  has_batch_stats = "batch_stats" in variables
  order = ec2t.forward_order(
      lambda p, x: model.apply({**variables, "params": p}, x), params, x)
  selection = ec2t.Selection(order=order)
  library = optax.chain(optax.adam(_LEARNING_RATE), ec2t.twn(selection=selection))
  state = library.init(params)
  selected = [layer.path for layer in ec2t.summary(ec2t.find_quantizer_state(state)).layers]
  variants = {"adam": optax.adam(_LEARNING_RATE), "twn": library,
              "twn_flat": optax.chain(optax.adam(_LEARNING_RATE), flat_twn(selected))}
  batch_stats = variables.get("batch_stats", {})
  carries = {}
  for label, tx in variants.items():  # two steps each; the two TWNs must agree
    step = jax.jit(step_overhead._make_step(model, tx, has_batch_stats))
    opt_state = tx.init(params)
    p = params if label == "adam" else ec2t.quantized_params(params, state)
    carry = (p, batch_stats, opt_state)
    for _ in range(2):
      *carry, _ = step(*carry, x, y)
    carries[label] = carry
  # Float sums in another order can put a weight at the threshold on the other side: it
  # flips between 0 and +-alpha (and its layer's alpha moves by ~1e-6). Count the flips.
  differing = sum(int(jnp.sum(jnp.abs(a - b) > 1e-3)) for a, b in zip(
      jax.tree.leaves(carries["twn"][0]), jax.tree.leaves(carries["twn_flat"][0])))
  total = sum(x.size for x in jax.tree.leaves(params))
  if differing > 1e-4 * total:
    raise AssertionError(f"{name}: flat TWN differs from the library's in {differing} weights")
  times = {label: [] for label in variants}
  for _ in range(rounds):
    for label, tx in variants.items():
      times[label].append(step_overhead._compile_seconds(
          model, tx, has_batch_stats, (*carries[label], x, y)))
  base_wall = statistics.median(t[0] for t in times["adam"])
  base_cpu = statistics.median(t[1] for t in times["adam"])
  print(f"\n{name}: {len(selected)} ternarized layers; after two steps the two TWNs "
        f"differ in {differing} of {total} weights (threshold ties)")
  print(f"  {'variant':<9} {'compile s':>10} {'vs adam':>8} {'CPU s':>7} {'vs adam':>8}")
  for label, samples in times.items():
    wall = statistics.median(t[0] for t in samples)
    cpu = statistics.median(t[1] for t in samples)
    print(f"  {label:<9} {wall:>10.2f} {wall / base_wall:>7.2f}x {cpu:>7.2f} "
          f"{cpu / base_cpu:>7.2f}x", flush=True)


def main(argv):
  del argv
  print(f"devices: {jax.devices()}; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
  available = _models()
  for key in _MODELS.value:
    if key not in available:
      raise app.UsageError(f"--models: unknown model {key!r}; choose from {sorted(available)}")
    _probe(*available[key], _ROUNDS.value)


if __name__ == "__main__":
  app.run(main)
