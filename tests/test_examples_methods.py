"""The --method registry of the examples and a whole pipeline run of a non-EC2T method."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import examples_support as support  # puts examples/ on the path
import mnist_lenet
from common import methods
from common import pipeline
from common.cli import UserError
from ec2t_jax import export
from ec2t_jax import models


def _config(method, options="", **kwargs):
  return pipeline.PipelineConfig(workdir="unused", dataset="mnist", model_name="lenet5",
                                 model=models.LeNet5(), method=method, method_options=options,
                                 **kwargs)


def test_options_are_typed_like_the_defaults():
  options = methods.parse_options("ttq", "sparsity=0.6, threshold=0.1")
  assert options == {"threshold": 0.1, "sparsity": "0.6", "init_scale": None}
  assert methods.parse_options("twn", "") == {"threshold": "layer"}


@pytest.mark.parametrize("method, options, message", [
    ("nope", "", "--method='nope' is not one of"),
    ("twn", "gamma=1", "'gamma=1' is not key=value with a key of method 'twn'"),
    ("ttq", "threshold=high", "threshold='high' is not a float"),
    ("ttq", "threshold=1.5", "threshold must be"),
    ("faraone", "strength=-1", "strength must be in"),
])
def test_bad_method_flags_are_one_clear_user_error(method, options, message):
  with pytest.raises(UserError, match=message):
    methods.build(_config(method, options))


def test_faraone_without_phase2_is_a_user_error():
  with pytest.raises(UserError, match="phase2_epochs >= 1"):
    methods.build(_config("faraone", phase2_epochs=0))


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_every_registered_method_builds_and_quantizes_lenet5(method):
  import ec2t_jax as ec2t  # pylint: disable=g-import-not-at-top
  params = models.LeNet5().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  setup = methods.build(_config(method))
  state = setup.optimizer.init(params)
  assert [l.path for l in ec2t.summary(state).layers] == [
      "conv2/kernel", "fc1/kernel", "fc2/kernel"]


def test_faraone_pipeline_prunes_in_phase_2_and_exports_a_ternary_model(tmp_path):
  results = support.run_in_process(
      mnist_lenet, "--mock_data=256", "--nodownload", f"--workdir={tmp_path}", "--num_devices=1",
      "--batch_size=32", "--eval_batch_size=64", "--steps_per_epoch=4", "--fp_epochs=1",
      "--phase1_epochs=1", "--phase2_epochs=1", "--method=faraone",
      "--method_options=strength=3")
  assert results["method"] == "faraone" and results["method_options"]["strength"] == 3.0
  assert 0.3 < results["sparsity"] < 0.9  # pruned by TWN's threshold 0.7 mean|W|
  params = export.load(tmp_path / "model.ec2t")
  assert np.unique(params["fc1"]["kernel"]).size == 3
  assert json.loads((tmp_path / "report.json").read_text())["export_bytes"] == (
      tmp_path / "model.ec2t").stat().st_size
