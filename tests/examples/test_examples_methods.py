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
import ec2t_jax as ec2t
from ec2t_jax import export
from ec2t_jax import models


def _config(method, options="", **kwargs):
  return pipeline.PipelineConfig(workdir="unused", dataset="mnist", model_name="lenet5",
                                 model=models.LeNet5(), method=method, method_options=options,
                                 **kwargs)


def test_options_are_the_librarys_knobs_typed_like_their_defaults():
  assert methods.parse_options("ttq", "sparsity=0.6, threshold=0.1") == {
      "threshold": 0.1, "sparsity": 0.6}
  assert methods.parse_options("inq", "bits=3,portions=0.5/1,restart=false") == {
      "bits": 3, "portions": (0.5, 1.0), "restart": False}
  assert methods.parse_options("mcq", "samples_per_weight=2") == {"samples_per_weight": 2.0}
  assert methods.parse_options("twn", "") == {}


def test_every_option_default_is_the_registrys():
  for name, spec in ec2t.method_registry().items():
    defaults = methods.option_defaults(name)
    for knob_name, knob in {**spec.knobs, **spec.regularizer_knobs}.items():
      assert defaults[knob_name] == knob.default, (name, knob_name)


@pytest.mark.parametrize("method, options, message", [
    ("nope", "", "--method='nope' is not one of"),
    ("twn", "gamma=1", "'gamma=1' is not key=value with a key of method 'twn'"),
    ("ttq", "threshold=high", "threshold='high' is not a float"),
    ("ttq", "threshold=1.5", "threshold must be"),
    ("faraone", "strength=-1", "strength must be"),
    ("inq", "bits=9", "bits must be"),
    ("slq", "freeze_order=loss,portions=0.5/0.9", "portions must end at 1.0"),
    ("slq", "portions=0.5/1", "freeze_order=.loss."),
    ("mlq", "portions=0.5,1", "'1' is not key=value"),
    ("mcq", "K=2", "'K=2' is not key=value with a key of method 'mcq'"),
    ("mcq", "samples_per_weight=0", "samples_per_weight must be"),
    ("prune", "sparsity=1", "sparsity must be"),
    ("prune", "calibration=web", "calibration must be one of real, fractal"),
])
def test_bad_method_flags_are_one_clear_user_error(method, options, message):
  with pytest.raises(UserError, match=message):
    methods.build(_config(method, options))


def test_a_size_budget_with_a_method_that_takes_none_is_a_user_error():
  with pytest.raises(UserError, match="--method=ttq takes none"):
    methods.build(_config("ttq", bits_per_weight=1.0))


@pytest.mark.parametrize("method", ["faraone", "inq", "slq", "mlq"])
def test_method_without_phase2_is_a_user_error(method):
  with pytest.raises(UserError, match="phase2_epochs >= 1"):
    methods.build(_config(method, phase2_epochs=0))


@pytest.mark.parametrize("method", ["mcq", "prune"])
def test_post_training_methods_have_no_optimizer_but_a_grid_check(method):
  setup = methods.build(_config(method))
  assert setup.optimizer is None and setup.post_training is not None and setup.check is not None


# The library's own methods (a test module may register a toy method for the
# duration of its tests, e.g. tests/methods/test_contract.py).
_LIBRARY = {name for name, spec in ec2t.method_registry().items()
            if spec.quantizer.__module__.startswith("ec2t_jax.")}
TRAINED = sorted(m for m, spec in ec2t.method_registry().items()
                 if spec.kind != "one_shot" and m in _LIBRARY)


@pytest.mark.parametrize("method", TRAINED)
def test_every_registered_method_builds_and_quantizes_lenet5(method):
  import ec2t_jax as ec2t  # pylint: disable=g-import-not-at-top
  params = models.LeNet5().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  setup = methods.build(_config(method))
  state = setup.optimizer.init(params)
  assert [l.path for l in ec2t.summary(state).layers] == [
      "conv2/kernel", "fc1/kernel", "fc2/kernel"]


@pytest.mark.slow  # a whole example pipeline (7-11 s)
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


_TINY = ("--mock_data=256", "--nodownload", "--num_devices=1", "--batch_size=32",
         "--eval_batch_size=64", "--steps_per_epoch=4", "--fp_epochs=1", "--phase1_epochs=1",
         "--phase2_epochs=1")


