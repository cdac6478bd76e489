r"""Ternary methods on the nanoGPT-style character model: one full-precision start, every method.

Trains the full-precision GPT of ``examples/shakespeare_gpt.py`` once (cached in
``<workdir>/fp``; reused when its checkpoint is there), then runs each method
from that checkpoint with the example's default schedule (phase 1 + phase 2,
AdamW with a cosine from ``--learning_rate``), for each seed (data order of the
method's phases): EC2T at several gammas, BitNet b1.58, TWN, TTQ. Writes
validation loss, sparsity and bits/weight of the ternarized kernels, the 2-bit
packed and exported sizes to ``benchmarks/RESULTS_gpt.md`` (mean and range
over seeds) with a PNG of the loss-vs-size front::

  TFDS_DATA_DIR=../shared/data/tfds python benchmarks/gpt_methods.py \
      --workdir=runs/gpt_methods --seeds=0,1 --runs=ec2t:0.1,ec2t:0.15,ec2t:0.2,bitnet,twn,ttq

Every run is the example's own ``run`` (same flags), so ``--phase1_steps`` etc.
are passed through (``--example_flags``, space-separated).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

from absl import app
from absl import flags
from absl import logging

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/gpt_methods", "Folder of every run (fp/ is the cache).")
flags.DEFINE_string("seeds", "0,1", "Seeds of the methods' phases (comma-separated).")
flags.DEFINE_string("runs", "ec2t:0.1,ec2t:0.15,ec2t:0.2,bitnet,twn,ttq",
                    "Runs in order: a method, or ec2t:GAMMA (comma-separated).")
flags.DEFINE_bool("cached_only", False, "Only tabulate the runs that already finished.")
flags.DEFINE_string("example_flags", "", "Extra flags for every run of the example.")
flags.DEFINE_string("output", str(REPO / "benchmarks" / "RESULTS_gpt.md"), "Markdown table.")
flags.DEFINE_string("plot", str(REPO / "benchmarks" / "RESULTS_gpt_front.png"), "PNG front.")


def _run_example(args: list[str]) -> dict:
  import shakespeare_gpt  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  shakespeare_gpt.define_flags(fv)
  fv(["shakespeare_gpt", "--noprogress", "--sample_chars=0", *args])
  return shakespeare_gpt.run(fv)


def _cached(workdir: str, args: list[str]) -> dict:
  """The run's report.json if it finished, else runs it (resuming what is there)."""
  report = os.path.join(workdir, "report.json")
  if os.path.exists(report):
    with open(report, encoding="utf-8") as f:
      return json.load(f)
  resume = ["--resume"] if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
  started = time.perf_counter()
  results = _run_example([f"--workdir={workdir}", *args, *resume])
  print(f"{workdir}: {time.perf_counter() - started:.0f} s", flush=True)
  return results


def _float16_export(workdir: str) -> dict:
  """Bytes and validation loss of the run's ``model.ec2t`` re-exported with its float leaves
  (embeddings, LayerNorms, biases) as float16 (``ec2t.export.save(..., float16=True)``),
  cached in ``<workdir>/float16.json``."""
  cache = os.path.join(workdir, "float16.json")
  if os.path.exists(cache):
    with open(cache, encoding="utf-8") as f:
      return json.load(f)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import shakespeare_gpt  # pylint: disable=g-import-not-at-top
  from common import language  # pylint: disable=g-import-not-at-top
  from ec2t_jax import export  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  shakespeare_gpt.define_flags(fv)
  fv(["shakespeare_gpt"])
  data = language.load_tiny_shakespeare()
  _, apply_fn = shakespeare_gpt.build_model(fv, len(data.vocab))
  blob = export.encode(export.load(os.path.join(workdir, "model.ec2t")), float16=True)
  params = export.decode(blob)
  eval_step = jax.jit(language.make_eval_step(apply_fn))
  windows = language.eval_windows(data.val, fv.block_size)
  loss = count = 0.0
  for start in range(0, len(windows["x"]), fv.eval_batch_size):
    batch = {k: v[start:start + fv.eval_batch_size] for k, v in windows.items()}
    sums = eval_step(params, {**batch, "mask": np.ones(len(batch["x"]), np.float32)})
    loss, count = loss + float(sums["loss"]), count + float(sums["count"])
  result = {"float16_bytes": len(blob), "float16_val_loss": loss / count}
  with open(cache, "w", encoding="utf-8") as f:
    json.dump(result, f)
  return result


def _runs(seeds, runs):
  for run in runs:
    method, _, gamma = run.partition(":")
    name = f"ec2t_g{float(gamma):g}" if gamma else method
    for seed in seeds:
      args = [f"--method={method}", f"--seed={seed}"]
      if gamma:
        args.append(f"--gamma={float(gamma)}")
      yield name, seed, args


