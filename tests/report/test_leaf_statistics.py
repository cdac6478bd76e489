"""Chunked leaf statistics equal the whole-array oracles (ternary_parts, ternary_entropy)."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from ec2t_jax._src.export import leaf_parts
from ec2t_jax._src.methods.ec2t import ternary
from ec2t_jax._src.report import leaf_statistics as stats_lib


def _cases(rng):
  yield np.array([0.3, 0.0, -0.2, 0.3, 0.0], np.float32)
  for dtype in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
    values = np.array([-0.75, 0.0, 0.5]).astype(dtype)
    yield values[rng.integers(0, 3, size=(7, 11))]
  yield np.where(rng.random(500) < 0.5, np.float32(-0.0), np.float32(0.25)).astype(np.float32)
  mixed = np.array([-0.5, 0.0, -0.0, 0.5], np.float32)[rng.integers(0, 4, size=300)]
  yield mixed  # both zero signs: four patterns, not ternary
  yield rng.normal(size=(13, 17)).astype(np.float32)
  yield np.array([-1.0, 0.0, np.inf, 1.0] * 10, np.float32)
  yield np.array([-1.0, 0.0, np.nan] * 10, np.float32)
  yield np.array([1, 0, -1] * 10, np.int32)  # not float: never ternary
  yield np.array([0.5, 0.0], np.float32)  # fewer than three elements
  yield np.array([-0.5, 0.0, 0.5], np.float32)[rng.integers(0, 3, size=(20, 30))].T  # strided


@pytest.mark.parametrize("chunk", [1, 7, stats_lib.CHUNK_ELEMENTS])
def test_chunked_statistics_equal_the_whole_array_oracles(monkeypatch, chunk):
  monkeypatch.setattr(stats_lib, "CHUNK_ELEMENTS", chunk)
  for array in _cases(np.random.default_rng(chunk)):
    got = stats_lib.leaf_statistics(array)
    parts = leaf_parts.ternary_parts(array)
    assert got.ternary == (parts is not None), array
    assert got.zeros == array.size - np.count_nonzero(array)
    as_float = array.astype(np.float64) if array.dtype.kind != "i" else array
    assert got.nonfinite == int(np.sum(~np.isfinite(as_float)))
    if parts is None:
      continue
    assert got.values.dtype == parts.values.dtype
    assert got.values.tobytes() == parts.values.tobytes()  # bitwise, zero sign included
    assert got.counts == tuple(int(np.sum(parts.assignment == k)) for k in (-1, 0, 1))
    assert got.w_n == parts.w_n and got.w_p == parts.w_p
    oracle = float(ternary.ternary_entropy(jnp.asarray(parts.assignment)))
    assert got.entropy_bits() == pytest.approx(oracle, abs=1e-6)


def test_non_finite_values_are_counted_chunk_by_chunk(monkeypatch):
  monkeypatch.setattr(stats_lib, "CHUNK_ELEMENTS", 5)
  array = np.zeros(23, ml_dtypes.bfloat16)
  array[[0, 6, 22]] = [np.nan, np.inf, -np.inf]
  assert stats_lib.count_nonfinite(array) == 3
  assert stats_lib.count_nonfinite(np.arange(10)) == 0
