"""Exact-reference mode against a plain numpy re-statement of the reference step.

The numpy code below restates section 4 of the algorithm document (convert the
gradients, three Adams, floor, reassign) independently of the library; only the
forward/backward pass of the tiny model (step 1) uses JAX.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ec2t_jax as ec2t
from models_for_tests import stack_and_head


class _Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    for width in (12, 10, 8):
      x = jnp.tanh(nn.Dense(width)(x))
    return nn.Dense(3)(x)


_TERNARY = ("Dense_1", "Dense_2")


def _loss(params, x, y):
  logits = _Mlp().apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


class _NumpyAdam:
  """PyTorch's Adam with optional L2 weight decay added to the gradient."""

  def __init__(self, lr, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8):
    self.lr, self.wd, self.b1, self.b2, self.eps = lr, weight_decay, b1, b2, eps
    self.m, self.v, self.t = {}, {}, 0

  def step(self, values, grads):
    self.t += 1
    out = {}
    for k, p in values.items():
      g = grads[k] + self.wd * p
      self.m[k] = self.b1 * self.m.get(k, 0.0) + (1 - self.b1) * g
      self.v[k] = self.b2 * self.v.get(k, 0.0) + (1 - self.b2) * g * g
      m_hat = self.m[k] / (1 - self.b1 ** self.t)
      v_hat = self.v[k] / (1 - self.b2 ** self.t)
      out[k] = p - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
    return out


def _np_nearest(w, w_n, w_p):
  costs = np.stack([w ** 2, (w + w_n) ** 2, (w - w_p) ** 2])
  return np.array([0, -1, 1])[np.argmin(costs, axis=0)]


def _np_probabilities(a, renormalization):
  n = a.size
  p_n, p_0, p_p = (max(np.sum(a == c), 1) / n for c in (-1, 0, 1))
  if p_0 < 0.5:
    if renormalization == "exact":
      p_n, p_p = 0.5 * p_n / (p_n + p_p), 0.5 * p_p / (p_n + p_p)
    else:
      excess = 0.5 - p_0
      p_n = p_n - excess * p_n / (p_n + p_p)
      p_p = p_p - excess * p_p / (p_n + p_p)
    p_0 = 0.5
  return np.array([p_n, p_0, p_p])


def _np_assign(w, w_n, w_p, gamma, decay, renormalization):
  info = -np.log2(_np_probabilities(_np_nearest(w, w_n, w_p), renormalization))
  lo, hi = abs(w.min()), abs(w.max())
  lam_n = (lo ** 2 - (w_n - lo) ** 2) / (info[0] - info[1])
  lam_p = (hi ** 2 - (w_p - hi) ** 2) / (info[2] - info[1])
  lam = gamma * decay * min(lam_n, lam_p)
  costs = np.stack([w ** 2 + lam * info[1], (w + w_n) ** 2 + lam * info[0],
                    (w - w_p) ** 2 + lam * info[2]])
  return np.array([0, -1, 1])[np.argmin(costs, axis=0)]


def _numpy_reference_run(params, batches, gamma, sign, renormalization):
  flat = {f"{m}/{k}": np.asarray(v, np.float64)
          for m, d in params.items() for k, v in d.items()}
  ternary = [f"{m}/kernel" for m in _TERNARY]
  numels = [flat[k].size for k in ternary]
  decay = {k: (n / max(numels) + 0.05) / 1.05 for k, n in zip(ternary, numels)}
  latent = {k: flat[k].copy() for k in ternary}
  w_n = {k: 0.3 * abs(latent[k].min()) for k in ternary}
  w_p = {k: 0.3 * abs(latent[k].max()) for k in ternary}
  a = {k: _np_nearest(latent[k], w_n[k], w_p[k]) for k in ternary}
  others = {k: v for k, v in flat.items() if k not in ternary}
  adam_params = _NumpyAdam(1e-3, weight_decay=5e-6)
  adam_latent, adam_centroids = _NumpyAdam(1e-3), _NumpyAdam(1e-4)

  def current():
    values = dict(others)
    for k in ternary:
      values[k] = np.where(a[k] > 0, w_p[k], np.where(a[k] < 0, -w_n[k], 0.0))
    nested = {}
    for key, v in values.items():
      m, leaf = key.split("/")
      nested.setdefault(m, {})[leaf] = jnp.asarray(v, jnp.float32)
    return nested

  for x, y in batches:
    grads = jax.grad(_loss)(current(), x, y)                      # step 1
    g = {f"{m}/{k}": np.asarray(v, np.float64)
         for m, d in grads.items() for k, v in d.items()}
    latent_grads, centroid_grads = {}, {}                          # step 2
    for k in ternary:
      scale = np.where(a[k] > 0, w_p[k], np.where(a[k] < 0, w_n[k], 1.0))
      latent_grads[k] = scale * g[k]
      sum_n = g[k][a[k] < 0].sum()
      centroid_grads[k + "/n"] = -sum_n if sign == "exact" else sum_n
      centroid_grads[k + "/p"] = g[k][a[k] > 0].sum()
    others = adam_params.step(others, {k: g[k] for k in others})  # step 3
    latent = adam_latent.step(latent, latent_grads)
    centroids = adam_centroids.step(
        {**{k + "/n": w_n[k] for k in ternary}, **{k + "/p": w_p[k] for k in ternary}},
        centroid_grads)
    for k in ternary:
      floor = 0.675 * np.std(latent[k], ddof=1)                    # step 4
      w_n[k] = max(centroids[k + "/n"], floor)
      w_p[k] = max(centroids[k + "/p"], floor)
      a[k] = _np_assign(latent[k], w_n[k], w_p[k], gamma, decay[k],
                        renormalization)                           # step 5
  return current(), latent, w_n, w_p


