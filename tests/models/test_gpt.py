"""The NNX GPT: shapes, causality, tied head, scanned == unrolled, bad configs."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ec2t_jax import models

CONFIG = dict(vocab_size=11, block_size=8, num_layers=2, num_heads=2, width=16)


def _model(scan=False, seed=0):
  return models.GPT(models.GPTConfig(**CONFIG, scan_layers=scan), rngs=nnx.Rngs(seed))


def _tokens(seed=0, length=8):
  return jax.random.randint(jax.random.key(seed), (3, length), 0, CONFIG["vocab_size"])


def test_parameter_count_is_nanogpts_with_a_tied_head():
  d, v, t, layers = 16, 11, 8, 2
  per_block = (2 * 2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
  expected = v * d + t * d + layers * per_block + 2 * d  # no separate LM head
  params = nnx.to_pure_dict(nnx.state(_model(), nnx.Param))
  assert sum(x.size for x in jax.tree.leaves(params)) == expected


def test_a_later_token_never_changes_earlier_logits():
  model, tokens = _model(), _tokens()
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % CONFIG["vocab_size"])
  np.testing.assert_array_equal(model(tokens)[:, :5], model(changed)[:, :5])
  assert not np.allclose(model(tokens)[:, 5:], model(changed)[:, 5:])


def test_the_head_is_the_token_embedding_transposed():
  model = _model()
  hidden = jax.random.normal(jax.random.key(3), (2, CONFIG["width"]))
  np.testing.assert_allclose(model.wte.attend(hidden), hidden @ model.wte.embedding[...].T,
                             rtol=1e-6)


def test_scanned_blocks_compute_the_unrolled_model_with_the_same_weights():
  scanned, unrolled = _model(scan=True), _model(scan=False, seed=1)
  stacked = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  assert stacked["blocks"]["mlp"]["c_fc"]["kernel"].shape == (2, 16, 64)
  state = nnx.state(unrolled, nnx.Param)
  state.replace_by_pure_dict(models.unstack_blocks(stacked, 2))
  nnx.update(unrolled, state)
  np.testing.assert_allclose(scanned(_tokens()), unrolled(_tokens()), rtol=1e-5, atol=1e-6)


def test_a_sequence_longer_than_the_context_is_refused():
  with pytest.raises(ValueError, match="block_size 8"):
    _model()(_tokens(length=9))


@pytest.mark.parametrize("field, value, message", [
    ("width", 15, "multiple of num_heads"), ("num_layers", 0, "num_layers must be >= 1")])
def test_bad_configurations_are_refused_by_name(field, value, message):
  with pytest.raises(ValueError, match=message):
    models.GPTConfig(**{**CONFIG, field: value})
