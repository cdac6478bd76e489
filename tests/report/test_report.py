"""The paper's accounting, reproduced on its own checkpoints, and the report tool."""

import json
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ec2t_jax import export
from ec2t_jax import report
from ec2t_jax._src.cli import report_cli
from ec2t_jax._src.report import accounting
from ec2t_jax._src.core import trees
from ec2t_jax._src.report import geometry

DATA = Path(__file__).parents[2].parent / "shared/data/ec2t-reference"

# Paper, section 10: sparsity %, scoring params (K), MicroNet FLOPs (M).
PUBLISHED = {"ec2t_spars45": (45.2, 13.4, 11.1), "ec2t_spars64": (63.9, 11.8, 8.5),
             "ec2t_spars73": (73.3, 11.0, 6.6)}


def _path(name):
  path = DATA / f"resnet20_{name}.npz"
  if not path.exists():
    pytest.skip(f"{path} not available")
  return path


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_scoring_params_and_flops_match_the_paper(name):
  r = report.build_report(_path(name))
  _, params_k, flops_m = PUBLISHED[name]
  chex.assert_equal(round(r["scoring_params"] / 1e3, 1), params_k)
  chex.assert_equal(round(r["flops"] / 1e6, 1), flops_m)


@pytest.mark.parametrize("name", ["ec2t_spars45", "ec2t_spars64"])
def test_sparsity_matches_the_paper(name):
  r = report.build_report(_path(name))
  chex.assert_equal(round(100 * r["sparsity"], 1), PUBLISHED[name][0])


def test_spars73_sparsity_is_73_24_not_the_published_73_3():
  # Documented in benchmarks/RESULTS_export.md: no counting rule gives 73.3.
  r = report.build_report(_path("ec2t_spars73"))
  chex.assert_equal(r["sparsity_detail"]["zeros"], 197551)
  chex.assert_equal(r["sparsity_detail"]["parameters"], 269722)


def test_full_precision_model_counts_269k_params_and_81_3m_flops_at_32_bit():
  rules = accounting.CountingRules(mul_bits=32)
  r = report.build_report(_path("fp"), rules=rules)
  chex.assert_equal(r["params"], 269722)
  chex.assert_equal(round(r["flops"] / 1e6, 1), 81.3)


def test_json_has_the_documented_keys_and_file_bytes(tmp_path, capsys):
  export.export_file(_path("ec2t_spars64"), tmp_path / "m.ec2t")
  assert report_cli.main([str(tmp_path / "m.ec2t"), "--json"]) == 0
  r = json.loads(capsys.readouterr().out)
  assert {"sparsity", "scoring_params", "flops", "bytes", "layers"} <= set(r)
  chex.assert_equal(r["bytes"]["file"], (tmp_path / "m.ec2t").stat().st_size)
  chex.assert_equal(r["bytes"]["measured"], "file")
  layer = next(l for l in r["layers"] if l["path"] == "layer3.2.conv2.weight")
  assert layer["ternary"] and layer["codec"] == "tc"
  assert layer["bits_per_weight"] < layer["entropy_bits"]
  chex.assert_equal(sum(l["ternary"] for l in r["layers"]), 18)


def test_text_report_lists_every_weight_layer(capsys):
  assert report_cli.main([str(_path("ec2t_spars45"))]) == 0
  out = capsys.readouterr().out
  chex.assert_equal(out.count(".conv"), 18)
  assert "MicroNet FLOPs: 11.09M" in out


