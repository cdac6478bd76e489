r"""MNIST LeNet-5: the post-training and staged methods of issue 10 beside EC2T.

Pretrains LeNet-5 in full precision once (cached as ``<workdir>/fp.ec2t``),
then makes every row of :data:`ROWS` from it and measures: test accuracy,
change vs full precision, sparsity and zeroth-order value entropy (bits per
weight) of the compressed layers (the paper's rule: conv2, fc1, fc2), the
exported file size (``ec2t.export.save``; the script checks that the file
loads back bitwise) and the method's wall time (training for the staged
methods, the post-training call for MCQ and calibrated pruning).

  TFDS_DATA_DIR=../shared/data/tfds python benchmarks/posttrain_mnist.py
  python benchmarks/posttrain_mnist.py --rows=mcq_k1,prune50_real   # some rows only

Writes ``<workdir>/<row>.json`` per row and ``<workdir>/posttrain.md`` (the
table of every row measured in that workdir so far) and ``posttrain.json``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
from typing import Callable

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

import ec2t_jax as ec2t  # pylint: disable=g-import-not-at-top,wrong-import-position
from ec2t_jax import export  # pylint: disable=g-import-not-at-top,wrong-import-position
from ec2t_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from examples.common import posttrain  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/posttrain_mnist", "Output folder.")
flags.DEFINE_list("rows", [], "Row names to run (default: all).")
flags.DEFINE_integer("fp_epochs", 3, "Full-precision pretraining epochs (once, cached).")
flags.DEFINE_integer("stage_epochs", 1, "Retraining epochs per stage of the staged methods; "
                     "EC2T trains stages x this many epochs.")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate of every training phase.")
flags.DEFINE_integer("calibration_images", 300, "Calibration images of calibrated pruning.")
flags.DEFINE_integer("seed", 0, "Seed of sampling, fractals and data order.")

MEAN, STD = 0.1307, 0.3081


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  method: str
  knob: str
  make: Callable  # (context) -> params


ROWS: list[Row] = []


def add_row(name: str, method: str, knob: str):
  def wrap(make):
    ROWS.append(Row(name, method, knob, make))
    return make
  return wrap


# ------------------------------------------------------------------ data, model


def load_mnist():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  def split(name):
    x, y = tfds.as_numpy(tfds.load("mnist", split=name, batch_size=-1, as_supervised=True,
                                   download=False))
    return ((x.astype(np.float32) / 255.0 - MEAN) / STD), y.astype(np.int32)
  return split("train[:55000]"), split("test")


MODEL = models.LeNet5()
apply_fn = jax.jit(lambda p, x: MODEL.apply({"params": p}, x))


def accuracy(params, data) -> float:
  x, y = data
  correct = 0
  for i in range(0, len(x), 2000):
    correct += int((jnp.argmax(apply_fn(params, x[i:i + 2000]), -1) == y[i:i + 2000]).sum())
  return correct / len(x)


def train(params, tx, data, epochs: int, *, extra_steps: int = 0, seed=0):
  """Trains ``epochs`` epochs (plus ``extra_steps`` steps) with ``tx``."""
  x, y = data
  opt_state = tx.init(params)
  params = ec2t.quantized_params(params, opt_state) if _has_quantizer(opt_state) else params

  @jax.jit
  def step(params, opt_state, xb, yb):
    def loss(p):
      logits = MODEL.apply({"params": p}, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  steps = len(x) // FLAGS.batch_size
  for epoch in range(epochs + (1 if extra_steps else 0)):
    order = rng.permutation(len(x))
    for i in range(steps if epoch < epochs else extra_steps):
      idx = order[i * FLAGS.batch_size:(i + 1) * FLAGS.batch_size]
      params, opt_state = step(params, opt_state, x[idx], y[idx])
  return params, opt_state


def steps_per_epoch(ctx) -> int:
  return len(ctx.train[0]) // FLAGS.batch_size


def staged(ctx, method, stages: int):
  """Trains ``stages - 1`` stages of ``stage_epochs`` epochs, then one step of the last stage.

  The method advances its stage every ``stage_epochs`` epochs by itself
  (``steps_per_stage``); the last stage freezes everything, so one step of it
  finishes the quantization.
  """
  tx = optax.chain(optax.adam(FLAGS.learning_rate), method)
  params, _ = train(ctx.fp, tx, ctx.train, (stages - 1) * FLAGS.stage_epochs, extra_steps=1,
                    seed=FLAGS.seed)
  return params


def _has_quantizer(opt_state) -> bool:
  try:
    ec2t.summary(opt_state)
    return True
  except Exception:  # pylint: disable=broad-except
    return False


# ------------------------------------------------------------------------- rows


@dataclasses.dataclass
class Context:
  fp: dict
  train: tuple
  test: tuple
  selection: ec2t.Selection


@add_row("ec2t_g0.2", "ec2t", "gamma=0.2, 3 x stage_epochs")
def _ec2t(ctx):
  tx = optax.chain(optax.adam(FLAGS.learning_rate),
                   ec2t.ternarize_transform(gamma=0.2, selection=ctx.selection))
  params, _ = train(ctx.fp, tx, ctx.train, 3 * FLAGS.stage_epochs, seed=FLAGS.seed)
  return params


def _per_stage(ctx):
  return steps_per_epoch(ctx) * FLAGS.stage_epochs


@add_row("inq_2bit", "inq", "ternary (2 bits), portions .5/.75/.875/1")
def _inq2(ctx):
  return staged(ctx, ec2t.inq(2, steps_per_stage=_per_stage(ctx), selection=ctx.selection), 4)


@add_row("inq_5bit", "inq", "5 bits, portions .5/.75/.875/1")
def _inq5(ctx):
  return staged(ctx, ec2t.inq(5, steps_per_stage=_per_stage(ctx), selection=ctx.selection), 4)


@add_row("mlq_ternary", "mlq", "ternary, portions .5/1, 3 layers staggered")
def _mlq(ctx):
  return staged(ctx, ec2t.mlq((0.5, 1.0), steps_per_stage=_per_stage(ctx),
                              selection=ctx.selection), 3 + 2 - 1)


@add_row("mcq_k1", "mcq", "samples_per_weight=1")
def _mcq_k1(ctx):
  return ec2t.mcq(ctx.fp, 1.0, key=jax.random.key(FLAGS.seed), selection=ctx.selection)


@add_row("mcq_k4", "mcq", "samples_per_weight=4")
def _mcq_k4(ctx):
  return ec2t.mcq(ctx.fp, 4.0, key=jax.random.key(FLAGS.seed), selection=ctx.selection)


def _prune(ctx, sparsity, data, **kwargs):
  return ec2t.prune_calibrated(ctx.fp, lambda p, x: MODEL.apply({"params": p}, x), data,
                               sparsity, selection=ctx.selection, **kwargs)


def _calibration(ctx, kind):
  # ctx.train images are already standardised: undo it so both kinds share one path.
  raw = ctx.train[0] * STD + MEAN if kind == "real" else None
  return posttrain.calibration_images(kind, FLAGS.calibration_images, raw, (28, 28, 1),
                                      (MEAN,), (STD,), seed=FLAGS.seed)


def _real_images(ctx):
  return _calibration(ctx, "real")


def _fractals():
  return _calibration(None, "fractal")


@add_row("prune50_real", "calibrated pruning", "50%, 300 real images")
def _prune50_real(ctx):
  return _prune(ctx, 0.5, _real_images(ctx))


@add_row("prune80_real", "calibrated pruning", "80%, 300 real images")
def _prune80_real(ctx):
  return _prune(ctx, 0.8, _real_images(ctx))


@add_row("prune80_plain", "magnitude pruning (ablation)",
         "80%, same global L2-normalised threshold, no correction or calibration")
def _prune80_plain(ctx):
  return _prune(ctx, 0.8, _real_images(ctx), ramp=0.0, steps_per_level=0,
                statistics_correction="none", bias_correction=False)


@add_row("prune50_fractal", "calibrated pruning", "50%, 300 fractals (data-free)")
def _prune50_fractal(ctx):
  return _prune(ctx, 0.5, _fractals())


@add_row("prune80_fractal", "calibrated pruning", "80%, 300 fractals (data-free)")
def _prune80_fractal(ctx):
  return _prune(ctx, 0.8, _fractals())


# ---------------------------------------------------------------------- metrics


def measure(params, ctx, path: pathlib.Path) -> dict:
  info = export.save(path, params)
  back = export.load(path)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.tobytes() != b.tobytes():
      raise AssertionError(f"{path}: export round trip is not bitwise")
  named = posttrain.selected_leaves(params, ctx.selection)
  measures = posttrain.compression_measures(named)
  paths = {p for p, _ in named}
  stored = sum(r.nbytes for r in info.records if r.path in paths)
  return {"test_accuracy": accuracy(params, ctx.test),
          "sparsity": measures["sparsity"],
          "bits_per_weight": measures["bits_per_weight"],
          "stored_bits_per_weight": 8 * stored / measures["numel"],
          "export_bytes": info.total_bytes}


def table(fp: dict, rows: list[tuple[Row, dict]]) -> str:
  lines = ["| method | knob | test acc | vs FP (pts) | sparsity | bits/weight (entropy) "
           "| bits/weight (stored) | export (bytes) | vs fp32 export | wall time (s) |",
           "|---|---|---|---|---|---|---|---|---|---|",
           f"| full precision | - | {100 * fp['test_accuracy']:.2f}% | - | 0.0% | "
           f"{fp['bits_per_weight']:.2f} | {fp['stored_bits_per_weight']:.2f} | "
           f"{fp['export_bytes']:,} | 1.000 | {fp['seconds']:.0f} |"]
  for row, r in rows:
    if "error" in r:
      lines.append(f"| {row.method} | {row.knob} | failed: {r['error']} | | | | | | | |")
      continue
    lines.append(
        f"| {row.method} | {row.knob} | {100 * r['test_accuracy']:.2f}% | "
        f"{100 * (r['test_accuracy'] - fp['test_accuracy']):+.2f} | "
        f"{100 * r['sparsity']:.1f}% | {r['bits_per_weight']:.3f} | "
        f"{r['stored_bits_per_weight']:.3f} | {r['export_bytes']:,} | "
        f"{r['export_bytes'] / fp['export_bytes']:.3f} | {r['seconds']:.2f} |")
  return "\n".join(lines)


def _full_precision(root: pathlib.Path, train_data):
  """The full-precision LeNet-5 and its training seconds (trained once, cached as fp.ec2t)."""
  fp_path, fp_meta = root / "fp.ec2t", root / "fp.json"
  if fp_path.exists() and fp_meta.exists():
    return (jax.tree.map(jnp.asarray, export.load(fp_path)),
            json.loads(fp_meta.read_text())["seconds"])
  params = MODEL.init(jax.random.key(FLAGS.seed), jnp.zeros((1, 28, 28, 1)))["params"]
  started = time.perf_counter()
  fp_params, _ = train(params, optax.adam(2e-3), train_data, FLAGS.fp_epochs, seed=FLAGS.seed)
  fp_seconds = time.perf_counter() - started
  export.save(fp_path, jax.tree.map(np.asarray, fp_params))
  fp_meta.write_text(json.dumps({"seconds": fp_seconds, "epochs": FLAGS.fp_epochs}))
  return fp_params, fp_seconds


def _measure_row(row, ctx, root: pathlib.Path) -> dict:
  started = time.perf_counter()
  try:
    params = jax.block_until_ready(row.make(ctx))
    seconds = time.perf_counter() - started
    r = measure(jax.tree.map(np.asarray, params), ctx, root / f"{row.name}.ec2t")
    r["seconds"] = seconds
  except Exception as error:  # pylint: disable=broad-except
    print(f"row {row.name} failed: {error!r}", flush=True)
    r = {"error": type(error).__name__}
  print(row.name, r, flush=True)
  (root / f"{row.name}.json").write_text(json.dumps(r, default=float))
  return r


def main(argv):
  del argv
  root = pathlib.Path(FLAGS.workdir).resolve()
  root.mkdir(parents=True, exist_ok=True)
  unknown = set(FLAGS.rows) - {r.name for r in ROWS}
  if unknown:
    raise app.UsageError(f"unknown rows {sorted(unknown)}; known: {[r.name for r in ROWS]}")
  train_data, test_data = load_mnist()
  fp_params, fp_seconds = _full_precision(root, train_data)
  order = ec2t.forward_order(lambda p, x: MODEL.apply({"params": p}, x), fp_params,
                             jnp.zeros((1, 28, 28, 1)))
  ctx = Context(fp_params, train_data, test_data, ec2t.Selection(order=tuple(order)))
  fp = measure(fp_params, ctx, root / "fp_measured.ec2t")
  fp["seconds"] = fp_seconds
  print(f"full precision: {fp}", flush=True)
  done = {row.name: _measure_row(row, ctx, root)
          for row in ROWS if not FLAGS.rows or row.name in FLAGS.rows}
  # The table holds every row measured in this workdir (earlier runs too), in ROWS order.
  for row in ROWS:
    saved = root / f"{row.name}.json"
    if row.name not in done and saved.exists():
      done[row.name] = json.loads(saved.read_text())
  results = [(row, done[row.name]) for row in ROWS if row.name in done]
  text = table(fp, results)
  (root / "posttrain.md").write_text(text + "\n")
  (root / "posttrain.json").write_text(json.dumps(
      {"fp": fp, "rows": [{"name": row.name, **r} for row, r in results]}, default=float, indent=2))
  print(text)


if __name__ == "__main__":
  app.run(main)
