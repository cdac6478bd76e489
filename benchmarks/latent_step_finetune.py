r"""Before/after of issue 18's STTN and TTQ fix: one epoch of fine-tuning under Adam.

Fine-tunes the dense LeNet-5 of ``compare_methods.py`` (same cache) for one
epoch (469 batches of 128) with ``optax.chain(optax.adam(1e-4), method)`` for
``ec2t.sttn()`` and ``ec2t.ttq(sparsity=0.5)``, each with
``latent_step="gradient"`` (the exact-gradient map: the former default) and
``latent_step="update"`` (the new default), and prints the test accuracies.

  TFDS_DATA_DIR=/work/shared/data/tfds python benchmarks/latent_step_finetune.py \
      --workdir=runs/compare_methods
"""

from __future__ import annotations

import pathlib
import sys

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import compare_methods as cm  # pylint: disable=g-import-not-at-top,wrong-import-position
import ec2t_jax as ec2t  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_integer("steps", 469, "Fine-tuning steps (469 = one epoch of 128).")
FLAGS = flags.FLAGS

METHODS = {"sttn": lambda step, sel: ec2t.sttn(latent_step=step, selection=sel),
           "ttq r=0.5": lambda step, sel: ec2t.ttq(sparsity=0.5, latent_step=step, selection=sel)}


def main(argv):
  del argv
  workdir = pathlib.Path(FLAGS.workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  data = cm.load_mnist(FLAGS.data_dir)
  dense = cm.dense_model(workdir, data, FLAGS.dense_steps)
  print(f"dense: {100 * cm.accuracy(dense, data['test_x'], data['test_y']):.2f}%")
  selection = cm.selection_of(dense)
  for name, make in METHODS.items():
    for step in ("gradient", "update"):
      tx = optax.chain(optax.adam(1e-4), make(step, selection))
      params, _ = cm.train(dense, tx, data, FLAGS.steps, seed=0)
      acc = cm.accuracy(params, data["test_x"], data["test_y"])
      print(f"{name:10s} latent_step={step:9s} {FLAGS.steps} steps: {100 * acc:.2f}%",
            flush=True)


if __name__ == "__main__":
  app.run(main)
