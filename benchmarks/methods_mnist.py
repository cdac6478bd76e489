r"""MNIST LeNet-5: the train-time ternary methods beside EC2T, one table and one plot.

Pretrains LeNet-5 in full precision once (``<workdir>/fp``; its checkpoint
``fp/checkpoints/fp`` is the cache every row starts from), then runs every row
of :data:`ROWS` through ``examples/mnist_lenet.py``'s pipeline in this process
(``--init_from`` that checkpoint) with the same data, inner optimizer and
number of steps, and collects: test accuracy, change vs full precision,
sparsity and zeroth-order entropy of the quantized layers, the exported file
size (``model.ec2t``, ``ec2t.export``) and the training time per epoch.
Writes ``<workdir>/methods.md``, ``methods.json`` and ``front.png``
(``ec2t_jax.plots.accuracy_sparsity_front``).

  TFDS_DATA_DIR=../shared/data/tfds python benchmarks/methods_mnist.py
  python benchmarks/methods_mnist.py --rows=ec2t_g0.2,ttq_t0.05 --workdir=runs/m \
      --steps_per_epoch=50 -- --batch_size=64   # flags after -- go to every run of mnist_lenet.py

Rows resume from their checkpoints, so an interrupted benchmark continues where
it stopped. Other methods add rows with :func:`add_row`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

from absl import app
from absl import flags
from absl import logging

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO))

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/methods_mnist", "Output folder (one sub-folder per row).")
flags.DEFINE_list("rows", [], "Row names to run (default: all of ROWS).")
flags.DEFINE_integer("steps_per_epoch", 200, "Steps of 128 images per epoch of every run (the "
                     "whole train split is 430; 0: all of it).")
flags.DEFINE_integer("fp_epochs", 5, "Full-precision pretraining epochs (once).")
flags.DEFINE_integer("phase1_epochs", 2, "Phase 1 epochs of every row.")
flags.DEFINE_integer("phase2_epochs", 1, "Phase 2 epochs of every row.")


@dataclasses.dataclass(frozen=True)
class Row:
  """One model of the table.

  Attributes:
    name: unique id (also its sub-folder).
    method: ``--method`` of ``examples/mnist_lenet.py`` (``common/methods.py``).
    knob: what distinguishes it from the method's other rows (table and plot).
    flags: further flags of that run (``--method_options``, ``--gamma``...).
  """
  name: str
  method: str
  knob: str
  flags: tuple[str, ...] = ()


ROWS: list[Row] = []


def add_row(name: str, method: str, knob: str, *flag_args: str) -> None:
  """Adds a row (names must be unique)."""
  if any(r.name == name for r in ROWS):
    raise ValueError(f"row {name!r} exists")
  ROWS.append(Row(name, method, knob, tuple(flag_args)))


# The inner optimizer of every chain-form method is L2 5e-6 + Adam(1e-3); EC2T runs the
# paper's three Adams at 10x the paper's rates (1e-3 latent / 1e-3 other / 1e-4 centroids),
# so every method moves at the same rate in this short budget.
add_row("ec2t_g0", "ec2t", "gamma=0", "--gamma=0")
add_row("ec2t_g0.2", "ec2t", "gamma=0.2", "--gamma=0.2")
add_row("ec2t_g0.5", "ec2t", "gamma=0.5", "--gamma=0.5")
add_row("twn_layer", "twn", "threshold=layer", "--method_options=threshold=layer")
add_row("twn_filter", "twn", "threshold=filter", "--method_options=threshold=filter")
add_row("ttq_t0.05", "ttq", "threshold=0.05", "--method_options=threshold=0.05")
add_row("ttq_r0.5", "ttq", "sparsity=0.5", "--method_options=sparsity=0.5")
add_row("ttq_r0.8", "ttq", "sparsity=0.8", "--method_options=sparsity=0.8")
add_row("sttn", "sttn", "init_factor=0.7", "--method_options=init_factor=0.7")
add_row("faraone_s0", "faraone", "strength=0", "--method_options=strength=0")
add_row("faraone_s3", "faraone", "strength=3", "--method_options=strength=3")
add_row("faraone_s30", "faraone", "strength=30", "--method_options=strength=30")
add_row("faraone_s300", "faraone", "strength=300", "--method_options=strength=300")

COMMON_FLAGS = ("--model=lenet5", "--num_devices=1", "--noprogress", "--nodownload", "--resume",
                "--learning_rate=1e-3", "--latent_learning_rate=1e-3",
                "--centroid_learning_rate=1e-4")


def _run(workdir: pathlib.Path, *args: str) -> dict:
  import mnist_lenet  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  mnist_lenet.define_flags(fv)
  fv(["mnist_lenet", f"--workdir={workdir}", *COMMON_FLAGS, *args])
  print("$ mnist_lenet.py", f"--workdir={workdir}", *COMMON_FLAGS, *args, flush=True)
  return mnist_lenet.run(fv)


def _table(fp: dict, rows: list[tuple[Row, dict]], steps_per_epoch: int) -> str:
  epoch = f"s/epoch ({steps_per_epoch} steps)" if steps_per_epoch else "s/epoch"
  lines = [
      "| method | knob | test acc | vs FP (pts) | sparsity | bits/weight | export (bytes) "
      f"| vs fp32 export | {epoch} |",
      "|---|---|---|---|---|---|---|---|---|",
      f"| full precision | - | {100 * fp['fp_test_accuracy']:.2f}% | - | 0.0% | 32 | "
      f"{fp['fp_export_bytes']:,} | 1.000 | {fp['fp_seconds_per_epoch']:.1f} |"]
  for row, r in rows:
    if "error" in r:
      lines.append(f"| {row.method} | {row.knob} | failed: {r['error']} | | | | | | |")
      continue
    lines.append(
        f"| {row.method} | {row.knob} | {100 * r['ternary_test_accuracy']:.2f}% | "
        f"{100 * (r['ternary_test_accuracy'] - fp['fp_test_accuracy']):+.2f} | "
        f"{100 * r['sparsity']:.1f}% | {r['assignment_entropy']:.3f} | "
        f"{r['export_bytes']:,} | {r['export_bytes'] / fp['fp_export_bytes']:.3f} | "
        f"{r['seconds_per_epoch']:.1f} |")
  return "\n".join(lines)


def _assignment_entropy(report: dict) -> float:
  """Numel-weighted zeroth-order entropy of sign(value) over the quantized layers.

  Equals the value entropy for one-scale-per-layer methods; for per-filter
  scales (TWN filter, STTN) it counts the ternary assignment, not the scales.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ec2t_jax import export  # pylint: disable=g-import-not-at-top
  params = export.load(pathlib.Path(report["workdir"]) / "model.ec2t")
  flat = {"/".join(map(str, k)): v for k, v in _flatten(params)}
  bits, numel = 0.0, 0
  for layer in report["layers"]:
    sign = np.sign(flat[layer["path"]])
    _, counts = np.unique(sign, return_counts=True)
    p = counts / counts.sum()
    bits += float(-(p * np.log2(p)).sum()) * sign.size
    numel += sign.size
  return bits / numel


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, (*prefix, k))
  else:
    yield prefix, tree