def _compressed_kernels(path):
  params = export.load(path)
  return {name: np.asarray(params[name]["kernel"]) for name in ("conv2", "fc1", "fc2")}


@pytest.mark.slow  # a whole example pipeline (7-11 s)
def test_inq_5bit_pipeline_ends_on_powers_of_two_with_more_than_three_values(tmp_path):
  results = support.run_in_process(mnist_lenet, *_TINY, f"--workdir={tmp_path}", "--method=inq",
                                   "--method_options=bits=5,portions=0.5/1")
  assert results["method"] == "inq" and results["ternary"] is False
  for name, kernel in _compressed_kernels(tmp_path / "model.ec2t").items():
    values = np.unique(kernel)
    nonzero = np.abs(values[values != 0])
    assert 3 < values.size <= 17, name  # 5 bits: {0} and +-2^n for 8 exponents
    np.testing.assert_array_equal(np.exp2(np.round(np.log2(nonzero))), nonzero)
  # Phase 2's first step froze every weight: its summary reports all of them frozen.
  assert all(layer["stats"]["frozen"] == 1.0 for layer in results["layers"])


def test_mcq_pipeline_skips_training_and_exports_integer_multiples(tmp_path):
  results = support.run_in_process(mnist_lenet, *_TINY, f"--workdir={tmp_path}", "--method=mcq",
                                   "--method_options=samples_per_weight=2")
  assert not (tmp_path / "checkpoints" / "ec2t_phase1").exists()
  assert results["posttrain_seconds"] > 0 and results["ternary_layers"] == 3
  for kernel in _compressed_kernels(tmp_path / "model.ec2t").values():
    nonzero = np.abs(kernel[kernel != 0])
    q = kernel / nonzero.min()  # K=2 on thousands of weights: some weight got one hit
    np.testing.assert_allclose(q, np.round(q), atol=1e-3)
    assert 3 < np.unique(kernel).size < 64
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["sparsity"] == pytest.approx(np.mean(np.concatenate(
      [k.ravel() == 0 for k in _compressed_kernels(tmp_path / "model.ec2t").values()])))


@pytest.mark.slow  # a whole example pipeline (7-11 s)
def test_prune_pipeline_with_fractals_reaches_the_sparsity_and_keeps_survivors(tmp_path):
  results = support.run_in_process(
      mnist_lenet, *_TINY, f"--workdir={tmp_path}", "--method=prune",
      "--method_options=sparsity=0.7,calibration=fractal,calibration_images=16,steps_per_level=1")
  kernels = _compressed_kernels(tmp_path / "model.ec2t")
  zeros = sum(int((k == 0).sum()) for k in kernels.values())
  assert zeros / sum(k.size for k in kernels.values()) >= 0.69
  assert results["sparsity"] == pytest.approx(zeros / sum(k.size for k in kernels.values()))
  assert np.unique(kernels["fc1"]).size > 1000  # full-precision survivors, not a grid


@pytest.mark.slow
@pytest.mark.parametrize("method, options, most", [("slq", "bits=3", 5),
                                                   ("mlq", "portions=0.5/1", 3)])
def test_slq_and_mlq_pipelines_end_on_their_levels(tmp_path, method, options, most):
  results = support.run_in_process(mnist_lenet, *_TINY, f"--workdir={tmp_path}",
                                   f"--method={method}", f"--method_options={options}")
  assert results["method"] == method
  for kernel in _compressed_kernels(tmp_path / "model.ec2t").values():
    assert 2 <= np.unique(kernel).size <= most


def test_compression_measures_match_hand_counts():
  from common import posttrain  # pylint: disable=g-import-not-at-top
  leaves = [("a", np.array([0.0, 0.0, 0.5, -0.5])), ("b", np.array([0.0, 1.0, 1.0, 1.0]))]
  measures = posttrain.compression_measures(leaves)
  # a: p = (1/2, 1/4, 1/4) -> 1.5 bits; b: p = (1/4, 3/4) -> 0.8113 bits; mean over 8 weights.
  b_bits = -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))
  assert measures["sparsity"] == 3 / 8
  assert measures["bits_per_weight"] == pytest.approx((1.5 + b_bits) / 2)
  assert [l["distinct_values"] for l in measures["layers"]] == [3, 2]


def test_the_grid_check_of_a_one_shot_method_is_the_registrys():
  setup = methods.build(_config("mcq"))
  scale = np.float32(0.037)
  setup.check([("w", np.array([0, 2, -4, 6], np.float32) * scale)])  # no weight with one hit
  with pytest.raises(AssertionError, match="w: values are not integer multiples"):
    setup.check([("w", np.array([0.1, 0.2, 0.3141], np.float32))])


