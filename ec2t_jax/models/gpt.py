"""A nanoGPT-style decoder-only transformer in Flax NNX, unrolled or with scanned blocks.

Pre-LayerNorm blocks (causal self-attention, GELU MLP of 4x width), learned
position embeddings, a final LayerNorm and an LM head tied to the token
embedding (``logits = h @ wte^T``), biases everywhere, no dropout (nanoGPT's CPU
configuration uses none), initialised as nanoGPT does (normal 0.02; the
residual projections ``0.02 / sqrt(2 L)``; zero biases).

With ``activation_bits=8`` the model is BitNet b1.58's "W1.58A8": the input
of every linear layer of the blocks (``c_attn``, ``attn/c_proj``, ``c_fc``,
``mlp/c_proj``: the layers a method ternarizes) is quantized per token to
int8 by absmax (:func:`ec2t_jax.quantize_activations_int8`:
``s = 127 / max_j |x_j|``, ``round(s x)`` clipped to ``[-128, 127]``, divided
by ``s``), with a straight-through gradient, as BitNet's ``BitLinear`` does;
the embeddings, LayerNorms, attention scores and the tied LM head stay float.
It works with any method (or none): the weights are the method's business.

With ``scan_layers=True`` the blocks are built once by ``nnx.vmap`` (every
parameter of ``blocks`` gets a leading axis of length ``num_layers``, e.g.
``blocks/mlp/c_fc/kernel`` of shape ``(L, d, 4d)``) and applied by
``nnx.scan``: the traced program holds one block, so compile time does not
grow with depth. Unrolled, the blocks are ``blocks/0``, ``blocks/1``, ...

Example:
  >>> from flax import nnx
  >>> import jax.numpy as jnp
  >>> from ec2t_jax.models import GPT, GPTConfig
  >>> model = GPT(GPTConfig(vocab_size=65, num_layers=2, width=32, num_heads=2,
  ...                       block_size=16), rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((3, 16), jnp.int32)).shape
  (3, 16, 65)
"""

from __future__ import annotations

import dataclasses
import math

from typing import Optional

from flax import nnx
import jax
import jax.numpy as jnp

from ec2t_jax._src.methods.bitnet import quantize_activations_int8

