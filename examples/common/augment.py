"""On-device input pipeline: pixel normalisation and CIFAR augmentation (flip + pad-4 crop).

Runs inside the jitted step, so it is sharded with the batch, costs no host
CPU, and its randomness comes from the train state's RNG key: a resumed run
draws exactly the same crops and flips. Per-example keys are split from one
key for the whole global batch, so the result does not depend on the mesh.

Example:
  >>> from common.augment import random_flip_and_crop
  >>> import jax, jax.numpy as jnp
  >>> images = jnp.zeros((2, 32, 32, 3))
  >>> random_flip_and_crop(images, jax.random.key(0)).shape
  (2, 32, 32, 3)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def prepare_images(images: jax.Array, mean: Sequence[float], std: Sequence[float],
                   augment_key: jax.Array | None = None, *, flip: bool = True,
                   padding: int = 4) -> jax.Array:
  """``uint8`` pixels -> standardised ``float32``, augmented first if a key is given.

  Args:
    images: ``uint8 [batch, H, W, C]``.
    mean: Per-channel mean of pixels in [0, 1].
    std: Per-channel standard deviation of pixels in [0, 1].
    augment_key: If given, :func:`random_flip_and_crop` is applied (before
      standardising, so padding is black as in torchvision's ``RandomCrop``).
    flip: Random horizontal flips (CIFAR); False for digits.
    padding: Padding of the random crop.

  Returns:
    ``float32 (x / 255 - mean) / std``.
  """
  x = images.astype(jnp.float32) / 255.0
  if augment_key is not None:
    x = random_flip_and_crop(x, augment_key, padding, flip=flip)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def random_flip_and_crop(images: jax.Array, key: jax.Array, padding: int = 4, *,
                         flip: bool = True) -> jax.Array:
  """Random horizontal flip, then a random crop of the zero-padded image (CIFAR recipe).

  Args:
    images: ``[batch, H, W, C]``; the padding is zeros.
    key: PRNG key; the batch's randomness is derived from it.
    padding: Pixels of zero padding on each side before cropping back to H x W.
    flip: Whether to flip (False: random shifts only, e.g. for digits).

  Returns:
    Augmented images of the same shape.
  """
  batch, height, width, _ = images.shape
  flip_key, y_key, x_key = jax.random.split(key, 3)
  flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
  if flip:
    images = jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  ys = jax.random.randint(y_key, (batch,), 0, 2 * padding + 1)
  xs = jax.random.randint(x_key, (batch,), 0, 2 * padding + 1)

  def crop(image, y, x):
    return jax.lax.dynamic_slice(image, (y, x, 0), (height, width, image.shape[-1]))

  return jax.vmap(crop)(padded, ys, xs)
