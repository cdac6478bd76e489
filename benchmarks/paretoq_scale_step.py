r"""ParetoQ's scale in the chain form against the official model trained by one Adam.

A toy regression (X: 512 x 128 Gaussian, a 128 x 64 kernel, half its channels 4x larger,
noise 0.1, the kernel started at the truth + 0.05 noise; MSE; 300 full-batch steps of
Adam 1e-3). The official model is ParetoQ's forward and backward (the numpy/jnp
transcription of ``models/utils_quant.py`` in ``tests/methods/test_paretoq.py``) with
``(W, alpha)`` trained by ``optax.adam``, as ``train.py`` trains ``weight_clip_val``
beside the weights; the chain form is ``optax.chain(optax.adam(1e-3), ec2t.paretoq(...))``
for each ``scale_step`` / ``scale_update``. Prints the final loss and how far the scales
travelled (mean ``|alpha - alpha0|``, in units of ``lr x steps``).

  python benchmarks/paretoq_scale_step.py      # ~3 min on the loaded 2-core machine
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ec2t_jax as ec2t

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "methods"))
from test_paretoq import OFFICIAL_BITS, _official_quantizer, official_init  # noqa: E402

STEPS, LR = 300, 1e-3
CHAIN = (("mean", 1.0), ("mean", 3.0), ("mean", 10.0), ("gradient", 1.0))


def main():
  rng = np.random.default_rng(0)
  n_in, n_out, n = 128, 64, 512
  x = jnp.asarray(rng.normal(size=(n, n_in)), jnp.float32)
  w_true = rng.normal(size=(n_in, n_out)) * 0.1
  w_true[:, : n_out // 2] *= 4  # channels of different scales
  y = x @ jnp.asarray(w_true, jnp.float32) + 0.1 * jnp.asarray(
      rng.normal(size=(n, n_out)), jnp.float32)
  k0 = jnp.asarray(w_true + rng.normal(size=w_true.shape) * 0.05, jnp.float32)
  loss = lambda w: jnp.mean((x @ w - y) ** 2)
  print("| bits | training | final loss | mean abs(alpha - alpha0) / (lr steps) |")
  print("|---|---|---|---|")
  for bits in (1.58, 2):
    quantize = _official_quantizer(OFFICIAL_BITS[bits])
    a0 = jnp.asarray(official_init(np.asarray(k0).T, OFFICIAL_BITS[bits]).T)
    opt = optax.adam(LR)
    p = {"k": k0, "a": a0}
    s = opt.init(p)

    @jax.jit
    def step(p, s):
      g = jax.grad(lambda p: loss(quantize(p["k"], p["a"])))(p)
      u, s = opt.update(g, s)
      return optax.apply_updates(p, u), s

    for _ in range(STEPS):
      p, s = step(p, s)
    travel = float(jnp.mean(jnp.abs(p["a"] - a0))) / (LR * STEPS)
    print(f"| {bits} | official: Adam on (W, alpha) | "
          f"{float(loss(quantize(p['k'], p['a']))):.4f} | {travel:.3f} |")
    for mode, k in CHAIN:
      tx = optax.chain(optax.adam(LR), ec2t.paretoq(bits, scale_step=mode, scale_update=k,
                                                    selection=lambda *_: True))
      params = {"k": k0}
      state = tx.init(params)
      params = ec2t.quantized_params(params, state)

      @jax.jit
      def chain_step(params, state):
        u, state = tx.update(jax.grad(lambda p: loss(p["k"]))(params), state, params)
        return optax.apply_updates(params, u), state

      for _ in range(STEPS):
        params, state = chain_step(params, state)
      leaf = ec2t.find_quantizer_state(state).leaves["k"]
      travel = float(jnp.mean(jnp.abs(leaf.scale - a0))) / (LR * STEPS)
      print(f"| {bits} | chain, scale_step={mode!r}, scale_update={k:g} | "
            f"{float(loss(params['k'])):.4f} | {travel:.3f} |")


if __name__ == "__main__":
  main()
