"""Post-training compression and its measures, shared by the MNIST example and benchmark.

* :func:`calibration_images`: real training images or data-free fractals
  (``ec2t.fractal_images``), standardised like the training inputs;
* :func:`mcq` / :func:`prune`: ``ec2t.mcq`` and ``ec2t.prune_calibrated`` on a
  model's params (no training);
* :func:`selected_leaves`, :func:`value_entropy`, :func:`compression_measures`:
  what a compressed model holds in its selected layers (zeros and the
  zeroth-order entropy of the values, ``H = -sum_v p_v log2 p_v`` per layer,
  weighted by the layer's size);
* :func:`check_at_most_values`, :func:`check_integer_multiples`,
  :func:`check_sparsity`: each method's grid, asserted on the final params.

This module imports only the library, so ``benchmarks/`` can import it as
``examples.common.posttrain`` and the example scripts as ``common.posttrain``.

Example:
  >>> import numpy as np
  >>> from common.posttrain import compression_measures
  >>> leaves = [("w", np.array([0.0, 0.5, 0.5, -0.5]))]
  >>> compression_measures(leaves)["bits_per_weight"]
  1.5
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import ec2t_jax as ec2t
from ec2t_jax._src.core import trees
from ec2t_jax._src.methods._support import common as methods_common
from ec2t_jax._src.methods._support import grids

CALIBRATIONS = ("real", "fractal")


def calibration_images(kind: str, count: int, train_images: np.ndarray | None,
                       image_shape: Sequence[int], mean: Sequence[float], std: Sequence[float],
                       seed: int = 0) -> jax.Array:
  """``count`` standardised calibration inputs ``(x - mean) / std``.

  Args:
    kind: ``"real"``: a random subset (without replacement) of ``train_images``
      (floats in ``[0, 1]`` or ``uint8`` pixels); ``"fractal"``: data-free
      ``ec2t.fractal_images`` of ``image_shape``.
    count: number of images (``>= 1``; at most ``len(train_images)`` for real).
    train_images: the training images (real only).
    image_shape: ``(H, W, C)``.
    mean, std: per-channel statistics of pixels scaled to ``[0, 1]``.
    seed: seed of the subset or of the fractals.

  Returns:
    ``float32 [count, H, W, C]``.
  """
  if kind not in CALIBRATIONS:
    raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {kind!r}")
  if count < 1:
    raise ValueError(f"calibration_images must be >= 1, got {count}")
  if kind == "real":
    if train_images is None or count > len(train_images):
      raise ValueError(f"calibration_images={count} needs that many training images, got "
                       f"{0 if train_images is None else len(train_images)}")
    idx = np.random.default_rng(seed).choice(len(train_images), count, replace=False)
    images = np.asarray(train_images[idx])
    images = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images
    images = jnp.asarray(images, jnp.float32)
  else:
    images = ec2t.fractal_images(count, tuple(image_shape), jax.random.key(seed))
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def mcq(params: Any, samples_per_weight: float, *, seed: int = 0, per_neuron: bool = False,
        selection: Any = None) -> Any:
  """``ec2t.mcq`` with ``key = jax.random.key(seed)``."""
  return ec2t.mcq(params, samples_per_weight, key=jax.random.key(seed), per_neuron=per_neuron,
                  selection=selection)


def prune(params: Any, apply_fn: Callable, calibration: jax.Array, sparsity: float, *,
          selection: Any = None, **kwargs: Any) -> Any:
  """``ec2t.prune_calibrated`` (kwargs: its ablation knobs, e.g. ``ramp=0.0``)."""
  return ec2t.prune_calibrated(params, apply_fn, calibration, sparsity, selection=selection,
                               **kwargs)


def selected_leaves(params: Any, selection: Any) -> list[tuple[str, np.ndarray]]:
  """``(path, host array)`` of the leaves ``selection`` picks (the compressed layers)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  chosen = methods_common.selected_leaves(params, selection)
  return [(trees.path_to_str(path), np.asarray(leaf))
          for (path, leaf), picked in zip(flat, chosen) if picked]


def value_entropy(leaves: Sequence[np.ndarray]) -> float:
  """Numel-weighted zeroth-order entropy (bits) of each layer's values."""
  bits = 0.0
  for leaf in leaves:
    _, counts = np.unique(leaf, return_counts=True)
    p = counts / counts.sum()
    bits += float(-(p * np.log2(p)).sum()) * leaf.size
  return bits / sum(l.size for l in leaves)


def compression_measures(named_leaves: Sequence[tuple[str, np.ndarray]]) -> dict[str, Any]:
  """Sparsity and value entropy of the compressed layers, total and per layer."""
  leaves = [leaf for _, leaf in named_leaves]
  numel = sum(l.size for l in leaves)
  layers = [{"path": path, "shape": list(leaf.shape), "numel": int(leaf.size),
             "sparsity": float((leaf == 0).mean()), "entropy": value_entropy([leaf]),
             "distinct_values": int(np.unique(leaf).size)} for path, leaf in named_leaves]
  return {"sparsity": sum(int((l == 0).sum()) for l in leaves) / numel,
          "bits_per_weight": value_entropy(leaves), "numel": int(numel), "layers": layers}


def check_at_most_values(path: str, leaf: np.ndarray, most: int, per_filter: bool = False) -> None:
  """Asserts ``leaf`` holds at most ``most`` distinct values (per output filter):
  the registry's :func:`~ec2t_jax._src.methods._support.grids.at_most_values`."""
  _assert_none(grids.at_most_values(most, per_filter)(path, np.asarray(leaf)))


def check_integer_multiples(path: str, leaf: np.ndarray, per_filter: bool = False,
                            largest_divisor: int = 16) -> None:
  """Asserts every value is an integer multiple ``q * s`` of one scale ``s`` (per filter):
  the registry's :func:`~ec2t_jax._src.methods._support.grids.integer_multiples`."""
  _assert_none(grids.integer_multiples(per_filter, largest_divisor)(path, np.asarray(leaf)))


def _assert_none(problem: str | None) -> None:
  if problem is not None:
    raise AssertionError(problem)


def check_sparsity(named_leaves: Sequence[tuple[str, np.ndarray]], target: float,
                   tolerance: float = 0.01) -> None:
  """Asserts the selected layers together are at least ``target - tolerance`` zeros."""
  measured = compression_measures(named_leaves)["sparsity"]
  if measured < target - tolerance:
    raise AssertionError(f"pruned to {measured:.4f} zeros, asked for {target}")


def count_selected(params: Any, selection: Any) -> int:
  """How many leaves ``selection`` picks (``params`` may be abstract shapes)."""
  return sum(methods_common.selected_leaves(params, selection))
