"""Stacked ternary leaves: one record per slice, the stacked tree back bitwise."""

import jax
import numpy as np
import optax
import pytest

import ec2t_jax as ec2t
from ec2t_jax import export
from ec2t_jax import report
from ec2t_jax._src.export import container
from ec2t_jax._src.export import stacking
from models_for_tests import TinyGPT, token_batch


@pytest.fixture(scope="module")
def stacked_params():
  model = TinyGPT(layers=3, scan=True)
  tokens, _ = token_batch()
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]  # jitted: one compile
  order = ec2t.forward_order(lambda p, x: model.apply({"params": p}, x), params, tokens)
  tx = optax.chain(optax.adam(1e-2),
                   ec2t.ternarize_transform(gamma=0.2, selection=ec2t.Selection(order=order)))
  quantized = jax.jit(lambda p: ec2t.quantized_params(p, tx.init(p)))(params)
  return jax.tree.map(np.asarray, quantized)


def test_stacked_kernel_is_stored_as_one_ternary_record_per_slice(stacked_params, tmp_path):
  info = export.save(tmp_path / "gpt.ec2t", {"params": stacked_params})
  codecs = {r.path: r.codec for r in info.records}
  for i in range(3):
    assert codecs[f"params/blocks/c_fc/kernel[{i}]"] in container.TERNARY_CODECS
  assert "params/blocks/c_fc/kernel" not in codecs
  assert "params/blocks/c_fc/bias" in codecs  # biases are not split


def test_load_gives_back_the_stacked_tree_bitwise(stacked_params, tmp_path):
  export.save(tmp_path / "gpt.ec2t", {"params": stacked_params})
  loaded = export.load(tmp_path / "gpt.ec2t")["params"]
  assert jax.tree.structure(loaded) == jax.tree.structure(stacked_params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(stacked_params)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_export_file_and_decode_keep_the_stacked_shapes(stacked_params, tmp_path):
  export.save(tmp_path / "gpt.ec2t", {"params": stacked_params})
  arrays = export.decode_file(tmp_path / "gpt.ec2t", tmp_path / "gpt.npz")
  np.testing.assert_array_equal(arrays["params/blocks/c_fc/kernel"],
                                stacked_params["blocks"]["c_fc"]["kernel"])


def test_report_has_one_row_per_slice(stacked_params):
  rows = {layer["path"]: layer for layer in
          report.build_report({"params": stacked_params}, geometry=None)["layers"]}
  for i in range(3):
    assert rows[f"params/blocks/c_fc/kernel[{i}]"]["ternary"]
    assert rows[f"params/blocks/c_fc/kernel[{i}]"]["shape"] == [8, 32]


def test_a_leaf_ternary_as_a_whole_is_not_split():
  whole = np.array([[[0.5, 0.0], [-0.5, 0.5]]] * 2, np.float32)
  tree, split = stacking.split_stacked({"k": whole})
  assert split == [] and tree["k"] is whole


def test_restack_of_a_record_not_matching_the_tree_is_an_error():
  with pytest.raises(ValueError, match="does not match the tree"):
    stacking.restack({"a": {"k[0]": np.zeros(2)}}, [[["a", "k"], 2]])


def test_encode_splits_stacked_ternary_layers_as_save_does_so_float16_keeps_them_exact():
  stacked = np.stack([np.array([[0.33, -0.33], [0.0, 0.33]], np.float32),
                      np.array([[0.0, 0.1], [-0.1, 0.0]], np.float32)])
  tree = {"k": stacked, "b": np.array([0.1234567, 2.5], np.float32)}
  decoded = export.decode(export.encode(tree, float16=True))
  np.testing.assert_array_equal(decoded["k"], stacked)
  np.testing.assert_array_equal(decoded["b"], tree["b"].astype(np.float16).astype(np.float32))
  # The record-level pack sees one leaf of five values: float16, so not exact.
  assert not np.array_equal(export.unpack(export.pack(tree, float16=True))["k"], stacked)
