"""The README's 20-line example: a small Flax CNN made sparse and ternary.

Run: python examples/quickstart.py
"""
import flax.linen as nn
import jax
import optax

import ec2t_jax as ec2t


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    for features in (16, 32, 32):
      x = nn.relu(nn.Conv(features, (3, 3))(x))
    x = nn.relu(nn.Dense(64)(x.mean((1, 2))))
    return nn.Dense(10)(x)


model = CNN()
x = jax.random.normal(jax.random.key(0), (64, 16, 16, 1))
y = jax.random.randint(jax.random.key(1), (64,), 0, 10)
params = model.init(jax.random.key(2), x)["params"]

# The input and output layers stay full precision: name them by the forward pass.
order = ec2t.forward_order(lambda p, x: model.apply({"params": p}, x), params, x)
tx = optax.chain(optax.adam(1e-3), ec2t.ternarize_transform(
    gamma=0.3, selection=ec2t.Selection(order=order)))
opt_state = tx.init(params)
params = ec2t.quantized_params(params, opt_state)  # ternary from the first step


@jax.jit
def step(params, opt_state):
  loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y).mean()
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


for i in range(30):
  params, opt_state, loss = step(params, opt_state)
print(f"loss after 30 steps: {loss:.3f}")
print(ec2t.summary(opt_state))
