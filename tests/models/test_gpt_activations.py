"""W1.58A8: the GPT's ``activation_bits=8`` against a numpy transcription (per-token absmax
int8 inputs of the blocks' linear layers), its straight-through gradient, scanned == unrolled."""

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ec2t_jax import models

CONFIG = dict(vocab_size=11, block_size=8, num_layers=2, num_heads=2, width=16)
_erf = np.vectorize(math.erf, otypes=[np.float32])


def _model(bits=8, scan=False, seed=0):
  """A tiny GPT with weights of std 0.3 (the default init's 0.02 makes int8 rounding
  invisible in the logits)."""
  model = models.GPT(models.GPTConfig(**CONFIG, scan_layers=scan, activation_bits=bits),
                     rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state.to_pure_dict())
  keys = jax.random.split(jax.random.key(seed + 10), len(leaves))
  state.replace_by_pure_dict(jax.tree.unflatten(
      treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
  nnx.update(model, state)
  return model


def _logits(model, tokens):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.asarray(tokens))


def _tokens(seed=0):
  return np.asarray(jax.random.randint(jax.random.key(seed), (3, 8), 0, CONFIG["vocab_size"]))


def _params(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def np_int8_per_token(x):
  """BitNet's activation_quant: ``s = 127 / max|x|`` per token, round, clip, divide."""
  scale = np.float32(127) / np.maximum(np.abs(x).max(-1, keepdims=True), np.float32(1e-5))
  return (np.clip(np.round(x * scale), -128, 127) / scale).astype(np.float32)


def _np_gpt(p, tokens, quantize):
  q = np_int8_per_token if quantize else (lambda x: x)
  gelu = lambda x: np.float32(0.5) * x * (1 + _erf(x / np.float32(math.sqrt(2))))
  dense = lambda layer, x: x @ layer["kernel"] + layer["bias"]

  def norm(layer, x):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + np.float32(1e-5)) * layer["scale"] + layer["bias"]

  batch, length = tokens.shape
  width, heads = CONFIG["width"], CONFIG["num_heads"]
  x = p["wte"]["embedding"][tokens] + p["wpe"]["embedding"][np.arange(length)]
  for i in range(CONFIG["num_layers"]):
    b = p["blocks"][i]
    qkv = dense(b["attn"]["c_attn"], q(norm(b["ln_1"], x)))
    split = [t.reshape(batch, length, heads, width // heads).transpose(0, 2, 1, 3)
             for t in np.split(qkv, 3, axis=-1)]
    scores = split[0] @ split[1].transpose(0, 1, 3, 2) / np.float32(math.sqrt(width // heads))
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    y = (weights @ split[2]).transpose(0, 2, 1, 3).reshape(batch, length, width)
    x = x + dense(b["attn"]["c_proj"], q(y))
    hidden = gelu(dense(b["mlp"]["c_fc"], q(norm(b["ln_2"], x))))
    x = x + dense(b["mlp"]["c_proj"], q(hidden))
  return norm(p["ln_f"], x) @ p["wte"]["embedding"].T


def test_w8_inputs_give_the_numpy_per_token_int8_model():
  model, tokens = _model(8), _tokens()
  params = _params(model)
  expected = _np_gpt(params, tokens, quantize=True)
  np.testing.assert_allclose(_logits(model, tokens), expected, rtol=1e-4, atol=1e-4)
  # ... and the int8 grid matters: the float model is measurably elsewhere.
  assert np.abs(_np_gpt(params, tokens, quantize=False) - expected).max() > 1e-3


def test_float_inputs_are_the_default_and_match_numpy_without_quantization():
  model, tokens = _model(None), _tokens()
  np.testing.assert_allclose(_logits(model, tokens),
                             _np_gpt(_params(model), tokens, quantize=False),
                             rtol=1e-4, atol=1e-4)


def test_the_input_gradient_is_straight_through():
  """MLP with int8 inputs: the gradient is the float chain rule at the quantized point
  (dL/dx = ((r W_p^T) * gelu'(h)) W_fc^T, h = q(x) W_fc + b), as if q were the identity."""
  mlp = models.gpt.MLP(models.GPTConfig(**CONFIG, activation_bits=8), rngs=nnx.Rngs(2))
  x = np.asarray(jax.random.normal(jax.random.key(4), (5, CONFIG["width"])), np.float32)
  r = np.asarray(jax.random.normal(jax.random.key(5), (5, CONFIG["width"])), np.float32)
  grad = jax.grad(lambda v: jnp.sum(mlp(v) * r))(jnp.asarray(x))
  fc, proj = (jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m, nnx.Param)))
              for m in (mlp.c_fc, mlp.c_proj))
  h = np_int8_per_token(x) @ fc["kernel"] + fc["bias"]
  gelu_prime = 0.5 * (1 + _erf(h / np.sqrt(2))) + h * np.exp(-h * h / 2) / np.sqrt(2 * np.pi)
  expected = ((r @ proj["kernel"].T) * gelu_prime) @ fc["kernel"].T
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_scanned_and_unrolled_w8_models_agree():
  scanned, unrolled = _model(8, scan=True), _model(8, scan=False, seed=1)
  state = nnx.state(unrolled, nnx.Param)
  state.replace_by_pure_dict(models.unstack_blocks(_params(scanned), CONFIG["num_layers"]))
  nnx.update(unrolled, state)
  tokens = _tokens()
  np.testing.assert_allclose(_logits(scanned, tokens), _logits(unrolled, tokens),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 16, 0, True, "8"])
def test_other_activation_bits_are_refused_by_name(bits):
  with pytest.raises(ValueError, match=f"activation_bits must be None or 8.*{bits!r}"):
    models.GPTConfig(**CONFIG, activation_bits=bits)
