"""Sampling from the exported GPT as a packed inference model (``--sample_packed``).

The ``.ec2t`` file is read by :func:`ec2t_jax.export.load_packed`: the ternary
kernels stay packed in memory (int4 codes for ``xla``, 2-bit codes for the
Pallas kernel, ``pallas``), and :func:`ec2t_jax.models.gpt_decode.generate`
decodes with a KV cache, the matmuls reading the packed kernels.
"""

from __future__ import annotations

from typing import Any


def sample_packed(path: str, route: str, config: Any, data: Any, length: int, *,
                  prompt: str = "\n", temperature: float = 0.8, seed: int = 0,
                  dtype: str = "float32") -> tuple[str, int]:
  """``(text, resident bytes)``: up to ``length`` characters sampled from the packed model
  (at most ``config.block_size - len(prompt)``, the decoder's context)."""
  # pylint: disable=g-import-not-at-top  (the examples import JAX late)
  import jax
  import jax.numpy as jnp
  from ec2t_jax import export
  from ec2t_jax.models import gpt_decode
  tree = export.load_packed(path, route, dtype=jnp.dtype(dtype))
  ids = jnp.asarray(data.encode(prompt))[None]
  steps = min(length, config.block_size - ids.shape[1] + 1)
  tokens, _ = gpt_decode.generate(tree, ids, jax.random.key(seed), config=config,
                                  new_tokens=steps, temperature=temperature)
  return data.decode(tokens[0]), export.resident_bytes(tree)
