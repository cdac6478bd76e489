"""ec2t.chain: the inner optimizer's weight decay acts on the latent weights.

The oracle: with a zero loss gradient, AdamW's decoupled decay multiplies a
weight by ``1 - lr * wd`` per step, so ``n`` steps shrink every selected
leaf's latent weights by ``(1 - lr * wd)^n`` (zero-valued weights included)
and every other leaf exactly as ``optax.adamw`` alone does.
"""

from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ec2t_jax as ec2t
from ec2t_jax._src import core
from tests.models_for_tests import SmallNnxCNN

LR, WD, STEPS = 1e-2, 0.1, 3
PARAMS = {"a": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
          "b": jnp.linspace(-1.0, 1.0, 24).reshape(4, 6),
          "c": jnp.linspace(-0.5, 0.7, 24).reshape(4, 6)}
B_AND_C = lambda path, leaf: path in ("b", "c")  # same shape: their states are grouped
ZEROS = jax.tree.map(jnp.zeros_like, PARAMS)
GRADS = {k: jnp.sin(jnp.arange(v.size, dtype=jnp.float32) + i).reshape(v.shape)
         for i, (k, v) in enumerate(PARAMS.items())}
TRAINED = sorted(name for name, spec in ec2t.method_registry().items()
                 if spec.kind in ("train", "staged"))
# Methods whose step compiles slowly (as in tests/methods/test_contract.py): the slow set.
HEAVY = {"ec2t", "faraone", "inq", "mlq", "slq"}
TRAINED_MARKED = [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in TRAINED]


def _method(name):
  return ec2t.get_method(name).make_transform(selection=B_AND_C)


def _run(tx, grads=ZEROS, steps=STEPS, params=PARAMS):
  """``steps`` jitted updates from ``params`` (quantized first where a method is)."""
  state = tx.init(params)
  try:
    p = ec2t.quantized_params(params, state)
  except ValueError:  # no method in tx
    p = params
  update = jax.jit(tx.update)
  for _ in range(steps):
    updates, state = update(grads, state, p)
    p = optax.apply_updates(p, updates)
  return p, state


def _latents(state):
  latent = ec2t.find_quantizer_state(state).latent
  return {k: latent[k] for k in ("b", "c")}


# ------------------------------------------------------------------ the oracle


@pytest.mark.parametrize("name", TRAINED_MARKED)
def test_adamw_shrinks_every_latent_weight_by_one_minus_lr_wd_per_step(name):
  tx = ec2t.chain(optax.adamw(LR, weight_decay=WD), _method(name))
  start = _latents(tx.init(PARAMS))
  params, state = _run(tx)
  for key, latent in _latents(state).items():
    np.testing.assert_allclose(latent, start[key] * (1 - LR * WD) ** STEPS, rtol=1e-6,
                               atol=1e-7, err_msg=f"{name}: latents of {key!r}")
  # The leaf the method leaves alone: as optax.adamw alone.
  np.testing.assert_allclose(params["a"], PARAMS["a"] * (1 - LR * WD) ** STEPS, rtol=1e-6)


def test_leaves_the_method_leaves_alone_are_updated_as_by_adamw_alone():
  params, _ = _run(ec2t.chain(optax.adamw(LR, weight_decay=WD), _method("twn")), grads=GRADS)
  alone, _ = _run(optax.adamw(LR, weight_decay=WD), grads={"a": GRADS["a"]},
                  params={"a": PARAMS["a"]})
  # Two compiled programs: equal up to XLA's fusion (one rounding).
  np.testing.assert_allclose(params["a"], alone["a"], rtol=1e-6)


def test_latents_whose_value_is_zero_shrink_too():
  tx = ec2t.chain(optax.adamw(LR, weight_decay=WD), ec2t.twn(selection=B_AND_C))
  start = _latents(tx.init(PARAMS))["b"]
  params, state = _run(tx)
  zero = np.asarray(params["b"]) == 0
  moved = zero & (np.asarray(start) != 0)
  assert moved.sum() >= 4
  np.testing.assert_allclose(np.asarray(_latents(state)["b"])[moved],
                             np.asarray(start)[moved] * (1 - LR * WD) ** STEPS, rtol=1e-6)


