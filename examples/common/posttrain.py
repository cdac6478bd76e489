"""What the examples and benchmarks measure on a compressed model, and calibration inputs.

* :func:`calibration_images`: real training images or data-free fractals
  (``ec2t.fractal_images``), standardised like the training inputs;
* :func:`selected_leaves`, :func:`compression_measures`: what a compressed model
  holds in its selected layers (zeros, and ``ec2t.value_entropy`` per layer,
  weighted by the layer's size).

This module imports only the public library, so ``benchmarks/`` can import it as
``examples.common.posttrain`` and the example scripts as ``common.posttrain``.

Example:
  >>> import numpy as np
  >>> from common.posttrain import compression_measures
  >>> leaves = [("w", np.array([0.0, 0.5, 0.5, -0.5]))]
  >>> compression_measures(leaves)["bits_per_weight"]
  1.5
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import ec2t_jax as ec2t

CALIBRATIONS = ("real", "fractal")


def check_calibration(kind: str, count: int) -> None:
  """Raises ``ValueError`` for an unknown ``kind`` or a ``count`` below 1."""
  if kind not in CALIBRATIONS:
    raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {kind!r}")
  if count < 1:
    raise ValueError(f"calibration_images must be >= 1, got {count}")


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
  check_calibration(kind, count)
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


def named_leaves(params: Any) -> list[tuple[str, Any]]:
  """``(path, leaf)`` of every leaf, paths as ``ec2t.summary`` names them (``fc1/kernel``)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return [("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), leaf)
          for path, leaf in flat]


def selected_leaves(params: Any, selection: Any) -> list[tuple[str, np.ndarray]]:
  """``(path, host array)`` of the leaves ``selection`` picks (the compressed layers)."""
  plans = (selection or ec2t.Selection()).plan(params)
  return [(path, np.asarray(leaf)) for (path, leaf), plan in zip(named_leaves(params), plans)
          if plan is not None]


def compression_measures(named_leaves: Sequence[tuple[str, np.ndarray]]) -> dict[str, Any]:
  """Sparsity and value entropy (``ec2t.value_entropy``, numel-weighted) of the compressed
  layers, total and per layer."""
  layers = [{"path": path, "shape": list(leaf.shape), "numel": int(leaf.size),
             "sparsity": float((leaf == 0).mean()), "entropy": ec2t.value_entropy(leaf),
             "distinct_values": int(np.unique(leaf).size)} for path, leaf in named_leaves]
  numel = sum(l["numel"] for l in layers)
  return {"sparsity": sum(int((leaf == 0).sum()) for _, leaf in named_leaves) / numel,
          "bits_per_weight": sum(l["entropy"] * l["numel"] for l in layers) / numel,
          "numel": int(numel), "layers": layers}