def test_real_calibration_images_are_a_standardised_subset():
  from common import posttrain  # pylint: disable=g-import-not-at-top
  pixels = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) * 20
  images = np.asarray(posttrain.calibration_images("real", 4, pixels, (1, 1, 1), (0.5,), (0.25,)))
  expected = (pixels.astype(np.float32) / 255.0 - 0.5) / 0.25
  assert len(np.unique(images)) == 4
  assert all(np.isclose(expected.ravel(), v).any() for v in images.ravel())
  with pytest.raises(ValueError, match="calibration_images=11 needs that many training images"):
    posttrain.calibration_images("real", 11, pixels, (1, 1, 1), (0.5,), (0.25,))


def test_bitnet_is_registered_as_a_chain_method():
  setup = methods.build(_config("bitnet"))
  params = {"a": {"kernel": jnp.ones((3, 4))}, "b": {"kernel": jnp.ones((4, 4))},
            "c": {"kernel": jnp.ones((4, 2))}}
  summary = __import__("ec2t_jax").summary(setup.optimizer.init(params))
  assert summary.method == "BitNet" and [r.path for r in summary.layers] == ["b/kernel"]


@pytest.mark.parametrize("method", ["ec2t", "bitnet", "twn"])
def test_a_config_inner_optimizer_replaces_every_methods_inner_adam(method):
  import dataclasses
  import optax

  @dataclasses.dataclass(frozen=True)
  class Config:
    method: str
    method_options: str = ""
    ec2t_mode: str = "chain"
    gamma: float = 0.2
    init_scale: float = 0.3
    sustain: float = 0.05
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    ec2t_steps: int = 0
    inner_optimizer: object = None

  params = {"a": {"kernel": jnp.ones((3, 4))}, "b": {"kernel": jnp.linspace(-1, 1, 16)
                                                     .reshape(4, 4)},
            "c": {"kernel": jnp.ones((4, 2))}}
  grads = jax.tree.map(jnp.ones_like, params)
  plain = methods.build(Config(method, inner_optimizer=lambda: optax.sgd(0.5))).optimizer
  state = plain.init(params)
  updates, _ = plain.update(grads, state, params)
  # SGD(0.5) moves the unselected first kernel by exactly -0.5 (Adam's first step: -1e-3).
  np.testing.assert_allclose(updates["a"]["kernel"], -0.5)


def _toy_quantizer(factor=0.6, *, selection=None):
  """A user's method: TWN's quantizer under another name and knob."""
  return ec2t.get_method("twn").quantizer("layer", factor, selection=selection)


@pytest.fixture
def toy_method():
  from ec2t_jax._src.methods._support import registry  # internal: unregister_method
  spec = ec2t.register_method(ec2t.MethodSpec(
      name="toy_examples", kind="train", quantizer=_toy_quantizer,
      knobs={"factor": ec2t.Knob(sweep=(0.4, 0.6))},
      grid=lambda options: ec2t.get_method("twn").grid_for()))
  yield spec
  registry.unregister_method(spec.name)


def test_a_method_registered_in_the_library_runs_through_the_examples_with_no_edit(toy_method):
  params = models.LeNet5().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  assert methods.option_defaults("toy_examples") == {"factor": 0.6}
  setup = methods.build(_config("toy_examples", "factor=0.9"))
  state = setup.optimizer.init(params)
  updates, state = setup.optimizer.update(jax.tree.map(jnp.ones_like, params), state, params)
  quantized = jax.tree.map(lambda p, u: p + u, params, updates)
  setup.check([("fc1/kernel", np.asarray(quantized["fc1"]["kernel"]))])  # its grid: ternary
  assert [l.path for l in ec2t.summary(state).layers] == ["conv2/kernel", "fc1/kernel",
                                                          "fc2/kernel"]
  # TWN's threshold 0.9 mean|W| (the option reached the factory, not its default 0.6).
  kernel = np.asarray(params["fc1"]["kernel"])
  expected_zeros = np.mean(np.abs(kernel) <= 0.9 * np.abs(kernel).mean())
  assert np.mean(np.asarray(quantized["fc1"]["kernel"]) == 0) == pytest.approx(expected_zeros,
                                                                               abs=0.01)