def test_optax_chain_decays_the_quantized_values_instead():
  # What ec2t.chain fixes: in optax.chain the decay -lr*wd*T misses zero-valued weights.
  tx = optax.chain(optax.adamw(LR, weight_decay=WD), ec2t.bitnet(selection=B_AND_C))
  start = _latents(tx.init(PARAMS))["b"]
  params, state = _run(tx, steps=1)
  t0 = ec2t.quantized_params(PARAMS, tx.init(PARAMS))["b"]
  change = np.asarray(_latents(state)["b"] - start)
  np.testing.assert_allclose(change, -LR * WD * t0, atol=1e-7)
  assert (change[np.asarray(t0) == 0] == 0).all()  # zero-valued weights: no decay


def test_ec2t_phase_2_keeps_its_frozen_latents_under_decay():
  tx = ec2t.chain(optax.adamw(LR, weight_decay=WD), ec2t.ternarize_transform(
      gamma=0.1, selection=B_AND_C))
  state = ec2t.freeze_assignment(tx.init(PARAMS))
  start = _latents(state)["b"]
  params = ec2t.quantized_params(PARAMS, state)
  _, state = tx.update(ZEROS, state, params)
  np.testing.assert_array_equal(_latents(state)["b"], start)


def test_both_latent_kernels_of_sttn_shrink():
  tx = ec2t.chain(optax.adamw(LR, weight_decay=WD), ec2t.sttn(selection=B_AND_C))
  start = ec2t.find_quantizer_state(tx.init(PARAMS)).field("latent2")["b"]
  _, state = _run(tx)
  np.testing.assert_allclose(ec2t.find_quantizer_state(state).field("latent2")["b"],
                             start * (1 - LR * WD) ** STEPS, rtol=1e-6, atol=1e-7)


# --------------------------------------------------- where the decay comes from


def test_a_decay_spelled_as_add_decayed_weights_in_the_inner_chain_is_the_same():
  inner = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(WD), optax.scale(-LR))
  spelled, s1 = _run(ec2t.chain(inner, ec2t.ttq(selection=B_AND_C)), grads=GRADS)
  adamw, s2 = _run(ec2t.chain(optax.adamw(LR, weight_decay=WD), ec2t.ttq(selection=B_AND_C)),
                   grads=GRADS)
  jax.tree.map(np.testing.assert_array_equal, (spelled, _latents(s1)), (adamw, _latents(s2)))


def test_several_inner_transformations_are_chained_like_optax_chain():
  start = _latents(ec2t.chain(ec2t.twn(selection=B_AND_C)).init(PARAMS))
  tx = ec2t.chain(optax.scale_by_adam(), optax.add_decayed_weights(WD), optax.scale(-LR),
                  ec2t.twn(selection=B_AND_C))
  _, state = _run(tx)
  np.testing.assert_allclose(_latents(state)["b"], start["b"] * (1 - LR * WD) ** STEPS,
                             rtol=1e-6, atol=1e-7)


def test_a_scheduled_decay_uses_each_steps_learning_rate():
  schedule = optax.linear_schedule(LR, LR / 4, STEPS)
  tx = ec2t.chain(optax.adamw(schedule, weight_decay=WD), ec2t.twn(selection=B_AND_C))
  start = _latents(tx.init(PARAMS))["b"]
  _, state = _run(tx)
  factor = np.prod([1 - float(schedule(k)) * WD for k in range(STEPS)])
  np.testing.assert_allclose(_latents(state)["b"], start * factor, rtol=1e-6, atol=1e-7)


def test_a_decay_mask_that_excludes_a_leaf_keeps_its_latents():
  mask = lambda params: {k: k != "b" for k in params}
  tx = ec2t.chain(optax.adamw(LR, weight_decay=WD, mask=mask), ec2t.twn(selection=B_AND_C))
  start = _latents(tx.init(PARAMS))
  _, state = _run(tx)
  np.testing.assert_array_equal(_latents(state)["b"], start["b"])
  np.testing.assert_allclose(_latents(state)["c"], start["c"] * (1 - LR * WD) ** STEPS,
                             rtol=1e-6, atol=1e-7)


