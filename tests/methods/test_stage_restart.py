"""ec2t.restart_on_stage: a fresh inner optimizer when a staged method's stage begins."""

import jax.numpy as jnp
import numpy as np
import optax

import ec2t_jax as ec2t

PARAMS = {"a": jnp.ones((3, 4)), "b": jnp.linspace(-1.0, 1.0, 24).reshape(4, 6),
          "c": jnp.ones((6, 2))}
ONLY_B = lambda path, leaf: path == "b"
GRADS = {k: jnp.full(v.shape, 0.1) for k, v in PARAMS.items()}


def _counts(tx, steps, phase_at=None):
  state = tx.init(PARAMS)
  params = ec2t.quantized_params(PARAMS, state)
  counts = []
  for step in range(steps):
    if phase_at is not None and step == phase_at[0]:
      state = ec2t.set_phase(state, phase_at[1])
    updates, state = tx.update(GRADS, state, params)
    params = optax.apply_updates(params, updates)
    counts.append(int(state.inner.count))
  return counts


def test_inner_count_restarts_after_the_step_that_begins_each_stage():
  # Stages by steps: step k is in stage k // 2 (three portions): stages 0 0 1 1 2 2.
  inner = optax.scale_by_schedule(lambda count: 1.0 / (count + 1.0))
  tx = ec2t.restart_on_stage(inner, ec2t.inq(5, (0.5, 0.75, 1.0), steps_per_stage=2, selection=ONLY_B))
  assert _counts(tx, 6) == [1, 2, 0, 1, 0, 1]


def test_a_phase_switch_restarts_the_inner_optimizer():
  inner = optax.scale_by_schedule(lambda count: 1.0 / (count + 1.0))
  tx = ec2t.restart_on_stage(inner, ec2t.slq(3, (0.5, 1.0), selection=ONLY_B))
  assert _counts(tx, 5, phase_at=(3, 1)) == [1, 2, 3, 0, 1]


def test_updates_equal_the_plain_chain_until_the_first_restart():
  make = lambda: ec2t.inq(5, (0.5, 1.0), steps_per_stage=3, selection=ONLY_B)
  restarted = ec2t.restart_on_stage(optax.adam(1e-2), make())
  plain = optax.chain(optax.adam(1e-2), make())
  s1, s2 = restarted.init(PARAMS), plain.init(PARAMS)
  params = ec2t.quantized_params(PARAMS, s1)
  for _ in range(3):
    u1, s1 = restarted.update(GRADS, s1, params)
    u2, s2 = plain.update(GRADS, s2, params)
    np.testing.assert_array_equal(u1["b"], u2["b"])
    params = optax.apply_updates(params, u1)


def test_same_shape_layers_grouped_in_the_state_still_restart():
  # Two selected leaves of one shape live stacked in QuantizerState.groups.
  params = {"b": PARAMS["b"], "b2": PARAMS["b"] * 0.5}
  grads = {k: jnp.full(v.shape, 0.1) for k, v in params.items()}
  inner = optax.scale_by_schedule(lambda count: 1.0 / (count + 1.0))
  tx = ec2t.restart_on_stage(inner, ec2t.inq(5, (0.5, 1.0), steps_per_stage=2,
                                             selection=lambda path, leaf: True))
  state = tx.init(params)
  p = ec2t.quantized_params(params, state)
  counts = []
  for _ in range(4):
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    counts.append(int(state.inner.count))
  assert counts == [1, 2, 0, 1]
