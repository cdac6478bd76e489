"""Fractal calibration images: shape, range, coverage, determinism, bad input."""

import jax
import numpy as np
import pytest

import ec2t_jax as ec2t
from ec2t_jax._src.methods._support import fractals


@pytest.fixture(scope="module")
def images():
  return ec2t.fractal_images(6, (16, 16, 3), jax.random.key(0), num_points=1024)


def test_shape_and_range(images):
  assert images.shape == (6, 16, 16, 3)
  assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


def test_same_key_same_images_other_key_other_images(images):
  again = ec2t.fractal_images(6, (16, 16, 3), jax.random.key(0), num_points=1024)
  other = ec2t.fractal_images(6, (16, 16, 3), jax.random.key(1), num_points=1024)
  np.testing.assert_array_equal(images, again)
  assert not np.array_equal(images, other)


def test_kept_images_cover_enough_pixels(images):
  # Blur only spreads ink, flips/rotations keep it: >= 20% of pixels stay lit.
  lit = (np.asarray(images).max(-1) > 0).mean((1, 2))
  assert np.all(lit >= 0.2)


def test_render_contracting_system_covers_its_attractor():
  # Sierpinski triangle: three half-scale maps; its bounding box is well covered.
  a = np.tile(np.eye(2, dtype=np.float32) * 0.5, (7, 1, 1))
  b = np.zeros((7, 2), np.float32)
  b[1] = [0.5, 0.0]
  b[2] = [0.25, 0.5]
  weights = np.array([1, 1, 1, 0, 0, 0, 0], np.float32)
  image, coverage = fractals.render_system(a, b, weights, jax.random.key(0), 32, 32, 20000)
  assert 0.2 < float(coverage) < 0.8  # a Sierpinski triangle fills about 1/3 at this size
  assert float(image[0, 0]) == 1.0 and float(image[31, 31]) == 0.0


def test_escaping_system_is_rejected():
  a = np.tile(np.eye(2, dtype=np.float32) * 3.0, (7, 1, 1))
  _, coverage = fractals.render_system(a, np.ones((7, 2), np.float32), np.ones(7, np.float32),
                                       jax.random.key(0), 16, 16, 2000)
  assert float(coverage) == 0.0


@pytest.mark.parametrize("kwargs,name", [({"n": 0}, "n must"), ({"shape": (16,)}, "shape"),
                                         ({"min_coverage": 1.0}, "min_coverage")])
def test_bad_input_named(kwargs, name):
  args = {"n": 2, "shape": (8, 8), "key": jax.random.key(0), **kwargs}
  with pytest.raises(ValueError, match=name):
    ec2t.fractal_images(**args)