def main(argv: list[str]) -> None:
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
  extra = argv[1:]
  root = pathlib.Path(FLAGS.workdir).resolve()
  root.mkdir(parents=True, exist_ok=True)
  chosen = [r for r in ROWS if not FLAGS.rows or r.name in FLAGS.rows]
  unknown = set(FLAGS.rows) - {r.name for r in ROWS}
  if unknown:
    raise app.UsageError(f"unknown rows {sorted(unknown)}; known: {[r.name for r in ROWS]}")
  started = time.perf_counter()

  # ---- full precision, once: its checkpoint is the cache every row starts from.
  extra = [f"--steps_per_epoch={FLAGS.steps_per_epoch}", *extra]
  fp = _run(root / "fp", f"--fp_epochs={FLAGS.fp_epochs}", "--phase1_epochs=0", *extra)
  fp_ckpt = root / "fp" / "checkpoints" / "fp"
  from common import checkpoint  # pylint: disable=g-import-not-at-top
  from ec2t_jax import export  # pylint: disable=g-import-not-at-top
  fp_params, _ = checkpoint.restore_variables(str(fp_ckpt))
  fp["fp_export_bytes"] = export.save(root / "fp" / "model.ec2t", fp_params).total_bytes

  results = []
  for row in chosen:
    workdir = root / row.name
    try:
      r = _run(workdir, f"--method={row.method}", f"--init_from={fp_ckpt}",
               f"--phase1_epochs={FLAGS.phase1_epochs}",
               f"--phase2_epochs={FLAGS.phase2_epochs}", *row.flags, *extra)
    except Exception as error:  # pylint: disable=broad-except
      print(f"row {row.name} failed: {error!r}", flush=True)
      results.append((row, {"error": type(error).__name__}))
      continue
    r["workdir"] = str(workdir)
    r["assignment_entropy"] = _assignment_entropy(r)
    r["seconds_per_epoch"] = r["ec2t_seconds_per_epoch"]
    results.append((row, r))
  fp["fp_seconds_per_epoch"] = fp.get("fp_seconds_per_epoch") or float("nan")

  table = _table(fp, results, FLAGS.steps_per_epoch)
  (root / "methods.md").write_text(table + "\n")
  (root / "methods.json").write_text(json.dumps(
      {"fp": fp, "rows": [{"row": dataclasses.asdict(row), **r} for row, r in results],
       "wall_seconds": time.perf_counter() - started}, indent=2, default=float))
  from ec2t_jax import plots  # pylint: disable=g-import-not-at-top
  points = [plots.FrontPoint(row.method, row.knob, r["sparsity"], r["ternary_test_accuracy"])
            for row, r in results if "error" not in r]
  plots.save_figure(plots.accuracy_sparsity_front(
      points, reference=fp["fp_test_accuracy"], title="MNIST LeNet-5: accuracy vs sparsity"),
      root / "front.png")
  print(table)
  print(f"wall time {time.perf_counter() - started:.0f} s; written to {root}")


if __name__ == "__main__":
  app.run(main)
