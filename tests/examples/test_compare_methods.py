"""benchmarks/compare_methods.py: its building blocks, and the --quick run (slow)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests import examples_support as support

sys.path.insert(0, str(support.REPO / "benchmarks"))
import compare_methods as cm  # pylint: disable=g-import-not-at-top,wrong-import-position


def _row(method, label, accuracy, sparsity, size, before=False):
  return {"method": method, "label": label, "accuracy": accuracy, "sparsity": sparsity,
          "export_bytes": size, "before": before}


def test_pareto_keeps_exactly_the_undominated_rows():
  rows = [_row("a", "1", 0.99, 0.5, 100), _row("b", "1", 0.98, 0.6, 90),
          _row("c", "1", 0.97, 0.55, 95),  # beaten by b on both
          _row("d", "1", 0.99, 0.4, 120)]  # beaten by a on both
  assert cm.pareto(rows, "sparsity", True) == {("a", "1"), ("b", "1")}
  assert cm.pareto(rows, "export_bytes", False) == {("a", "1"), ("b", "1")}


def test_aggregate_gives_mean_and_population_std_over_seeds():
  runs = [{"method": "m", "label": "k", "x": 1.0, "before": False, "seed": s,
           "accuracy": a, "sparsity": 0.5, "export_bytes": b, "bits_per_weight": 1.0,
           "cpu_seconds": 3.0} for s, a, b in ((0, 0.9, 10), (1, 0.8, 20), (2, 0.7, 60))]
  (row,) = cm.aggregate(runs)
  assert row["seeds"] == 3
  np.testing.assert_allclose([row["accuracy"], row["accuracy_std"]],
                             [0.8, np.std([0.9, 0.8, 0.7])])
  np.testing.assert_allclose([row["export_bytes"], row["export_bytes_std"]],
                             [30.0, np.std([10, 20, 60])])


def test_every_registered_method_gets_points_from_its_knobs_sweep():
  registered = cm.registered_methods()
  assert set(cm.SWEPT) | set(cm.BEFORE) | set(cm.EXTRA_POINTS) <= set(registered)
  for method in registered:
    assert cm.sweep(method) and len(cm.sweep(method, quick=True)) == 1
  assert all(not p.before for m in registered for p in cm.sweep(m, before=False))
  twn = [p.options["factor"] for p in cm.sweep("twn", before=False)]
  assert twn == list(cm.ec2t.get_method("twn").knobs["factor"].sweep)
  strengths = [p.options["strength"] for p in cm.sweep("faraone", before=False)]
  assert strengths == list(cm.ec2t.get_method("faraone").regularizer_knobs["strength"].sweep)


def test_every_point_builds_with_the_examples_builder():
  for method in cm.registered_methods():
    for point in cm.sweep(method):
      known = cm.methods_lib.option_defaults(method)
      assert set(point.options) <= set(known), (method, point.label)
      assert cm.methods_lib.parse_options(method, cm._option_text(point.options)) == (
          point.options), (method, point.label)


def test_a_method_registered_in_the_library_gets_its_sweep_with_no_edit():
  from ec2t_jax._src.methods._support import registry  # internal: unregister_method
  import ec2t_jax as ec2t
  ec2t.register_method(ec2t.MethodSpec(
      name="toy_bench", kind="train",
      quantizer=lambda factor=0.6, mode="a", *, selection=None: None,
      knobs={"mode": ec2t.Knob(("a", "b"), ("a", "b")),
             "factor": ec2t.Knob(sweep=(0.4, 0.6, 0.8))},
      grid=lambda options: None))
  try:
    assert "toy_bench" in cm.registered_methods()
    assert [p.label for p in cm.sweep("toy_bench")] == ["factor=0.4", "factor=0.6", "factor=0.8"]
    assert [p.label for p in cm.sweep("toy_bench", quick=True)] == ["factor=0.6"]
  finally:
    registry.unregister_method("toy_bench")


@pytest.mark.slow
@support.needs_mnist
def test_quick_mode_writes_the_table_and_figure_with_every_method(tmp_path):
  env = {**os.environ, "TFDS_DATA_DIR": str(support.MNIST_DATA_DIR),
         "PYTHONPATH": str(support.REPO)}
  subprocess.run([sys.executable, str(support.REPO / "benchmarks" / "compare_methods.py"),
                  "--quick", f"--workdir={tmp_path}"], check=True, env=env,
                 capture_output=True, timeout=1800)
  summary = json.loads((tmp_path / "compare.json").read_text())
  assert {r["method"] for r in summary["rows"]} == set(cm.registered_methods())
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in summary["runs"])
  assert pathlib.Path(tmp_path / "compare.png").stat().st_size > 10_000
  assert "| ec2t |" in (tmp_path / "compare.md").read_text()