def test_a_knob_injected_with_inject_hyperparams_still_gets_the_decay():
  injected = optax.inject_hyperparams(ec2t.twn, static_args=("threshold", "selection"))(
      factor=0.7, selection=B_AND_C)
  tx = ec2t.chain(optax.adamw(LR, weight_decay=WD), injected)
  start = _latents(tx.init(PARAMS))["b"]
  _, state = _run(tx)
  np.testing.assert_allclose(_latents(state)["b"], start * (1 - LR * WD) ** STEPS,
                             rtol=1e-6, atol=1e-7)


# ---------------------------------------------------- the same as optax.chain


@pytest.mark.parametrize("name", TRAINED_MARKED)
def test_without_decay_it_equals_optax_chain_bitwise(name):
  inner = lambda: optax.adamw(LR, weight_decay=0.0)
  got = _run(ec2t.chain(inner(), _method(name)), grads=GRADS)
  want = _run(optax.chain(inner(), _method(name)), grads=GRADS)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_its_state_has_the_structure_of_optax_chain():
  make = lambda: (optax.clip_by_global_norm(1.0), optax.adamw(LR), ec2t.twn(selection=B_AND_C))
  assert (jax.tree.structure(ec2t.chain(*make()).init(PARAMS))
          == jax.tree.structure(optax.chain(*make()).init(PARAMS)))


def test_jit_equals_eager():
  tx = ec2t.chain(optax.adamw(LR, weight_decay=WD), ec2t.ternarize_transform(
      gamma=0.1, selection=B_AND_C))
  state = tx.init(PARAMS)
  params = ec2t.quantized_params(PARAMS, state)
  eager = tx.update(GRADS, state, params)
  jitted = jax.jit(tx.update)(GRADS, state, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               eager, jitted)


def test_state_tools_work_on_the_chained_state():
  tx = ec2t.chain(optax.adamw(LR, weight_decay=WD), ec2t.ternarize_transform(
      gamma=0.1, selection=B_AND_C))
  params, state = _run(tx, grads=GRADS, steps=2)
  jax.tree.map(np.testing.assert_array_equal, params, ec2t.quantized_params(params, state))
  state = ec2t.freeze_assignment(state)
  assert bool(ec2t.is_frozen(state))
  assert {layer.path for layer in ec2t.summary(state).layers} == {"b", "c"}


def test_nnx_optimizer_decays_the_latents():
  model = SmallNnxCNN(nnx.Rngs(0))
  tx = ec2t.chain(optax.adamw(LR, weight_decay=WD), ec2t.twn())
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  nnx.update(model, ec2t.quantized_params(nnx.state(model, nnx.Param), optimizer))
  start = ec2t.find_quantizer_state(optimizer).latent["conv2"]["kernel"]
  zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  nnx.jit(lambda m, o, g: o.update(m, g))(model, optimizer, zeros)
  np.testing.assert_allclose(ec2t.find_quantizer_state(optimizer).latent["conv2"]["kernel"],
                             start * (1 - LR * WD), rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------ bad input


class _NoLatentLeaf(NamedTuple):
  q: jax.Array

  def value(self, dtype):
    return self.q.astype(dtype)

  def describe(self):
    return {"method": "Rounder", "mode": "integer"}


def _rounder():
  def init_leaf(param, ctx, hyper):
    del ctx, hyper
    return _NoLatentLeaf(jnp.round(param))

  def step_leaf(update, leaf, ctx, hyper, phase):
    del ctx, hyper, phase
    return _NoLatentLeaf(jnp.round(leaf.q + update))

  return core.Quantizer(core.Method("rounder", init_leaf, step_leaf), (), {},
                        B_AND_C).transform()


@pytest.mark.parametrize("jit", [False, True])
def test_a_decay_on_a_method_without_latent_weights_is_refused_at_init(jit):
  init = ec2t.chain(optax.adamw(LR, weight_decay=WD), _rounder()).init
  with pytest.raises(ValueError, match=r"'b'.*'Rounder'"):
    (jax.jit(init) if jit else init)(PARAMS)


def test_a_method_without_latent_weights_chains_when_nothing_decays():
  _run(ec2t.chain(optax.adam(LR), _rounder()), grads=GRADS, steps=1)


def test_a_last_transformation_that_is_not_a_method_is_refused():
  with pytest.raises(TypeError, match="last transformation"):
    ec2t.chain(optax.adamw(LR), optax.identity())
  with pytest.raises(ValueError, match="at least"):
    ec2t.chain()
