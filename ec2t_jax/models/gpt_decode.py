"""Token-by-token decoding of a :class:`~ec2t_jax.models.GPT` from its params, with a KV cache.

The same network as :class:`~ec2t_jax.models.GPT` (pre-LayerNorm blocks,
tied LM head), written as pure functions of a params tree so that a linear
layer's ``kernel`` may be a dense array *or* any object with a
``matmul(x)`` method (the packed ternary kernels of
:mod:`ec2t_jax._src.export.packed_matmul`): decoding one token per step then
reads each weight once per step, which is what a packed kernel speeds up.

The params are the GPT's ``nnx.to_pure_dict`` (string or int keys, unrolled
``blocks/0, blocks/1, ...`` or scanned blocks whose leaves carry a leading
layer axis; a stacked packed kernel is a tuple of per-layer kernels), as
:func:`ec2t_jax.export.load` or :func:`ec2t_jax.export.load_packed` return
them. Activations run in the dtype of the token embedding (cast the params
with :func:`cast_floats` for bf16); LayerNorm statistics and the softmax in
float32; logits in float32.

Example:
  >>> from flax import nnx
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from ec2t_jax.models import GPT, GPTConfig, gpt_decode
  >>> config = GPTConfig(vocab_size=11, num_layers=2, width=16, num_heads=2, block_size=8)
  >>> model = GPT(config, rngs=nnx.Rngs(0))
  >>> params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  >>> tokens = jnp.array([[1, 2, 3, 4]])
  >>> _, logits = gpt_decode.generate(params, tokens[:, :1], config=config, new_tokens=3,
  ...                                 forced=tokens[:, 1:])
  >>> np.testing.assert_allclose(logits, model(tokens)[:, :3], atol=1e-5)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ec2t_jax.models.gpt import GPTConfig


class KVCache(NamedTuple):
  """Keys and values of every layer: ``[layers, batch, block_size, heads, head_dim]``."""
  k: jax.Array
  v: jax.Array


def init_cache(config: GPTConfig, batch: int, dtype=jnp.float32) -> KVCache:
  """An empty cache for ``batch`` sequences of up to ``config.block_size`` tokens."""
  shape = (config.num_layers, batch, config.block_size, config.num_heads,
           config.width // config.num_heads)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def _is_kernel_object(x) -> bool:
  return hasattr(x, "matmul")


def cast_floats(params, dtype):
  """``params`` with every float array in ``dtype``; packed kernels untouched."""
  def cast(x):
    if _is_kernel_object(x) or not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
      return x
    return jnp.asarray(x, dtype)
  return jax.tree.map(cast, params, is_leaf=_is_kernel_object)


def _get(tree: Mapping, key):
  return tree[key] if key in tree else tree[str(key)]


def layer_params(params, num_layers: int) -> list:
  """The blocks' params, one tree per layer (unrolled or scanned ``blocks``)."""
  blocks = params["blocks"]
  if isinstance(blocks, Mapping) and all(str(k).isdigit() for k in blocks):
    return [_get(blocks, i) for i in range(num_layers)]
  slice_of = lambda i: (lambda x: x[i])
  stacked = lambda x: isinstance(x, (tuple, list)) or _is_kernel_object(x)
  return [jax.tree.map(slice_of(i), blocks, is_leaf=stacked) for i in range(num_layers)]


def linear(x, p: Mapping) -> jax.Array:
  """``x @ kernel + bias`` in ``x.dtype`` (float32 accumulation); ``kernel`` may be packed."""
  kernel = p["kernel"]
  if _is_kernel_object(kernel):
    y = kernel.matmul(x)
  else:
    y = jnp.dot(x, jnp.asarray(kernel).astype(x.dtype),
                preferred_element_type=jnp.float32).astype(x.dtype)
  return y + jnp.asarray(p["bias"]).astype(x.dtype) if "bias" in p else y


def _layer_norm(x, p, eps: float = 1e-5):
  h = x.astype(jnp.float32)
  mean = h.mean(-1, keepdims=True)
  var = jnp.square(h - mean).mean(-1, keepdims=True)
  h = (h - mean) * jax.lax.rsqrt(var + eps) * jnp.asarray(p["scale"], jnp.float32)
  if "bias" in p:
    h = h + jnp.asarray(p["bias"], jnp.float32)
  return h.astype(x.dtype)


