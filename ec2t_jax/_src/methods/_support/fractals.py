"""Data-free calibration images: random 2-D iterated function systems (fractals).

Following Lazarevich et al. (2021), after the FractalDB recipe: a system has
2 to 7 affine maps ``x -> A_j x + b_j`` with entries drawn from ``U(-1, 1)``;
the chaos game picks map ``j`` with probability proportional to
``|det A_j|``. The visited points, scaled to the image's bounding box, are
rendered as a binary image; a system is kept only when it covers at least
``min_coverage`` (20%) of the pixels (non-contracting systems that escape to
infinity are rejected the same way). Each kept image is then flipped
horizontally and vertically at random, rotated by a random multiple of 90
degrees, blurred with a random Gaussian (sigma in ``[0, 1]`` pixels) and,
for ``C > 1`` channels, coloured by a random colour.

Pixel values are in ``[0, 1]``; normalise them as you normalise real inputs.

Example:
  >>> import jax
  >>> from ec2t_jax import fractal_images
  >>> images = fractal_images(6, (16, 16, 3), jax.random.key(0), num_points=1024)
  >>> images.shape, bool(images.min() >= 0), bool(images.max() <= 1)
  ((6, 16, 16, 3), True, True)
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MAX_MAPS = 7
MIN_MAPS = 2
_BURN_IN = 20


def _random_system(key):
  k_count, k_a, k_b = jax.random.split(key, 3)
  count = jax.random.randint(k_count, (), MIN_MAPS, MAX_MAPS + 1)
  a = jax.random.uniform(k_a, (MAX_MAPS, 2, 2), minval=-1.0, maxval=1.0)
  b = jax.random.uniform(k_b, (MAX_MAPS, 2), minval=-1.0, maxval=1.0)
  det = jnp.abs(a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0])
  weights = jnp.where(jnp.arange(MAX_MAPS) < count, det, 0.0)
  return a, b, weights


def render_system(a, b, weights, key, height: int, width: int, num_points: int):
  """Renders one system's chaos game as a ``(height, width)`` 0/1 image.

  Returns:
    ``(image, coverage)``: float32 image and the fraction of pixels hit.
  """
  a, b, weights = jnp.asarray(a), jnp.asarray(b), jnp.asarray(weights)
  k_choice, k_start = jax.random.split(key)
  logits = jnp.log(jnp.maximum(weights, 1e-30))
  choices = jax.random.categorical(k_choice, logits, shape=(num_points + _BURN_IN,))

  def step(point, j):
    point = a[j] @ point + b[j]
    return point, point

  start = jax.random.uniform(k_start, (2,), minval=-1.0, maxval=1.0)
  _, points = jax.lax.scan(step, start, choices)
  points = points[_BURN_IN:]
  finite = jnp.all(jnp.isfinite(points)) & (jnp.max(jnp.abs(points)) < 1e6)
  points = jnp.where(finite, points, 0.0)
  low, high = points.min(0), points.max(0)
  span = jnp.maximum(high - low, 1e-12)
  unit = (points - low) / span
  rows = jnp.clip((unit[:, 1] * (height - 1)).round().astype(jnp.int32), 0, height - 1)
  cols = jnp.clip((unit[:, 0] * (width - 1)).round().astype(jnp.int32), 0, width - 1)
  image = jnp.zeros((height, width), jnp.float32).at[rows, cols].set(1.0)
  coverage = jnp.where(finite, image.mean(), 0.0)
  return image, coverage


def _gaussian_blur(image, sigma):
  radius = 2
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-0.5 * (taps / jnp.maximum(sigma, 1e-3)) ** 2)
  kernel = jnp.where(sigma > 1e-3, kernel, (taps == 0).astype(jnp.float32))
  kernel = kernel / kernel.sum()
  padded = jnp.pad(image, radius, mode="edge")
  rows = sum(kernel[i] * padded[i:i + image.shape[0], :] for i in range(2 * radius + 1))
  return sum(kernel[i] * rows[:, i:i + image.shape[1]] for i in range(2 * radius + 1))


def augment(image, key, channels: int):
  """Random flips, 90-degree rotation (square images), blur and colour."""
  k_h, k_v, k_rot, k_blur, k_colour = jax.random.split(key, 5)
  image = jnp.where(jax.random.bernoulli(k_h), image[:, ::-1], image)
  image = jnp.where(jax.random.bernoulli(k_v), image[::-1, :], image)
  if image.shape[0] == image.shape[1]:
    turns = jax.random.randint(k_rot, (), 0, 4)
    image = jax.lax.switch(turns, [lambda x, k=k: jnp.rot90(x, k) for k in range(4)], image)
  image = _gaussian_blur(image, jax.random.uniform(k_blur, (), maxval=1.0))
  image = image / jnp.maximum(image.max(), 1e-12)
  colour = (jnp.ones((channels,)) if channels == 1
            else jax.random.uniform(k_colour, (channels,), minval=0.2, maxval=1.0))
  return jnp.clip(image[..., None] * colour, 0.0, 1.0)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _candidates(key, batch: int, height: int, width: int, channels: int, points: int):
  """``batch`` random systems rendered and augmented, with their coverage."""

  def one(k):
    k_sys, k_render, k_aug = jax.random.split(k, 3)
    a, b, weights = _random_system(k_sys)
    image, coverage = render_system(a, b, weights, k_render, height, width, points)
    return augment(image, k_aug, channels), coverage

  return jax.vmap(one)(jax.random.split(key, batch))


def fractal_images(n: int, shape: Sequence[int], key: jax.Array, *,
                   min_coverage: float = 0.2, num_points: int | None = None,
                   max_attempts: int = 50) -> jax.Array:
  """``n`` synthetic fractal images of ``shape`` for data-free calibration.

  Args:
    n: number of images (``>= 1``).
    shape: ``(height, width)`` or ``(height, width, channels)``.
    key: ``jax.random`` key; the same key gives the same images.
    min_coverage: keep a system only when its image covers at least this
      fraction of the pixels (the paper's 20%).
    num_points: chaos-game points per system (default ``max(4000, 4 H W)``).
    max_attempts: batches of candidate systems to try before giving up.

  Returns:
    float32 array ``(n, height, width, channels)`` in ``[0, 1]`` (channels 1
    when ``shape`` has two entries).

  Raises:
    ValueError: bad ``n`` / ``shape`` / ``min_coverage``, or too few systems
      passed the coverage test in ``max_attempts`` batches.
  """
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"n must be a positive integer, got {n!r}")
  shape = tuple(int(s) for s in shape)
  if len(shape) not in (2, 3) or any(s < 1 for s in shape):
    raise ValueError(f"shape must be (height, width) or (height, width, channels) with "
                     f"positive sizes, got {shape!r}")
  if not 0.0 <= min_coverage < 1.0:
    raise ValueError(f"min_coverage must be in [0, 1), got {min_coverage!r}")
  height, width = shape[:2]
  channels = shape[2] if len(shape) == 3 else 1
  points = int(num_points or max(4000, 4 * height * width))
  batch = max(16, 2 * int(n))

  kept = []
  count = 0
  for attempt in range(max_attempts):
    images, coverage = _candidates(jax.random.fold_in(key, attempt), batch, height, width,
                                   channels, points)
    good = np.flatnonzero(np.asarray(coverage) >= min_coverage)
    kept.append(images[good[:n - count]])
    count += min(len(good), n - count)
    if count == n:
      return jnp.concatenate(kept)
  raise ValueError(f"only {count} of {n} fractal systems covered {min_coverage:.0%} of the "
                   f"pixels in {max_attempts} batches; lower min_coverage")
