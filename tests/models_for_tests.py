"""Small Flax models and a loss shared by the tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class SmallCNN(nn.Module):
  """Conv_0 and Dense_1 stay full precision; Conv_1, Conv_2, Dense_0 ternary."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda f: nn.Conv(f, (3, 3), dtype=self.dtype, param_dtype=self.dtype)
    x = nn.relu(conv(8)(x))
    x = nn.relu(conv(16)(x))
    x = nn.relu(conv(16)(x))
    x = x.mean((1, 2))
    x = nn.relu(nn.Dense(32, dtype=self.dtype, param_dtype=self.dtype)(x))
    return nn.Dense(10, dtype=self.dtype, param_dtype=self.dtype)(x)


TERNARY_LEAVES = ("Conv_1", "Conv_2", "Dense_0")


def batch(seed=0, n=16):
  x = jax.random.normal(jax.random.key(seed), (n, 8, 8, 1))
  y = jax.random.randint(jax.random.key(seed + 1), (n,), 0, 10)
  return x, y


def init(model=None, seed=0):
  model = model or SmallCNN()
  x, _ = batch()
  return model, model.init(jax.random.key(seed), x)["params"]


def loss_fn(model, params, x, y):
  logits = model.apply({"params": params}, x).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train(model, params, tx, steps=5, seed=0, jit=True):
  """Runs ``steps`` optimizer steps; returns (params, opt_state, losses)."""
  import ec2t_jax as ec2t  # pylint: disable=g-import-not-at-top
  opt_state = tx.init(params)
  params = ec2t.ternary_params(params, opt_state)

  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(
        lambda p: loss_fn(model, p, x, y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(step) if jit else step
  losses = []
  for i in range(steps):
    x, y = batch(seed + i)
    params, opt_state, loss = step(params, opt_state, x, y)
    losses.append(float(loss))
  return params, opt_state, losses
