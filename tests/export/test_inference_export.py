"""Inference export: batch norm folded into scale / shift, float16 leaves, ternary leaves bitwise."""

from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ec2t_jax import export
from ec2t_jax._src.cli import export_cli
from ec2t_jax._src.export import inference
from ec2t_jax._src.export import container
from ec2t_jax._src.export import errors

DATA = Path(__file__).parents[2].parent / "shared/data/ec2t-reference"
PAPER_SPARS64_BYTES = 47_240  # 11.81K scoring params x 4 B, the paper's count


def _batch_norm_numpy(x, gamma, beta, mean, var, eps=1e-5):
  return gamma * (x - mean) / np.sqrt(var + eps) + beta


def test_fold_gives_the_affine_map_of_the_batch_norm():
  rng = np.random.default_rng(0)
  gamma, beta, mean = (rng.normal(size=4) for _ in range(3))
  var = rng.random(4) + 0.1
  state = {"conv.weight": np.ones((4, 2, 3, 3), np.float32),
           "bn.weight": gamma, "bn.bias": beta, "bn.running_mean": mean, "bn.running_var": var,
           "bn.num_batches_tracked": np.array(7), "fc.bias": np.zeros(2)}
  folded = export.fold_batch_norm(state)
  chex.assert_equal(list(folded), ["conv.weight", "bn.scale", "bn.shift", "fc.bias"])
  x = rng.normal(size=(5, 4))
  np.testing.assert_allclose(folded["bn.scale"] * x + folded["bn.shift"],
                             _batch_norm_numpy(x, gamma, beta, mean, var), rtol=1e-12)


def test_unfolded_flax_batch_norm_computes_scale_x_plus_shift():
  rng = np.random.default_rng(1)
  bn = nn.BatchNorm(use_running_average=True)
  x = jnp.asarray(rng.normal(size=(3, 6)).astype(np.float32))
  variables = {"params": {"bn": {"scale": rng.normal(size=6).astype(np.float32),
                                 "bias": rng.normal(size=6).astype(np.float32)}},
               "batch_stats": {"bn": {"mean": rng.normal(size=6).astype(np.float32),
                                      "var": (rng.random(6) + 0.5).astype(np.float32)}}}
  folded = export.fold_batch_norm(variables)
  assert "batch_stats" not in folded
  unfolded = export.unfold_batch_norm(folded, batch_norm_paths=["bn"])
  apply = lambda v: bn.apply({"params": v["params"]["bn"], "batch_stats": v["batch_stats"]["bn"]},
                             x)
  s, t = folded["params"]["bn"]["scale"], folded["params"]["bn"]["bias"]
  chex.assert_trees_all_close(apply(unfolded), s * x + t, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(apply(unfolded), apply(variables), rtol=1e-5, atol=1e-5)


def test_tree_without_batch_norm_is_refused():
  with pytest.raises(ValueError, match="no batch norm found"):
    export.fold_batch_norm({"w": np.ones(3)})


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


def test_flax_variables_export_and_run_on_the_ternary_path(tmp_path):
  rng = np.random.default_rng(2)
  model = _Net()
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)).astype(np.float32))
  variables = jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.key(0), x))
  a = rng.choice([-1, 0, 1], size=(3, 3, 3, 8), p=(0.2, 0.6, 0.2))
  variables["params"]["Conv_0"]["kernel"] = np.where(a > 0, 0.3, np.where(a < 0, -0.2, 0.0)
                                                     ).astype(np.float32)
  variables["batch_stats"]["BatchNorm_0"] = {"mean": rng.normal(size=8).astype(np.float32),
                                             "var": (rng.random(8) + 0.5).astype(np.float32)}
  export.save(tmp_path / "vars.ec2t", variables)
  result = export.export_inference(tmp_path / "vars.ec2t", tmp_path / "inf.ec2t")
  records = {r.path: r for r in result.info.records}
  chex.assert_equal(records["params/Conv_0/kernel"].codec in container.TERNARY_CODECS, True)
  chex.assert_equal(records["params/Dense_0/kernel"].storage, "float16")
  chex.assert_equal(records["params/BatchNorm_0/scale"].storage, "float32")
  restored = export.load_inference(tmp_path / "inf.ec2t")
  chex.assert_trees_all_equal(restored["params"]["Conv_0"]["kernel"],
                              variables["params"]["Conv_0"]["kernel"])
  got = inference.ternary_apply(model, restored, x)
  chex.assert_trees_all_close(got, model.apply(variables, x), atol=1e-2)


def test_loading_a_plain_file_as_inference_file_is_an_error(tmp_path):
  export.save(tmp_path / "m.ec2t", {"w": np.ones(3, np.float32)})
  with pytest.raises(errors.ExportFormatError, match="not an inference file"):
    export.load_inference(tmp_path / "m.ec2t")


@pytest.mark.parametrize("settings, match", [
    ({"eps": 1e-5, "batch_norms": ["missing/bn"]}, "do not match the tree"),
    ({"eps": 1e-5, "batch_norms": [3]}, "corrupt inference settings"),
    ({"eps": 7.0, "batch_norms": []}, "corrupt inference settings"),
])
def test_inference_file_with_hostile_settings_is_an_export_format_error(tmp_path, settings,
                                                                         match):
  tree = {"params": {"bn": {"scale": np.ones(2, np.float32), "bias": np.zeros(2, np.float32)}}}
  # A crafted file: "inference" is the library's own key, refused in user metadata.
  (tmp_path / "m.ec2t").write_bytes(container.pack(tree, library_metadata={"inference": settings}))
  with pytest.raises(errors.ExportFormatError, match=match):
    export.load_inference(tmp_path / "m.ec2t")


def _official(name):
  path = DATA / f"resnet20_{name}.npz"
  if not path.exists():
    pytest.skip(f"{path} not available")
  return path


def test_official_spars64_inference_file_meets_the_size_and_logit_targets(tmp_path, capsys):
  source = _official("ec2t_spars64")
  resnet = pytest.importorskip("ec2t_jax.models.resnet")
  torch_convert = pytest.importorskip("ec2t_jax.models.torch_convert")
  assert export_cli.main(["--inference", str(source), str(tmp_path / "r20.ec2t")]) == 0
  assert "inference" in capsys.readouterr().out
  size = (tmp_path / "r20.ec2t").stat().st_size
  assert size <= PAPER_SPARS64_BYTES, size
  with np.load(source) as npz:
    original = {k: npz[k] for k in npz.files}
  # Ternary leaves come back bitwise, as TernaryWeights too.
  ternary = export.load_ternary(tmp_path / "r20.ec2t")
  weights = {k: v for k, v in ternary.items() if isinstance(v, export.TernaryWeight)}
  chex.assert_equal(len(weights), 18)
  for key, weight in weights.items():
    chex.assert_trees_all_equal(np.asarray(weight.values(np.float32)), original[key])
  # Logits of the ternary path from the file vs the float model.
  model = resnet.cifar_resnet(20)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 32, 32, 3)).astype(np.float32))
  params, stats = torch_convert.convert_state_dict(original)
  expected = model.apply({"params": params, "batch_stats": stats}, x)
  params, stats = torch_convert.convert_state_dict(export.load_inference(tmp_path / "r20.ec2t"))
  variables = {"params": params, "batch_stats": stats}
  got = inference.ternary_apply(model, variables, x,
                                ternary=inference.ternary_weights(variables["params"]))
  assert float(jnp.max(jnp.abs(got - expected))) <= 1e-2
