r"""Seconds per MNIST training step, FP (Adam) vs EC2T (reference optimizer).

Uses the example's own train step (``examples/common/training.py``), so run it
with ``examples/`` importable (``benchmarks/mnist_gamma_sweep.py`` does so)::

  PYTHONPATH=examples python benchmarks/mnist_step_timing.py --model=lenet5

Prints one JSON line: ``fp_seconds_per_step``, ``ec2t_seconds_per_step``,
``ratio``.
"""

from __future__ import annotations

import json
import time

from absl import app
from absl import flags
from common import data
from common import training
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ec2t_jax as ec2t
from ec2t_jax import models

_MODEL = flags.DEFINE_string("model", "lenet5", "lenet5 or lenet300100.")
_STEPS = flags.DEFINE_integer("steps", 200, "Steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
_GAMMA = flags.DEFINE_float("gamma", 0.2, "EC2T gamma.")


def interleaved_step_timing(model_name: str, steps: int, rounds: int, gamma: float = 0.2
                            ) -> dict[str, float]:
  """Seconds per training step, FP (Adam) vs EC2T (reference optimizer), same batch, one process.

  The two jitted steps alternate in rounds of ``steps`` steps, so slow drifts of a
  shared machine hit both alike; the median round is reported.
  """
  model = models.get_model(model_name, num_classes=10)
  spec = data.dataset_spec("mnist")
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (128, 28, 28, 1), dtype=np.uint8)),
           "label": jnp.asarray(rng.integers(0, 10, 128, dtype=np.int32))}
  runs = {}
  for name, tx, prepare in (("fp", optax.adam(1e-3), None),
                            ("ec2t", ec2t.reference_optimizer(gamma=gamma), ec2t.quantized_params)):
    state = training.TrainState.create(variables["params"], {}, tx, 0, prepare)
    # The step donates its state: give every leaf a buffer of its own (the
    # latent weights may alias the params they were made from).
    state = jax.tree.map(jnp.copy, state)
    step = jax.jit(training.make_train_step(model, tx, spec, augment=False), donate_argnums=0)
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    runs[name] = [step, state, []]
  for _ in range(rounds):
    for name, run in runs.items():
      step, state, times = run
      started = time.perf_counter()
      for _ in range(steps):
        state, _ = step(state, batch)
      jax.block_until_ready(state)
      times.append((time.perf_counter() - started) / steps)
      run[1] = state
  fp, ec2t_s = (float(np.median(runs[k][2])) for k in ("fp", "ec2t"))
  return {"fp_seconds_per_step": fp, "ec2t_seconds_per_step": ec2t_s, "ratio": ec2t_s / fp}



def main(argv: list[str]) -> None:
  del argv
  print(json.dumps(interleaved_step_timing(_MODEL.value, _STEPS.value, _ROUNDS.value,
                                           _GAMMA.value)))


if __name__ == "__main__":
  app.run(main)