def decode_step(params, config: GPTConfig, cache: KVCache, tokens, position):
  """One token per sequence at ``position``: ``(logits [batch, vocab] float32, cache)``.

  Args:
    params: the GPT's params (module docstring).
    config: its :class:`GPTConfig`.
    cache: from :func:`init_cache` (positions ``< position`` filled).
    tokens: ``int32 [batch]``, the tokens at ``position``.
    position: scalar ``int32``, ``< config.block_size``.
  """
  heads, width = config.num_heads, config.width
  head_dim = width // heads
  wte = jnp.asarray(params["wte"]["embedding"])
  x = wte[tokens] + jnp.asarray(params["wpe"]["embedding"])[position].astype(wte.dtype)
  batch = x.shape[0]
  visible = jnp.arange(config.block_size) <= position
  keys, values = [], []
  for i, block in enumerate(layer_params(params, config.num_layers)):
    attn = block["attn"]
    q, k, v = jnp.split(linear(_layer_norm(x, block["ln_1"]), attn["c_attn"]), 3, axis=-1)
    k_cache = jax.lax.dynamic_update_index_in_dim(
        cache.k[i], k.reshape(batch, heads, head_dim).astype(cache.k.dtype), position, 1)
    v_cache = jax.lax.dynamic_update_index_in_dim(
        cache.v[i], v.reshape(batch, heads, head_dim).astype(cache.v.dtype), position, 1)
    keys.append(k_cache)
    values.append(v_cache)
    q = q.reshape(batch, heads, head_dim).astype(jnp.float32)
    scores = jnp.einsum("bhd,bthd->bht", q, k_cache.astype(jnp.float32)) / math.sqrt(head_dim)
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    y = jnp.einsum("bht,bthd->bhd", weights, v_cache.astype(jnp.float32))
    x = x + linear(y.reshape(batch, width).astype(x.dtype), attn["c_proj"])
    mlp = block["mlp"]
    h = jax.nn.gelu(linear(_layer_norm(x, block["ln_2"]), mlp["c_fc"]), approximate=False)
    x = x + linear(h, mlp["c_proj"])
  h = _layer_norm(x, params["ln_f"])
  logits = jnp.dot(h, wte.astype(h.dtype).T, preferred_element_type=jnp.float32)
  return logits, KVCache(jnp.stack(keys), jnp.stack(values))


@functools.partial(jax.jit, static_argnames=("config", "new_tokens", "temperature"))
def generate(params, prompt, key=None, *, config: GPTConfig, new_tokens: int,
             temperature: float = 0.0, forced=None):
  """Feeds ``prompt`` then decodes ``new_tokens`` tokens, one jitted loop.

  Args:
    params: the GPT's params (module docstring); float leaves in the compute dtype.
    prompt: ``int32 [batch, P]``, ``P >= 1``.
    key: PRNG key for ``temperature > 0``.
    config: the :class:`GPTConfig`.
    new_tokens: tokens to produce (``P + new_tokens - 1 <= block_size``).
    temperature: 0 for greedy (argmax), else softmax sampling of logits / temperature.
    forced: optional ``int32 [batch, new_tokens]``: feed these instead of the
      chosen tokens (teacher forcing; the returned logits are then the
      model's at every position, as a full forward pass gives them).

  Returns:
    ``(tokens [batch, new_tokens], logits [batch, new_tokens, vocab] float32)``:
    the logits that chose each token.
  """
  batch, length = prompt.shape
  if length < 1 or length + new_tokens - 1 > config.block_size:
    raise ValueError(f"prompt of {length} tokens + {new_tokens} new tokens exceeds block_size "
                     f"{config.block_size}")
  if temperature > 0 and key is None:
    raise ValueError("generate: temperature > 0 needs a PRNG key")
  dtype = jnp.asarray(params["wte"]["embedding"]).dtype
  cache = init_cache(config, batch, dtype)

  def feed(cache, inputs):
    token, position = inputs
    _, cache = decode_step(params, config, cache, token, position)
    return cache, None

  if length > 1:
    cache, _ = jax.lax.scan(feed, cache, (prompt[:, :-1].T, jnp.arange(length - 1)))

  def step(carry, inputs):
    cache, token = carry
    position, sub, given = inputs
    logits, cache = decode_step(params, config, cache, token, position)
    if temperature > 0:
      chosen = jax.random.categorical(sub, logits / temperature).astype(jnp.int32)
    else:
      chosen = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    nxt = chosen if given is None else given
    return (cache, nxt), (chosen, logits)

  keys = jax.random.split(key if key is not None else jax.random.key(0), new_tokens)
  positions = length - 1 + jnp.arange(new_tokens)
  given = None if forced is None else jnp.asarray(forced, jnp.int32).T
  _, (tokens, logits) = jax.lax.scan(step, (cache, prompt[:, -1].astype(jnp.int32)),
                                     (positions, keys, given))
  return tokens.T, logits.transpose(1, 0, 2)


def param_bytes(params) -> int:
  """Bytes resident: packed kernels by their ``nbytes``, arrays by size x itemsize."""
  total = 0
  for leaf in jax.tree.leaves(params, is_leaf=_is_kernel_object):
    total += int(leaf.nbytes) if _is_kernel_object(leaf) else int(jnp.asarray(leaf).nbytes)
  return total


def random_ternary(params, seed: int = 0, *, sparsity: float = 0.5, per_column: bool = True,
                   scale: float = 0.02) -> Any:
  """``params`` (numpy) with every block kernel replaced by a random ternary one (benchmarks).

  Each ``kernel`` under ``blocks`` gets i.i.d. codes (zero with probability
  ``sparsity``, else a random sign) and positive per-column (or per-layer)
  scales ``w_n, w_p`` uniform in ``[0.5, 1.5] * scale``; everything else is kept.
  """
  rng = np.random.default_rng(seed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for path, leaf in flat:
    leaf = np.asarray(leaf)
    names = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
    if "blocks" in names and names[-1] == "kernel":
      shape = leaf.shape
      code = rng.choice(np.array([-1, 0, 1], np.int8), size=shape,
                        p=[(1 - sparsity) / 2, sparsity, (1 - sparsity) / 2])
      scales = shape[:-2] + (1, shape[-1] if per_column else 1)
      w_n, w_p = (scale * rng.uniform(0.5, 1.5, scales) for _ in range(2))
      leaf = np.where(code > 0, w_p, np.where(code < 0, -w_n, 0.0)).astype(np.float32)
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)
