r"""Cost of EC2T per training step, measured side by side in one run.

For a LeNet-5-sized and a ResNet-20-sized model (batch 128, this machine's
devices), and a nanoGPT-sized character GPT (12 blocks, width 128, 4 heads,
context 64, batch 12, tied embedding; ``gpt12``: blocks unrolled, ``gpt12scan``:
blocks stacked with ``nn.scan``) it times the jitted training step of

* ``adam``: plain ``optax.adam`` on full-precision params,
* ``chain``: ``optax.chain(optax.adam, ec2t.ternarize_transform(gamma=0.2))``,
* ``reference``: ``ec2t.reference_optimizer(gamma=0.2)`` (three Adams),

interleaving the three in rounds so that machine noise hits all alike, and
prints the median step time, the ratio to ``adam``, and the optimizer-state
bytes relative to the params' bytes. Target: ``chain`` <= 1.10x ``adam`` on the
ResNet-20-sized model.

It also times compiling each step (tracing, lowering and XLA compilation of a
fresh ``jax.jit``), interleaved the same way over ``--compile_rounds`` rounds.
Targets (issue 26): ``chain`` <= 1.3x ``adam`` on ResNet-20 and the unrolled and
scanned GPTs, not growing with depth (``resnet56``, ``gpt48``), step time <= 1.05x.
``chain`` keeps the selected leaves' states in one flat buffer (one trace of the
method's step, the default layout); ``chain_grouped`` is the layout before it
(same-shape leaves share one stacked state and one ``vmap``-ed step).

Every variant selects with the traced forward order (``ec2t.forward_order``):
for the GPTs that is what makes the tied embedding both the input and the
output layer, so every block kernel is ternarized.

Run::

  python benchmarks/step_overhead.py [--rounds 30] [--batch 128] [--compile_rounds 3]
  python benchmarks/step_overhead.py --models resnet20,gpt12,gpt12scan --rounds 10
  python benchmarks/step_overhead.py --models resnet20,resnet56,gpt12,gpt48 --variants chain \
      --rounds 3 --compile_rounds 2     # the ratio against depth
"""

from __future__ import annotations

import os
import statistics
import time

from absl import app
from absl import flags
import jax
import optax

import flax.linen as nn
import jax.numpy as jnp

import ec2t_jax as ec2t
from ec2t_jax import models

_ROUNDS = flags.DEFINE_integer("rounds", 30, "Timed steps per variant.")
_BATCH = flags.DEFINE_integer("batch", 128, "Batch size.")
_COMPILE_ROUNDS = flags.DEFINE_integer(
    "compile_rounds", 3, "Compilations per variant (0 skips compile timing).")
_MODELS = flags.DEFINE_list("models", ["lenet5", "resnet8", "resnet20"],
                            "Models to measure.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["adam", "chain", "reference"],
    "Optimizers to measure (adam is the baseline and always runs); chain_per_leaf is the "
    "chain with every leaf's state on its own (no flat buffer, no same-shape groups), "
    "chain_grouped the chain with same-shape groups instead of one flat buffer "
    "(layout='grouped', the layout before flat buffers).")
_GAMMA = 0.2
_GPT = {"vocab": 65, "width": 128, "heads": 4, "context": 64, "batch": 12}