def _table(fp: dict, rows: dict[str, list[dict]], command: str) -> str:
  import numpy as np  # pylint: disable=g-import-not-at-top
  lines = ["# Ternary methods on a character-level GPT (tiny Shakespeare)", "",
           f"Command: `{command}`", "",
           f"Model {fp['model']} ({fp.get('total_params', 0):,} parameters), nanoGPT's CPU "
           "configuration; full precision trained once (2000 AdamW steps, the example's "
           "defaults), every method starts from that checkpoint and runs the example's "
           "default phases. Ternarized: every linear kernel of the blocks; embedding / tied "
           "head, position embedding, LayerNorms and biases stay float32. Validation loss in "
           "nats/char on tfds validation+test (nanoGPT's val split). Mean over seeds "
           "[min, max].", "",
           "Float16 columns: the same file with the float leaves stored as float16 "
           "(`ec2t.export.save(..., float16=True)`; the ternary kernels are unchanged) and the "
           "validation loss of that file.", "",
           "| method | seeds | val loss | sparsity | bits/weight | 2-bit packed (B) | "
           "exported (B) | exported / BitNet packed | float16 export (B) | its val loss | "
           "float16 export / BitNet packed |",
           "|---|---|---|---|---|---|---|---|---|---|---|",
           f"| full precision | 1 | {fp['fp_val_loss']:.4f} | - | 32 | - | "
           f"{fp['total_params'] * 4:,} (float32) | - | - | - | - |"]
  bitnet_packed = None
  if "bitnet" in rows:
    bitnet_packed = rows["bitnet"][0]["sizes"]["packed_bits"] / 8
  for name, runs in rows.items():
    loss = np.array([r["val_loss"] for r in runs])
    sparsity = np.array([r["sparsity"] for r in runs])
    bits = np.array([r["bits_per_weight"] for r in runs])
    exported = np.array([r["export_bytes"] for r in runs])
    packed = runs[0]["sizes"]["packed_bits"] / 8
    half = np.array([r["float16_bytes"] for r in runs])
    half_loss = np.array([r["float16_val_loss"] for r in runs])
    ratio = lambda size: f"{size / bitnet_packed:.3f}" if bitnet_packed else "-"
    lines.append(
        f"| {name} | {len(runs)} | {loss.mean():.4f} [{loss.min():.4f}, {loss.max():.4f}] | "
        f"{100 * sparsity.mean():.1f}% | {bits.mean():.3f} | {packed:,.0f} | "
        f"{exported.mean():,.0f} | {ratio(exported.mean())} | {half.mean():,.0f} | "
        f"{half_loss.mean():.4f} | {ratio(half.mean())} |")
  return "\n".join(lines) + "\n"


def _plot(fp: dict, rows: dict[str, list[dict]], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, runs in rows.items():
    ax.scatter([r["export_bytes"] / 1024 for r in runs], [r["val_loss"] for r in runs],
               label=name)
  ax.axhline(fp["fp_val_loss"], color="k", ls="--", lw=1, label="full precision")
  ax.set_xlabel("exported file (KiB)")
  ax.set_ylabel("validation loss (nats/char)")
  ax.set_title("tiny Shakespeare GPT: loss vs size")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  extra = FLAGS.example_flags.split()
  seeds = [int(s) for s in FLAGS.seeds.split(",") if s]
  runs = [r for r in FLAGS.runs.split(",") if r]
  fp_dir = os.path.join(FLAGS.workdir, "fp")
  fp = _cached(fp_dir, ["--phase1_steps=0", "--eval_every=1000",
                        *[a for a in extra if "phase" not in a]])
  init = f"--init_from={os.path.join(fp_dir, 'checkpoints', 'fp', 'latest')}"
  rows: dict[str, list[dict]] = {}
  for name, seed, args in _runs(seeds, runs):
    workdir = os.path.join(FLAGS.workdir, f"{name}_s{seed}")
    if FLAGS.cached_only and not os.path.exists(os.path.join(workdir, "report.json")):
      continue
    result = {**_cached(workdir, [init, *args, *extra]), **_float16_export(workdir)}
    rows.setdefault(name, []).append(result)
    fp.setdefault("total_params", result["total_params"])
    command = "python benchmarks/gpt_methods.py " + " ".join(
        a for a in sys.argv[1:] if not a.startswith(("--output", "--plot", "--cached_only")))
    with open(FLAGS.output, "w", encoding="utf-8") as f:  # rewritten after every run
      f.write(_table(fp, rows, command))
    print(_table(fp, rows, command), flush=True)
  _plot(fp, rows, FLAGS.plot)


if __name__ == "__main__":
  app.run(main)
