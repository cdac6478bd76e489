"""examples/shakespeare_gpt.py on a tiny GPT: the whole job, exact resume, methods, sharding."""

import functools
import json
import os

import chex
import jax
import numpy as np
import pytest

import examples_support as support  # puts examples/ on the path
import ec2t_jax as ec2t
import shakespeare_gpt
from common import checkpoint, language
from common.cli import UserError
from common.training import StopRequested
from ec2t_jax import export

TINY = ("--num_layers=2", "--num_heads=2", "--width=32", "--block_size=16", "--fp_steps=12",
        "--phase1_steps=8", "--phase2_steps=4", "--eval_every=4", "--eval_batch_size=2048",
        "--sample_chars=20", "--batch_size=8")

pytestmark = support.needs_shakespeare


def _run(workdir, *args):
  return support.run_in_process(shakespeare_gpt, f"--workdir={workdir}",
                                f"--data_dir={support.SHAKESPEARE_DATA_DIR}", *TINY, *args)


@functools.cache
def _tiny_run(tmp_root):
  workdir = os.path.join(tmp_root, "ec2t")
  return workdir, _run(workdir, "--gamma=0.2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return _tiny_run(str(tmp_path_factory.mktemp("gpt")))


def test_the_job_reports_both_losses_sparsity_sizes_and_samples(tiny):
  workdir, results = tiny
  assert np.isfinite(results["fp_val_loss"]) and np.isfinite(results["val_loss"])
  assert results["ternary_layers"] == 8  # every linear kernel of the 2 blocks
  assert 0.0 < results["sparsity"] < 1.0
  assert results["export_bytes"] == os.path.getsize(os.path.join(workdir, "model.ec2t"))
  assert set(results["samples"]) == {"fp", "ec2t"} and len(results["samples"]["ec2t"]) == 20
  with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
    assert json.load(f)["val_loss"] == results["val_loss"]


def test_the_exported_kernels_are_ternary_and_the_embedding_full_precision(tiny):
  workdir, _ = tiny
  params = export.load(os.path.join(workdir, "model.ec2t"))
  for block in ("0", "1"):
    for layer in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
      kernel = np.asarray(params["blocks"][block][layer.split("/")[0]][layer.split("/")[1]]
                          ["kernel"])
      assert len(np.unique(kernel)) <= 3
  assert len(np.unique(np.asarray(params["wte"]["embedding"]))) > 3


def test_validation_loss_is_the_mean_over_every_validation_window():
  data = language.CharData("abc", np.zeros(0, np.int32), np.arange(35) % 3)
  windows = language.eval_windows(data.val, 8)
  assert windows["x"].shape == (4, 8)  # (35 - 1) // 8 windows, each position predicted once
  np.testing.assert_array_equal(windows["y"][:, :-1], windows["x"][:, 1:])
  np.testing.assert_array_equal(windows["y"].ravel(), data.val[1:33])


def test_each_process_takes_its_rows_of_the_same_global_batch():
  ids = np.arange(1000)
  whole = language.train_batch(ids, 5, 8, 16, seed=3)
  parts = [language.train_batch(ids, 5, 8, 16, seed=3, process_index=i, process_count=4)
           for i in range(4)]
  np.testing.assert_array_equal(np.concatenate([p["x"] for p in parts]), whole["x"])


class _Killed(BaseException):
  """Stands in for the SIGKILL of common.kill_points in-process (nothing in the run catches it)."""


def _raise(point):
  raise _Killed(point)


def _metrics_without_timings(workdir):
  from common import metrics  # pylint: disable=g-import-not-at-top
  return [{k: v for k, v in r.items() if "seconds" not in k}
          for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.slow  # four more tiny runs (~1 min)
def test_a_stopped_run_resumes_exactly(tmp_path, monkeypatch):
  from common import kill_points  # pylint: disable=g-import-not-at-top
  whole = _run(tmp_path / "whole", "--sample_chars=0")
  with pytest.raises(StopRequested):
    _run(tmp_path / "cut", "--sample_chars=0", "--stop_after_steps=14")  # inside phase 1
  monkeypatch.setattr(kill_points, "_kill", _raise)
  monkeypatch.setenv(kill_points.KILL_AT, "ec2t_phase1/4/record")  # killed before its checkpoint
  with pytest.raises(_Killed):
    _run(tmp_path / "cut", "--sample_chars=0", "--resume")
  monkeypatch.delenv(kill_points.KILL_AT)
  resumed = _run(tmp_path / "cut", "--sample_chars=0", "--resume")
  assert resumed["val_loss"] == whole["val_loss"]
  # No record twice, and the mean train loss of the stopped interval counts its every step.
  assert _metrics_without_timings(tmp_path / "cut") == _metrics_without_timings(tmp_path / "whole")
  a = checkpoint.read_state(tmp_path / "whole" / "checkpoints" / "ec2t_phase2" / "latest")
  b = checkpoint.read_state(tmp_path / "cut" / "checkpoints" / "ec2t_phase2" / "latest")
  chex.assert_trees_all_equal(a["params"], b["params"])
  chex.assert_trees_all_equal(a["opt_state"], b["opt_state"])


@pytest.mark.slow  # a tiny run per method (~20 s each)
@pytest.mark.parametrize("method", ["bitnet", "twn", "ttq", "inq", "mcq"])
def test_every_registered_training_method_runs_from_the_full_precision_checkpoint(
    tiny, tmp_path, method):
  workdir, _ = tiny
  init = os.path.join(workdir, "checkpoints", "fp", "latest")
  results = _run(tmp_path / method, f"--method={method}", f"--init_from={init}",
                 "--sample_chars=0")
  assert np.isfinite(results["val_loss"]) and results["ternary_layers"] == 8


@pytest.mark.slow  # a tiny run of 60 + 4 steps (~20 s)
def test_a_size_budget_trains_ec2t_to_its_target_and_reports_it(tiny, tmp_path):
  workdir, _ = tiny
  results = _run(tmp_path / "budget", "--target_sparsity=0.7", "--phase1_steps=60",
                 f"--init_from={os.path.join(workdir, 'checkpoints', 'fp', 'latest')}",
                 "--sample_chars=0")
  assert results["budget"]["kind"] == "sparsity"
  np.testing.assert_allclose(results["budget"]["target"], 0.7, rtol=1e-6)  # float32 state
  assert abs(results["budget"]["reached"] - 0.7) < 0.05
  np.testing.assert_allclose(results["sparsity"], results["budget"]["reached"], atol=1e-6)


@pytest.mark.slow  # a tiny run of 60 + 4 steps (~20 s)
def test_a_bytes_budget_lands_within_5_percent_of_the_exported_file(tiny, tmp_path):
  workdir, _ = tiny
  results = _run(tmp_path / "bytes", "--target_bytes=15500", "--phase1_steps=60",
                 f"--init_from={os.path.join(workdir, 'checkpoints', 'fp', 'latest')}",
                 "--sample_chars=0")
  assert results["export_bytes"] == pytest.approx(15500, rel=0.05)
  assert results["budget"]["reached"] == pytest.approx(15500, rel=0.03)


@pytest.mark.slow  # a tiny run from the full-precision checkpoint (~20 s)
def test_a_float16_export_is_smaller_and_reports_the_loss_of_the_file(tiny, tmp_path):
  workdir, float32 = tiny
  results = _run(tmp_path / "f16", "--gamma=0.2", "--export_float16", "--sample_chars=0",
                 f"--init_from={os.path.join(workdir, 'checkpoints', 'fp', 'latest')}")
  assert results["export_bytes"] < float32["export_bytes"]
  wte = np.asarray(export.load(tmp_path / "f16" / "model.ec2t")["wte"]["embedding"])
  np.testing.assert_array_equal(wte, wte.astype(np.float16).astype(np.float32))
  assert abs(results["export_val_loss"] - results["val_loss"]) < 0.01


def test_a_size_budget_for_another_method_is_refused(tmp_path):
  with pytest.raises(UserError, match="--method=bitnet takes none"):
    _run(tmp_path / "refused", "--method=bitnet", "--bits_per_weight=0.8")


@pytest.mark.slow  # 8 fake devices, FSDP
@support.needs_8_devices
def test_data_parallel_fsdp_run_matches_one_device(tiny, tmp_path):
  workdir, _ = tiny
  init = f"--init_from={os.path.join(workdir, 'checkpoints', 'fp', 'latest')}"
  one = _run(tmp_path / "one", init, "--num_devices=1", "--sample_chars=0")
  four = _run(tmp_path / "four", init, "--num_devices=4", "--fsdp=2", "--sample_chars=0")
  np.testing.assert_allclose(four["val_loss"], one["val_loss"], rtol=2e-3)
  np.testing.assert_allclose(four["sparsity"], one["sparsity"], atol=5e-3)


def _core_stacks_layers() -> bool:
  return "stack_axes" in getattr(ec2t.Rule, "__dataclass_fields__", {})


@pytest.mark.slow
@pytest.mark.skipif(not _core_stacks_layers(), reason="stacked layers not in the core yet")
def test_scanned_blocks_are_ternarized_per_layer(tmp_path):
  results = _run(tmp_path / "scan", "--scan_layers", "--sample_chars=0")
  assert results["ternary_layers"] == 8  # 4 stacked kernels x 2 slices
  state = checkpoint.read_state(tmp_path / "scan" / "checkpoints" / "ec2t_phase2" / "latest")
  kernel = np.asarray(state["params"]["blocks"]["mlp"]["c_fc"]["kernel"])
  assert kernel.shape[0] == 2
  scales = [sorted(np.unique(np.abs(k)))[-1] for k in kernel]
  assert scales[0] != scales[1]  # one w_p per slice, not one per stacked leaf


@pytest.mark.slow  # a tiny run from the full-precision checkpoint + a Pallas decoder (~30 s)
def test_sample_packed_samples_from_the_packed_file_and_reports_its_resident_bytes(tiny,
                                                                                    tmp_path):
  workdir, _ = tiny
  results = _run(tmp_path / "packed", "--gamma=0.2", "--sample_chars=6", "--phase1_steps=2",
                 "--phase2_steps=1", "--sample_packed=pallas",
                 f"--init_from={os.path.join(workdir, 'checkpoints', 'fp', 'latest')}")
  assert len(results["samples"]["ec2t packed (pallas)"]) == 6
  params = export.load(tmp_path / "packed" / "model.ec2t")
  float32_bytes = sum(4 * np.asarray(x).size for x in jax.tree.leaves(params))
  kernels = sum(np.asarray(params["blocks"][b][m][l]["kernel"]).size for b in ("0", "1")
                for m, l in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"),
                             ("mlp", "c_proj")))
  # the other leaves as float32, the kernels at 2 bits (+ scales and padding to the tiles)
  assert float32_bytes - 4 * kernels < results["packed_resident_bytes"] < float32_bytes
