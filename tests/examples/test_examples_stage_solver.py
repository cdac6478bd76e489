"""The staged methods' solver per stage (issue 25, item 2): ``--method_options solver=...``.

Every update's step is read off an unselected leaf whose loss gradient is 1: with Adam
(bias-corrected moments of a constant gradient) the step is the learning rate itself; with
the official solver it is SGD momentum on the gradient plus L2 5e-4, written out below.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import examples_support  # pylint: disable=unused-import  (puts examples/ on the path)
from common import methods
from common import pipeline
from common.cli import UserError
import ec2t_jax as ec2t
from ec2t_jax import models
import shakespeare_gpt

PHASE1, PHASE2, LR = 30, 10, 1e-3


def _setup(options: str):
  config = pipeline.PipelineConfig(
      workdir="unused", dataset="mnist", model_name="lenet5", model=models.LeNet5(),
      method="inq", method_options=options, learning_rate=LR, weight_decay=0.0,
      phase2_epochs=1)
  return methods.build(config, ec2t.Selection([ec2t.Rule("^k$")]))


def _steps(options: str) -> tuple[list, list]:
  """Every update of the unselected leaf ``bias`` (value and update) over both phases."""
  tx, last = _setup(options).staged(PHASE1, 1, phase2_steps=PHASE2)
  params = {"bias": jnp.zeros((3,)), "k": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)}
  state = tx.init(params)
  p = ec2t.quantized_params(params, state)
  grads = {"bias": jnp.ones((3,)), "k": jnp.zeros((8, 8))}
  update = jax.jit(tx.update)
  values, steps = [], []
  for step in range(PHASE1 + PHASE2):
    if step == PHASE1:
      state = ec2t.set_phase(state, last)
    values.append(float(p["bias"][0]))
    updates, state = update(grads, state, p)
    p = optax.apply_updates(p, updates)
    steps.append(-float(updates["bias"][0]))
  return values, steps


# INQ's 4 portions over 30 + 10 steps: stages begin in updates 10, 20 and 30 (phase 2); each
# restarts the solver from the next update, so its runs are 11, 10, 10 and 9 updates long.
RUNS = (11, 10, 10, 9)


@pytest.mark.slow  # 40 steps of a compiled staged optimizer
def test_solver_inner_anneals_adam_by_a_cosine_within_each_stage():
  cosine = lambda n: [LR * (1 + np.cos(np.pi * c / n)) / 2 for c in range(n)]
  expected = sum((cosine(n) for n in RUNS), [])
  np.testing.assert_allclose(_steps("")[1], expected, rtol=1e-5, atol=1e-9)


@pytest.mark.slow  # 40 steps of a compiled staged optimizer
def test_solver_official_is_sgd_momentum_with_l2_on_the_official_step_schedule():
  values, steps = _steps("solver=official")
  expected, k = [], 0
  for n in RUNS:  # each run: momentum 0 and the schedule's count 0 again
    momentum, every = 0.0, max(1, round(15 / 63 * n))
    for c in range(n):
      rate = 0.003 * 0.2 ** (c // every)
      momentum = (1.0 + 5e-4 * values[k]) + 0.9 * momentum
      expected.append(rate * momentum)
      k += 1
  np.testing.assert_allclose(steps, expected, rtol=1e-5, atol=1e-10)


@pytest.mark.slow  # 40 steps of a compiled staged optimizer
def test_solver_constant_restarts_adam_at_one_rate():
  np.testing.assert_allclose(_steps("solver=constant")[1], [LR] * (PHASE1 + PHASE2),
                             rtol=3e-5)  # float32


@pytest.mark.parametrize("options, message", [
    ("solver=sgd", "solver must be one of inner, official, constant, got 'sgd'"),
    ("solver=official,restart=false", "solver=official .* needs restart=true"),
])
def test_a_bad_solver_is_a_clear_user_error(options, message):
  with pytest.raises(UserError, match=message):
    _setup(options)


def test_solver_constant_is_refused_beside_a_run_long_schedule():
  config = shakespeare_gpt.MethodConfig(
      method="inq", method_options="solver=constant", gamma=0.0, init_scale=0.3, sustain=0.05,
      learning_rate=LR, weight_decay=0.0, phase2_epochs=1, ec2t_steps=100,
      inner_optimizer=lambda steps=100: optax.adam(optax.cosine_decay_schedule(LR, steps)))
  with pytest.raises(UserError, match="solver=constant .* never anneal"):
    methods.build(config, ec2t.Selection([ec2t.Rule("^k$")]))
