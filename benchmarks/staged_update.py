r"""The staged methods' update in a flat buffer against same-shape groups, side by side.

INQ, SLQ and MLQ (the registry's ``staged`` methods) step every selected layer in one flat
buffer by default (``layout="flat"``); ``layout="grouped"`` is the path before it (one
``vmap``-ed step per group of same-shape leaves). A staged method's step does its heavy
work (INQ's ranking, SLQ/MLQ's re-clustering and freezing) only at a step where some layer
moves to a new stage, under a ``lax.cond``. This script times the optimizer update alone
(``optax.chain(optax.adam(1e-4), method)`` and ``optax.apply_updates``, jitted) on a
model's params, for each method and layout, in two cases:

* ``between stages`` (``steps_per_stage=1000``): what nearly every step costs;
* ``at a stage step`` (``steps_per_stage=1``, timed on the state after one update, so that
  every timed call moves the layers one stage on).

Before timing, the flat and grouped layouts are checked to give the same params after the
update (to 1e-5: the two layouts sum in different orders). It prints the compile CPU time
of each update and the median of ``--rounds`` interleaved calls.

Run (repository root)::

  python benchmarks/staged_update.py                  # the 12-layer GPT of step_overhead
  python benchmarks/staged_update.py --staged_methods slq --stage_rounds 5
"""

from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np
import optax

import ec2t_jax as ec2t
import step_overhead  # pylint: disable=g-import-not-at-top  (its GPT)

# Not --methods: compare_methods.py defines it, and the tests import both scripts.
_METHODS = flags.DEFINE_list(
    "staged_methods", [], "Staged methods to time (default: every registered staged method).")
_LAYERS = flags.DEFINE_integer("layers", 12, "Blocks of step_overhead's unrolled GPT.")
_STAGE_ROUNDS = flags.DEFINE_integer("stage_rounds", 15, "Timed calls per variant.")
_CASES = {"between stages": 1000, "at a stage step": 1}
_LAYOUTS = ("flat", "grouped")


def _update_fn(tx):
  def update(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return update


def _prepared(name, layout, steps_per_stage, selection, params, grads) -> dict:
  """The compiled update, its compile CPU seconds, and the state one update in."""
  quantizer = ec2t.get_method(name).build(selection=selection,
                                          steps_per_stage=steps_per_stage)
  tx = optax.chain(optax.adam(1e-4), quantizer._replace(layout=layout).transform())
  state = tx.init(params)
  params = ec2t.quantized_params(params, state)
  lowered = jax.jit(_update_fn(tx)).lower(grads, state, params)
  start = time.process_time()
  compiled = lowered.compile()
  compile_cpu = time.process_time() - start
  params, state = jax.block_until_ready(compiled(grads, state, params))
  return {"update": compiled, "args": (grads, state, params), "compile_cpu": compile_cpu,
          "times": []}


def measure(methods, layers: int, rounds: int, echo=print) -> list[dict]:
  """Times each method's update on both layouts, in both cases; returns one row per variant.

  Each row: ``method``, ``case``, ``layout``, ``compile_cpu`` (s), ``update`` (median s).
  ``echo`` gets the model's description first.
  """
  model = step_overhead._GPTModel(layers, scan=False)  # pylint: disable=protected-access
  x, _, _ = step_overhead._inputs("tokens", 1)  # pylint: disable=protected-access
  params = jax.jit(model.init)(jax.random.key(2), x)["params"]
  selection = ec2t.Selection(order=ec2t.forward_order(
      lambda p, x: model.apply({"params": p}, x), params, x))
  grads = jax.tree.map(lambda p: 0.01 * p, params)
  weights = sum(leaf.size for leaf in jax.tree.leaves(params))
  echo(f"{layers}-layer GPT ({weights / 1e6:.2f} M weights), {jax.devices()[0].device_kind}; "
       f"update alone, median of {rounds} calls")
  rows = []
  for name in methods:
    for case, steps_per_stage in _CASES.items():
      runs = {layout: _prepared(name, layout, steps_per_stage, selection, params, grads)
              for layout in _LAYOUTS}
      outputs = {layout: run["update"](*run["args"])[0] for layout, run in runs.items()}
      np.testing.assert_allclose(
          np.concatenate([np.ravel(v) for v in jax.tree.leaves(outputs["flat"])]),
          np.concatenate([np.ravel(v) for v in jax.tree.leaves(outputs["grouped"])]),
          rtol=1e-5, atol=1e-5, err_msg=f"{name}: flat and grouped updates differ")
      for _ in range(rounds):
        for run in runs.values():
          start = time.perf_counter()
          jax.block_until_ready(run["update"](*run["args"]))
          run["times"].append(time.perf_counter() - start)
      rows += [{"method": name, "case": case, "layout": layout,
                "compile_cpu": run["compile_cpu"], "update": statistics.median(run["times"])}
               for layout, run in runs.items()]
  return rows


def main(argv):
  del argv
  methods = _METHODS.value or sorted(
      n for n, spec in ec2t.method_registry().items() if spec.kind == "staged")
  rows = measure(methods, _LAYERS.value, _STAGE_ROUNDS.value)
  print("| method | case | layout | compile CPU | update |")
  print("|---|---|---|---|---|")
  for row in rows:
    print(f"| {row['method']} | {row['case']} | {row['layout']} | {row['compile_cpu']:.2f} s | "
          f"{1e3 * row['update']:.1f} ms |")


if __name__ == "__main__":
  app.run(main)
