r"""MNIST LeNet-5: a gamma sweep's accuracy-vs-size front against training to a size budget.

Runs ``examples/mnist_lenet.py`` (chain form) once per gamma and once per size
target (``--bits_per_weight`` / ``--target_bytes``), every run starting from the
same full-precision model (the first gamma's pretraining, then ``--init_from``),
with the same training budget. Each point is (size, test accuracy) where size is
the bits/weight of the ternarized layers and the bytes of the exported file
(``ec2t.export``); a budget run is "on or above the front" when its accuracy is
at least the front's, linearly interpolated at its size. Writes
``RESULTS_budget.md``-style tables to ``<workdir>/front.md``, ``front.json``
and a PNG.

  TFDS_DATA_DIR=../shared/data/tfds python benchmarks/budget_front.py \
      --workdir=runs/budget_front -- --fp_epochs=3 --phase1_epochs=4 \
      --phase2_epochs=2 --steps_per_epoch=200     # flags after -- go to every run

Each run resumes from its checkpoints, so an interrupted benchmark continues
where it stopped (a finished run is only re-read).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from absl import app
from absl import flags
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/budget_front", "Output folder (one run per point).")
flags.DEFINE_list("gammas", ["0", "0.1", "0.2", "0.35", "0.5"], "The sweep; the first one "
                  "also pretrains the full-precision model.")
flags.DEFINE_list("budgets", ["bits_per_weight=1.0", "bits_per_weight=0.6",
                              "target_bytes=11000"],
                  "Size targets, one run each: FLAG=VALUE of mnist_lenet.py.")
flags.DEFINE_string("png", None, "Plot path (default <workdir>/front.png).")
flags.DEFINE_bool("collect_only", False, "Only read the runs' report.json (after a full run).")


def _run(name: str, args: list[str], workdir: pathlib.Path, extra: list[str],
         init_from: str | None) -> dict:
  command = [sys.executable, str(REPO / "examples" / "mnist_lenet.py"), "--model=lenet5",
             *args, f"--workdir={workdir}", "--resume", "--noprogress", *extra]
  if init_from:
    command.append(f"--init_from={init_from}")
  print("$", " ".join(command), flush=True)
  if not FLAGS.collect_only:
    subprocess.run(command, check=True, cwd=REPO)
  report = json.loads((workdir / "report.json").read_text())
  report["name"] = name
  return report


def interpolate_front(points: list[tuple[float, float]], size: float) -> float | None:
  """The front's accuracy at ``size``: linear between the sweep's points sorted by size,
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


def _row(r: dict, front_bits, front_bytes) -> str:
  acc = r["ternary_test_accuracy"]
  at_bits = interpolate_front(front_bits, r["bits_per_weight"])
  at_bytes = interpolate_front(front_bytes, r["export_bytes"])
  verdict = lambda f: "-" if f is None else f"{100 * f:.2f}% ({100 * (acc - f):+.2f})"
  budget = r.get("budget")
  target = "-" if not budget else (
      f"{budget['target']:,.0f} B" if budget["kind"] == "bytes" else
      f"{budget['target']:.3g} {budget['kind']}")
  mult = "-" if not budget else f"{budget['multiplier']:.3f}"
  return (f"| {r['name']} | {target} | {r['bits_per_weight']:.3f} | {r['export_bytes']:,} | "
          f"{100 * r['sparsity']:.1f}% | {100 * acc:.2f}% | {verdict(at_bits)} | "
          f"{verdict(at_bytes)} | {mult} |")


def _plot(sweep: list[dict], budgets: list[dict], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, label in ((axes[0], "bits_per_weight", "bits/weight of the ternarized layers"),
                         (axes[1], "export_bytes", "exported file (bytes)")):
    s = sorted(sweep, key=lambda r: r[key])
    ax.plot([r[key] for r in s], [100 * r["ternary_test_accuracy"] for r in s], "o-",
            label="gamma sweep")
    for r in s:
      ax.annotate(r["name"], (r[key], 100 * r["ternary_test_accuracy"]), fontsize=7)
    ax.plot([r[key] for r in budgets], [100 * r["ternary_test_accuracy"] for r in budgets],
            "r*", markersize=12, label="size budget (one run each)")
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle("MNIST LeNet-5: accuracy vs size, gamma sweep vs size budget")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
  extra = argv[1:]
  root = pathlib.Path(FLAGS.workdir)
  root.mkdir(parents=True, exist_ok=True)
  first = root / f"gamma_{FLAGS.gammas[0]}"
  fp = str(first / "checkpoints" / "fp")
  sweep = [_run(f"gamma {FLAGS.gammas[0]}", [f"--gamma={FLAGS.gammas[0]}"], first, extra, None)]
  for gamma in FLAGS.gammas[1:]:
    sweep.append(_run(f"gamma {gamma}", [f"--gamma={gamma}"], root / f"gamma_{gamma}", extra, fp))
  budgets = []
  for spec in FLAGS.budgets:
    name = spec.replace("=", "_")
    budgets.append(_run(spec, [f"--{spec}"], root / name, extra, fp))
  front_bits = [(r["bits_per_weight"], r["ternary_test_accuracy"]) for r in sweep]
  front_bytes = [(r["export_bytes"], r["ternary_test_accuracy"]) for r in sweep]
  header = ("| run | target | bits/weight | exported bytes | sparsity | test acc | "
            "front at its bits/weight (delta) | front at its bytes (delta) | multiplier |\n"
            "|---|---|---|---|---|---|---|---|---|")
  table = "\n".join([header] + [_row(r, front_bits, front_bytes) for r in sweep + budgets])
  png = pathlib.Path(FLAGS.png) if FLAGS.png else root / "front.png"
  _plot(sweep, budgets, png)
  (root / "front.json").write_text(json.dumps(sweep + budgets, indent=2, default=float))
  (root / "front.md").write_text(table + "\n")
  print(f"FP test accuracy {100 * sweep[0]['fp_test_accuracy']:.2f}%")
  print(table)
  print(f"plot: {png}")


if __name__ == "__main__":
  app.run(main)
