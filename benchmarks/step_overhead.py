r"""Cost of EC2T per training step, measured side by side in one run.

For a LeNet-5-sized and a ResNet-20-sized model (batch 128, this machine's
devices) it times the jitted training step of

* ``adam``: plain ``optax.adam`` on full-precision params,
* ``chain``: ``optax.chain(optax.adam, ec2t.ternarize_transform(gamma=0.2))``,
* ``reference``: ``ec2t.reference_optimizer(gamma=0.2)`` (three Adams),

interleaving the three in rounds so that machine noise hits all alike, and
prints the median step time, the ratio to ``adam``, and the optimizer-state
bytes relative to the params' bytes. Target: ``chain`` <= 1.10x ``adam`` on the
ResNet-20-sized model.

It also times compiling each step (tracing, lowering and XLA compilation of a
fresh ``jax.jit``), interleaved the same way over ``--compile_rounds`` rounds.
Target: ``chain`` <= 1.5x ``adam`` on ResNet-20 (every method built on the
shared core pays the same per-leaf machinery).

Run::

  python benchmarks/step_overhead.py [--rounds 30] [--batch 128] [--compile_rounds 3]
"""

from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags
import jax
import optax

import ec2t_jax as ec2t
from ec2t_jax import models

_ROUNDS = flags.DEFINE_integer("rounds", 30, "Timed steps per variant.")
_BATCH = flags.DEFINE_integer("batch", 128, "Batch size.")
_COMPILE_ROUNDS = flags.DEFINE_integer(
    "compile_rounds", 3, "Compilations per variant (0 skips compile timing).")
_MODELS = flags.DEFINE_list("models", ["lenet5", "resnet8", "resnet20"],
                            "Models to measure.")
_GAMMA = 0.2


def _optimizers():
  return {
      "adam": optax.adam(1e-4),
      "chain": optax.chain(optax.adam(1e-4),
                           ec2t.ternarize_transform(gamma=_GAMMA)),
      "reference": ec2t.reference_optimizer(gamma=_GAMMA),
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


def _compile_seconds(model, tx, has_batch_stats, args) -> float:
  """Wall time of tracing, lowering and compiling a fresh jitted step."""
  step = jax.jit(_make_step(model, tx, has_batch_stats))
  start = time.perf_counter()
  step.lower(*args).compile()
  return time.perf_counter() - start


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _benchmark(name, model, input_shape, rounds, batch, compile_rounds):
  x = jax.random.normal(jax.random.key(0), (batch, *input_shape))
  y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
  variables = model.init(jax.random.key(2), x)
  has_batch_stats = "batch_stats" in variables
  runs = {}
  for label, tx in _optimizers().items():
    params = variables["params"]
    opt_state = tx.init(params)
    if label != "adam":
      params = ec2t.ternary_params(params, opt_state)
    step = jax.jit(_make_step(model, tx, has_batch_stats))
    carry = (params, variables.get("batch_stats", {}), opt_state)
    for _ in range(3):  # compile and warm up
      *carry, loss = step(*carry, x, y)
    jax.block_until_ready(loss)
    runs[label] = {"step": step, "carry": carry, "times": [], "compile": [],
                   "tx": tx, "state_bytes": _bytes(opt_state)}
  for _ in range(compile_rounds):
    for run in runs.values():
      run["compile"].append(_compile_seconds(model, run["tx"], has_batch_stats,
                                             (*run["carry"], x, y)))
  for _ in range(rounds):
    for run in runs.values():
      start = time.perf_counter()
      *carry, loss = run["step"](*run["carry"], x, y)
      jax.block_until_ready((carry, loss))
      run["times"].append(time.perf_counter() - start)
      run["carry"] = carry
  params_bytes = _bytes(variables["params"])
  base = statistics.median(runs["adam"]["times"])
  print(f"\n{name}: {params_bytes / 4 / 1e3:.1f}K params, batch {batch}, "
        f"{rounds} interleaved rounds")
  print(f"  {'variant':<10} {'median ms':>10} {'vs adam':>8} {'state/params':>13}"
        + (f" {'compile s':>10} {'vs adam':>8}" if compile_rounds else ""))
  base_compile = (statistics.median(runs["adam"]["compile"])
                  if compile_rounds else None)
  for label, run in runs.items():
    median = statistics.median(run["times"])
    line = (f"  {label:<10} {median * 1e3:>10.2f} {median / base:>7.3f}x "
            f"{run['state_bytes'] / params_bytes:>12.2f}x")
    if compile_rounds:
      c = statistics.median(run["compile"])
      line += f" {c:>10.2f} {c / base_compile:>7.2f}x"
    print(line)


def main(argv):
  del argv
  print(f"devices: {jax.devices()}")
  available = {
      "lenet5": ("LeNet-5", models.LeNet5(), (28, 28, 1)),
      "resnet8": ("ResNet-8", models.cifar_resnet(8), (32, 32, 3)),
      "resnet20": ("ResNet-20", models.cifar_resnet(20), (32, 32, 3)),
  }
  for key in _MODELS.value:
    if key not in available:
      raise app.UsageError(f"--models: unknown model {key!r}; choose from "
                           f"{sorted(available)}")
    _benchmark(*available[key], _ROUNDS.value, _BATCH.value,
               _COMPILE_ROUNDS.value)


if __name__ == "__main__":
  app.run(main)
