"""pack_params / load_packed: a packed inference tree, the GPT decoded from it, the --packed CLI."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ec2t_jax import export
from ec2t_jax._src.cli import export_cli
from ec2t_jax.models import GPT, GPTConfig, gpt_decode

CONFIG = GPTConfig(vocab_size=13, block_size=8, num_layers=2, num_heads=2, width=16)


@pytest.fixture(scope="module")
def gpt_params():
  """The GPT's params tree (shapes traced, not initialised: fast), random, block kernels
  ternary."""
  shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: GPT(CONFIG, rngs=nnx.Rngs(0))),
                                      nnx.Param))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(np.float32), shapes)
  return gpt_decode.random_ternary(params, 1, scale=0.3)


@pytest.fixture(scope="module")
def gpt_file(gpt_params, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("packed") / "gpt.ec2t")
  export.save(path, gpt_params)
  return path


def _kernels(tree):
  return [leaf for leaf in jax.tree.leaves(tree, is_leaf=export.PackedTernary.__instancecheck__)]


def test_every_ternary_block_kernel_is_packed_and_the_rest_cast(gpt_params):
  tree = export.pack_params(gpt_params, "xla", dtype=jnp.bfloat16)
  rows = export.packed_summary(tree)
  assert len(rows) == 4 * CONFIG.num_layers
  assert {r.kind for r in rows} == {"Int4Ternary"}
  assert tree["wte"]["embedding"].dtype == jnp.bfloat16  # not a kernel: stays dense
  assert tree["blocks"][0]["attn"]["c_attn"]["bias"].dtype == jnp.bfloat16


def test_a_non_ternary_kernel_stays_dense_unless_selected(gpt_params):
  params = jax.tree.map(np.copy, gpt_params)
  params["blocks"][0]["mlp"]["c_fc"]["kernel"] = np.random.default_rng(0).normal(
      size=(16, 64)).astype(np.float32)
  tree = export.pack_params(params, "pallas")
  assert not export.is_packed(tree["blocks"][0]["mlp"]["c_fc"]["kernel"])
  assert len(export.packed_summary(tree)) == 4 * CONFIG.num_layers - 1
  with pytest.raises(ValueError, match=r"blocks/0/mlp/c_fc/kernel: not ternary: output column"):
    export.pack_params(params, "pallas", layers=r"blocks/.*/kernel$")


def test_a_non_finite_leaf_is_refused_naming_it(gpt_params):
  params = jax.tree.map(np.copy, gpt_params)
  kernel = params["blocks"][1]["attn"]["c_proj"]["kernel"]
  kernel[kernel > 0] = np.inf  # the layer's scale w_p
  with pytest.raises(ValueError, match=r"blocks/1/attn/c_proj/kernel: non-finite value inf"):
    export.pack_params(params, "xla")


def test_an_unknown_route_is_refused(gpt_params):
  with pytest.raises(ValueError, match="route must be one of"):
    export.pack_params(gpt_params, "int2")


def test_resident_bytes_count_the_packed_kernels_with_their_padding(gpt_params):
  dense = export.pack_params(gpt_params, "dense", dtype=jnp.float32)
  pallas = export.pack_params(gpt_params, "pallas", dtype=jnp.float32)
  kernel_weights = 2 * (16 * 48 + 16 * 16 + 16 * 64 + 64 * 16)
  # per layer, packed rows x padded columns + two float32 scales per padded column:
  # c_attn 16 x 64 + 8 x 64, attn c_proj 16 x 16 + 8 x 16, c_fc 16 x 64 + 8 x 64,
  # mlp c_proj (K = 64: 16 rows) 16 x 16 + 8 x 16
  packed = 2 * (1536 + 384 + 1536 + 384)
  assert export.resident_bytes(pallas) == (export.resident_bytes(dense) - 4 * kernel_weights
                                           + packed)


@pytest.mark.slow  # three decoders compiled (~5 s)
def test_greedy_decoding_is_the_same_through_every_route(gpt_file):
  prompt = jnp.array([[1], [2]], jnp.int32)
  out = {}
  for route in export.ROUTES:
    tree = export.load_packed(gpt_file, route, dtype=jnp.float32)
    out[route] = gpt_decode.generate(tree, prompt, config=CONFIG, new_tokens=6)
  for route in ("xla", "pallas"):
    np.testing.assert_array_equal(out[route][0], out["dense"][0])
  np.testing.assert_array_equal(out["xla"][1], out["dense"][1])  # same weights, same dot
  np.testing.assert_allclose(out["pallas"][1], out["dense"][1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # two decoders compiled
def test_stacked_kernels_pack_per_layer_and_decode_as_unrolled(gpt_params):
  stacked = dict(gpt_params)
  stacked["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *[gpt_params["blocks"][i]
                                                               for i in range(2)])
  tree = export.pack_params(stacked, "xla", dtype=jnp.float32)
  c_fc = tree["blocks"]["mlp"]["c_fc"]["kernel"]
  assert isinstance(c_fc, tuple) and len(c_fc) == 2
  prompt = jnp.array([[3]], jnp.int32)
  unrolled = export.pack_params(gpt_params, "xla", dtype=jnp.float32)
  np.testing.assert_array_equal(
      gpt_decode.generate(tree, prompt, config=CONFIG, new_tokens=4)[1],
      gpt_decode.generate(unrolled, prompt, config=CONFIG, new_tokens=4)[1])


def test_cli_packed_prints_the_packed_layers_and_resident_bytes(gpt_file, capsys):
  assert export_cli.main(["--packed", gpt_file, "--route", "pallas"]) == 0
  out = capsys.readouterr().out
  assert "blocks/0/mlp/c_fc/kernel" in out and "PackedTernary" in out
  assert "8 packed kernels (pallas):" in out and "B resident" in out


def test_cli_packed_with_an_output_or_a_missing_file_is_one_line_exit_2(gpt_file, tmp_path,
                                                                           capsys):
  assert export_cli.main(["--packed", gpt_file, str(tmp_path / "x")]) == 2
  assert export_cli.main(["--packed", str(tmp_path / "missing.ec2t")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and "--packed reads INPUT only" in err[0]


@pytest.mark.slow  # a Linen init and two interpreted Pallas layers
def test_packed_apply_runs_linen_dense_layers_on_the_packed_kernels():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(5)(nn.relu(nn.Dense(19)(x)))

  model, x = MLP(), jnp.asarray(np.random.default_rng(0).normal(size=(3, 37)), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda p: np.where(np.abs(p) < 0.1, 0.0, np.sign(p) * 0.25)
                        .astype(np.float32) if p.ndim == 2 else np.asarray(p), params)
  packed = {"params": export.pack_params(params, "pallas", dtype=jnp.float32)}
  assert len(export.packed_summary(packed)) == 2
  np.testing.assert_allclose(export.packed_apply(model, packed, x),
                             model.apply({"params": params}, x), rtol=1e-5, atol=1e-6)


def test_a_packed_file_with_a_non_finite_scale_is_refused_naming_the_layer(gpt_params,
                                                                            tmp_path):
  params = jax.tree.map(np.copy, gpt_params)
  kernel = params["blocks"][0]["mlp"]["c_proj"]["kernel"]
  kernel[kernel < 0] = -np.inf  # the layer's w_n
  export.save(tmp_path / "bad.ec2t", params)
  with pytest.raises(ValueError, match=r"blocks/0/mlp/c_proj/kernel: non-finite value -inf"):
    export.load_packed(tmp_path / "bad.ec2t")
