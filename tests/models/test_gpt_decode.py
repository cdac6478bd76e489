"""KV-cache decoding of the GPT from its params: the full forward pass is the oracle."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ec2t_jax import models
from ec2t_jax.models import gpt_decode

CONFIG = models.GPTConfig(vocab_size=11, block_size=8, num_layers=2, num_heads=2, width=16,
                          scan_layers=True)
TOKENS = jnp.array([[1, 5, 2, 9, 3, 3, 0, 7], [4, 4, 10, 1, 2, 6, 8, 5]], jnp.int32)


@pytest.fixture(scope="module")
def scanned():
  model = models.GPT(CONFIG, rngs=nnx.Rngs(0))
  return model, nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.fixture(scope="module")
def greedy(scanned):
  _, params = scanned
  return gpt_decode.generate(params, TOKENS[:, :2], config=CONFIG, new_tokens=7)


@pytest.mark.slow  # a scanned GPT built and a decoder compiled (the doctest runs by default)
def test_teacher_forced_decoding_of_scanned_blocks_equals_the_forward_pass(scanned):
  model, params = scanned
  _, logits = gpt_decode.generate(params, TOKENS[:, :1], config=CONFIG, new_tokens=7,
                                  forced=TOKENS[:, 1:])
  np.testing.assert_allclose(logits, model(TOKENS)[:, :7], atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # a scanned GPT built and a decoder compiled (the doctest runs by default)
def test_greedy_tokens_are_the_argmax_of_their_logits(greedy):
  tokens, logits = greedy
  np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))


@pytest.mark.slow  # a scanned GPT built and a decoder compiled (the doctest runs by default)
def test_greedy_logits_are_the_forward_pass_on_the_generated_text(scanned, greedy):
  model, _ = scanned
  tokens, logits = greedy
  text = jnp.concatenate([TOKENS[:, :2], tokens[:, :-1]], axis=1)  # 8 tokens
  np.testing.assert_allclose(logits, model(text)[:, 1:], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def zeros():
  """The scanned GPT's params as zeros (shapes traced, nothing initialised: fast)."""
  shapes = nnx.state(nnx.eval_shape(lambda: models.GPT(CONFIG, rngs=nnx.Rngs(0))), nnx.Param)
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nnx.to_pure_dict(shapes))


def test_a_prompt_and_new_tokens_beyond_the_context_are_refused(zeros):
  with pytest.raises(ValueError, match="exceeds block_size 8"):
    gpt_decode.generate(zeros, TOKENS[:, :4], config=CONFIG, new_tokens=6)


def test_sampling_needs_a_key(zeros):
  with pytest.raises(ValueError, match="temperature > 0 needs a PRNG key"):
    gpt_decode.generate(zeros, TOKENS[:, :1], config=CONFIG, new_tokens=2, temperature=0.8)


def test_cast_floats_casts_arrays_and_keeps_integers_and_packed_kernels():
  class Packed:
    def matmul(self, x):
      return x
  packed = Packed()
  out = gpt_decode.cast_floats({"a": np.ones(2, np.float32), "b": np.ones(2, np.int32),
                                "k": packed}, jnp.bfloat16)
  assert out["a"].dtype == jnp.bfloat16 and out["b"].dtype == np.int32 and out["k"] is packed


def test_random_ternary_makes_block_kernels_ternary_per_column():
  params = {"blocks": {"0": {"mlp": {"kernel": np.zeros((6, 5), np.float32),
                                     "bias": np.ones(5, np.float32)}}},
            "wte": {"embedding": np.ones((3, 2), np.float32)}}
  out = gpt_decode.random_ternary(params, 0, sparsity=0.5)
  kernel = out["blocks"]["0"]["mlp"]["kernel"]
  assert all(np.unique(kernel[:, c]).size <= 3 for c in range(5))
  assert (kernel == 0).any() and (kernel > 0).any() and (kernel < 0).any()
  np.testing.assert_array_equal(out["wte"]["embedding"], params["wte"]["embedding"])
