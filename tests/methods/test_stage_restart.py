"""ec2t.restart_on_stage: a fresh inner optimizer when a staged method's stage begins."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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
  tx = ec2t.restart_on_stage(inner, ec2t.slq(3, (0.5, 1.0), freeze_order="loss", selection=ONLY_B))
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


# ------------------------------------------------- each stage anneals (stage_steps)

END = 0.25


def _linear(steps):
  """SGD whose learning rate falls linearly from 1 to END over ``steps`` updates."""
  return optax.sgd(optax.linear_schedule(1.0, END, max(steps - 1, 1)))


def _learning_rates(tx, steps):
  """The learning rate of every update, read off leaf "a" (unselected, gradient 1)."""
  grads = {k: jnp.ones(v.shape) for k, v in PARAMS.items()}
  state = tx.init(PARAMS)
  params = ec2t.quantized_params(PARAMS, state)
  update = jax.jit(tx.update)
  rates = []
  for _ in range(steps):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    rates.append(-float(updates["a"][0, 0]))
  return rates


@pytest.mark.slow  # compiles three inner optimizers
def test_each_run_of_the_inner_optimizer_ends_at_the_schedules_end_value():
  # Stage k by steps: k = step // 3; a stage begun in update k restarts from update k + 1,
  # so the runs are updates 0-3, 4-6 and 7-11.
  tx = ec2t.restart_on_stage(_linear, ec2t.inq(5, (0.5, 0.75, 1.0), steps_per_stage=3,
                                               selection=ONLY_B), stage_steps=(4, 3, 5))
  np.testing.assert_allclose(_learning_rates(tx, 12),
                             [1.0, 0.75, 0.5, 0.25, 1.0, 0.625, 0.25,
                              1.0, 0.8125, 0.625, 0.4375, 0.25], rtol=1e-6)


def test_one_length_serves_every_run():
  tx = ec2t.restart_on_stage(_linear, ec2t.inq(5, (0.5, 0.75, 1.0), steps_per_stage=2,
                                               selection=ONLY_B), stage_steps=2)
  # Runs: updates 0-2 (the first run's third update stays at the end value), 3-4, 5-6.
  np.testing.assert_allclose(_learning_rates(tx, 7), [1.0, END, END, 1.0, END, 1.0, END],
                             rtol=1e-6)


@pytest.mark.slow
def test_a_weight_decay_inside_restart_on_stage_shrinks_the_latents():
  lr, wd = 1e-2, 0.1
  tx = ec2t.restart_on_stage(optax.adamw(lr, weight_decay=wd),
                             ec2t.inq(5, (0.5, 1.0), steps_per_stage=2, selection=ONLY_B))
  state = tx.init(PARAMS)
  start = ec2t.find_quantizer_state(state).latent["b"]
  params = ec2t.quantized_params(PARAMS, state)
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  for _ in range(3):
    updates, state = tx.update(zeros, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(ec2t.find_quantizer_state(state).latent["b"],
                             start * (1 - lr * wd) ** 3, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, (4, 0)])
def test_stage_steps_that_are_not_whole_numbers_of_at_least_one_are_refused(bad):
  with pytest.raises(ValueError, match="stage_steps"):
    ec2t.restart_on_stage(_linear, ec2t.inq(5, selection=ONLY_B), stage_steps=bad)


def test_a_built_optimizer_cannot_restart_with_each_stages_length():
  with pytest.raises(TypeError, match="factory"):
    ec2t.restart_on_stage(optax.adam(optax.cosine_decay_schedule(1e-3, 100)),
                          ec2t.inq(5, selection=ONLY_B), stage_steps=10)


def test_a_factory_needs_stage_steps():
  with pytest.raises(TypeError, match="stage_steps"):
    ec2t.restart_on_stage(_linear, ec2t.inq(5, selection=ONLY_B))


def test_a_factory_that_returns_no_optimizer_is_refused():
  with pytest.raises(TypeError, match=r"inner\(10\)"):
    ec2t.restart_on_stage(lambda n: optax.cosine_decay_schedule(1e-3, n),
                          ec2t.inq(5, selection=ONLY_B), stage_steps=10)


def test_a_factory_whose_optimizers_keep_different_states_is_refused_at_init():
  tx = ec2t.restart_on_stage(lambda n: optax.adam(1e-3) if n == 3 else optax.sgd(1e-3),
                             ec2t.inq(5, selection=ONLY_B), stage_steps=(3, 5))
  with pytest.raises(ValueError, match="different structures"):
    tx.init(PARAMS)
