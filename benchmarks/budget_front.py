r"""A gamma sweep's quality-vs-size front against training to a size budget, one run per target.

Runs an example (``--example``: ``mnist_lenet``, EC2T's chain form on LeNet-5, or
``shakespeare_gpt``, the character GPT) once per gamma and once per size target
(``--bits_per_weight`` / ``--target_bytes`` / ``--target_sparsity``), every run
starting from the same full-precision model (the first gamma's pretraining, or
``--init_from``), with the same training budget. Each point is (size, quality):
size is the bits/weight of the ternarized layers and the bytes of the exported
file (``ec2t.export``), quality the test accuracy (LeNet-5, higher is better) or
the validation loss (GPT, lower is better). A budget run is "on or above the
front" when its quality is at least the front's, linearly interpolated at its
size. Writes ``RESULTS_budget.md``-style tables to ``<workdir>/front.md``,
``front.json`` and a PNG.

  TFDS_DATA_DIR=../shared/data/tfds python benchmarks/budget_front.py \
      --workdir=runs/budget_front -- --fp_epochs=3 --phase1_epochs=4 \
      --phase2_epochs=2 --steps_per_epoch=200     # flags after -- go to every run
  # the GPT, sharing the runs of benchmarks/gpt_methods.py (fp/, ec2t_g<gamma>_s0/)
  TFDS_DATA_DIR=../shared/data/tfds python benchmarks/budget_front.py \
      --example=shakespeare_gpt --workdir=runs/gpt_methods \
      --init_from=runs/gpt_methods/fp/checkpoints/fp/latest \
      --gammas=0.05,0.1,0.15,0.2,0.35 \
      --budgets=bits_per_weight=0.85,bits_per_weight=0.6,target_bytes=160000 \
      -- --eval_every=1000

A run whose ``report.json`` exists is only re-read; any other resumes from its
checkpoints, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import NamedTuple

from absl import app
from absl import flags
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


class Example(NamedTuple):
  """How to run one example and read its quality from ``report.json``."""
  script: str
  args: tuple[str, ...]
  quality: str            # report.json key of the quantized model's quality
  fp_quality: str         # ... and of the full-precision model's
  higher_is_better: bool
  label: str              # axis label
  scale: float            # quality x scale is what the tables print
  unit: str
  gamma_dir: str          # run folders, formatted with text= / value= (gamma), name=
  budget_dir: str
  fp_checkpoint: str      # the first run's full-precision checkpoint, inside its folder


EXAMPLES = {
    "mnist_lenet": Example("mnist_lenet.py", ("--model=lenet5",), "ternary_test_accuracy",
                           "fp_test_accuracy", True, "test accuracy (%)", 100.0, "%",
                           "gamma_{text}", "{name}", "checkpoints/fp"),
    # The GPT's folders are benchmarks/gpt_methods.py's, so both share their runs.
    "shakespeare_gpt": Example("shakespeare_gpt.py", ("--sample_chars=0",), "val_loss",
                               "fp_val_loss", False, "validation loss (nats/char)", 1.0, "",
                               "ec2t_g{value:g}_s0", "budget_{name}_s0",
                               "checkpoints/fp/latest"),
}
FLAGS = flags.FLAGS
flags.DEFINE_enum("example", "mnist_lenet", list(EXAMPLES), "The example to train.")
flags.DEFINE_string("init_from", None, "Full-precision checkpoint of every run (default: the "
                    "first gamma's run pretrains it).")
flags.DEFINE_string("workdir", "runs/budget_front", "Output folder (one run per point).")
flags.DEFINE_list("gammas", ["0", "0.1", "0.2", "0.35", "0.5"], "The sweep; the first one "
                  "also pretrains the full-precision model.")
flags.DEFINE_list("budgets", ["bits_per_weight=1.0", "bits_per_weight=0.6",
                              "target_bytes=11000"],
                  "Size targets, one run each: FLAG=VALUE of mnist_lenet.py.")
flags.DEFINE_string("png", None, "Plot path (default <workdir>/front.png).")
flags.DEFINE_bool("collect_only", False, "Only read the runs' report.json (after a full run).")


def _run(example: Example, name: str, args: list[str], workdir: pathlib.Path,
         extra: list[str], init_from: str | None) -> dict:
  command = [sys.executable, str(REPO / "examples" / example.script), *example.args,
             *args, f"--workdir={workdir.resolve()}", "--noprogress", *extra]
  if (workdir / "checkpoints").is_dir():
    command.append("--resume")
  if init_from:
    command.append(f"--init_from={pathlib.Path(init_from).resolve()}")
  print("$", " ".join(command), flush=True)
  if not FLAGS.collect_only and not (workdir / "report.json").exists():
    subprocess.run(command, check=True, cwd=REPO)
  report = json.loads((workdir / "report.json").read_text())
  report["name"] = name
  report["quality"] = report[example.quality]
  return report


def interpolate_front(points: list[tuple[float, float]], size: float) -> float | None:
  """The front's quality at ``size``: linear between the sweep's points sorted by size,
  None outside their range.

  Example:
    >>> interpolate_front([(1.0, 0.98), (0.5, 0.96)], 0.75)
    0.97
  """
  pts = sorted(points)
  xs = [p[0] for p in pts]
  if not pts or size < xs[0] or size > xs[-1]:
    return None
  return float(np.interp(size, xs, [p[1] for p in pts]))


def _row(example: Example, r: dict, front_bits, front_bytes) -> str:
  quality = r["quality"]
  at_bits = interpolate_front(front_bits, r["bits_per_weight"])
  at_bytes = interpolate_front(front_bytes, r["export_bytes"])
  show = lambda v: f"{example.scale * v:.{2 if example.higher_is_better else 4}f}{example.unit}"
  verdict = lambda f: ("-" if f is None else
                       f"{show(f)} ({example.scale * (quality - f):+.{2 if example.higher_is_better else 4}f})")
  budget = r.get("budget")
  target = "-" if not budget else (
      f"{budget['target']:,.0f} B" if budget["kind"] == "bytes" else
      f"{budget['target']:.3g} {budget['kind']}")
  mult = "-" if not budget else f"{budget['multiplier']:.3f}"
  return (f"| {r['name']} | {target} | {r['bits_per_weight']:.3f} | {r['export_bytes']:,} | "
          f"{100 * r['sparsity']:.1f}% | {show(quality)} | {verdict(at_bits)} | "
          f"{verdict(at_bytes)} | {mult} |")


def _plot(example: Example, sweep: list[dict], budgets: list[dict],
          path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, label in ((axes[0], "bits_per_weight", "bits/weight of the ternarized layers"),
                         (axes[1], "export_bytes", "exported file (bytes)")):
    s = sorted(sweep, key=lambda r: r[key])
    ax.plot([r[key] for r in s], [example.scale * r["quality"] for r in s], "o-",
            label="gamma sweep")
    for r in s:
      ax.annotate(r["name"], (r[key], example.scale * r["quality"]), fontsize=7)
    ax.plot([r[key] for r in budgets], [example.scale * r["quality"] for r in budgets],
            "r*", markersize=12, label="size budget (one run each)")
    ax.set_xlabel(label)
    ax.set_ylabel(example.label)
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle(f"{FLAGS.example}: {example.label} vs size, gamma sweep vs size budget")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
  extra = argv[1:]
  example = EXAMPLES[FLAGS.example]
  root = pathlib.Path(FLAGS.workdir)
  root.mkdir(parents=True, exist_ok=True)
  gamma_dir = lambda gamma: root / example.gamma_dir.format(text=gamma, value=float(gamma))
  first = gamma_dir(FLAGS.gammas[0])
  fp = FLAGS.init_from or str(first / example.fp_checkpoint)
  sweep = [_run(example, f"gamma {FLAGS.gammas[0]}", [f"--gamma={FLAGS.gammas[0]}"], first,
                extra, FLAGS.init_from)]
  for gamma in FLAGS.gammas[1:]:
    sweep.append(_run(example, f"gamma {gamma}", [f"--gamma={gamma}"], gamma_dir(gamma),
                      extra, fp))
  budgets = []
  for spec in FLAGS.budgets:
    folder = root / example.budget_dir.format(name=spec.replace("=", "_"))
    budgets.append(_run(example, spec, [f"--{spec}"], folder, extra, fp))
  front_bits = [(r["bits_per_weight"], r["quality"]) for r in sweep]
  front_bytes = [(r["export_bytes"], r["quality"]) for r in sweep]
  quality = "test acc" if example.higher_is_better else "val loss (lower is better)"
  header = (f"| run | target | bits/weight | exported bytes | sparsity | {quality} | "
            "front at its bits/weight (delta) | front at its bytes (delta) | multiplier |\n"
            "|---|---|---|---|---|---|---|---|---|")
  table = "\n".join([header] + [_row(example, r, front_bits, front_bytes)
                                for r in sweep + budgets])
  png = pathlib.Path(FLAGS.png) if FLAGS.png else root / "front.png"
  _plot(example, sweep, budgets, png)
  (root / "front.json").write_text(json.dumps(sweep + budgets, indent=2, default=float))
  (root / "front.md").write_text(table + "\n")
  print(f"full precision: {example.label} {example.scale * sweep[0][example.fp_quality]:.4g}")
  print(table)
  print(f"plot: {png}")


if __name__ == "__main__":
  app.run(main)