def test_report_cli_rejects_a_corrupt_file_with_status_2(tmp_path, capsys):
  (tmp_path / "x.ec2t").write_bytes(export.MAGIC + bytes(100))
  assert report_cli.main([str(tmp_path / "x.ec2t")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("ec2t_jax.report: error:") and "Traceback" not in err


def test_unknown_architecture_reports_storage_without_ops():
  tree = {"a": {"kernel": np.where(np.arange(64).reshape(8, 8) % 3 == 0, 0.5, 0.0)
                .astype(np.float32) - np.where(np.arange(64).reshape(8, 8) % 3 == 1, 0.25, 0)
                .astype(np.float32)}}
  r = report.build_report(tree)
  assert r["flops"] is None and r["ops"] is None
  chex.assert_equal(r["scoring_params_basis"], "per leaf")
  chex.assert_equal(r["layers"][0]["ternary"], True)


def test_dead_filters_are_dropped_with_the_next_layers_inputs():
  rng = np.random.default_rng(0)
  first = rng.choice([-0.5, 0.0, 0.5], size=(4, 2, 3, 3)).astype(np.float32)
  first[1] = 0  # dead output filter 1
  second = rng.choice([-0.5, 0.0, 0.5], size=(3, 4, 3, 3)).astype(np.float32)
  flat = {"c1": first, "c2": second}
  layers = [geometry.LayerGeometry("c1", "conv", 2, 4, (3, 3), (8, 8)),
            geometry.LayerGeometry("c2", "conv", 4, 3, (3, 3), (8, 8))]
  s1, s2 = accounting.score_layers(flat, layers)
  chex.assert_equal((s1.dead_out, s1.live_out, s2.dead_in, s2.live_in), ((1,), 3, (1,), 3))
  chex.assert_equal(s1.ops_live.mults, 2 * 64 * 3)  # ternary: 2 H W M'
  live_nnz = np.count_nonzero(np.delete(second, 1, axis=1))
  chex.assert_equal(s2.ops_live.adds, 64 * (live_nnz - 3))  # H W M (sigma N K^2 - 1)


def test_tree_adder_counts_pairs_with_growing_operand_width():
  # 5 operands (reference starts from vector_length - 1 = 4): 2 x 16 + 1 x 17 bits.
  chex.assert_equal(accounting.tree_adder_bits(5.0), 2 * 16 + 17)
  chex.assert_equal(accounting.tree_adder_bits(1.0), 0)


def test_statistics_are_not_parameters():
  assert accounting.is_statistic("layer1.0.bn1.running_var")
  assert accounting.is_statistic("batch_stats/bn1/mean")
  assert not accounting.is_statistic("layer1.0.bn1.weight")
  zeros, total = accounting.paper_sparsity({"w": np.zeros(4, np.float32),
                                            "bn.running_mean": np.zeros(9, np.float32)})
  chex.assert_equal((zeros, total), (4, 4))


def test_traced_geometry_of_the_flax_resnet20_equals_the_built_in_description():
  resnet = pytest.importorskip("ec2t_jax.models.resnet")
  model = resnet.cifar_resnet(20)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  stats = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), variables["batch_stats"])
  fn = lambda p, x: model.apply({"params": p, "batch_stats": stats}, x)
  traced = report.trace_geometry(fn, variables["params"], x)
  shapes = {f"params/{k}": v.shape for k, v in
            trees.flatten(variables["params"], as_numpy=False)[0]}
  described = report.cifar_resnet_geometry(shapes)
  strip = lambda g: g._replace(path=g.path.removeprefix("params/"), folded=())
  chex.assert_equal([strip(g) for g in traced], [strip(g) for g in described])
  chex.assert_equal(traced[1].folded, ("layer1_0/bn1/scale", "layer1_0/bn1/bias"))


def test_traced_geometry_of_a_dense_model(tmp_path):
  model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
  x = jnp.zeros((3, 8))
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  layers = report.trace_geometry(lambda p, x: model.apply({"params": p}, x), params, x)
  chex.assert_equal([(g.path, g.kind, g.in_channels, g.out_channels, g.activation, g.bias)
                     for g in layers],
                    [("layers_0/kernel", "dense", 8, 16, "relu", True),
                     ("layers_2/kernel", "dense", 16, 4, None, True)])
  report.save_geometry(tmp_path / "g.json", layers)
  chex.assert_equal(report.load_geometry(tmp_path / "g.json"), layers)


def _ternary_dense_model():
  rng = np.random.default_rng(1)
  kernel = rng.choice([-0.5, 0.0, 0.5], size=(8, 16)).astype(np.float32)
  layers = [geometry.LayerGeometry("k", "dense", 8, 16, (1, 1), (1, 1), in_axis=0, out_axis=1,
                                   bias=False, activation=None)]
  return {"k": kernel}, layers


def test_int8_activations_start_the_tree_adder_at_8_bits():
  flat, layers = _ternary_dense_model()
  float_inputs, = accounting.score_layers(flat, layers, accounting.PAPER_RULES)
  int8 = accounting.CountingRules(activation_bits=8)
  int8_inputs, = accounting.score_layers(flat, layers, int8)
  nnz_per_output = np.count_nonzero(flat["k"]) / 16
  chex.assert_equal(int8_inputs.flop_adds,
                    accounting.tree_adder_bits(nnz_per_output, 8) * 16 / 32)
  assert int8_inputs.flop_adds < float_inputs.flop_adds
  chex.assert_equal(int8_inputs.ops_live, float_inputs.ops_live)  # same operations, narrower


def test_the_report_says_ternary_x_int8_with_8_bit_activations():
  flat, layers = _ternary_dense_model()
  r = report.build_report(flat, geometry=layers,
                          rules=accounting.CountingRules(activation_bits=8))
  chex.assert_equal((r["arithmetic"], r["rules"]["activation_bits"]), ("ternary x int8", 8))
  assert "ternary x int8" in report.format_report(r)
  chex.assert_equal(report.build_report(flat, geometry=layers)["arithmetic"],
                    "ternary x float16")


@pytest.mark.parametrize("bits", [0, 64, 8.0, True])
def test_bad_activation_bits_are_refused_by_name(bits):
  with pytest.raises(ValueError, match="activation_bits"):
    accounting.CountingRules(activation_bits=bits)
