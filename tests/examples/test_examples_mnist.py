"""examples/mnist_lenet.py on the real MNIST, offline, and its answers to bad input."""

import json

import pytest

import examples_support as support
import mnist_lenet
from common import checkpoint

SMALL_RUN = ("--num_devices=1", "--steps_per_epoch=100", "--fp_epochs=3", "--phase1_epochs=2", "--phase2_epochs=1",
             # 10x the paper's Adam rates: EC2T converges in 300 steps instead of epochs.
             "--learning_rate=1e-3", "--latent_learning_rate=1e-3",
             "--centroid_learning_rate=1e-4")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mnist")
  results = support.run_in_process(
      mnist_lenet, f"--data_dir={support.MNIST_DATA_DIR}", "--nodownload",
      f"--workdir={workdir}", *SMALL_RUN)
  return workdir, results


@support.needs_mnist
@pytest.mark.slow  # shares the real-MNIST 600-step run (~25 s)
def test_lenet5_reaches_95_percent_ternary_test_accuracy_in_600_steps(small_run):
  _, results = small_run
  assert results["fp_test_accuracy"] >= 0.96
  assert results["ternary_test_accuracy"] >= 0.95
  assert results["ternary_layers"] == 3  # conv2, fc1, fc2: all but the first and last layer
  assert results["sparsity"] > 0.5


@support.needs_mnist
@pytest.mark.slow  # shares the real-MNIST 600-step run (~25 s)
def test_report_and_metrics_are_written(small_run):
  workdir, results = small_run
  report = json.loads((workdir / "report.json").read_text())
  assert report["ternary_test_accuracy"] == results["ternary_test_accuracy"]
  assert report["sizes"]["ratio_packed"] < 0.2
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  phases = [json.loads(line)["phase"] for line in lines]
  assert phases == ["fp"] * 3 + ["ec2t_phase1"] * 3 + ["ec2t_phase2"] * 2
  assert (workdir / "tensorboard").is_dir()


@support.needs_mnist
@pytest.mark.slow  # shares the real-MNIST 600-step run (~25 s)
def test_best_phase2_checkpoint_holds_frozen_ternary_weights(small_run):
  workdir, _ = small_run
  state = checkpoint.read_state(workdir / "checkpoints" / "ec2t_phase2")
  # The default chain form keeps its state last in the chain (the reference mode under "ternary").
  opt_state = state["opt_state"]
  quantizer = opt_state["ternary"] if isinstance(opt_state, dict) else opt_state[-1]
  assert int(quantizer["phase"]) == 1
  import numpy as np
  assert np.unique(state["params"]["fc1"]["kernel"]).size == 3


def test_missing_data_offline_is_one_clear_line(tmp_path):
  result = support.run_program("mnist_lenet.py", f"--data_dir={tmp_path}", "--nodownload",
                               f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 2
  assert f"error: dataset 'mnist' is not in {tmp_path}" in result.stderr
  assert "Traceback" not in result.stderr


def test_unknown_model_is_rejected_before_anything_runs():
  result = support.run_program("mnist_lenet.py", "--model=vgg16")
  assert result.returncode == 1
  assert "--model=vgg16: value should be one of <lenet5|lenet300100>" in result.stderr
  assert "Traceback" not in result.stderr


def test_unknown_dataset_is_rejected_before_anything_runs():
  result = support.run_program("cifar_resnet.py", "--dataset=imagenet")
  assert result.returncode == 1
  assert "--dataset=imagenet: value should be one of <cifar10|cifar100>" in result.stderr
  assert "Traceback" not in result.stderr


def test_unknown_resnet_depth_is_rejected_before_anything_runs():
  result = support.run_program("cifar_resnet.py", "--model=resnet21")
  assert result.returncode == 1
  assert "unknown model: expected resnet20" in result.stderr


def test_init_from_a_corrupt_file_is_a_clear_error(tmp_path):
  bad = tmp_path / "weights.npz"
  bad.write_bytes(b"not a zip file")
  from common.cli import UserError
  import cifar_resnet
  with pytest.raises(UserError, match=f"--init_from {bad} cannot be read as a state dict"):
    support.run_in_process(cifar_resnet, "--mock_data=32", "--model=resnet8",
                           f"--init_from={bad}", f"--workdir={tmp_path / 'run'}")


@support.needs_mnist
@pytest.mark.slow  # shares the real-MNIST 600-step run (~25 s)
def test_init_from_an_incompatible_model_names_the_mismatch(small_run, tmp_path):
  workdir, _ = small_run
  from common.cli import UserError
  with pytest.raises(UserError, match=r"(?s)--init_from .*does not match the model.*"
                                      r"fc1/kernel checkpoint \(400, 120\) vs model \(784, 300\)"):
    support.run_in_process(mnist_lenet, "--model=lenet300100",
                           f"--init_from={workdir / 'checkpoints' / 'fp'}",
                           f"--data_dir={support.MNIST_DATA_DIR}", f"--workdir={tmp_path}",
                           "--num_devices=1", "--steps_per_epoch=1", "--phase1_epochs=1",
                           "--phase2_epochs=0")


@support.needs_mnist
@pytest.mark.slow  # shares the real-MNIST 600-step run (~25 s)
def test_plot_curves_draws_a_png_of_the_run(small_run, tmp_path):
  workdir, _ = small_run
  result = support.run_program("plot_curves.py", f"--workdir={workdir}",
                               f"--output={tmp_path / 'curves.png'}")
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