ACTIVATION_BITS = (None, 8)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Shape of a :class:`GPT` (defaults: nanoGPT's CPU configuration, 0.8M parameters).

  Attributes:
    vocab_size: number of tokens (65 characters for tiny Shakespeare).
    block_size: longest context (positions embedded).
    num_layers: transformer blocks.
    num_heads: attention heads (``width`` must be a multiple).
    width: embedding width ``d``.
    bias: biases in the linear layers and LayerNorms.
    scan_layers: stack the blocks (``nnx.vmap``) and apply them with ``nnx.scan``.
    activation_bits: None (float inputs) or 8: the blocks' linear layers take
      their inputs quantized per token to int8 (absmax, straight-through;
      BitNet's W1.58A8 with ternary weights).
  """
  vocab_size: int = 65
  block_size: int = 64
  num_layers: int = 4
  num_heads: int = 4
  width: int = 128
  bias: bool = True
  scan_layers: bool = False
  activation_bits: Optional[int] = None

  def __post_init__(self):
    if self.activation_bits not in ACTIVATION_BITS or isinstance(self.activation_bits, bool):
      raise ValueError(f"GPTConfig.activation_bits must be None or 8 (per-token absmax int8), "
                       f"got {self.activation_bits!r}")
    for name in ("vocab_size", "block_size", "num_layers", "num_heads", "width"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.width % self.num_heads:
      raise ValueError(f"GPTConfig.width ({self.width}) must be a multiple of num_heads "
                       f"({self.num_heads})")


def _linear(config: GPTConfig, n_in: int, n_out: int, rngs: nnx.Rngs, std: float = 0.02):
  return nnx.Linear(n_in, n_out, use_bias=config.bias,
                    kernel_init=nnx.initializers.normal(std), rngs=rngs)


def _linear_input(activation_bits: Optional[int], x):
  """A block linear layer's input: per-token int8 (straight-through) with ``activation_bits=8``."""
  return x if activation_bits is None else quantize_activations_int8(x)


def _layer_norm(config: GPTConfig, rngs: nnx.Rngs):
  return nnx.LayerNorm(config.width, epsilon=1e-5, use_bias=config.bias, rngs=rngs)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention: ``c_attn`` (q, k, v) and ``c_proj``."""

  def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
    self.num_heads = config.num_heads
    self.activation_bits = config.activation_bits
    residual_std = 0.02 / math.sqrt(2 * config.num_layers)
    self.c_attn = _linear(config, config.width, 3 * config.width, rngs)
    self.c_proj = _linear(config, config.width, config.width, rngs, residual_std)

  def __call__(self, x):
    batch, length, width = x.shape
    heads = lambda t: t.reshape(batch, length, self.num_heads, width // self.num_heads)
    qkv = self.c_attn(_linear_input(self.activation_bits, x))
    q, k, v = (heads(t) for t in jnp.split(qkv, 3, axis=-1))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((length, length), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
    return self.c_proj(_linear_input(self.activation_bits, y))


class MLP(nnx.Module):
  """``c_proj(gelu(c_fc(x)))`` with a hidden width of ``4 d``."""

  def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
    residual_std = 0.02 / math.sqrt(2 * config.num_layers)
    self.activation_bits = config.activation_bits
    self.c_fc = _linear(config, config.width, 4 * config.width, rngs)
    self.c_proj = _linear(config, 4 * config.width, config.width, rngs, residual_std)

  def __call__(self, x):
    hidden = jax.nn.gelu(self.c_fc(_linear_input(self.activation_bits, x)), approximate=False)
    return self.c_proj(_linear_input(self.activation_bits, hidden))


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

  def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
    self.ln_1 = _layer_norm(config, rngs)
    self.attn = CausalSelfAttention(config, rngs)
    self.ln_2 = _layer_norm(config, rngs)
    self.mlp = MLP(config, rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class GPT(nnx.Module):
  """Decoder-only character/token model; ``model(tokens) -> logits``.

  Args:
    config: a :class:`GPTConfig`.
    rngs: ``nnx.Rngs`` of the initialisation.
  """

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    self.config = config
    embed_init = nnx.initializers.normal(0.02)
    self.wte = nnx.Embed(config.vocab_size, config.width, embedding_init=embed_init, rngs=rngs)
    self.wpe = nnx.Embed(config.block_size, config.width, embedding_init=embed_init, rngs=rngs)
    if config.scan_layers:
      @nnx.split_rngs(splits=config.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def create_blocks(rngs: nnx.Rngs):
        return Block(config, rngs)
      self.blocks = create_blocks(rngs)
    else:
      self.blocks = nnx.List([Block(config, rngs) for _ in range(config.num_layers)])
    self.ln_f = _layer_norm(config, rngs)

  def __call__(self, tokens):
    """Logits ``(batch, length, vocab)`` of the next token at every position."""
    length = tokens.shape[-1]
    if length > self.config.block_size:
      raise ValueError(f"sequence length {length} exceeds block_size {self.config.block_size}")
    x = self.wte(tokens) + self.wpe(jnp.arange(length))
    if self.config.scan_layers:
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def forward(h, block):
        return block(h)
      x = forward(x, self.blocks)
    else:
      for block in self.blocks:
        x = block(x)
    return self.wte.attend(self.ln_f(x))


def unstack_blocks(stacked_params, num_layers: int) -> dict:
  """Params of a scanned :class:`GPT` as the unrolled model's (``blocks/i/...``).

  Args:
    stacked_params: the scanned model's params as nested dicts
      (``nnx.state(model, nnx.Param).to_pure_dict()``).
    num_layers: length of the stack.

  Returns:
    The same params with ``blocks`` a dict ``{0: ..., 1: ...}`` of per-layer trees.
  """
  out = dict(stacked_params)
  out["blocks"] = {i: jax.tree.map(lambda x, i=i: x[i], stacked_params["blocks"])
                   for i in range(num_layers)}
  return out