@pytest.mark.parametrize("sign, renormalization, layout", [
    ("exact", "exact", "flat"), ("reference", "reference", "flat"),
    ("exact", "exact", "grouped")])
def test_reference_mode_equals_numpy_restatement(sign, renormalization, layout):
  x = jax.random.normal(jax.random.key(0), (32, 6))
  params = _Mlp().init(jax.random.key(1), x)["params"]
  batches = [(jax.random.normal(jax.random.key(10 + i), (32, 6)),
              jax.random.randint(jax.random.key(20 + i), (32,), 0, 3))
             for i in range(6)]
  gamma = 0.3
  expected, latent, w_n, w_p = _numpy_reference_run(
      params, batches, gamma, sign, renormalization)

  tx = ec2t.reference_optimizer(
      gamma=gamma, init_scale=0.3, learning_rate=1e-3,
      latent_learning_rate=1e-3, centroid_learning_rate=1e-4,
      negative_centroid_sign=sign, renormalization=renormalization, layout=layout)
  state = tx.init(params)
  want = {"flat": ["FlatGroup"], "grouped": []}[layout]  # two shapes: no same-shape group
  assert [type(g).__name__ for g in state.ternary.groups] == want
  params = ec2t.quantized_params(params, state)

  @jax.jit
  def step(params, state, x, y):
    updates, state = tx.update(jax.grad(_loss)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  for x, y in batches:
    params = step(params, state, x, y)
    params, state = params
  core = ec2t.find_quantizer_state(state)
  for m in params:
    for k in params[m]:
      np.testing.assert_allclose(params[m][k], expected[m][k], rtol=2e-5,
                                 atol=2e-6, err_msg=f"{m}/{k}")
  for m in _TERNARY:
    key = f"{m}/kernel"
    np.testing.assert_allclose(core.latent[m]["kernel"], latent[key], rtol=2e-5,
                               atol=2e-6)
    np.testing.assert_allclose(core.field("w_n")[m]["kernel"], w_n[key], rtol=2e-5)
    np.testing.assert_allclose(core.field("w_p")[m]["kernel"], w_p[key], rtol=2e-5)
    assert np.mean(np.asarray(core.field("assignment")[m]["kernel"]) == 0) > 0.2


def test_reference_mode_frozen_keeps_latents_and_latent_optimizer_state():
  x = jax.random.normal(jax.random.key(0), (32, 6))
  y = jax.random.randint(jax.random.key(2), (32,), 0, 3)
  params = _Mlp().init(jax.random.key(1), x)["params"]
  tx = ec2t.reference_optimizer(gamma=0.2)
  state = ec2t.freeze_assignment(tx.init(params))
  params = ec2t.quantized_params(params, state)
  _, new_state = tx.update(jax.grad(_loss)(params, x, y), state, params)
  assert isinstance(new_state, ec2t.TernarizeReferenceState)
  chex.assert_trees_all_equal(new_state.latent_state, state.latent_state)
  np.testing.assert_array_equal(new_state.ternary.latent["Dense_1"]["kernel"],
                                state.ternary.latent["Dense_1"]["kernel"])
  assert (float(new_state.ternary.field("w_p")["Dense_1"]["kernel"])
          != float(state.ternary.field("w_p")["Dense_1"]["kernel"]))


def test_reference_mode_skips_a_step_with_nonfinite_gradients():
  x = jax.random.normal(jax.random.key(0), (32, 6))
  params = _Mlp().init(jax.random.key(1), x)["params"]
  tx = ec2t.reference_optimizer(gamma=0.2)
  state = tx.init(params)
  params = ec2t.quantized_params(params, state)
  grads = jax.tree.map(jnp.ones_like, params)
  grads["Dense_0"]["bias"] = grads["Dense_0"]["bias"].at[0].set(jnp.inf)
  updates, new_state = tx.update(grads, state, params)
  assert int(new_state.ternary.nonfinite_count) == 1
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
  chex.assert_trees_all_equal(new_state.params_state, state.params_state)
  chex.assert_trees_all_equal(new_state.ternary.latent, state.ternary.latent)


# init_scale 0.5 gives w_n = w_p = 0.5 (exact): -0.25 costs 0.0625 as n and as 0
# (an n/0 tie), 0.25 costs 0.0625 as 0 and as p (a 0/p tie, zero under both rules).
_TIED = {"w": jnp.array([[-1.0, -0.25], [0.25, 1.0]])}


@pytest.mark.parametrize("ties, expected", [
    ("zero", [[-0.5, 0.0], [0.0, 0.5]]),
    ("reference", [[-0.5, -0.5], [0.0, 0.5]]),
])
@pytest.mark.parametrize("form", ["reference_optimizer", "chain"])
def test_tie_rule_holds_at_init_and_after_a_step(form, ties, expected):
  # gamma 0 and no floor: a zero-gradient step reassigns the same tied weights.
  kwargs = dict(gamma=0.0, init_scale=0.5, floor_factor=0.0,
                selection=[ec2t.Rule("^w$")], ties=ties)
  tx = (ec2t.reference_optimizer(**kwargs) if form == "reference_optimizer"
        else optax.chain(optax.sgd(0.1), ec2t.ternarize_transform(**kwargs)))
  state = tx.init(_TIED)
  params = ec2t.quantized_params(_TIED, state)
  chex.assert_trees_all_equal(params["w"], jnp.array(expected))
  updates, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
  params = optax.apply_updates(params, updates)
  chex.assert_trees_all_equal(params["w"], jnp.array(expected))


def _smooth_loss(params):
  return sum(jnp.sum(jnp.sin(3.0 * p) + 0.5 * p * p) for p in jax.tree.leaves(params))


def test_reference_mode_steps_a_stacked_leaf_per_slice_in_a_flat_buffer_as_grouped():
  # The centroid increments enter the flat step one per slice (a stack-shaped input).
  params, selection = stack_and_head()
  results = {}
  for layout in ("flat", "grouped"):
    tx = ec2t.reference_optimizer(gamma=0.2, selection=selection, layout=layout,
                                  latent_learning_rate=1e-2, centroid_learning_rate=1e-2)
    state = tx.init(params)
    initial_w_p = np.asarray(state.ternary.field("w_p")["stack"])
    p = ec2t.quantized_params(params, state)
    updates, state = jax.jit(tx.update)(jax.grad(_smooth_loss)(p), state, p)
    results[layout] = (optax.apply_updates(p, updates), state)
  assert type(results["flat"][1].ternary.groups[0]).__name__ == "FlatGroup"
  flat_p, flat_state = results["flat"]
  grouped_p, grouped_state = results["grouped"]
  chex.assert_trees_all_close(flat_p, grouped_p, atol=1e-6)
  chex.assert_trees_all_close(flat_state.ternary.resolved_leaves(),
                              grouped_state.ternary.resolved_leaves(), atol=1e-6)
  w_p = np.asarray(flat_state.ternary.field("w_p")["stack"])
  assert w_p.shape == (3,) and np.all(w_p != initial_w_p)  # each slice's centroid moved


class _Deep(nn.Module):
  depth: int

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = jnp.tanh(nn.Dense(8)(x))
    return x


def _compiled_instructions(depth):
  params = _Deep(depth).init(jax.random.key(0), jnp.ones((1, 8)))["params"]
  tx = ec2t.reference_optimizer(gamma=0.2, selection=lambda path, leaf: leaf.ndim == 2)
  state = tx.init(params)
  text = jax.jit(tx.update).lower(params, state, params).compile().as_text()
  return sum(1 for line in text.splitlines() if " = " in line)


def test_the_compiled_update_grows_linearly_with_the_number_of_layers():
  # A global answer read by every leaf's update (the finiteness of all gradients) must be
  # computed once, not copied into each fusion: that made the program quadratic in depth.
  # Four times the layers: at most four times the program (4.4x when it was quadratic).
  small, large = _compiled_instructions(3), _compiled_instructions(12)
  assert large < 4.0 * small, (small, large)


def test_unknown_layout_is_an_error_naming_it():
  with pytest.raises(ValueError, match="layout.*'packed'"):
    ec2t.reference_optimizer(layout="packed")


def test_unknown_tie_rule_is_an_error_at_construction():
  with pytest.raises(ValueError, match="ties"):
    ec2t.reference_optimizer(ties="negative")
