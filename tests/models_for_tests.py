"""Small Flax models and a loss shared by the tests."""

from flax import nnx
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


class SmallNnxCNN(nnx.Module):
  """The NNX twin of SmallCNN's shape: conv1 and fc2 stay full precision."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
    self.fc1 = nnx.Linear(16, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x)).mean((1, 2))
    return self.fc2(nnx.relu(self.fc1(x)))


def batch(seed=0, n=16):
  x = jax.random.normal(jax.random.key(seed), (n, 8, 8, 1))
  y = jax.random.randint(jax.random.key(seed + 1), (n,), 0, 10)
  return x, y


def init(model=None, seed=0):
  model = model or SmallCNN()
  x, _ = batch()
  return model, jax.jit(model.init)(jax.random.key(seed), x)["params"]


def loss_fn(model, params, x, y):
  logits = model.apply({"params": params}, x).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train(model, params, tx, steps=5, seed=0, jit=True):
  """Runs ``steps`` optimizer steps; returns (params, opt_state, losses)."""
  import ec2t_jax as ec2t  # pylint: disable=g-import-not-at-top
  opt_state = tx.init(params)
  params = ec2t.quantized_params(params, opt_state)

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


# ------------------------------------------------- tiny GPTs (stacked layers)

VOCAB, WIDTH, CONTEXT = 11, 8, 5


class TinyBlock(nn.Module):
  """Pre-LayerNorm MLP block with a 3-D ``DenseGeneral`` projection."""

  @nn.compact
  def __call__(self, x, _=None):
    h = nn.DenseGeneral((2, WIDTH // 2), name="attn")(nn.LayerNorm(name="ln_1")(x))
    x = x + nn.DenseGeneral(WIDTH, axis=(-2, -1), name="attn_proj")(nn.gelu(h))
    h = nn.Dense(4 * WIDTH, name="c_fc")(nn.LayerNorm(name="ln_2")(x))
    return x + nn.Dense(WIDTH, name="c_proj")(nn.gelu(h)), None


class TinyGPT(nn.Module):
  """Token embedding, ``layers`` blocks (``scan``: one ``nn.scan`` of them,
  leaves ``blocks/...`` of shape ``(layers, ...)``; else ``blocks_0`` ...),
  final LayerNorm, tied (``wte.attend``) or untied (``head``) output."""
  layers: int = 3
  scan: bool = True
  tied: bool = True

  @nn.compact
  def __call__(self, tokens):
    wte = nn.Embed(VOCAB, WIDTH, name="wte")
    x = wte(tokens)
    if self.scan:
      x, _ = nn.scan(TinyBlock, variable_axes={"params": 0},
                     split_rngs={"params": True},
                     length=self.layers)(name="blocks")(x, None)
    else:
      for i in range(self.layers):
        x, _ = TinyBlock(name=f"blocks_{i}")(x)
    x = nn.LayerNorm(name="ln_f")(x)
    return wte.attend(x) if self.tied else nn.Dense(VOCAB, use_bias=False, name="head")(x)


def token_batch(seed=0, n=4):
  tokens = jax.random.randint(jax.random.key(seed), (n, CONTEXT + 1), 0, VOCAB)
  return tokens[:, :-1], tokens[:, 1:]


def unstack_blocks(params, layers: int, key="blocks"):
  """The unrolled model's params from the scanned model's (same weights)."""
  out = {k: v for k, v in params.items() if k != key}
  for i in range(layers):
    out[f"{key}_{i}"] = jax.tree.map(lambda x, i=i: x[i], params[key])
  return out


def gpt_loss(model, params, tokens, targets):
  logits = model.apply({"params": params}, tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def stack_and_head():
  """``(params, selection)``: a (3, 8, 4) stack of three layers (one segment per slice in a
  flat buffer) and a (4, 2) head, both selected, nothing else."""
  import ec2t_jax as ec2t  # pylint: disable=g-import-not-at-top
  params = {"stack": jax.random.normal(jax.random.key(3), (3, 8, 4)),
            "head": jax.random.normal(jax.random.key(4), (4, 2))}
  selection = ec2t.Selection([ec2t.Rule("^stack$", stack_axes=(0,)), ec2t.Rule("^head$")],
                             default="none")
  return params, selection
