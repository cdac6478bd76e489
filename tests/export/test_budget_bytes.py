"""ec2t.export.fixed_bytes: F of a bytes budget measured on the params, against real files."""

import numpy as np
import pytest

import ec2t_jax as ec2t
from ec2t_jax import export
from ec2t_jax._src import container_layout
from ec2t_jax._src.core import budget as budget_lib
from tests.models_for_tests import TERNARY_LEAVES, init


def _embedding_heavy_params():
  """SmallCNN's params with a smooth float leaf (the head) that the export compresses well."""
  _, params = init()
  params = {k: {n: np.asarray(v) for n, v in leaf.items()} for k, leaf in params.items()}
  params["Dense_1"]["kernel"] = np.round(np.linspace(-1, 1, 320, dtype=np.float32), 2).reshape(
      32, 10)
  return params


def _all_zero_ternary(params):
  """Rate 0: every selected kernel all zeros, so the file is F plus the coder's few bytes."""
  return {k: {n: (np.zeros_like(v) if k in TERNARY_LEAVES and n == "kernel" else v)
              for n, v in leaf.items()} for k, leaf in params.items()}


def test_fixed_bytes_is_the_file_of_a_rate_zero_model(tmp_path):
  params = _embedding_heavy_params()
  written = export.save(tmp_path / "zero.ec2t", _all_zero_ternary(params)).total_bytes
  assert export.fixed_bytes(params) == pytest.approx(written, rel=0.03)


def test_fixed_bytes_is_at_most_the_models_raw_size_bound():
  params = _embedding_heavy_params()
  kept = [(v.size, v.dtype.itemsize) for k, leaf in params.items() for n, v in leaf.items()
          if not (k in TERNARY_LEAVES and n == "kernel")]
  bound = budget_lib.fixed_bytes_bound(kept, [params[k]["kernel"].size for k in TERNARY_LEAVES])
  assert export.fixed_bytes(params) < bound


def test_fixed_bytes_of_a_float16_file_counts_two_bytes_per_value(tmp_path):
  params = _embedding_heavy_params()
  written = export.save(tmp_path / "zero16.ec2t", _all_zero_ternary(params),
                        float16=True).total_bytes
  assert export.fixed_bytes(params, float16=True) == pytest.approx(written, rel=0.03)
  assert export.fixed_bytes(params, float16=True) < export.fixed_bytes(params)


def test_a_budget_takes_the_measured_fixed_bytes():
  params = _embedding_heavy_params()
  budget = ec2t.Budget(bytes=10_000, fixed_bytes=export.fixed_bytes(params))
  assert budget.fixed_bytes == export.fixed_bytes(params)


def test_the_bytes_model_counts_the_containers_fixed_header_and_checksum():
  info = export.read_info(export.pack({"w": np.zeros(3, np.float32)}))
  assert info.total_bytes == (container_layout.FILE_OVERHEAD_BYTES + info.header_bytes
                              + info.payload_bytes)
  assert budget_lib.FILE_OVERHEAD_BYTES == container_layout.FILE_OVERHEAD_BYTES