class _Block(nn.Module):
  """nanoGPT's block: pre-LayerNorm causal self-attention and a GELU MLP."""

  @nn.compact
  def __call__(self, x, _=None):
    width, heads = _GPT["width"], _GPT["heads"]
    h = nn.Dense(3 * width, name="c_attn")(nn.LayerNorm(name="ln_1")(x))
    q, k, v = jnp.split(h.reshape(*h.shape[:-1], 3 * heads, width // heads), 3, axis=-2)
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    a = nn.dot_product_attention(q, k, v, mask=mask).reshape(x.shape)
    x = x + nn.Dense(width, name="attn_proj")(a)
    h = nn.gelu(nn.Dense(4 * width, name="c_fc")(nn.LayerNorm(name="ln_2")(x)))
    return x + nn.Dense(width, name="c_proj")(h), None


class _GPTModel(nn.Module):
  """Character GPT with a tied embedding; ``scan``: blocks stacked by nn.scan."""
  layers: int = 12
  scan: bool = False

  @nn.compact
  def __call__(self, tokens):
    wte = nn.Embed(_GPT["vocab"], _GPT["width"], name="wte")
    wpe = nn.Embed(_GPT["context"], _GPT["width"], name="wpe")
    x = wte(tokens) + wpe(jnp.arange(tokens.shape[1]))
    if self.scan:
      x, _ = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=self.layers)(name="blocks")(x, None)
    else:
      for i in range(self.layers):
        x, _ = _Block(name=f"blocks_{i}")(x)
    return wte.attend(nn.LayerNorm(name="ln_f")(x))


def _optimizers(order):
  selection = ec2t.Selection(order=order)
  grouped = ec2t.get_method("ec2t").build(gamma=_GAMMA, selection=selection)._replace(
      layout="grouped")
  return {
      "adam": optax.adam(1e-4),
      "chain": optax.chain(optax.adam(1e-4),
                           ec2t.ternarize_transform(gamma=_GAMMA, selection=selection)),
      "chain_grouped": optax.chain(optax.adam(1e-4), grouped.transform()),
      "reference": ec2t.reference_optimizer(gamma=_GAMMA, selection=selection),
  }


def _make_step(model, tx, has_batch_stats):
  def loss_fn(params, batch_stats, x, y):
    variables = {"params": params}
    if has_batch_stats:
      variables["batch_stats"] = batch_stats
      logits, new = model.apply(variables, x, train=True,
                                mutable=["batch_stats"])
      batch_stats = new["batch_stats"]
    else:
      logits = model.apply(variables, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, batch_stats

  def step(params, batch_stats, opt_state, x, y):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return step


def _compile_seconds(model, tx, has_batch_stats, args) -> tuple[float, float]:
  """``(wall, process CPU)`` seconds of tracing, lowering and compiling a
  fresh jitted step (CPU time is less sensitive to a loaded machine)."""
  step = jax.jit(_make_step(model, tx, has_batch_stats))
  start, start_cpu = time.perf_counter(), time.process_time()
  step.lower(*args).compile()
  return time.perf_counter() - start, time.process_time() - start_cpu


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _inputs(input_shape, batch):
  """A batch of inputs and labels: tokens for the GPT, images otherwise."""
  if input_shape == "tokens":
    batch = _GPT["batch"]
    tokens = jax.random.randint(jax.random.key(0), (batch, _GPT["context"] + 1), 0,
                                _GPT["vocab"])
    return tokens[:, :-1], tokens[:, 1:], batch
  x = jax.random.normal(jax.random.key(0), (batch, *input_shape))
  return x, jax.random.randint(jax.random.key(1), (batch,), 0, 10), batch


def _prepared_run(label, tx, model, variables, x, y) -> dict:
  """A compiled, warmed-up step of ``tx`` with its carry."""
  has_batch_stats = "batch_stats" in variables
  params = variables["params"]
  opt_state = tx.init(params)
  if label == "chain_per_leaf":  # the update takes either layout
    opt_state = jax.tree.map(
        lambda s: s._replace(leaves=s.resolved_leaves(), groups=())
        if isinstance(s, ec2t.QuantizerState) else s,
        opt_state, is_leaf=lambda s: isinstance(s, ec2t.QuantizerState))
  if label != "adam":
    params = ec2t.quantized_params(params, opt_state)
  step = jax.jit(_make_step(model, tx, has_batch_stats))
  carry = (params, variables.get("batch_stats", {}), opt_state)
  for _ in range(3):  # compile and warm up
    *carry, loss = step(*carry, x, y)
  jax.block_until_ready(loss)
  return {"step": step, "carry": carry, "times": [], "compile": [], "compile_cpu": [],
          "tx": tx, "state_bytes": _bytes(opt_state)}


def _benchmark(name, model, input_shape, rounds, batch, compile_rounds) -> dict:
  """Prints the table of one model; returns ``{variant: {"step": ratio, "compile": ratio}}``
  (ratios of the medians to adam's; ``compile`` absent without compile rounds)."""
  x, y, batch = _inputs(input_shape, batch)
  variables = model.init(jax.random.key(2), x)
  has_batch_stats = "batch_stats" in variables
  order = ec2t.forward_order(
      lambda p, x: model.apply({**variables, "params": p}, x), variables["params"], x)
  chosen = {"adam", *_VARIANTS.value}
  optimizers = _optimizers(order)
  optimizers["chain_per_leaf"] = optimizers["chain"]
  runs = {label: _prepared_run(label, tx, model, variables, x, y)
          for label, tx in optimizers.items() if label in chosen}
  for _ in range(compile_rounds):
    for run in runs.values():
      wall, cpu = _compile_seconds(model, run["tx"], has_batch_stats,
                                   (*run["carry"], x, y))
      run["compile"].append(wall)
      run["compile_cpu"].append(cpu)
  for _ in range(rounds):
    for run in runs.values():
      start = time.perf_counter()
      *carry, loss = run["step"](*run["carry"], x, y)
      jax.block_until_ready((carry, loss))
      run["times"].append(time.perf_counter() - start)
      run["carry"] = carry
  params_bytes = _bytes(variables["params"])
  base = statistics.median(runs["adam"]["times"])
  if "chain" in runs:
    chain_state = ec2t.find_quantizer_state(runs["chain"]["carry"][2])
    kinds = [type(g).__name__ for g in chain_state.groups]
    print(f"\n{name}: chain ternarizes {len(ec2t.summary(chain_state).layers)} layers; "
          f"shared states: {kinds.count('FlatGroup')} flat buffer(s), "
          f"{kinds.count('StackedLeaf')} same-shape group(s)")
  print(f"\n{name}: {params_bytes / 4 / 1e3:.1f}K params, batch {batch}, "
        f"{rounds} interleaved rounds")
  print(f"  {'variant':<10} {'median ms':>10} {'vs adam':>8} {'state/params':>13}"
        + (f" {'compile s':>10} {'vs adam':>8} {'CPU s':>7} {'vs adam':>8}"
           if compile_rounds else ""))
  if compile_rounds:
    base_compile = statistics.median(runs["adam"]["compile"])
    base_cpu = statistics.median(runs["adam"]["compile_cpu"])
  ratios = {}
  for label, run in runs.items():
    median = statistics.median(run["times"])
    ratios[label] = {"step": median / base}
    line = (f"  {label:<10} {median * 1e3:>10.2f} {median / base:>7.3f}x "
            f"{run['state_bytes'] / params_bytes:>12.2f}x")
    if compile_rounds:
      c = statistics.median(run["compile"])
      cpu = statistics.median(run["compile_cpu"])
      line += (f" {c:>10.2f} {c / base_compile:>7.2f}x"
               f" {cpu:>7.2f} {cpu / base_cpu:>7.2f}x")
      ratios[label]["compile"] = c / base_compile
    print(line)
  return ratios


def main(argv):
  del argv
  print(f"devices: {jax.devices()}; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
  available = {
      "lenet5": ("LeNet-5", models.LeNet5(), (28, 28, 1)),
      "resnet8": ("ResNet-8", models.cifar_resnet(8), (32, 32, 3)),
      "resnet20": ("ResNet-20", models.cifar_resnet(20), (32, 32, 3)),
      "gpt12": ("GPT 12x128 unrolled", _GPTModel(12, scan=False), "tokens"),
      "gpt12scan": ("GPT 12x128 scanned", _GPTModel(12, scan=True), "tokens"),
      # depth: does the compile-time ratio grow with the number of layers?
      "resnet56": ("ResNet-56", models.cifar_resnet(56), (32, 32, 3)),
      "gpt48": ("GPT 48x128 unrolled", _GPTModel(48, scan=False), "tokens"),
      "gpt48scan": ("GPT 48x128 scanned", _GPTModel(48, scan=True), "tokens"),
  }
  for key in _MODELS.value:
    if key not in available:
      raise app.UsageError(f"--models: unknown model {key!r}; choose from "
                           f"{sorted(available)}")
    _benchmark(*available[key], _ROUNDS.value, _BATCH.value,
               _COMPILE_ROUNDS.value)


if __name__ == "__main__":
  app.run(main)
