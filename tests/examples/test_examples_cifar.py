"""examples/cifar_resnet.py driven by tfds mock data on 8 fake CPU devices.

Tolerance of "sharded == single device": every array of the final train state
(params, batch statistics, the whole EC2T optimizer state) within 1e-5
absolute; the ternary assignments must be identical. Only the order of the
floating-point reductions over the batch differs between meshes.
"""

import jax
import numpy as np
import pytest

import examples_support as support
import cifar_resnet
from common import checkpoint, training
from common.cli import UserError

pytestmark = support.needs_8_devices
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def pretrained_npz(tmp_path_factory):
  """A PyTorch-layout state dict of a random ResNet-8, as --init_from takes it."""
  return support.write_random_resnet8_npz(
      tmp_path_factory.mktemp("pretrained") / "resnet8.npz", seed=0)


def _args(workdir, pretrained, *extra):
  return ("--mock_data=64", "--model=resnet8", "--width_multiplier=0.5", "--batch_size=16",
          "--eval_batch_size=32", f"--init_from={pretrained}", "--phase1_epochs=1",
          "--phase2_epochs=1", f"--workdir={workdir}", *extra)


def _final_state(workdir):
  return checkpoint.read_state(f"{workdir}/checkpoints/ec2t_phase2/latest")


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory, pretrained_npz):
  workdir = tmp_path_factory.mktemp("dp8")
  results = support.run_in_process(cifar_resnet, *_args(workdir, pretrained_npz))
  return workdir, results


@pytest.mark.slow  # shares the 8-device mock CIFAR run (~15 s)
def test_mock_cifar_runs_both_ec2t_phases_on_eight_devices(eight_device_run):
  workdir, results = eight_device_run
  assert results["ternary_layers"] == 6
  assert 0.0 < results["sparsity"] < 1.0
  assert (workdir / "report.json").exists() and (workdir / "metrics.jsonl").exists()
  state = _final_state(workdir)
  assert int(state["opt_state"]["ternary"]["phase"]) == 1  # phase 2 ran with a frozen assignment
  assert int(state["step"]) == 4  # 64 mock examples / batch 16


@pytest.mark.slow  # a second full run of the mock job (~10 s)
def test_sharded_run_equals_the_single_device_run(eight_device_run, tmp_path, pretrained_npz):
  workdir, results = eight_device_run
  single = support.run_in_process(cifar_resnet, *_args(tmp_path, pretrained_npz),
                                  "--num_devices=1")
  sharded_state, single_state = _final_state(workdir), _final_state(tmp_path)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=TOLERANCE),
               sharded_state, single_state)
  jax.tree.map(np.testing.assert_array_equal, support.leaf_field(sharded_state["opt_state"]["ternary"], "assignment"),
               support.leaf_field(single_state["opt_state"]["ternary"], "assignment"))
  assert single["ternary_test_accuracy"] == results["ternary_test_accuracy"]


@pytest.mark.slow  # a second full run of the mock job (~10 s)
def test_resume_continues_bitwise_identically(eight_device_run, tmp_path, pretrained_npz):
  workdir, _ = eight_device_run
  with pytest.raises(training.StopRequested, match="stopped after 2 steps"):
    support.run_in_process(cifar_resnet, *_args(tmp_path, pretrained_npz), "--stop_after_steps=2")
  partial = checkpoint.read_state(f"{tmp_path}/checkpoints/ec2t_phase1/latest")
  assert int(partial["step"]) == 2  # stopped mid-epoch, data position saved
  support.run_in_process(cifar_resnet, *_args(tmp_path, pretrained_npz), "--resume")
  jax.tree.map(np.testing.assert_array_equal, _final_state(tmp_path), _final_state(workdir))


@pytest.mark.slow
def test_fsdp_run_equals_the_data_parallel_run(eight_device_run, tmp_path, pretrained_npz):
  workdir, _ = eight_device_run
  support.run_in_process(cifar_resnet, *_args(tmp_path, pretrained_npz), "--fsdp=4")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=TOLERANCE),
               _final_state(tmp_path), _final_state(workdir))


@pytest.mark.slow  # shares the 8-device mock CIFAR run (~15 s)
def test_rerunning_into_a_used_workdir_without_resume_is_refused(eight_device_run,
                                                                 pretrained_npz):
  workdir, _ = eight_device_run
  with pytest.raises(UserError, match="already holds checkpoints: pass --resume"):
    support.run_in_process(cifar_resnet, *_args(workdir, pretrained_npz))


@pytest.mark.slow  # shares the 8-device mock CIFAR run (~15 s)
def test_resuming_with_another_model_is_a_clear_error(eight_device_run, pretrained_npz):
  workdir, _ = eight_device_run
  with pytest.raises(UserError, match="incompatible with this run.*'resnet8' vs this run "
                                      "'resnet14'"):
    support.run_in_process(cifar_resnet, *_args(workdir, pretrained_npz), "--resume",
                           "--model=resnet14")


@pytest.mark.slow
def test_supernet_starts_from_the_function_of_the_pretrained_resnet(eight_device_run, tmp_path,
                                                                  pretrained_npz):
  _, base_results = eight_device_run
  results = support.run_in_process(
      cifar_resnet, *_args(tmp_path, pretrained_npz), "--model=supernet", "--phi=1",
      "--alpha=1.4", "--beta=1.2", "--transfer_noise=0", "--phase2_epochs=0", "--num_devices=1")
  # ResNet-8 at width 0.5 (8/16/32, 1 block) -> 2 blocks per stage, 8/16/40 channels.
  assert results["total_params"] > base_results["total_params"]
  assert results["fp_test_accuracy"] == base_results["fp_test_accuracy"]


def test_supernet_rejects_a_pretrained_network_it_cannot_hold(tmp_path, pretrained_npz):
  with pytest.raises(UserError, match="--phi/--alpha/--beta.*depth_multiplier must be >= 1"):
    support.run_in_process(cifar_resnet, *_args(tmp_path, pretrained_npz), "--model=supernet",
                           "--phi=1", "--alpha=0.5")


@pytest.mark.slow
@pytest.mark.skipif(not support.RESNET20_NPZ.exists(), reason="official ResNet-20 not available")
def test_official_resnet20_weights_start_ec2t(tmp_path):
  results = support.run_in_process(
      cifar_resnet, "--mock_data=64", f"--init_from={support.RESNET20_NPZ}", "--batch_size=32",
      "--eval_batch_size=32", "--phase1_epochs=1", "--phase2_epochs=1", "--num_devices=1",
      f"--workdir={tmp_path}")
  assert results["ternary_layers"] == 18  # every conv inside the 9 residual blocks
  assert results["total_params"] == 269_722
