"""The GPT example's staged methods: each stage anneals its own cosine (issue 23, item 5)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import examples_support  # pylint: disable=unused-import  (puts examples/ on the path)
import ec2t_jax as ec2t
import shakespeare_gpt

PHASE1, PHASE2, LR = 30, 10, 1e-3

pytestmark = pytest.mark.slow  # 40 steps of a compiled staged optimizer


def _learning_rates(method: str) -> list:
  """Every update's learning rate / LR, read off an unselected 1-D leaf with gradient 1."""
  fv = types.SimpleNamespace(
      method=method, method_options="", gamma=0.0, init_scale=0.3, sustain=0.05,
      learning_rate=LR, ec2t_weight_decay=0.0, phase1_steps=PHASE1, phase2_steps=PHASE2,
      beta2=0.99, clip=1e9, bits_per_weight=0.0, target_bytes=0.0, target_sparsity=0.0,
      budget_ramp=0.0, export_float16=False)
  params = {"bias": jnp.zeros((3,)), "k": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)}
  setup = shakespeare_gpt.method_setup(fv, ec2t.Selection([ec2t.Rule("^k$")]), PHASE1 + PHASE2)
  tx, last = setup.staged(PHASE1, 1, phase2_steps=PHASE2)
  state = tx.init(params)
  p = ec2t.quantized_params(params, state)
  grads = {"bias": jnp.ones((3,)), "k": jnp.zeros((8, 8))}
  update = jax.jit(tx.update)
  rates = []
  for step in range(PHASE1 + PHASE2):
    if step == PHASE1:
      state = ec2t.set_phase(state, last)
    updates, state = update(grads, state, p)
    p = optax.apply_updates(p, updates)
    rates.append(-float(updates["bias"][0]) / LR)
  return rates


def test_inq_runs_a_full_cosine_between_restarts():
  # INQ (4 portions): stages begin in updates 10, 20, 30 (phase 2); each restarts the cosine
  # from the next update, over that run's length: 11, 10, 10 and 9 updates.
  cosine = lambda n: [(1 + np.cos(np.pi * c / n)) / 2 for c in range(n)]
  expected = cosine(11) + cosine(10) + cosine(10) + cosine(9)
  np.testing.assert_allclose(_learning_rates("inq"), expected, rtol=1e-5, atol=1e-7)
