"""ec2t.summary: per-layer figures as data and as a table."""

import numpy as np
import optax

import ec2t_jax as ec2t
from models_for_tests import init, TERNARY_LEAVES, train


def _trained():
  model, params = init()
  tx = optax.chain(optax.adam(1e-3), ec2t.ternarize_transform(gamma=0.3))
  return train(model, params, tx, steps=2)


def test_summary_rows_match_the_state():
  params, state, _ = _trained()
  summary = ec2t.summary(state)
  core = ec2t.find_quantizer_state(state)
  assert [l.path for l in summary.layers] == [f"{n}/kernel" for n in TERNARY_LEAVES]
  for layer, name in zip(summary.layers, TERNARY_LEAVES):
    kernel = np.asarray(params[name]["kernel"])
    assert layer.shape == kernel.shape
    np.testing.assert_allclose(layer.sparsity, np.mean(kernel == 0))
    np.testing.assert_allclose(layer.w_p, core.field("w_p")[name]["kernel"])
    np.testing.assert_allclose(layer.lam, core.field("lam")[name]["kernel"])
    counts = np.array([np.sum(kernel < 0), np.sum(kernel == 0), np.sum(kernel > 0)])
    p = counts[counts > 0] / kernel.size
    np.testing.assert_allclose(layer.entropy, -np.sum(p * np.log2(p)), rtol=1e-5)


def test_summary_totals_weight_layers_by_size():
  _, state, _ = _trained()
  summary = ec2t.summary(state)
  numel = sum(int(np.prod(l.shape)) for l in summary.layers)
  zeros = sum(l.sparsity * np.prod(l.shape) for l in summary.layers)
  assert summary.totals["numel"] == numel
  np.testing.assert_allclose(summary.totals["sparsity"], zeros / numel)


def test_summary_prints_a_table_and_exports_a_dict():
  _, state, _ = _trained()
  summary = ec2t.summary(state)
  text = str(summary)
  assert "sparsity" in text and "Conv_2/kernel" in text and "total" in text
  data = summary.to_dict()
  assert data["step"] == 2 and not data["frozen"]
  assert data["layers"][0]["path"] == "Conv_1/kernel"
